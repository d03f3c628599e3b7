"""Minitron pruning of a hybrid parent (NemotronH: one mixer per layer, a Mamba2, an attention, a relu2 MLP or
an MoE) into a plain NemotronH checkpoint that transformers' own `NemotronHForCausalLM` loads.

Depth: a NemotronH layer is one residual block (transformers `NemotronHBlock`: norm, mixer, residual), so
dropping layers drops whole Mamba2 / attention / MLP / MoE blocks, chosen as for a dense parent
(prune.py `layers_to_drop`: block, bi, loss; task_depth.py: task); the kept layers keep their kinds, in order,
in the config's `layers_block_type`.
Width, where `puzzle importance` scores the units (importance.py, the same hooks as a dense parent's):
  attention layers  KV groups and query heads per group (`layers.{i}.kv_groups` / `heads`), every attention
                    layer the same (the config has one num_attention_heads / num_key_value_heads)
  MLP layers        relu2 neurons (`layers.{i}.neurons`): up_proj rows, down_proj columns
  MoE layers        experts (`--experts`: router rows and score-correction biases kept with them) and their
                    width (`--expert-size`: each expert its own top neurons by `layers.{i}.experts.neurons`)
Grouped routing (n_group > 1; transformers `NemotronHTopkRouter`: the E experts in n_group contiguous groups
of E / n_group) keeps the same number of experts in each group, the best of each by the router statistic:
a kept expert stays in its group, so the group choice is the parent's rule over the kept experts.
Mamba2 mixers are kept whole: their heads share B / C groups and one gated norm per group (transformers
`NemotronHMamba2Mixer`), and importance does not score them. Refused in one line: --hidden-size (the
residual stream's channels), --target-params (its shape search assumes uniform layers).
"""

from dataclasses import asdict, dataclass
from typing import Any

import torch
import transformers

from puzzle.errors import PuzzleError
from puzzle.model import PuzzleForCausalLM
from puzzle.export.nemotron_h_puzzle import block_type  # the one mixer of a NemotronH layer
from puzzle.model.checkpoint import layer_slots, nemotron_h_class_state, puzzle_config_from
from puzzle.shape import ModelShape

from .experts import layer_expert_scores
from .slicing import drop_layers_state, keep_cols, keep_rows, select_heads, slice_attention_state, top_k

# `layers_block_type` values of transformers 5's NemotronHConfig (`validate_layer_type`), by mixer
_BLOCK_TYPE = {"mamba": "linear_attention", "attention": "full_attention", "mlp": "mlp", "moe": "moe"}


@dataclass(frozen=True)
class HybridPlan:
    """What a hybrid parent keeps; None keeps the parent's size."""

    drop_layers: tuple[int, ...] = ()
    ffn_size: int | None = None  # relu2 neurons of every MLP layer
    heads_per_group: int | None = None
    kv_groups: int | None = None
    experts: int | None = None  # experts of every MoE layer
    top_k: int | None = None  # experts per token (None: the parent's, capped at `experts`)
    expert_size: int | None = None  # neurons of every routed expert
    expert_criterion: str = "output"


def check_hybrid_flags(hidden_size: int | None, target_params: str | None, expert_size: int | None,
                       hybrid: bool) -> None:
    """One line for flags a hybrid parent cannot take, and for --expert-size on any other parent."""
    if hybrid and hidden_size:
        raise PuzzleError("--hidden-size on a hybrid (NemotronH) parent is not supported: prune its layers, heads, "
                          "MLP neurons and experts (--drop-layers, --kv-groups/--heads-per-group, --ffn-size, "
                          "--experts, --expert-size)")
    if hybrid and target_params:
        raise PuzzleError("--target-params picks a uniform shape; a hybrid (NemotronH) parent's layers differ: "
                          "give --drop-layers and the widths instead")
    if not hybrid and expert_size:
        raise PuzzleError("--expert-size prunes a hybrid (NemotronH) parent's expert width; not this parent")


def _scores(scores: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in scores:
        raise PuzzleError(f"importance scores lack {key!r}; rerun `puzzle importance` for this parent")
    return scores[key]


def _check(plan: HybridPlan, config: Any, kinds: list[str]) -> None:
    n = len(kinds)
    if len(set(plan.drop_layers)) != len(plan.drop_layers) or any(not 0 <= i < n for i in plan.drop_layers):
        raise PuzzleError(f"layers to drop must be distinct indices below {n}, got {list(plan.drop_layers)}")
    if len(plan.drop_layers) >= n:
        raise PuzzleError(f"cannot drop {len(plan.drop_layers)} of {n} layers (at least one must stay)")
    group = config.num_attention_heads // config.num_key_value_heads
    checks = [("query heads per KV group", plan.heads_per_group, group, "attention"),
              ("KV groups", plan.kv_groups, config.num_key_value_heads, "attention"),
              ("FFN size", plan.ffn_size, config.intermediate_size, "mlp"),
              ("experts", plan.experts, config.n_routed_experts, "moe"),
              ("expert size", plan.expert_size, config.moe_intermediate_size, "moe")]
    for name, value, parent, kind in checks:
        if value is None:
            continue
        if kind not in kinds:
            raise PuzzleError(f"{name}: this hybrid parent has no {kind} layer")
        if not 0 < value <= parent:
            raise PuzzleError(f"{name} must be between 1 and the parent's {parent}, got {value}")
    experts = plan.experts or config.n_routed_experts
    n_group = config.n_group or 1
    if experts % n_group or (n_group > 1 and experts // n_group < 2):
        raise PuzzleError(f"--experts {experts}: grouped routing needs the experts in {n_group} groups of two or "
                          f"more (a multiple of {n_group}, at least {2 * n_group})")
    k = plan.top_k or min(config.num_experts_per_tok, experts)
    if not 0 < k <= experts:
        raise PuzzleError(f"--top-k must be between 1 and the {experts} experts kept, got {k}")


def kept_experts(scores: torch.Tensor, n: int, n_group: int) -> torch.Tensor:
    """The `n` experts an MoE layer keeps (ascending): the best n / n_group of each of the n_group contiguous
    routing groups (scores (E,); ties: the lower index), so every kept expert stays in its group."""
    size = scores.numel() // n_group
    return torch.cat([g * size + top_k(scores[g * size:(g + 1) * size], n // n_group) for g in range(n_group)])


def _slice_moe(layer: dict[str, torch.Tensor], prefix: str, experts: torch.Tensor | None,
               neurons: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """An MoE layer's state (puzzle names, `{prefix}mlp.`) cut to `experts` (router rows and score-correction
    biases with them, renumbered in order) and each kept expert to its own `neurons[j]` (new index j)."""
    if experts is not None:
        rows = experts.tolist()
        out = {}
        for key, w in layer.items():
            if key in (f"{prefix}mlp.gate.weight", f"{prefix}mlp.gate.e_score_correction_bias"):
                w = keep_rows(w, experts)
            elif key.startswith(f"{prefix}mlp.experts."):
                j, rest = key[len(f"{prefix}mlp.experts."):].split(".", 1)
                if int(j) not in rows:
                    continue
                key = f"{prefix}mlp.experts.{rows.index(int(j))}.{rest}"
            out[key] = w
        layer = out
    if neurons is not None:
        for j, idx in enumerate(neurons):
            e = f"{prefix}mlp.experts.{j}."
            layer[e + "up_proj.weight"] = keep_rows(layer[e + "up_proj.weight"], idx)
            layer[e + "down_proj.weight"] = keep_cols(layer[e + "down_proj.weight"], idx)
    return layer


def nemotron_h_config(parent: Any, kinds: list[str], **sizes: Any) -> Any:
    """transformers' NemotronHConfig of the parent's puzzle config (a NemotronH parent's or a converted one's)
    with `kinds` as its layers and the given sizes."""
    import dataclasses

    cls = transformers.NemotronHConfig
    data = parent.to_dict()
    if dataclasses.is_dataclass(cls):
        data = {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}}
    for key in ("num_hidden_layers", "architectures", "model_type", "dtype", "torch_dtype", "transformers_version"):
        data.pop(key, None)
    data.update(layers_block_type=[_BLOCK_TYPE[k] for k in kinds], layer_norm_epsilon=parent.rms_norm_eps, **sizes)
    config = cls(**data)
    config.architectures = ["NemotronHForCausalLM"]
    return config


@torch.no_grad()
def prune_hybrid(model: PuzzleForCausalLM, scores: dict[str, torch.Tensor], plan: HybridPlan) -> tuple[Any, dict]:
    """The pruned NemotronHForCausalLM and a record of what was kept."""
    parent = model.config
    kinds = [block_type(b) for b in parent.blocks]
    _check(plan, parent, kinds)
    keep = [i for i in range(len(kinds)) if i not in set(plan.drop_layers)]
    group = parent.num_attention_heads // parent.num_key_value_heads
    hpg, kv = plan.heads_per_group or group, plan.kv_groups or parent.num_key_value_heads
    n_experts = plan.experts or parent.n_routed_experts
    n_group = parent.n_group or 1
    sizes = dict(num_attention_heads=hpg * kv, num_key_value_heads=kv, head_dim=parent.head_dim,
                 intermediate_size=plan.ffn_size or parent.intermediate_size, n_routed_experts=n_experts,
                 num_experts_per_tok=plan.top_k or min(parent.num_experts_per_tok, n_experts),
                 moe_intermediate_size=plan.expert_size or parent.moe_intermediate_size)
    if puzzle_config_from(nemotron_h_config(parent, kinds)).blocks != parent.blocks:
        raise PuzzleError("prune needs a uniform hybrid parent (every layer of a kind the same, as its NemotronH "
                          "config describes them); this model is a heterogeneous child")
    config = nemotron_h_config(parent, [kinds[i] for i in keep], **sizes)
    state = drop_layers_state({k: v for k, v in model.state_dict().items() if "rotary_emb" not in k}, keep)
    record_experts, record_neurons = {}, {}
    for new, old in enumerate(keep):
        prefix = f"model.layers.{new}."
        layer = {k: v for k, v in state.items() if k.startswith(prefix)}
        kind = kinds[old]
        if kind == "attention" and (hpg, kv) != (group, parent.num_key_value_heads):
            groups, heads = select_heads(_scores(scores, f"layers.{old}.heads"), parent.num_key_value_heads, kv, hpg,
                                         _scores(scores, f"layers.{old}.kv_groups"))
            layer = slice_attention_state(layer, heads, groups, parent.head_dim)
        elif kind == "mlp" and sizes["intermediate_size"] != parent.intermediate_size:
            idx = top_k(_scores(scores, f"layers.{old}.neurons"), sizes["intermediate_size"])
            layer[prefix + "mlp.up_proj.weight"] = keep_rows(layer[prefix + "mlp.up_proj.weight"], idx)
            layer[prefix + "mlp.down_proj.weight"] = keep_cols(layer[prefix + "mlp.down_proj.weight"], idx)
        elif kind == "moe":
            experts = None
            if n_experts != parent.n_routed_experts:
                experts = kept_experts(layer_expert_scores(scores, old, plan.expert_criterion), n_experts, n_group)
                record_experts[str(old)] = experts.tolist()
            neurons = None
            if sizes["moe_intermediate_size"] != parent.moe_intermediate_size:
                per_expert = _scores(scores, f"layers.{old}.experts.neurons")  # (E, I)
                rows = experts.tolist() if experts is not None else range(parent.n_routed_experts)
                neurons = [top_k(per_expert[j], sizes["moe_intermediate_size"]) for j in rows]
                record_neurons[str(old)] = [n.tolist() for n in neurons]
            layer = _slice_moe(layer, prefix, experts, neurons)
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        state.update(layer)
    child = puzzle_config_from(config)  # the config reads back as the planned blocks
    dtype = next(model.parameters()).dtype
    pruned = transformers.NemotronHForCausalLM(config).to(dtype)
    state = nemotron_h_class_state(state, set(pruned.state_dict()), layer_slots(child))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = pruned.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"pruned weights do not fit the pruned config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        pruned.tie_weights()
    parent_shape, shape = ModelShape.from_config(parent), ModelShape.from_config(child)
    record = {
        "plan": {**asdict(plan), "drop_layers": list(plan.drop_layers)},
        "layer_kinds": [kinds[i] for i in keep],
        "parent_layer_kinds": kinds,
        "kept_layers": keep,
        "dropped_layers": sorted(plan.drop_layers),
        "channels": None,
        "experts": record_experts or None,  # each pruned MoE layer's kept experts (parent indices, by parent layer)
        "expert_neurons": record_neurons or None,  # each kept expert's neurons, in the layer's new expert order
        "expert_criterion": plan.expert_criterion if record_experts else None,
        "params": {"total": shape.total_params(), "non_embedding": shape.non_embedding_params()},
        "parent_params": {"total": parent_shape.total_params(), "non_embedding": parent_shape.non_embedding_params()},
    }
    return pruned.eval(), record
