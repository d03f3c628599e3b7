"""NVIDIA Puzzletron's AnyModel checkpoint (PyPI `nvidia-modelopt`, modelopt/torch/puzzletron/anymodel).

What Puzzletron's Llama support reads:
- config.json: a plain `llama` config (model_type "llama", architectures ["LlamaForCausalLM"]; RoPE both as
  transformers 5's `rope_parameters` and as 4.x's `rope_theta` / `rope_scaling`, Puzzletron running on both) plus
  `block_configs`, one Puzzletron `BlockConfig` per layer as `dataclasses.asdict` writes it (block_config.py):
  attention {no_op, replace_with_linear, sparsify, weights_precision, num_key_value_heads, llama4, mamba},
  ffn {no_op, replace_with_linear, sparsify, weights_precision, moe, intermediate_size}, parallel_blocks.
  A no-op sublayer carries no width (its `__post_init__` nulls num_key_value_heads / intermediate_size).
- anymodel/models/llama/llama_model_descriptor.py `LlamaModelDescriptor`: each layer is transformers' own
  `LlamaDecoderLayer`, built with `num_key_value_heads` and `intermediate_size` overridden per layer
  (`block_config_to_layer_overrides`, applied by puzzformer/patcher.py `deci_x_patcher`); a no-op sublayer
  becomes zeros and its norm the identity (`attn_no_op_post_init`, `mlp_no_op_post_init`). Nothing there
  builds a linear sublayer, so `check_anymodel` refuses a child with one.
- weights: model.safetensors.index.json + subblocks_safetensors/{embeddings, lm_head, block_{i}_attention,
  block_{i}_ffn}.safetensors, grouped as `LlamaModelDescriptor.layer_name_predicates` groups them
  (converter/base.py `convert_model_weights`); a tied lm_head.weight is left out (checkpoint_utils_hf.py
  `_save_checkpoint`). The tokenizer files sit beside them (the converter copies every non-weight file).
"""

import json
import re
from pathlib import Path
from typing import Any

import torch

from puzzle.errors import PuzzleError
from puzzle.io import write_safetensors
from puzzle.model.blocks import BlockConfig
from puzzle.model.checkpoint import atomic_directory, save_tokenizer
from puzzle.outputs import write_marker

from .fields import rope

SUBBLOCKS_DIR = "subblocks_safetensors"
# Puzzletron's SubblockConfig defaults, written out so the config is complete without its code.
_SUBBLOCK_DEFAULTS = {"sparsify": None, "weights_precision": "bf16"}
# Keys of the child's config that a plain Llama config has not (block_configs is rewritten in Puzzletron's form).
_NOT_LLAMA = ("block_configs", "auto_map", "family")  # family: only llama-like ones get here


def check_anymodel(blocks: list[BlockConfig]) -> None:
    """Refuse the first linear sublayer: Puzzletron's Llama descriptor builds GQA, SwiGLU and no-op only; and
    the first windowed attention, which `puzzletron_block` has no field for."""
    for i, block in enumerate(blocks):
        if block.attention.window is not None:
            raise PuzzleError(f"layer {i} ({block.name}) cannot be exported as anymodel: it writes no sliding "
                              "window (window_length), so the attention would see every key")
        for sub in (block.attention, block.ffn):
            if sub.replace_with_linear:
                raise PuzzleError(
                    f"layer {i} ({block.name}) cannot be exported as anymodel: Puzzletron's Llama descriptor "
                    f"builds no linear {sub.kind} (replace_with_linear)"
                )


def puzzletron_block(block: BlockConfig, num_attention_heads: int) -> dict[str, Any]:
    """One layer as Puzzletron's `BlockConfig.to_dict()` writes it."""
    attention = block.attention
    ffn = block.ffn
    return {
        "attention": {"no_op": attention.no_op, "replace_with_linear": False, **_SUBBLOCK_DEFAULTS,
                      "num_key_value_heads": attention.num_key_value_heads(num_attention_heads) or None,
                      "llama4": None, "mamba": None},
        "ffn": {"no_op": ffn.no_op, "replace_with_linear": False, **_SUBBLOCK_DEFAULTS,
                "moe": None, "intermediate_size": ffn.intermediate_size if ffn.is_swiglu else None},
        "parallel_blocks": None,
    }


def anymodel_config(config: Any, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the export: the child's config as a plain Llama's, Puzzletron's block_configs."""
    data = {k: v for k, v in config.to_dict().items() if k not in _NOT_LLAMA}
    theta, scaling = rope(config)
    data.update(
        model_type="llama",
        rope_theta=theta,  # what transformers 4.x reads (Puzzletron supports 4.57+); 5.x folds it into rope_parameters
        rope_scaling=scaling,
        architectures=["LlamaForCausalLM"],
        block_configs=[puzzletron_block(b, config.num_attention_heads) for b in config.blocks],
        dtype=str(dtype).removeprefix("torch."),
    )
    return data


# model.layers.{i}.<module>: which of the layer's two subblocks a weight belongs to.
_LAYER_WEIGHT = re.compile(r"model\.layers\.(\d+)\.(input_layernorm|self_attn|post_attention_layernorm|mlp)\.")
_SUBBLOCK = {"input_layernorm": "attention", "self_attn": "attention", "post_attention_layernorm": "ffn", "mlp": "ffn"}


def subblock_of(name: str) -> str:
    """The subblock file a weight goes to: embeddings, lm_head (with the final norm), block_{i}_{attention|ffn}."""
    if name == "model.embed_tokens.weight":
        return "embeddings"
    if name in ("model.norm.weight", "lm_head.weight"):
        return "lm_head"
    m = _LAYER_WEIGHT.match(name)
    if m is None:
        raise RuntimeError(f"no AnyModel subblock for {name}")  # a module this writer does not know: a bug
    return f"block_{m.group(1)}_{_SUBBLOCK[m.group(2)]}"


def write_anymodel(model: torch.nn.Module, tokenizer: Any, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write a PuzzleForCausalLM (+ tokenizer) to the directory `out` as an AnyModel checkpoint, atomically."""
    config = model.config
    check_anymodel(config.blocks)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in model.state_dict().items():
        if "rotary_emb" in name or (config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        groups.setdefault(subblock_of(name), {})[name] = tensor  # converted to dtype as it is written
    out = Path(out)
    with atomic_directory(out) as tmp:
        (tmp / SUBBLOCKS_DIR).mkdir()
        weight_map = {}
        for group, tensors in groups.items():
            with open(tmp / SUBBLOCKS_DIR / f"{group}.safetensors", "wb") as f:  # streamed, one tensor at a time
                write_safetensors(f, tensors, {"format": "pt"}, dtype=dtype)
            weight_map.update({name: f"{SUBBLOCKS_DIR}/{group}.safetensors" for name in tensors})
        index = {"metadata": {"format": "pt"}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(anymodel_config(config, dtype), indent=2) + "\n")
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        write_marker(tmp, "export")  # an earlier export may be replaced by the next (puzzle.outputs)
    return out
