"""The heterogeneous Llama child model and its Nemotron-NAS `block_configs` format.

The block types (blocks.py) are standard-library only and import eagerly, so torch-free stages (the
solver) can use them; the config and model classes load transformers and torch on first use, and
register with the Auto classes then (`register`).
"""

from importlib import import_module
from typing import Any

from .blocks import (
    AttentionConfig,
    BlockConfig,
    BlockConfigError,
    FFNConfig,
    MambaConfig,
    MoEConfig,
    parse_block_configs,
)

# Name -> the module (of this package) that defines it; loaded on first access.
_LAZY = {
    "PuzzleConfig": "configuration_puzzle",
    **{name: "modeling_puzzle" for name in (
        "GQAttention", "LinearAttention", "LinearFFN", "MoEFFN", "PuzzleDecoderLayer", "PuzzleForCausalLM", "PuzzleModel",
        "SwiGLU", "build_attention", "build_ffn",
    )},
}


def register() -> None:
    """In-process registration: AutoConfig / AutoModelForCausalLM.from_pretrained(child) work without
    trust_remote_code once this ran; saved checkpoints also carry auto_map for processes that never
    import `puzzle`. Idempotent."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .configuration_puzzle import PuzzleConfig
    from .modeling_puzzle import PuzzleForCausalLM

    AutoConfig.register(PuzzleConfig.model_type, PuzzleConfig, exist_ok=True)
    AutoModelForCausalLM.register(PuzzleConfig, PuzzleForCausalLM, exist_ok=True)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    register()
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "AttentionConfig",
    "BlockConfig",
    "BlockConfigError",
    "FFNConfig",
    "MambaConfig",
    "MoEConfig",
    "parse_block_configs",
    "register",
    *_LAZY,
]
