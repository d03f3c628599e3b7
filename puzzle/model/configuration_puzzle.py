"""Configuration of the heterogeneous Llama child, in the Nemotron-NAS / DeciLM `block_configs` format.

This file travels with every saved checkpoint (it is copied next to config.json and named in
`auto_map`, with blocks.py), so it may import only the standard library, torch, transformers and
`.blocks`: a process that never imported `puzzle` must be able to load a child with `trust_remote_code=True`.

One `BlockConfig` per layer (see blocks.py): an attention choice and an FFN choice.
"""


from typing import Any

from transformers import LlamaConfig

# blocks.py travels with this file (transformers' dynamic-module loader copies relative imports).
from .blocks import (  # noqa: F401  (re-exported: `from ...configuration_puzzle import BlockConfig` works)
    AttentionConfig,
    BlockConfig,
    BlockConfigError,
    FFNConfig,
    parse_block_configs,
)


class PuzzleConfig(LlamaConfig):
    """A Llama config whose layers each carry their own `BlockConfig`.

    Global fields mean what they mean in `LlamaConfig` (hidden size, query heads, RoPE, norms,
    vocabulary, tied embeddings); `num_key_value_heads` and `intermediate_size` are the parent's and
    serve only as the default for layers that `block_configs` does not describe.

    `block_configs` is stored as plain JSON dicts (what config.json holds); `blocks` parses them.
    """

    model_type = "puzzle_llama"
    block_configs: list | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.hidden_act != "silu":
            raise BlockConfigError(f"only SwiGLU FFNs (hidden_act='silu') are supported, got {self.hidden_act!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise BlockConfigError(
                f"num_key_value_heads={self.num_key_value_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.block_configs is None:
            parent = BlockConfig(
                AttentionConfig(n_heads_in_group=self.num_attention_heads // self.num_key_value_heads),
                FFNConfig(intermediate_size=self.intermediate_size),
            )
            self.block_configs = [parent] * self.num_hidden_layers
        blocks = parse_block_configs(
            self.block_configs, self.hidden_size, self.num_attention_heads, self.num_hidden_layers
        )
        self.block_configs = [b.to_dict(self.hidden_size) for b in blocks]

    @property
    def blocks(self) -> list[BlockConfig]:
        return [BlockConfig.from_dict(d, self.hidden_size) for d in self.block_configs]

    @property
    def num_cached_layers(self) -> int:
        """Layers that keep a KV cache: only GQA attention does."""
        return sum(b.attention.is_gqa for b in self.blocks)
