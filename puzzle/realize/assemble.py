"""A child = the parent with every layer's attention and FFN replaced by the chosen library variants."""

import copy
from typing import Callable

import torch

from puzzle.model import BlockConfig, PuzzleForCausalLM
from puzzle.model.surgery import replace_sublayer
from puzzle.search_space import Variant

StateFn = Callable[[Variant], dict[str, torch.Tensor]]


def _variants(parent: PuzzleForCausalLM, blocks: list[BlockConfig]) -> list[Variant]:
    parent_blocks = parent.config.blocks
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
        from puzzle.errors import PuzzleError

        raise PuzzleError(f"the solution has {len(blocks)} layers but the parent has {parent.config.num_hidden_layers}")
    child = copy.deepcopy(parent)
    for variant in _variants(parent, blocks):
        if variant.is_parent:
            continue  # the deep copy already holds the parent's weights
        replace_sublayer(child, variant.layer, variant.kind, variant.config, state_fn(variant))
    return child.eval()


def architecture_table(child: PuzzleForCausalLM) -> list[dict]:
    """One row per layer: the chosen variants and their parameter counts."""
    rows = []
    for i, (layer, block) in enumerate(zip(child.model.layers, child.config.blocks)):
        def count(*modules):
            return sum(p.numel() for m in modules if m is not None for p in m.parameters())

        rows.append({
            "layer": i,
            "attention": block.attention.name,
            "kv_heads": block.attention.num_key_value_heads(child.config.num_attention_heads),
            "ffn": block.ffn.name,
            "intermediate_size": block.ffn.intermediate_size if block.ffn.is_swiglu else 0,
            "attention_params": count(layer.self_attn, layer.input_layernorm),
            "ffn_params": count(layer.mlp, layer.post_attention_layernorm),
        })
    return rows


def table_markdown(rows: list[dict]) -> str:
    lines = ["| layer | attention | KV heads | FFN | intermediate | attention params | FFN params |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['attention']} | {r['kv_heads']} | {r['ffn']} | {r['intermediate_size']} "
            f"| {r['attention_params']:,} | {r['ffn_params']:,} |"
        )
    return "\n".join(lines) + "\n"
