"""The heterogeneous Llama child model and its Nemotron-NAS `block_configs` format."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_puzzle import (
    AttentionConfig,
    BlockConfig,
    BlockConfigError,
    FFNConfig,
    PuzzleConfig,
    parse_block_configs,
)
from .modeling_puzzle import (
    GQAttention,
    LinearAttention,
    LinearFFN,
    PuzzleDecoderLayer,
    PuzzleForCausalLM,
    PuzzleModel,
    SwiGLU,
    build_attention,
    build_ffn,
)

# In-process registration: AutoModelForCausalLM.from_pretrained(child) works without trust_remote_code
# once `puzzle` is imported; saved checkpoints also carry auto_map for processes that never import it.
AutoConfig.register(PuzzleConfig.model_type, PuzzleConfig, exist_ok=True)
AutoModelForCausalLM.register(PuzzleConfig, PuzzleForCausalLM, exist_ok=True)

__all__ = [
    "AttentionConfig",
    "BlockConfig",
    "BlockConfigError",
    "FFNConfig",
    "GQAttention",
    "LinearAttention",
    "LinearFFN",
    "PuzzleConfig",
    "PuzzleDecoderLayer",
    "PuzzleForCausalLM",
    "PuzzleModel",
    "SwiGLU",
    "build_attention",
    "build_ffn",
    "parse_block_configs",
]
