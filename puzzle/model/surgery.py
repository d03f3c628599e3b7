"""Swapping one sublayer (a layer's attention or its FFN) of a PuzzleForCausalLM in place.

A sublayer's state is its module's weights plus its pre-norm, keyed as inside `PuzzleDecoderLayer`:
attention -> `input_layernorm.weight`, `self_attn.*`; FFN -> `post_attention_layernorm.weight`, `mlp.*`.
The library stores variants in exactly this form, so scoring and realisation just call `replace_sublayer`.
"""

from typing import Literal

import torch

from puzzle.errors import PuzzleError

from .blocks import AttentionConfig, BlockConfig, FFNConfig
from .modeling_puzzle import PuzzleForCausalLM, build_attention, build_ffn, build_norm

Kind = Literal["attention", "ffn"]
_PARTS = {"attention": ("input_layernorm", "self_attn"), "ffn": ("post_attention_layernorm", "mlp")}


def sublayer_state(model: PuzzleForCausalLM, layer: int, kind: Kind) -> dict[str, torch.Tensor]:
    """The sublayer's weights (norm + module), detached clones keyed as in the decoder layer."""
    norm_name, module_name = _PARTS[kind]
    block = model.model.layers[layer]
    out = {}
    for name in (norm_name, module_name):
        module = getattr(block, name)
        if module is not None:
            out.update({f"{name}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    return out


def replace_sublayer(
    model: PuzzleForCausalLM,
    layer: int,
    kind: Kind,
    config: AttentionConfig | FFNConfig,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Put variant `config` into `model.model.layers[layer]` with weights `state` and update block_configs.

    `state=None` keeps fresh random weights (only for building shapes, e.g. latency measurement); a
    norm missing from `state` keeps the parent's norm weight when there is one.
    """
    norm_name, module_name = _PARTS[kind]
    block = model.model.layers[layer]
    param = next(model.parameters())
    old_norm = getattr(block, norm_name)
    if kind == "attention":
        if not isinstance(config, AttentionConfig):
            raise PuzzleError(f"an attention variant is needed, got {type(config).__name__}")
        config.validate(model.config.num_attention_heads)
        module = build_attention(model.config, config)
    else:
        if not isinstance(config, FFNConfig):
            raise PuzzleError(f"an FFN variant is needed, got {type(config).__name__}")
        module = build_ffn(model.config, config)
    norm = None
    if module is not None:
        norm = build_norm(model.config)
        if old_norm is not None:
            norm.weight.data.copy_(old_norm.weight.data)
    if state is not None:
        own = {k[len(module_name) + 1 :]: v for k, v in state.items() if k.startswith(module_name + ".")}
        norm_state = {k[len(norm_name) + 1 :]: v for k, v in state.items() if k.startswith(norm_name + ".")}
        stray = [k for k in state if not (k.startswith(module_name + ".") or k.startswith(norm_name + "."))]
        if stray:
            raise PuzzleError(f"layer {layer} {kind}: unexpected weights {stray[:3]}")
        if module is not None:
            try:
                module.load_state_dict(own, strict=True)
            except RuntimeError as err:
                raise PuzzleError(f"layer {layer} {kind} {config.name}: weights do not fit ({str(err).splitlines()[0]})") from None
            if norm_state:
                norm.load_state_dict(norm_state, strict=True)
        elif own or norm_state:
            raise PuzzleError(f"layer {layer} {kind}: a no-op variant has no weights, got {list(state)[:3]}")
    for name, value in ((module_name, module), (norm_name, norm)):
        setattr(block, name, value.to(device=param.device, dtype=param.dtype) if value is not None else None)
    blocks = model.config.blocks
    old = blocks[layer]
    blocks[layer] = BlockConfig(config, old.ffn) if kind == "attention" else BlockConfig(old.attention, config)
    model.config.block_configs = [b.to_dict(model.config.hidden_size) for b in blocks]
