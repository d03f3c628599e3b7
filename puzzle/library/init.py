"""Pruned initialisation of child sublayers from the parent's: pure functions on tensors.

States are in the `sublayer_state` form (`input_layernorm.weight`, `self_attn.q_proj.weight`, ... for
attention; `post_attention_layernorm.weight`, `mlp.gate_proj.weight`, ... for FFN). The child keeps the
parent's pre-norm; only the module behind it changes.

  attention, fewer KV heads  K and V projections (and their biases) mean-pooled over the parent heads of
                             each new group; q_proj, o_proj, their biases and Qwen3's q/k norms (one (d,)
                             weight shared by all heads) copied
  attention, linear          W_o @ W_v with each KV head copied to its query heads: the attention output
                             when every token attends only to itself (v/o biases dropped: a linear
                             sublayer has none, as in DeciLM; BLD fits the rest)
  FFN, fewer neurons         the neurons with the highest Channel Contribution (mean |X_i| * ||W_down[:, i]||
                             on calibration data, Puzzle) or Minitron activation importance
  FFN, linear                least squares from the normed FFN input to the FFN output on calibration data,
                             by `ridge_solve` (normal equations + a small ridge, Cholesky: runs on CUDA too)
  MoE FFN, fewer experts     the experts with the highest `expert_scores` (the router statistics of
                             `puzzle importance`, `layers.{i}.experts.output`, where the run has them) or, without
                             them, the largest router rows ||W_gate[j]||: a token's logit for expert j is
                             x . W_gate[j], so a small row rarely wins the top-k. Their router rows (and
                             router bias: gpt-oss) are kept with them, in the parent's order, each expert
                             with its biases; the shared expert (and its gate) is copied
  MoE FFN, narrower experts  each kept expert's neurons ranked by Channel Contribution as a dense FFN's, on
                             the calibration tokens (each expert's own |activations|, `FFNCalibration`);
                             gate/up biases go with their neurons, the down bias (D,) stays
  MoE FFN, other top-k       nothing to initialise: the router and experts are the same weights
"""

from dataclasses import dataclass

import torch

from puzzle.errors import PuzzleError
from puzzle.model.blocks import AttentionConfig, FFNConfig, MoEConfig

ATT_NORM, FFN_NORM = "input_layernorm.weight", "post_attention_layernorm.weight"
# Ridge of the linear blocks' least squares, relative to the mean diagonal of X^T X (the mean energy of
# an input channel). Small enough that a well-posed fit is lstsq's to float rounding: on SmolLM2's layers 2
# and 20 (4096 calibration tokens, cond(X) 2e3-5e3) the weights equal gelsd's to 2e-7 relative, the loss to
# 8 digits (1e-8 would move them by 2e-3). Large enough that X^T X + ridge is positive definite in float64
# when there are fewer calibration tokens than channels (rank < D); there it picks the near-minimum-norm
# fit, as gelsd did. `ridge_solve` retries with larger ridges where rounding leaves X^T X indefinite.
RIDGE = 1e-12


@dataclass
class FFNCalibration:
    """What one layer's parent FFN did on calibration tokens.

    abs_activation_sum: (I,) sum over tokens of |the input of down_proj| (silu(x W_gate^T) * (x W_up^T));
        (E, I) for an MoE FFN: each expert's, over every calibration token (so an expert the router seldom
        picks is still ranked on as many tokens as the others).
    tokens: how many tokens that sum is over.
    x: (N, D) normed FFN inputs, y: (N, D) FFN outputs, kept for the linear FFN's least squares.
    """

    abs_activation_sum: torch.Tensor
    tokens: int
    x: torch.Tensor
    y: torch.Tensor


# ----- attention -------------------------------------------------------------------------------------


def _kv_head_of_query(num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """(H,) the KV head each query head reads: query h uses KV head h // (H / K)."""
    return torch.arange(num_heads) // (num_heads // num_kv_heads)


def mean_pool_kv_heads(weight: torch.Tensor, num_heads: int, num_kv_heads: int, new_kv_heads: int) -> torch.Tensor:
    """A K or V projection (K*d, D) pooled to `new_kv_heads` heads: (K'*d, D).

    New KV head j serves query heads [j*H/K', (j+1)*H/K'); it becomes the mean of the parent KV heads those
    query heads read, weighted by how many of them read each (a plain mean when K' divides K). RoPE acts on
    each head linearly after the projection, so pooling the weights pools the rotated keys too (Qwen3's k_norm
    sits between them and is not linear: there the pool is an initialisation BLD refines). A bias (K*d,)
    pools the same way into (K'*d,).
    """
    if num_heads % new_kv_heads or num_heads % num_kv_heads:
        raise ValueError(f"{new_kv_heads} and {num_kv_heads} KV heads must both divide {num_heads} query heads")
    d = weight.shape[0] // num_kv_heads
    per_query = weight.view(num_kv_heads, d, -1)[_kv_head_of_query(num_heads, num_kv_heads)]  # (H, d, D or 1)
    pooled = per_query.view(new_kv_heads, num_heads // new_kv_heads, d, -1).mean(1)
    return pooled.reshape(new_kv_heads * d, *weight.shape[1:])


def linear_attention_weight(v_weight: torch.Tensor, o_weight: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """(D, D) map equal to attention in which each token attends only to itself: W_o @ expand(W_v).

    With softmax weight 1 on itself, query head h outputs v of its KV head, so the output is
    W_o [v_{kv(0)}; ...; v_{kv(H-1)}] = W_o E W_v, E copying each of the K heads to its H/K query heads.
    """
    d = v_weight.shape[0] // num_kv_heads
    expanded = v_weight.view(num_kv_heads, d, -1)[_kv_head_of_query(num_heads, num_kv_heads)]  # (H, d, D)
    return o_weight @ expanded.reshape(num_heads * d, -1)


def init_attention(
    parent: dict[str, torch.Tensor], variant: AttentionConfig, num_heads: int, num_kv_heads: int
) -> tuple[dict[str, torch.Tensor], str]:
    """The child's attention state from the parent's, and the name of the method used."""
    if variant.no_op:  # first: a hybrid's MLP / MoE layer has no attention (nor its norm) to start from
        return {}, "noop"
    norm = {ATT_NORM: parent[ATT_NORM].clone()}
    if variant.replace_with_linear:
        w = linear_attention_weight(parent["self_attn.v_proj.weight"], parent["self_attn.o_proj.weight"], num_heads, num_kv_heads)
        return {**norm, "self_attn.linear_attn.weight": w}, "wo_wv"
    new_kv = variant.num_key_value_heads(num_heads)
    state = {**norm}
    for key, w in parent.items():  # q/k/v/o weights and biases, q/k norms: whatever the family's attention has
        if not key.startswith("self_attn."):
            continue
        if key.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            state[key] = mean_pool_kv_heads(w, num_heads, num_kv_heads, new_kv)
        else:
            state[key] = w.clone()
    return state, "copy" if new_kv == num_kv_heads else "kv_mean_pool"


# ----- FFN -------------------------------------------------------------------------------------------


def channel_contribution(mean_abs_activation: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """(I,) Puzzle's Channel Contribution: mean |X_i| * ||W_down[:, i]||, X the down_proj input."""
    return mean_abs_activation * down_weight.norm(dim=0)


def top_channels(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` highest scores, in ascending order (the kept neurons keep their relative order)."""
    if not 0 < k <= scores.numel():
        raise ValueError(f"cannot keep {k} of {scores.numel()} neurons")
    return torch.topk(scores.float(), k).indices.sort().values


def prune_ffn(parent: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The FFN state restricted to neurons `keep`: rows of gate/up (and of their biases), columns of down (its
    bias (D,) copied), biases where the parent has them (gpt-oss's experts, Llama's `mlp_bias`); a relu2 FFN,
    NemotronH's, has no gate."""
    state = {FFN_NORM: parent[FFN_NORM].clone()}
    for part in ("gate_proj", "up_proj"):
        if (weight := parent.get(f"mlp.{part}.weight")) is not None:
            state[f"mlp.{part}.weight"] = weight[keep].clone()
        if (bias := parent.get(f"mlp.{part}.bias")) is not None:
            state[f"mlp.{part}.bias"] = bias[keep].clone()
    state["mlp.down_proj.weight"] = parent["mlp.down_proj.weight"][:, keep].clone()
    if (bias := parent.get("mlp.down_proj.bias")) is not None:
        state["mlp.down_proj.bias"] = bias.clone()
    return state


def ridge_solve(xtx: torch.Tensor, xty: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """(D, E) W minimising ||X W - Y||^2 + lam ||W||^2 from the normal equations X^T X (D, D) and X^T Y (D, E).

    lam = ridge x mean(diag X^T X). Solved in float64 by Cholesky (`torch.linalg.cholesky_ex` +
    `torch.cholesky_solve`, both on CPU and CUDA; CUDA has no gelsd). Float64 because forming X^T X squares
    the condition number (cond(X) ~ 1e3-1e4 on SmolLM2's FFN inputs). A matrix that stays indefinite
    (NaN or Inf activations) raises one line."""
    a = xtx.double()
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    scale = a.diagonal().mean().clamp_min(torch.finfo(a.dtype).tiny)
    for attempt in (ridge, ridge * 1e4, ridge * 1e8):  # larger ridges where rounding left X^T X indefinite
        factor, info = torch.linalg.cholesky_ex(a + attempt * scale * eye)
        if int(info) == 0:
            return torch.cholesky_solve(xty.double(), factor)
    raise PuzzleError("the least-squares init of a linear block failed: X^T X is not positive definite even with a "
                      "ridge (are the calibration activations finite?)")


def linear_ffn_weight(x: torch.Tensor, y: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """(D, D) weight W minimising ||x W^T - y||^2 (+ the small ridge) over calibration tokens x, y: (N, D).
    Any N works: with N < D the ridge makes the problem well posed. Float32 from bf16 / fp16 activations
    (the weight is a trained block's fp32 master copy)."""
    out_dtype = torch.promote_types(x.dtype, torch.float32)
    xd, yd = x.double(), y.double()
    solution = ridge_solve(xd.T @ xd, xd.T @ yd, ridge)  # (D, D) = W^T
    return solution.T.to(out_dtype).contiguous()


def init_ffn(
    parent: dict[str, torch.Tensor],
    variant: FFNConfig,
    calibration: FFNCalibration | None,
    neuron_scores: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], str]:
    """The child's FFN state from the parent's, and the method used.

    Neurons are ranked by `neuron_scores` (Minitron importance) when given, else by Channel Contribution
    on `calibration`. A linear FFN needs `calibration` for its least squares.
    """
    if variant.no_op:
        return {}, "noop"
    if variant.replace_with_linear:
        if calibration is None:
            raise ValueError("a linear FFN is initialised from calibration activations")
        w = linear_ffn_weight(calibration.x, calibration.y)
        return {FFN_NORM: parent[FFN_NORM].clone(), "mlp.linear_mlp.weight": w}, "lstsq"
    parent_size = parent["mlp.up_proj.weight"].shape[0]
    if variant.intermediate_size > parent_size:
        raise ValueError(f"an FFN of {variant.intermediate_size} neurons cannot be pruned from {parent_size}")
    if variant.intermediate_size == parent_size:
        return prune_ffn(parent, torch.arange(parent_size)), "copy"
    if neuron_scores is not None:
        scores, method = neuron_scores, "minitron"
    elif calibration is not None:
        mean_abs = calibration.abs_activation_sum / max(calibration.tokens, 1)
        scores, method = channel_contribution(mean_abs, parent["mlp.down_proj.weight"]), "channel_contribution"
    else:
        raise ValueError("FFN pruning needs calibration activations or neuron scores")
    if scores.shape != (parent_size,):
        raise ValueError(f"neuron scores have shape {tuple(scores.shape)}, expected ({parent_size},)")
    return prune_ffn(parent, top_channels(scores, variant.intermediate_size)), method


# ----- MoE FFN ---------------------------------------------------------------------------------------


_EXPERT_PARTS = ("gate_proj", "up_proj", "down_proj")  # a relu2 expert (NemotronH) has no gate_proj


def _expert_state(parent: dict[str, torch.Tensor], j: int) -> dict[str, torch.Tensor]:
    """Expert j's FFN as a dense FFN's state (`mlp.gate_proj.weight`, ..., and the biases where the family's
    experts have them: gpt-oss)."""
    return {f"mlp.{part}.{kind}": parent[key] for part in _EXPERT_PARTS for kind in ("weight", "bias")
            if (key := f"mlp.experts.{j}.{part}.{kind}") in parent}


def choose_experts(parent: dict[str, torch.Tensor], count: int, expert_scores: torch.Tensor | None = None) -> list[int]:
    """The `count` experts to keep, ascending: the highest `expert_scores` (E,) where given (`puzzle importance`'s
    router statistics), else the largest router rows ||W_gate[j]||."""
    router = parent["mlp.gate.weight"]  # (E, D)
    scores = router.float().norm(dim=1) if expert_scores is None else expert_scores.float()
    if scores.shape != (router.shape[0],):
        raise ValueError(f"expert scores have shape {tuple(scores.shape)}, expected ({router.shape[0]},)")
    if not 0 < count <= router.shape[0]:
        raise ValueError(f"cannot keep {count} of {router.shape[0]} experts")
    return top_channels(scores, count).tolist()


def init_moe_ffn(
    parent_state: dict[str, torch.Tensor],
    parent_moe: MoEConfig,
    child_moe: MoEConfig,
    keep: list[int] | None = None,
    expert_scores: torch.Tensor | None = None,
    calibration: FFNCalibration | None = None,
) -> tuple[dict[str, torch.Tensor], str, list[int]]:
    """The child's MoE FFN state from the parent's, the method used and the kept experts (parent indices).

    `keep`: the experts to keep (default: `choose_experts` by `expert_scores`, else router row norms); kept
    expert j' of the child is parent expert keep[j'], router row included. Narrower experts keep the neurons of
    highest Channel Contribution on `calibration` (abs_activation_sum (E, I)); the shared expert is copied.
    With every expert kept at full width the state is the parent's (any top-k: the same weights)."""
    if child_moe.shared_expert_size != parent_moe.shared_expert_size:
        raise ValueError("an MoE variant keeps the parent's shared expert")
    if child_moe.expert_size > parent_moe.expert_size:
        raise ValueError(f"experts of {child_moe.expert_size} neurons cannot be pruned from {parent_moe.expert_size}")
    if keep is None:
        keep = choose_experts(parent_state, child_moe.num_experts, expert_scores)
    keep = [int(j) for j in keep]
    if len(keep) != child_moe.num_experts or len(set(keep)) != len(keep) or not all(0 <= j < parent_moe.num_experts for j in keep):
        raise ValueError(f"keep {keep} does not name {child_moe.num_experts} distinct of the {parent_moe.num_experts} experts")
    state = {FFN_NORM: parent_state[FFN_NORM].clone()}
    # the router's rows (and its bias: gpt-oss; NemotronH's per-expert choice bias), the shared expert and its gate
    for key, w in parent_state.items():
        if key in ("mlp.gate.weight", "mlp.gate.bias", "mlp.gate.e_score_correction_bias"):
            state[key] = w[keep].clone()
        elif key.startswith(("mlp.shared_expert.", "mlp.shared_expert_gate.")):
            state[key] = w.clone()
    narrow = child_moe.expert_size < parent_moe.expert_size
    if narrow and calibration is None:
        raise ValueError("narrower experts are initialised from calibration activations")
    for new, old in enumerate(keep):
        expert = _expert_state(parent_state, old)
        if narrow:
            mean_abs = calibration.abs_activation_sum[old] / max(calibration.tokens, 1)
            neurons = top_channels(channel_contribution(mean_abs, expert["mlp.down_proj.weight"]), child_moe.expert_size)
        else:
            neurons = torch.arange(parent_moe.expert_size)
        pruned = prune_ffn({FFN_NORM: parent_state[FFN_NORM], **expert}, neurons)
        state.update({f"mlp.experts.{new}.{k.removeprefix('mlp.')}": w for k, w in pruned.items() if k != FFN_NORM})
    if keep == list(range(parent_moe.num_experts)) and not narrow:
        method = "copy"
    else:
        method = ("experts_by_importance" if expert_scores is not None else "experts_by_router_norm") + (
            "+channel_contribution" if narrow else "")
    return state, method, keep
