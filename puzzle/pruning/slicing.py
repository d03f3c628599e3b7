"""Keeping a subset of units: small pure functions on weight tensors and state dicts.

Conventions (nn.Linear weights are (out, in)):
  FFN       gate_proj / up_proj (F, D): rows are neurons, and so are their biases (gpt-oss's experts);
            down_proj (D, F): columns are neurons.
  attention q_proj (H*d, D), k_proj / v_proj (K*d, D): rows are heads / KV groups, d rows each, and so
            are their biases (Qwen2's q/k/v, Llama's with attention_bias); o_proj (D, H*d): columns are
            heads. Query head h reads KV head h // (H / K). Qwen3's q_norm / k_norm (d,) are one weight
            over head_dim shared by all heads (transformers `Qwen3Attention`): every kept head keeps it.
            gpt-oss's sinks (H,) are one logit per query head: kept with their heads.
  experts   an MoE FFN (modeling_puzzle.py `MoEFFN`): router `mlp.gate.weight` (E, D), rows are experts;
            expert j's SwiGLU under `mlp.experts.{j}.`; a shared expert (`mlp.shared_expert.`, its gate
            `mlp.shared_expert_gate.weight`) is every token's and stays.
  channels  every weight that touches the residual stream: embeddings and lm_head (V, D) columns,
            q/k/v/gate/up columns, o_proj/down_proj rows and biases, RMSNorm weights over the hidden
            size (not the per-head q/k norms), linear sublayers both ways.

State-dict functions match keys by suffix, so they work on a whole model's state dict
(`model.layers.3.mlp.gate_proj.weight`) and on a sublayer state (`mlp.gate_proj.weight`, as in
`puzzle.model.surgery.sublayer_state`) alike; keys they do not concern pass through unchanged.
Index tensors are kept in the order given (pass them sorted to keep the parent's order).
"""

import math
import re

import torch

_FFN_ROWS = ("gate_proj.weight", "up_proj.weight", "gate_proj.bias", "up_proj.bias")
_FFN_COLS = ("down_proj.weight",)
_CHANNEL_COLS = ("embed_tokens.weight", "lm_head.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight",
                 "gate_proj.weight", "up_proj.weight")
_CHANNEL_ROWS = ("o_proj.weight", "down_proj.weight", "o_proj.bias", "down_proj.bias")
_CHANNEL_BOTH = ("linear_attn.weight", "linear_mlp.weight")
_NORMS = ("layernorm.weight", "norm.weight")
_HEAD_NORMS = ("q_norm.weight", "k_norm.weight")  # over head_dim, not the residual stream


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` highest scores, in ascending index order (ties: the lower index wins)."""
    if not 0 < k <= scores.numel():
        raise ValueError(f"cannot keep {k} of {scores.numel()} units")
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k].sort().values


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of a (n_heads*head_dim, ...) projection for the given heads (each a block of head_dim)."""
    heads = torch.as_tensor(heads, dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def keep_rows(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return w.index_select(0, torch.as_tensor(idx, dtype=torch.long, device=w.device)).contiguous()


def keep_cols(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return w.index_select(-1, torch.as_tensor(idx, dtype=torch.long, device=w.device)).contiguous()


def select_heads(
    head_scores: torch.Tensor,  # (H,)
    n_kv_heads: int,
    kv_groups: int,
    heads_per_group: int,
    group_scores: torch.Tensor | None = None,  # (K,); default: the sum of each group's head scores
) -> tuple[torch.Tensor, torch.Tensor]:
    """The KV groups to keep (top `kv_groups` by score) and, inside each, its top `heads_per_group`
    query heads. Returns (groups (kv_groups,), heads (kv_groups*heads_per_group,)), heads listed group
    by group so that new head j reads new KV head j // heads_per_group."""
    H = head_scores.numel()
    if H % n_kv_heads:
        raise ValueError(f"{n_kv_heads} KV heads do not divide {H} query heads")
    group_size = H // n_kv_heads
    if not 0 < heads_per_group <= group_size:
        raise ValueError(f"heads per group must be in 1..{group_size}, got {heads_per_group}")
    per_group = head_scores.reshape(n_kv_heads, group_size)
    if group_scores is None:
        group_scores = per_group.sum(-1)
    groups = top_k(group_scores, kv_groups)
    heads = torch.cat([g * group_size + top_k(per_group[g], heads_per_group) for g in groups.tolist()])
    return groups, heads


def slice_ffn_state(state: dict[str, torch.Tensor], neurons: torch.Tensor) -> dict[str, torch.Tensor]:
    """`state` with every SwiGLU in it cut down to `neurons` (other keys unchanged)."""
    out = {}
    for key, w in state.items():
        if key.endswith(_FFN_ROWS):
            w = keep_rows(w, neurons)
        elif key.endswith(_FFN_COLS):
            w = keep_cols(w, neurons)
        out[key] = w
    return out


def slice_attention_state(
    state: dict[str, torch.Tensor], heads: torch.Tensor, groups: torch.Tensor, head_dim: int
) -> dict[str, torch.Tensor]:
    """`state` with every GQA attention in it cut down to query `heads` and KV `groups`."""
    q_rows, kv_rows = head_rows(heads, head_dim), head_rows(groups, head_dim)
    out = {}
    for key, w in state.items():
        if key.endswith(("q_proj.weight", "q_proj.bias")):
            w = keep_rows(w, q_rows)
        elif key.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            w = keep_rows(w, kv_rows)
        elif key.endswith("o_proj.weight"):
            w = keep_cols(w, q_rows)
        elif key.endswith("self_attn.sinks"):
            w = keep_rows(w, heads)
        out[key] = w
    return out


_ROUTER = re.compile(r"(.*\.)?mlp\.gate\.weight")
_EXPERT = re.compile(r"(.*\.)?mlp\.experts\.(\d+)\.(.*)")


def slice_experts_state(state: dict[str, torch.Tensor], experts: torch.Tensor) -> dict[str, torch.Tensor]:
    """`state` with every MoE FFN in it cut down to `experts` (ascending parent indices): their router rows,
    and their SwiGLUs renumbered 0..n-1 in that order; every other key unchanged."""
    keep = {int(j): new for new, j in enumerate(torch.as_tensor(experts).tolist())}
    out = {}
    for key, w in state.items():
        if _ROUTER.fullmatch(key):
            w = keep_rows(w, torch.as_tensor(list(keep)))
        elif m := _EXPERT.fullmatch(key):
            if int(m.group(2)) not in keep:
                continue
            key = f"{m.group(1) or ''}mlp.experts.{keep[int(m.group(2))]}.{m.group(3)}"
        out[key] = w
    return out


def norm_rescale(hidden_size: int, kept: int) -> float:
    """Factor that keeps RMSNorm outputs unchanged when `hidden_size - kept` all-zero channels are dropped.

    RMSNorm divides by sqrt(sum(x^2)/D + eps). With the dropped channels zero, sum(x^2) is the same over
    the kept D' channels, and multiplying the norm weights by sqrt(D/D') and eps by D/D' gives exactly
    the old output: x / sqrt((D/D')(sum/D + eps)) * w * sqrt(D/D'). For low-importance (small but
    non-zero) channels it restores the scale the smaller mean would otherwise inflate.
    """
    return math.sqrt(hidden_size / kept)


def slice_channels_state(
    state: dict[str, torch.Tensor], channels: torch.Tensor, hidden_size: int, rescale_norms: bool = True
) -> dict[str, torch.Tensor]:
    """`state` with the residual stream cut down to `channels` everywhere it appears.

    With `rescale_norms`, RMSNorm weights are multiplied by `norm_rescale` (set the config's eps to
    eps * hidden_size / len(channels) to match)."""
    scale = norm_rescale(hidden_size, len(channels)) if rescale_norms else 1.0
    out = {}
    for key, w in state.items():
        if key.endswith(_CHANNEL_BOTH):
            w = keep_cols(keep_rows(w, channels), channels)
        elif key.endswith(_CHANNEL_COLS):
            w = keep_cols(w, channels)
        elif key.endswith(_CHANNEL_ROWS):
            w = keep_rows(w, channels)
        elif key.endswith(_NORMS) and not key.endswith(_HEAD_NORMS) and w.ndim == 1 and w.numel() == hidden_size:
            w = keep_rows(w, channels) * scale
        out[key] = w
    return out


def drop_layers_state(state: dict[str, torch.Tensor], keep: list[int], prefix: str = "model.layers.") -> dict[str, torch.Tensor]:
    """`state` with only the layers in `keep` (ascending), renumbered 0..len(keep)-1."""
    new_index = {old: new for new, old in enumerate(keep)}
    out = {}
    for key, w in state.items():
        if key.startswith(prefix):
            old, rest = key[len(prefix):].split(".", 1)
            if int(old) not in new_index:
                continue
            key = f"{prefix}{new_index[int(old)]}.{rest}"
        out[key] = w
    return out
