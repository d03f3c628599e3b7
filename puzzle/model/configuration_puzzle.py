"""Configuration of the heterogeneous Llama child, in the Nemotron-NAS / DeciLM `block_configs` format.

This file travels with every saved checkpoint (it is copied next to config.json and named in
`auto_map`), so it may import only the standard library, torch and transformers: a process that
never imported `puzzle` must be able to load a child with `trust_remote_code=True`.

One `BlockConfig` per layer: an attention choice and an FFN choice.
  attention: GQA with `n_heads_in_group` query heads per KV head, or `replace_with_linear`
             (a hidden->hidden map applied per token), or `no_op` (the sublayer is skipped).
  ffn:       SwiGLU with `intermediate_size` neurons, or `replace_with_linear`, or `no_op`.
"""


import math
from dataclasses import asdict, dataclass
from typing import Any

from transformers import LlamaConfig


class BlockConfigError(ValueError):
    """A block_configs entry that cannot describe a valid block."""


def _ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    # DeciLM's rule (vLLM nemotron_nas.py): int(2 * mult * hidden / 3) rounded up to a multiple of 256.
    size = int(2 * ffn_mult * hidden_size / 3)
    return size if size % 256 == 0 else size + 256 - size % 256


def _check_bool(where: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise BlockConfigError(f"{where}: '{name}' must be true or false, got {value!r}")


_ATTENTION_KEYS = {"n_heads_in_group", "no_op", "replace_with_linear"}
_FFN_KEYS = {"ffn_mult", "intermediate_size", "no_op", "replace_with_linear"}


@dataclass(frozen=True)
class AttentionConfig:
    """One layer's attention: GQA (`n_heads_in_group` query heads share a KV head), linear, or no-op."""

    n_heads_in_group: int | None = None
    no_op: bool = False
    replace_with_linear: bool = False

    def __post_init__(self) -> None:
        _check_bool("attention", "no_op", self.no_op)
        _check_bool("attention", "replace_with_linear", self.replace_with_linear)
        if self.no_op and self.replace_with_linear:
            raise BlockConfigError("attention: 'no_op' and 'replace_with_linear' cannot both be true")
        if self.is_gqa:
            if self.n_heads_in_group is None:
                raise BlockConfigError("attention: a GQA block needs 'n_heads_in_group'")
            if isinstance(self.n_heads_in_group, bool) or not isinstance(self.n_heads_in_group, int):
                raise BlockConfigError(
                    f"attention: 'n_heads_in_group' must be an integer, got {self.n_heads_in_group!r}"
                )
            if self.n_heads_in_group <= 0:
                raise BlockConfigError(
                    f"attention: 'n_heads_in_group' must be positive, got {self.n_heads_in_group}"
                )

    @property
    def is_gqa(self) -> bool:
        return not (self.no_op or self.replace_with_linear)

    def num_key_value_heads(self, num_attention_heads: int) -> int:
        """KV heads of a GQA block; 0 for linear and no-op blocks (they keep no KV cache)."""
        if not self.is_gqa:
            return 0
        return num_attention_heads // self.n_heads_in_group

    def validate(self, num_attention_heads: int) -> None:
        if self.is_gqa and num_attention_heads % self.n_heads_in_group != 0:
            raise BlockConfigError(
                f"attention: n_heads_in_group={self.n_heads_in_group} does not divide the "
                f"{num_attention_heads} query heads (KV heads must divide the query heads)"
            )

    @property
    def name(self) -> str:
        if self.no_op:
            return "attn_noop"
        if self.replace_with_linear:
            return "attn_linear"
        return f"attn_g{self.n_heads_in_group}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AttentionConfig":
        if not isinstance(data, dict):
            raise BlockConfigError(f"attention: expected a mapping, got {type(data).__name__}")
        # Unknown DeciLM fields (sparsify, window_length, ...) change nothing we can build: refuse
        # those that are set rather than silently building a different model.
        for key, value in data.items():
            if key not in _ATTENTION_KEYS and value not in (None, False):
                raise BlockConfigError(f"attention: unsupported field {key!r}={value!r}")
        return cls(
            n_heads_in_group=data.get("n_heads_in_group"),
            no_op=data.get("no_op", False) or False,
            replace_with_linear=data.get("replace_with_linear", False) or False,
        )


@dataclass(frozen=True)
class FFNConfig:
    """One layer's FFN: SwiGLU of `intermediate_size` neurons, linear, or no-op."""

    intermediate_size: int | None = None
    no_op: bool = False
    replace_with_linear: bool = False

    def __post_init__(self) -> None:
        _check_bool("ffn", "no_op", self.no_op)
        _check_bool("ffn", "replace_with_linear", self.replace_with_linear)
        if self.no_op and self.replace_with_linear:
            raise BlockConfigError("ffn: 'no_op' and 'replace_with_linear' cannot both be true")
        if self.is_swiglu:
            if self.intermediate_size is None:
                raise BlockConfigError("ffn: a SwiGLU block needs 'intermediate_size' or 'ffn_mult'")
            if isinstance(self.intermediate_size, bool) or not isinstance(self.intermediate_size, int):
                raise BlockConfigError(
                    f"ffn: 'intermediate_size' must be an integer, got {self.intermediate_size!r}"
                )
            if self.intermediate_size <= 0:
                raise BlockConfigError(f"ffn: 'intermediate_size' must be positive, got {self.intermediate_size}")

    @property
    def is_swiglu(self) -> bool:
        return not (self.no_op or self.replace_with_linear)

    @property
    def name(self) -> str:
        if self.no_op:
            return "ffn_noop"
        if self.replace_with_linear:
            return "ffn_linear"
        return f"ffn_{self.intermediate_size}"

    def to_dict(self, hidden_size: int) -> dict[str, Any]:
        # intermediate_size is authoritative; ffn_mult is written for engines that only read it
        # (DeciLM's definition: intermediate = 2 * mult * hidden / 3, before its rounding).
        mult = None
        if self.is_swiglu:
            mult = round(self.intermediate_size * 3 / (2 * hidden_size), 6)
        return {
            "ffn_mult": mult,
            "intermediate_size": self.intermediate_size,
            "no_op": self.no_op,
            "replace_with_linear": self.replace_with_linear,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], hidden_size: int) -> "FFNConfig":
        if not isinstance(data, dict):
            raise BlockConfigError(f"ffn: expected a mapping, got {type(data).__name__}")
        for key, value in data.items():
            if key not in _FFN_KEYS and value not in (None, False):
                raise BlockConfigError(f"ffn: unsupported field {key!r}={value!r}")
        no_op = data.get("no_op", False) or False
        linear = data.get("replace_with_linear", False) or False
        size = data.get("intermediate_size")
        mult = data.get("ffn_mult")
        if size is None and mult is not None and not (no_op is True or linear is True):
            if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not math.isfinite(mult) or mult <= 0:
                raise BlockConfigError(f"ffn: 'ffn_mult' must be a positive number, got {mult!r}")
            size = _ffn_mult_to_intermediate_size(float(mult), hidden_size)
        return cls(intermediate_size=size, no_op=no_op, replace_with_linear=linear)


@dataclass(frozen=True)
class BlockConfig:
    attention: AttentionConfig
    ffn: FFNConfig

    @property
    def name(self) -> str:
        return f"{self.attention.name}+{self.ffn.name}"

    def to_dict(self, hidden_size: int) -> dict[str, Any]:
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict(hidden_size)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], hidden_size: int) -> "BlockConfig":
        if isinstance(data, BlockConfig):
            return data
        if not isinstance(data, dict) or "attention" not in data or "ffn" not in data:
            raise BlockConfigError("a block config needs an 'attention' and an 'ffn' mapping")
        return cls(AttentionConfig.from_dict(data["attention"]), FFNConfig.from_dict(data["ffn"], hidden_size))


def parse_block_configs(raw: Any, hidden_size: int, num_attention_heads: int, num_hidden_layers: int | None) -> list[BlockConfig]:
    """Validate a `block_configs` list; every error names the layer it is in."""
    if not isinstance(raw, (list, tuple)):
        raise BlockConfigError(f"block_configs must be a list with one entry per layer, got {type(raw).__name__}")
    if num_hidden_layers is not None and len(raw) != num_hidden_layers:
        raise BlockConfigError(f"block_configs has {len(raw)} entries but num_hidden_layers is {num_hidden_layers}")
    blocks = []
    for i, entry in enumerate(raw):
        try:
            block = BlockConfig.from_dict(entry, hidden_size)
            block.attention.validate(num_attention_heads)
        except BlockConfigError as err:
            raise BlockConfigError(f"block_configs[{i}] {err}") from None
        blocks.append(block)
    return blocks


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
