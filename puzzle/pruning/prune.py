"""Minitron pruning of a uniform parent into a smaller plain checkpoint of the parent's own family.

Width: every kept layer keeps the same number of units (the top ones by importance, different units
per layer): FFN neurons, KV groups and query heads per group; the residual stream keeps its top
channels everywhere. Depth: whole layers go, chosen by Block Importance, by the LM loss of dropping
each alone, or as the contiguous run of k whose removal costs the least LM loss or, with `task`
(task_depth.py), the least multiple-choice accuracy (Llama-3.1-Minitron's choice, by Winogrande).
The result is the family's own transformers class (family.py `causal_lm_class`: LlamaForCausalLM,
MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM) that plain transformers loads with no custom code;
the kept layers keep their sliding windows.

Experts (an MoE parent: Qwen2-MoE, Qwen3-MoE, Mixtral): every MoE layer keeps the same number N of its
experts, the highest-scoring by the router statistics (experts.py), with their router rows, and routes each
token to top-k of them (the parent's k capped at N unless given), as Minitron prunes a whole unit by its
importance. Dense layers of a Qwen-MoE parent stay dense; the checkpoint is the family's own MoE class.
"""

import dataclasses
import inspect
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel

from puzzle.errors import PuzzleError
from puzzle.model import FFNConfig, PuzzleForCausalLM
from puzzle.model.checkpoint import save_checkpoint, transformers_moe_state
from puzzle.outputs import marker
from puzzle.model.family import Family, window_layer_types
from puzzle.run_dir import PRUNING_FILE

from puzzle.shape import ModelShape
from .experts import ExpertCriterion, keep_experts, layer_expert_scores
from .shape import pruned_ffns, pruned_shape
from .slicing import (drop_layers_state, select_heads, slice_attention_state, slice_channels_state,
                      slice_experts_state, slice_ffn_state, top_k)

DepthMethod = Literal["block", "bi", "loss", "task"]
# PuzzleConfig fields that a plain family config must not receive.
_NOT_PLAIN = {"block_configs", "model_type", "architectures", "auto_map", "transformers_version", "_name_or_path",
              "dtype", "torch_dtype", "family"}


@dataclass(frozen=True)
class PrunePlan:
    """What to keep; None keeps the parent's size."""

    hidden_size: int | None = None
    intermediate_size: int | None = None
    heads_per_group: int | None = None
    kv_groups: int | None = None
    drop_layers: tuple[int, ...] = ()
    rescale_norms: bool = True
    experts: int | None = None  # experts kept per MoE layer (an MoE parent)
    top_k: int | None = None  # experts per token (None: the parent's, capped at `experts`)
    expert_criterion: ExpertCriterion = "output"  # which router statistic ranks the experts (experts.py)


def check_uniform(model: PuzzleForCausalLM) -> None:
    """Minitron pruning starts from a parent whose layers are all GQA + SwiGLU of the same sizes, or, for an
    MoE family, GQA of the same sizes with one MoE block in every MoE layer and the config's SwiGLU
    (`intermediate_size`) in every dense one (Qwen-MoE's `mlp_only_layers`): what the family's plain config
    can express. The family's sliding windows (on the blocks, per layer) stay with their layers: not a
    difference in width."""
    config = model.config
    blocks = config.blocks
    attentions = {b.attention.with_window(None) for b in blocks}
    ffns = {b.ffn for b in blocks}
    if config.family_descriptor.moe is not None and any(f.is_moe for f in ffns):
        uniform = (len(attentions) == 1 and blocks[0].attention.is_gqa
                   and all(f.is_moe or f.is_swiglu for f in ffns)
                   and len({f for f in ffns if f.is_moe}) == 1
                   and all(f.intermediate_size == config.intermediate_size for f in ffns if not f.is_moe))
        what = "one MoE block (and one dense SwiGLU)"
    else:
        uniform = (all(b.attention.is_gqa and b.ffn.is_swiglu for b in blocks)
                   and len({(b.attention.with_window(None), b.ffn) for b in blocks}) == 1)
        what = "SwiGLU of the same sizes"
    if not uniform:
        raise PuzzleError(f"prune needs a uniform parent (every layer GQA + {what}); this model is a heterogeneous child")


def layers_to_drop(scores: dict[str, torch.Tensor], n: int, method: DepthMethod) -> list[int]:
    """The `n` layers to remove, ascending: least Block Importance, least loss when dropped alone,
    or the contiguous run of `n` whose removal gives the lowest LM loss."""
    if n == 0:
        return []
    if method == "bi":
        bi = scores["layers.block_importance"]
        _check_n(n, bi.numel())
        return sorted(torch.sort(bi, stable=True).indices[:n].tolist())
    if method == "loss":
        if "layers.drop_loss.k1" not in scores:
            raise PuzzleError("importance has no drop-one-layer losses; rerun `puzzle importance` with --block-sizes 1")
        loss = scores["layers.drop_loss.k1"]
        _check_n(n, loss.numel())
        return sorted(torch.sort(loss, stable=True).indices[:n].tolist())
    if method == "block":
        key = f"layers.drop_loss.k{n}"
        if key not in scores:
            have = sorted(int(k.rsplit("k", 1)[1]) for k in scores if k.startswith("layers.drop_loss.k"))
            raise PuzzleError(f"importance has no scores for dropping {n} contiguous layers (has {have}); "
                              f"rerun `puzzle importance` with --block-sizes {n}")
        start = int(torch.argmin(scores[key]))
        return list(range(start, start + n))
    if method == "task":  # scored by running the model on the task, not from importance scores
        raise PuzzleError("the task depth method needs the model: puzzle.pruning.task_depth.task_layers_to_drop")
    raise PuzzleError(f"unknown depth method {method!r}; choose block, bi, loss or task")


def _check_n(n: int, layers: int) -> None:
    if not 0 <= n < layers:
        raise PuzzleError(f"cannot drop {n} of {layers} layers (at least one must stay)")


def check_expert_flags(shape: ModelShape, hidden_size: int | None = None, ffn_size: int | None = None,
                       target_params: str | None = None, experts: int | None = None, top_k: int | None = None) -> None:
    """One line for flags the parent's kind cannot take: an MoE parent is pruned by whole experts, heads
    and layers (its hidden size and FFN widths stay); a dense parent has no experts. Then the expert
    counts themselves (`pruned_moe`), all from the config alone."""
    if shape.parent_ffns is not None and (hidden_size or ffn_size or target_params):
        raise PuzzleError("an MoE parent is pruned by whole experts (--experts), heads and layers; "
                          "--hidden-size, --ffn-size and --target-params are for dense parents")
    if shape.parent_ffns is None and (experts or top_k):
        raise PuzzleError("--experts and --top-k prune an MoE parent's experts; this parent is dense")
    pruned_ffns(shape, list(range(shape.num_hidden_layers)), experts, top_k)  # N and k against every MoE layer


def _check_plan(plan: PrunePlan, shape: ModelShape) -> None:
    check_expert_flags(shape, plan.hidden_size, plan.intermediate_size, None, plan.experts, plan.top_k)
    group = shape.num_attention_heads // shape.num_key_value_heads
    checks = [
        ("hidden size", plan.hidden_size, shape.hidden_size),
        ("FFN size", plan.intermediate_size, shape.intermediate_size),
        ("query heads per KV group", plan.heads_per_group, group),
        ("KV groups", plan.kv_groups, shape.num_key_value_heads),
    ]
    for name, value, parent in checks:
        if value is not None and not 0 < value <= parent:
            raise PuzzleError(f"{name} must be between 1 and the parent's {parent}, got {value}")
    if len(set(plan.drop_layers)) != len(plan.drop_layers) or any(not 0 <= i < shape.num_hidden_layers for i in plan.drop_layers):
        raise PuzzleError(f"layers to drop must be distinct indices below {shape.num_hidden_layers}, got {list(plan.drop_layers)}")
    _check_n(len(plan.drop_layers), shape.num_hidden_layers)


def _scores(scores: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in scores:
        raise PuzzleError(f"importance scores lack {key!r}; rerun `puzzle importance` for this parent")
    return scores[key]


def _window_fields(family: Family, windows: list[int | None]) -> dict[str, Any]:
    """The kept layers' sliding windows in the family config's own fields (transformers' Mistral / Qwen2 /
    Qwen3 configs; see family.py `Family.layer_windows` for how each reads them back)."""
    window, layer_types = window_layer_types(windows)
    if family.windows == "all":
        if layer_types is not None and None in windows:
            raise PuzzleError(f"a {family.name} config windows every layer or none; these layers mix both")
        # Qwen3MoeConfig drops the window without `use_sliding_window` (Mistral's and Mixtral's have no such field)
        if "use_sliding_window" in inspect.signature(getattr(transformers, family.config_class)).parameters:
            return {"sliding_window": window, "use_sliding_window": window is not None}
        return {"sliding_window": window}
    if family.windows == "layer_types":
        if window is None:
            return {"use_sliding_window": False, "sliding_window": None}
        return {"use_sliding_window": True, "sliding_window": window, "layer_types": layer_types}
    return {}


def _moe_fields(family: Family, shape: ModelShape, cls: type) -> dict[str, Any]:
    """The pruned MoE layers' experts and top-k in the family config's own fields, and which layers are MoE
    (Qwen-MoE: `mlp_only_layers` lists the dense ones, every other layer MoE with `decoder_sparse_step` 1;
    family.py `MoESpec.is_moe_layer`). Nothing for a dense family."""
    if family.moe is None or shape.parent_ffns is None:
        return {}
    ffns = [FFNConfig.from_name(name) for name in shape.parent_ffns]
    moes = {f.moe for f in ffns if f.is_moe}
    if len(moes) != 1:
        raise PuzzleError(f"the pruned layers' MoE blocks must be one block ({len(moes)} found)")
    moe = moes.pop()
    fields = {family.moe.experts_field: moe.num_experts, "num_experts_per_tok": moe.top_k}
    if family.moe.sparse == "qwen":
        fields.update(decoder_sparse_step=1, mlp_only_layers=[i for i, f in enumerate(ffns) if not f.is_moe])
    elif not all(f.is_moe for f in ffns):
        raise PuzzleError(f"a {family.name} config has an MoE FFN in every layer; these layers mix MoE and dense")
    aliases = getattr(cls, "attribute_map", {})  # transformers 5's Qwen3MoeConfig stores num_experts as num_local_experts
    return {aliases.get(key, key): value for key, value in fields.items()}


def pruned_config(parent: Any, shape: ModelShape, eps_scale: float = 1.0,
                  kept_layers: list[int] | None = None) -> PretrainedConfig:
    """The plain config of the parent's family (transformers' own class) for the pruned `shape`;
    `kept_layers` (parent indices, default all) carry their sliding windows over."""
    family = parent.family_descriptor
    cls = getattr(transformers, family.config_class)
    data = {k: v for k, v in parent.to_dict().items() if k not in _NOT_PLAIN}
    if dataclasses.is_dataclass(cls):  # transformers 5: only the class's own fields (no stray Llama ones)
        data = {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}}
    kept = range(parent.num_hidden_layers) if kept_layers is None else kept_layers
    data.update(
        num_hidden_layers=shape.num_hidden_layers,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        # explicit: hidden / heads no longer gives it once either is pruned (Qwen2's attention reads it too)
        head_dim=shape.head_dim,
        rms_norm_eps=parent.rms_norm_eps * eps_scale,
        **_window_fields(family, [parent.layer_window(i) for i in kept]),
        **_moe_fields(family, shape, cls),
    )
    config = cls(**data)
    config.architectures = [family.causal_lm_class]
    return config


@torch.no_grad()
def prune_model(
    model: PuzzleForCausalLM, scores: dict[str, torch.Tensor], plan: PrunePlan
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The pruned plain model of the parent's family and a record of what was kept (layers, channels, shapes)."""
    check_uniform(model)
    parent = ModelShape.from_config(model.config)
    _check_plan(plan, parent)
    group = parent.num_attention_heads // parent.num_key_value_heads
    heads_per_group = plan.heads_per_group or group
    kv_groups = plan.kv_groups or parent.num_key_value_heads
    keep = [i for i in range(parent.num_hidden_layers) if i not in set(plan.drop_layers)]
    shape = pruned_shape(parent, plan.hidden_size, plan.intermediate_size, heads_per_group, kv_groups, keep,
                         plan.experts, plan.top_k)
    kept_experts = {}
    if shape.hidden_size % shape.num_attention_heads:
        raise PuzzleError(f"hidden size {shape.hidden_size} is not a multiple of the {shape.num_attention_heads} query heads kept; "
                          "transformers' config classes require it (pick a multiple or prune heads)")
    state = {k: v for k, v in model.state_dict().items() if "rotary_emb" not in k}
    state = drop_layers_state(state, keep)
    for new, old in enumerate(keep):
        prefix = f"model.layers.{new}."
        layer = {k: v for k, v in state.items() if k.startswith(prefix)}
        if (heads_per_group, kv_groups) != (group, parent.num_key_value_heads):
            groups, heads = select_heads(_scores(scores, f"layers.{old}.heads"), parent.num_key_value_heads, kv_groups,
                                         heads_per_group, _scores(scores, f"layers.{old}.kv_groups"))
            layer = slice_attention_state(layer, heads, groups, parent.head_dim)
        if shape.intermediate_size != parent.intermediate_size:
            layer = slice_ffn_state(layer, top_k(_scores(scores, f"layers.{old}.neurons"), shape.intermediate_size))
        experts = _layer_experts(model, scores, old, plan)
        if experts is not None:
            kept_experts[old] = experts.tolist()
            layer = slice_experts_state(layer, experts)
        for key in [k for k in state if k.startswith(prefix)]:  # the layer's dropped experts go too
            del state[key]
        state.update(layer)
    channels = None
    eps_scale = 1.0
    if shape.hidden_size != parent.hidden_size:
        channels = top_k(_scores(scores, "channels"), shape.hidden_size)
        state = slice_channels_state(state, channels, parent.hidden_size, plan.rescale_norms)
        if plan.rescale_norms:
            eps_scale = parent.hidden_size / shape.hidden_size
    config = pruned_config(model.config, shape, eps_scale, keep)
    if ModelShape.from_config(config).parent_ffns != shape.parent_ffns:  # the config reads back as planned
        raise RuntimeError(f"pruned config's FFNs {ModelShape.from_config(config).parent_ffns} != {shape.parent_ffns}")
    dtype = next(model.parameters()).dtype
    pruned = getattr(transformers, model.config.family_descriptor.causal_lm_class)(config).to(dtype)
    if shape.parent_ffns is not None:  # one SwiGLU per expert -> this transformers class's (fused) layout
        state = transformers_moe_state(state, set(pruned.state_dict()))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = pruned.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise PuzzleError(f"pruned weights do not fit the pruned config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        pruned.tie_weights()
    record = {
        "parent_shape": asdict(parent),
        "shape": asdict(shape),
        "plan": {**asdict(plan), "drop_layers": list(plan.drop_layers)},
        "kept_layers": keep,
        "dropped_layers": sorted(plan.drop_layers),
        "channels": channels.tolist() if channels is not None else None,
        # MoE: each pruned layer's kept experts (parent indices, by parent layer); None when all are kept
        "experts": {str(i): e for i, e in kept_experts.items()} or None,
        "expert_criterion": plan.expert_criterion if kept_experts else None,
        "params": {"total": shape.total_params(), "non_embedding": shape.non_embedding_params()},
        "parent_params": {"total": parent.total_params(), "non_embedding": parent.non_embedding_params()},
    }
    return pruned.eval(), record


def _layer_experts(model: PuzzleForCausalLM, scores: dict[str, torch.Tensor], layer: int,
                   plan: PrunePlan) -> torch.Tensor | None:
    """The experts parent layer `layer` keeps (ascending), None where it is dense or keeps all of them."""
    ffn = model.config.blocks[layer].ffn
    if not ffn.is_moe or plan.experts in (None, ffn.moe.num_experts):
        return None
    return keep_experts(layer_expert_scores(scores, layer, plan.expert_criterion), plan.experts)


def save_pruned(model: PreTrainedModel, out: str | Path, tokenizer: Any = None, record: dict | None = None) -> Path:
    """Write a plain checkpoint of the family (safetensors, config.json, tokenizer, pruning.json) atomically,
    marked as `puzzle prune`'s output (puzzle.outputs)."""
    extra = {**marker("prune"), **({PRUNING_FILE: record} if record is not None else {})}
    return save_checkpoint(model, out, tokenizer, extra_json=extra)
