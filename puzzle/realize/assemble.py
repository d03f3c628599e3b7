"""A child = the parent with every layer's attention and FFN replaced by the chosen library variants."""

import copy
from pathlib import Path
from typing import Any, Callable

import torch

from puzzle.errors import PuzzleError
from puzzle.model import BlockConfig, PuzzleForCausalLM
from puzzle.model.checkpoint import is_stored_fused, load_config, load_puzzle, parent_names, puzzle_config_from, read_unfused
from puzzle.model.loading import SafetensorsCheckpoint, check_materialised, materialise_buffers, on_meta
from puzzle.model.surgery import replace_sublayer
from puzzle.search_space import Variant

StateFn = Callable[[Variant], dict[str, torch.Tensor]]
# The attributes of `PuzzleDecoderLayer` a sublayer is made of (as in puzzle.model.surgery).
_PARTS = {"attention": ("input_layernorm", "self_attn"), "ffn": ("post_attention_layernorm", "mlp")}


def _variants(parent_blocks: list[BlockConfig], blocks: list[BlockConfig]) -> list[Variant]:
    out = []
    for layer, (block, own) in enumerate(zip(blocks, parent_blocks)):
        out.append(Variant(layer, "attention", block.attention, block.attention == own.attention))
        out.append(Variant(layer, "ffn", block.ffn, block.ffn == own.ffn))
    return out


def assemble_child(parent: PuzzleForCausalLM, blocks: list[BlockConfig], state_fn: StateFn) -> PuzzleForCausalLM:
    """A new model (the parent is untouched): each sublayer gets `state_fn(variant)`'s weights.

    `parent` must be the all-parent model, so `Variant.is_parent` means "identical to the parent's block".
    """
    if len(blocks) != parent.config.num_hidden_layers:
        raise PuzzleError(f"the solution has {len(blocks)} layers but the parent has {parent.config.num_hidden_layers}")
    child = copy.deepcopy(parent)
    for variant in _variants(parent.config.blocks, blocks):
        if variant.is_parent:
            continue  # the deep copy already holds the parent's weights
        replace_sublayer(child, variant.layer, variant.kind, variant.config, state_fn(variant))
    return child.eval()


class StateReader:
    """An in-memory state dict behind `SafetensorsCheckpoint`'s reading interface (a GGUF parent, loaded whole)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = self.state[name]
        return tensor if dtype is None else tensor.to(dtype)

    def close(self) -> None:
        self.state = {}


def _open_parent(parent: Path) -> Any:
    if parent.suffix == ".gguf":  # dequantised whole by transformers: nothing to stream from
        return StateReader(load_puzzle(parent, dtype=None).state_dict())
    return SafetensorsCheckpoint(parent)


def stream_child(parent: str | Path, blocks: list[BlockConfig], state_fn: StateFn,
                 dtype: torch.dtype | None = None) -> PuzzleForCausalLM:
    """The child of `blocks`, built on the meta device and filled one sublayer at a time: the parent's own
    sublayers (and the embeddings, final norm and head) read from the parent's checkpoint, the others from
    `state_fn(variant)` (the library). Holds the child and one sublayer, never the parent besides (a GGUF
    parent excepted: it is dequantised whole). `dtype`: the child's (default: the parent's stored dtype).
    Equal to `assemble_child(load_puzzle(parent), blocks, state_fn)`, tensor for tensor."""
    parent_config = puzzle_config_from(load_config(parent))
    if len(blocks) != parent_config.num_hidden_layers:
        raise PuzzleError(f"the solution has {len(blocks)} layers but the parent has {parent_config.num_hidden_layers}")
    config = copy.deepcopy(parent_config)
    config.block_configs = [b.to_dict(config.hidden_size) for b in blocks]  # as replace_sublayer leaves it
    child = on_meta(lambda: PuzzleForCausalLM(config))
    source = _open_parent(Path(parent))
    try:
        stored = parent_names(source.keys(), parent_config)  # ours -> the parent's (hub names, a hybrid's slots)
        dtype = dtype or source.dtype(stored["model.embed_tokens.weight"])
        fixed = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if config.tie_word_embeddings else ["lm_head.weight"])
        _fill(child, {k: source.read(stored[k], dtype) for k in fixed})
        for variant in _variants(parent_config.blocks, blocks):
            _fill(child, _sublayer_weights(source, stored, parent_config, variant, state_fn, dtype))
    finally:
        source.close()
    if config.tie_word_embeddings:
        child.tie_weights()
    materialise_buffers(child)
    check_materialised(child, f"the child of {parent}")
    return child.eval()


def _sublayer_weights(source: Any, stored: dict[str, str], parent_config: Any, variant: Variant, state_fn: StateFn,
                      dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One sublayer's tensors under the child's names: the parent's own (read from `source`), or the library
    entry's with the parent's pre-norm where the entry has none (as `replace_sublayer` keeps it)."""
    prefix = f"model.layers.{variant.layer}."
    norm_name, module_name = _PARTS[variant.kind]
    spec = parent_config.family_descriptor.moe
    mine = (prefix + norm_name + ".", prefix + module_name + ".")
    # `stored`: ours -> the parent's names (Mixtral's block_sparse_moe.experts.{j}.w1, gpt-oss's mlp.router,
    # NemotronH's mixer.*); gpt-oss's fused experts (MXFP4-packed or not) read whole and split
    own = {k: s for k, s in stored.items() if k.startswith(mine)}
    if variant.is_parent:
        fused = [k for k in source.keys() if is_stored_fused(k) and k.startswith(mine)]
        unfused = read_unfused(source, fused, spec, dtype) if fused else {}
        return {k: source.read(s, dtype) for k, s in own.items()} | unfused
    if variant.config.no_op:
        return {}
    state = state_fn(variant)
    if not any(k.startswith(norm_name + ".") for k in state):
        norm = prefix + norm_name + ".weight"
        parent_has_norm = norm in own
        state = {**state, f"{norm_name}.weight": source.read(norm, dtype) if parent_has_norm
                 else torch.ones(parent_config.hidden_size, dtype=dtype)}
    return {prefix + k: v.to(dtype) for k, v in state.items()}


def _fill(model: PuzzleForCausalLM, state: dict[str, torch.Tensor]) -> None:
    """Assign `state`'s tensors (a part of the model's) to the meta-built model, checking every name exists."""
    unexpected = [k for k in state if k not in model.state_dict()]  # buffers too (NemotronH's score bias)
    if unexpected:
        raise PuzzleError(f"weights that do not fit the child: {unexpected[:3]}")
    model.load_state_dict(state, strict=False, assign=True)


def architecture_table(child: PuzzleForCausalLM) -> list[dict]:
    """One row per layer: the chosen variants, their widths and their parameter counts. `intermediate_size` is
    a dense SwiGLU's width (0 for linear and no-op FFNs, None for an MoE FFN, whose block is `experts` experts of
    `expert_size` neurons, `top_k` per token, and a `shared_expert_size` shared expert or None)."""
    rows = []
    for i, (layer, block) in enumerate(zip(child.model.layers, child.config.blocks)):
        def count(*modules):
            return sum(p.numel() for m in modules if m is not None for p in m.parameters())

        moe = block.ffn.moe if block.ffn.is_moe else None
        rows.append({
            "layer": i,
            "attention": block.attention.name,
            "kv_heads": block.attention.num_key_value_heads(child.config.num_attention_heads),
            "ffn": block.ffn.name,
            "intermediate_size": block.ffn.intermediate_size if block.ffn.is_swiglu else None if moe else 0,
            **({"experts": moe.num_experts, "top_k": moe.top_k, "expert_size": moe.expert_size,
                "shared_expert_size": moe.shared_expert_size} if moe else {}),
            "attention_params": count(layer.self_attn, layer.input_layernorm),
            "ffn_params": count(layer.mlp, layer.post_attention_layernorm),
        })
    return rows


def ffn_width(row: dict) -> str:
    """The FFN column of the table: a dense width, or an MoE block as "8 x 768, top-2" (+ its shared expert)."""
    if row.get("experts") is None:
        return str(row["intermediate_size"])
    shared = f" + shared {row['shared_expert_size']}" if row.get("shared_expert_size") else ""
    return f"{row['experts']} x {row['expert_size']}, top-{row['top_k']}{shared}"


def table_markdown(rows: list[dict]) -> str:
    lines = ["| layer | attention | KV heads | FFN | FFN width | attention params | FFN params |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['attention']} | {r['kv_heads']} | {r['ffn']} | {ffn_width(r)} "
            f"| {r['attention_params']:,} | {r['ffn_params']:,} |"
        )
    return "\n".join(lines) + "\n"
