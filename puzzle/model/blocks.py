"""A layer's block, typed: `AttentionConfig` + `FFNConfig` = `BlockConfig` (Nemotron-NAS / DeciLM fields).

The one place that says what a block is, what it is called and how it is written down:
  name        the canonical string ("attn_g3", "attn_g3_w128", "attn_linear", "attn_noop", "ffn_1536", "ffn_linear",
              "ffn_noop", "moe_e8k2_i64", "attn_g3+ffn_1536"). It keys the library manifest, the scores and costs
              tables and the solutions; `from_name` is its only parser.
  to_dict     the `block_configs` entry of config.json; `from_dict` reads one back (strictly).
  ffn_mult    DeciLM's FFN width rule and its inverse (`ffn_mult_to_intermediate_size`,
              `intermediate_size_to_ffn_mult`); engines that derive widths from ffn_mult serve only
              widths on its grid (`on_ffn_mult_grid`, `snap_to_ffn_mult_grid`).
  AttrDict    a block_configs entry as engines read it: a JSON dict whose keys also read as attributes
              (`block.attention.no_op`, as vLLM, SGLang and TensorRT-LLM do).

Standard library only: this file travels with every saved child checkpoint (configuration_puzzle.py
imports it relatively), and torch-free stages (the solver) import it without loading torch.

  attention: GQA with `n_heads_in_group` query heads per KV head (and a sliding `window`: each query sees
             only the last `window` keys, named "attn_g3_w128", written as DeciLM's `window_length`), or `replace_with_linear`
             (a hidden->hidden map applied per token), or `no_op` (the sublayer is skipped), or a Mamba2
             mixer (`mamba`: `MambaConfig`, named "mamba_h8d16n16g2": 8 SSM heads of 16 channels, a state of
             16, 2 groups of B/C), written as NVIDIA Puzzletron's `attention.mamba` entry: a hybrid family's
             (NemotronH) sequence mixer sits in the attention slot of a block.
  ffn:       SwiGLU with `intermediate_size` neurons, or `replace_with_linear`, or `no_op`, or a
             Mixture of Experts (`moe`: `MoEConfig`, named "moe_e8k2_i64": 8 SwiGLU experts of 64
             neurons, 2 of them per token, and a router), written as NVIDIA Puzzletron's `ffn.moe` entry.
"""

import math
import re
from dataclasses import dataclass, replace
from typing import Any


class BlockConfigError(ValueError):
    """A block name or block_configs entry that cannot describe a valid block."""


FFN_MULT_MULTIPLE = 256  # DeciLM rounds every ffn_mult-derived width up to a multiple of this


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """DeciLM's rule (vLLM nemotron_nas.py `_ffn_mult_to_intermediate_size`, the same in SGLang,
    TensorRT-LLM and llama.cpp's converter): int(2 * mult * hidden / 3) rounded up to a multiple of 256."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return size if size % FFN_MULT_MULTIPLE == 0 else size + FFN_MULT_MULTIPLE - size % FFN_MULT_MULTIPLE


def intermediate_size_to_ffn_mult(intermediate_size: int, hidden_size: int) -> float:
    """The inverse before DeciLM's rounding (intermediate = 2 * mult * hidden / 3), to 6 decimals.
    For a width on the grid the rule above maps it back exactly (|error| * 2 * hidden / 3 < 1)."""
    return round(intermediate_size * 3 / (2 * hidden_size), 6)


def on_ffn_mult_grid(intermediate_size: int, hidden_size: int) -> bool:
    """Whether an engine that derives the width from the ffn_mult we write gets `intermediate_size` back."""
    mult = intermediate_size_to_ffn_mult(intermediate_size, hidden_size)
    return ffn_mult_to_intermediate_size(mult, hidden_size) == intermediate_size


def snap_to_ffn_mult_grid(intermediate_size: int) -> int:
    """The nearest positive multiple of 256 (ties to the smaller width: pruning is the point)."""
    low = intermediate_size // FFN_MULT_MULTIPLE * FFN_MULT_MULTIPLE
    high = low + FFN_MULT_MULTIPLE
    return low if low > 0 and intermediate_size - low <= high - intermediate_size else high


class AttrDict(dict):
    """A dict whose keys also read as attributes, nested: `block.attention.no_op` and
    `block["attention"]["no_op"]` both work, and json.dumps writes it as the plain dict it is.

    A missing key raises AttributeError, so `hasattr(block.ffn, "ffn_mult")` (vLLM's test) is the
    key's presence."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for key, value in self.items():
            if isinstance(value, dict) and not isinstance(value, AttrDict):
                super().__setitem__(key, AttrDict(value))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __reduce__(self):  # deepcopy / pickle as the dict it is
        return (AttrDict, (dict(self),))


def _check_bool(where: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise BlockConfigError(f"{where}: '{name}' must be true or false, got {value!r}")


def _check_positive_int(where: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BlockConfigError(f"{where}: '{name}' must be an integer, got {value!r}")
    if value <= 0:
        raise BlockConfigError(f"{where}: '{name}' must be positive, got {value}")


def _parse_name(cls: type, name: Any, base: str, size_prefix: str, field: str) -> Any:
    """`base + "noop" | base + "linear" | size_prefix + <positive int>` -> cls. Digits only, no leading
    zero: one block, one spelling (so the name of the result is `name` again)."""
    if isinstance(name, str):
        if name == base + "noop":
            return cls(no_op=True)
        if name == base + "linear":
            return cls(replace_with_linear=True)
        if m := re.fullmatch(re.escape(size_prefix) + r"([1-9][0-9]*)", name):
            return cls(**{field: int(m.group(1))})
    raise BlockConfigError(
        f"unknown {cls.kind} variant {name!r} (expected {size_prefix}<N>, {base}linear or {base}noop)"
    )


_ATTENTION_KEYS = {"n_heads_in_group", "no_op", "replace_with_linear", "window_length", "mamba"}
# Puzzletron's names for a Mamba2 mixer's fields (modelopt puzzletron block_config.py `MambaConfig`)
_MAMBA_KEYS = {"num_heads": "num_heads", "head_dim": "head_dim", "state_dim": "state_dim", "num_groups": "num_groups"}
_FFN_KEYS = {"ffn_mult", "intermediate_size", "no_op", "replace_with_linear", "moe"}
# Puzzletron's names for an MoE FFN's fields (its block_config.py `MoEConfig`; export/anymodel.py writes `moe`)
_MOE_KEYS = {"num_local_experts": "num_experts", "num_experts_per_tok": "top_k",
             "expert_intermediate_dim": "expert_size", "shared_expert_intermediate_dim": "shared_expert_size"}
_MOE_OPTIONAL = {"shared_expert_intermediate_dim"}


@dataclass(frozen=True)
class MoEConfig:
    """A Mixture-of-Experts FFN: `num_experts` SwiGLU experts of `expert_size` neurons each and a router
    (hidden -> num_experts logits) that sends every token to `top_k` of them. How the router's logits turn
    into the top-k weights (softmax then top-k, renormalised or not, a router bias) is the parent family's
    (family.py `MoESpec`), not the block's: a block only says how many experts, how many per token, how wide.

    `shared_expert_size`: the width of a shared expert every token goes through beside the routed ones
    (Qwen2-MoE's `shared_expert`; None: none), named "moe_e60k4_i1408_s5632"."""

    num_experts: int
    top_k: int
    expert_size: int
    shared_expert_size: int | None = None

    def __post_init__(self) -> None:
        for field in ("num_experts", "top_k", "expert_size"):
            _check_positive_int("ffn.moe", field, getattr(self, field))
        if self.shared_expert_size is not None:
            _check_positive_int("ffn.moe", "shared_expert_size", self.shared_expert_size)
        if self.top_k > self.num_experts:
            raise BlockConfigError(f"ffn.moe: top_k={self.top_k} exceeds the {self.num_experts} experts")

    @property
    def name(self) -> str:
        shared = "" if self.shared_expert_size is None else f"_s{self.shared_expert_size}"
        return f"moe_e{self.num_experts}k{self.top_k}_i{self.expert_size}{shared}"

    def to_dict(self) -> dict[str, Any]:
        out = {key: getattr(self, field) for key, field in _MOE_KEYS.items()}
        if self.shared_expert_size is None:  # written only when there is one
            del out["shared_expert_intermediate_dim"]
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "MoEConfig":
        if not isinstance(data, dict):
            raise BlockConfigError(f"ffn.moe: expected a mapping, got {type(data).__name__}")
        for key, value in data.items():  # Puzzletron's shared-expert fields etc.: refuse what is set
            if key not in _MOE_KEYS and value not in (None, False):
                raise BlockConfigError(f"ffn.moe: unsupported field {key!r}={value!r}")
        missing = [key for key in _MOE_KEYS if data.get(key) is None and key not in _MOE_OPTIONAL]
        if missing:
            raise BlockConfigError(f"ffn.moe: missing {', '.join(repr(k) for k in missing)}")
        return cls(**{field: data.get(key) for key, field in _MOE_KEYS.items()})


@dataclass(frozen=True)
class MambaConfig:
    """A Mamba2 mixer (transformers `NemotronHMamba2Mixer`): `num_heads` SSM heads of `head_dim` channels each
    (the mixer's inner width is num_heads * head_dim), an SSM state of `state_dim` per channel, and B/C
    projections shared by the heads of each of `num_groups` groups (num_groups divides num_heads). The
    convolution width, chunk size and time-step limits are the parent's, the same for every layer (family.py
    reads them from the config, as the MoE routing is); named "mamba_h8d16n16g2"."""

    num_heads: int
    head_dim: int
    state_dim: int
    num_groups: int

    def __post_init__(self) -> None:
        for field in _MAMBA_KEYS.values():
            _check_positive_int("attention.mamba", field, getattr(self, field))
        if self.num_heads % self.num_groups:
            raise BlockConfigError(f"attention.mamba: num_groups={self.num_groups} does not divide the "
                                   f"{self.num_heads} heads")

    @property
    def name(self) -> str:
        return f"mamba_h{self.num_heads}d{self.head_dim}n{self.state_dim}g{self.num_groups}"

    @property
    def inner_size(self) -> int:
        """The mixer's inner width (x and the gate z): num_heads * head_dim."""
        return self.num_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, field) for key, field in _MAMBA_KEYS.items()}

    @classmethod
    def from_dict(cls, data: Any) -> "MambaConfig":
        if not isinstance(data, dict):
            raise BlockConfigError(f"attention.mamba: expected a mapping, got {type(data).__name__}")
        unknown = [k for k, v in data.items() if k not in _MAMBA_KEYS and v not in (None, False)]
        if unknown:
            raise BlockConfigError(f"attention.mamba: unsupported field {unknown[0]!r}={data[unknown[0]]!r}")
        missing = [key for key in _MAMBA_KEYS if data.get(key) is None]
        if missing:
            raise BlockConfigError(f"attention.mamba: missing {', '.join(repr(k) for k in missing)}")
        return cls(**{field: data[key] for key, field in _MAMBA_KEYS.items()})


@dataclass(frozen=True)
class AttentionConfig:
    """One layer's attention: GQA (`n_heads_in_group` query heads share a KV head), linear, no-op, or a
    Mamba2 mixer (`mamba`; then `n_heads_in_group` is None: it keeps an SSM and a convolution state, no KV
    cache).

    `window`: a GQA attention's sliding window W: query t attends to keys in (t - W, t] (transformers
    masking_utils `sliding_window_overlay`), so an engine caches at most W tokens of a sequence there; None:
    full causal attention. It is DeciLM's per-layer `window_length` (the block_config.py `AttentionConfig` of
    DeciLM's remote code and of Puzzletron; its modeling_decilm.py masks the layer with it and its
    variable_cache.py gives the layer a SlidingWindowCache), and the window gpt-oss-puzzle puts on the layers
    it moves off full attention. A windowed variant has the weights of its unwindowed one: only the mask differs."""

    n_heads_in_group: int | None = None
    no_op: bool = False
    replace_with_linear: bool = False
    mamba: MambaConfig | None = None
    window: int | None = None

    kind = "attention"  # the sublayer kind (tables' `kind` column); a class attribute, not a field

    def __post_init__(self) -> None:
        _check_bool("attention", "no_op", self.no_op)
        _check_bool("attention", "replace_with_linear", self.replace_with_linear)
        if self.no_op and self.replace_with_linear:
            raise BlockConfigError("attention: 'no_op' and 'replace_with_linear' cannot both be true")
        if self.mamba is not None:
            if not isinstance(self.mamba, MambaConfig):
                raise BlockConfigError(f"attention: 'mamba' must be a MambaConfig, got {self.mamba!r}")
            if self.no_op or self.replace_with_linear or self.n_heads_in_group is not None:
                raise BlockConfigError("attention: a Mamba2 block has no 'n_heads_in_group', 'no_op' or "
                                       "'replace_with_linear'")
        elif self.is_gqa:
            if self.n_heads_in_group is None:
                raise BlockConfigError("attention: a GQA block needs 'n_heads_in_group'")
            _check_positive_int("attention", "n_heads_in_group", self.n_heads_in_group)
        if self.window is not None:
            if not self.is_gqa:
                raise BlockConfigError("attention: only a GQA block has a sliding window ('window_length')")
            _check_positive_int("attention", "window_length", self.window)

    @property
    def is_gqa(self) -> bool:
        return not (self.no_op or self.replace_with_linear or self.is_mamba)

    @property
    def is_mamba(self) -> bool:
        return self.mamba is not None

    def num_key_value_heads(self, num_attention_heads: int) -> int:
        """KV heads of a GQA block; 0 for linear and no-op blocks (they keep no KV cache)."""
        if not self.is_gqa:
            return 0
        return num_attention_heads // self.n_heads_in_group

    def keys(self, context: float) -> float:
        """Keys one query attends to (and tokens of a sequence an engine caches) at `context`: min(context, W)."""
        return context if self.window is None else min(context, self.window)

    def with_window(self, window: int | None) -> "AttentionConfig":
        """This attention with sliding window `window` (None: full causal); linear and no-op ones have none."""
        return replace(self, window=window) if self.is_gqa else self

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
        if self.mamba is not None:
            return self.mamba.name
        return f"attn_g{self.n_heads_in_group}" + ("" if self.window is None else f"_w{self.window}")

    @classmethod
    def from_name(cls, name: str) -> "AttentionConfig":
        """"attn_g3" -> GQA with 3 query heads per KV head; "attn_g3_w128" -> and a sliding window of 128;
        "attn_linear"; "attn_noop"; "mamba_h8d16n16g2" -> a Mamba2 mixer (8 heads of 16, state 16, 2 groups);
        digits only, no leading zero."""
        if isinstance(name, str) and name.startswith("mamba_"):
            if m := re.fullmatch(r"mamba_h([1-9][0-9]*)d([1-9][0-9]*)n([1-9][0-9]*)g([1-9][0-9]*)", name):
                return cls(mamba=MambaConfig(*(int(g) for g in m.groups())))
            raise BlockConfigError(f"unknown attention variant {name!r} (expected mamba_h<heads>d<head dim>"
                                   "n<state>g<groups>, e.g. mamba_h8d16n16g2)")
        if isinstance(name, str) and (m := re.fullmatch(r"attn_g([1-9][0-9]*)_w([1-9][0-9]*)", name)):
            return cls(n_heads_in_group=int(m.group(1)), window=int(m.group(2)))
        try:
            return _parse_name(cls, name, "attn_", "attn_g", "n_heads_in_group")
        except BlockConfigError:
            raise BlockConfigError(f"unknown attention variant {name!r} (expected attn_g<N>, attn_g<N>_w<window>, "
                                   "attn_linear, attn_noop or mamba_h<heads>d<head dim>n<state>g<groups>)") from None

    def to_dict(self) -> dict[str, Any]:
        out = {"n_heads_in_group": self.n_heads_in_group, "no_op": self.no_op,
               "replace_with_linear": self.replace_with_linear}
        if self.mamba is not None:  # only then: a transformer child's config.json stays as it was
            out["mamba"] = self.mamba.to_dict()
        if self.window is not None:  # only then: an unwindowed child's config.json stays as it was
            out["window_length"] = self.window
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AttentionConfig":
        if not isinstance(data, dict):
            raise BlockConfigError(f"attention: expected a mapping, got {type(data).__name__}")
        # Unknown DeciLM fields (sparsify, num_sink_tokens, ...) change nothing we can build: refuse
        # those that are set rather than silently building a different model.
        for key, value in data.items():
            if key not in _ATTENTION_KEYS and value not in (None, False):
                raise BlockConfigError(f"attention: unsupported field {key!r}={value!r}")
        no_op = data.get("no_op", False) or False
        linear = data.get("replace_with_linear", False) or False
        # DeciLM's AttentionConfig.__post_init__ clears window_length on no-op and linear blocks: so do we
        window = None if no_op is True or linear is True else data.get("window_length")
        mamba = None if data.get("mamba") is None else MambaConfig.from_dict(data["mamba"])
        return cls(n_heads_in_group=data.get("n_heads_in_group"), no_op=no_op, replace_with_linear=linear,
                   mamba=mamba, window=window)


@dataclass(frozen=True)
class FFNConfig:
    """One layer's FFN: SwiGLU of `intermediate_size` neurons, linear, no-op, or a Mixture of Experts (`moe`;
    then `intermediate_size` is None: an expert's width is `moe.expert_size`, and code that reads a dense width
    fails loudly on an MoE block rather than mistaking it for a dense one)."""

    intermediate_size: int | None = None
    no_op: bool = False
    replace_with_linear: bool = False
    moe: MoEConfig | None = None

    kind = "ffn"

    def __post_init__(self) -> None:
        _check_bool("ffn", "no_op", self.no_op)
        _check_bool("ffn", "replace_with_linear", self.replace_with_linear)
        if self.no_op and self.replace_with_linear:
            raise BlockConfigError("ffn: 'no_op' and 'replace_with_linear' cannot both be true")
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                raise BlockConfigError(f"ffn: 'moe' must be an MoEConfig, got {self.moe!r}")
            if self.no_op or self.replace_with_linear or self.intermediate_size is not None:
                raise BlockConfigError("ffn: an MoE block has no 'intermediate_size', 'no_op' or 'replace_with_linear'")
        elif self.is_swiglu:
            if self.intermediate_size is None:
                raise BlockConfigError("ffn: a SwiGLU block needs 'intermediate_size' or 'ffn_mult'")
            _check_positive_int("ffn", "intermediate_size", self.intermediate_size)

    @property
    def is_swiglu(self) -> bool:
        """A dense SwiGLU FFN (not an MoE one: its width is per expert)."""
        return not (self.no_op or self.replace_with_linear or self.is_moe)

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    @property
    def name(self) -> str:
        if self.no_op:
            return "ffn_noop"
        if self.replace_with_linear:
            return "ffn_linear"
        if self.moe is not None:
            return self.moe.name
        return f"ffn_{self.intermediate_size}"

    @classmethod
    def from_name(cls, name: str) -> "FFNConfig":
        """"ffn_1536" -> SwiGLU of 1536 neurons; "ffn_linear"; "ffn_noop"; "moe_e8k2_i64" -> 8 experts of
        64 neurons, top-2 ("moe_e8k2_i64_s128": and a shared expert of 128); digits only, no leading zero:
        one block, one spelling."""
        if isinstance(name, str) and name.startswith("moe_"):
            if m := re.fullmatch(r"moe_e([1-9][0-9]*)k([1-9][0-9]*)_i([1-9][0-9]*)(?:_s([1-9][0-9]*))?", name):
                return cls(moe=MoEConfig(*(None if g is None else int(g) for g in m.groups())))
            raise BlockConfigError(f"unknown ffn variant {name!r} (expected moe_e<experts>k<top_k>_i<expert width>"
                                   "[_s<shared expert width>], e.g. moe_e8k2_i64)")
        return _parse_name(cls, name, "ffn_", "ffn_", "intermediate_size")

    def to_dict(self, hidden_size: int | None) -> dict[str, Any]:
        # intermediate_size is authoritative; ffn_mult is written for engines that only read it
        # (null without a hidden size to relate it to).
        mult = None
        if self.is_swiglu and hidden_size:
            mult = intermediate_size_to_ffn_mult(self.intermediate_size, hidden_size)
        out = {
            "ffn_mult": mult,
            "intermediate_size": self.intermediate_size,
            "no_op": self.no_op,
            "replace_with_linear": self.replace_with_linear,
        }
        if self.moe is not None:  # only then: a dense child's config.json stays as it was
            out["moe"] = self.moe.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], hidden_size: int) -> "FFNConfig":
        if not isinstance(data, dict):
            raise BlockConfigError(f"ffn: expected a mapping, got {type(data).__name__}")
        for key, value in data.items():
            if key not in _FFN_KEYS and value not in (None, False):
                raise BlockConfigError(f"ffn: unsupported field {key!r}={value!r}")
        no_op = data.get("no_op", False) or False
        linear = data.get("replace_with_linear", False) or False
        if data.get("moe") is not None:
            return cls(intermediate_size=data.get("intermediate_size"), no_op=no_op, replace_with_linear=linear,
                       moe=MoEConfig.from_dict(data["moe"]))
        size = data.get("intermediate_size")
        mult = data.get("ffn_mult")
        if size is None and mult is not None and not (no_op is True or linear is True):
            if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not math.isfinite(mult) or mult <= 0:
                raise BlockConfigError(f"ffn: 'ffn_mult' must be a positive number, got {mult!r}")
            size = ffn_mult_to_intermediate_size(float(mult), hidden_size)
        return cls(intermediate_size=size, no_op=no_op, replace_with_linear=linear)


SublayerConfig = AttentionConfig | FFNConfig
SUBLAYER_CONFIGS: dict[str, type] = {"attention": AttentionConfig, "ffn": FFNConfig}


def sublayer_from_name(kind: str, name: str) -> SublayerConfig:
    """The config of a tables' (kind, variant) pair: `AttentionConfig.from_name` or `FFNConfig.from_name`."""
    if kind not in SUBLAYER_CONFIGS:
        raise BlockConfigError(f"unknown sublayer kind {kind!r} (expected attention or ffn)")
    return SUBLAYER_CONFIGS[kind].from_name(name)


@dataclass(frozen=True)
class BlockConfig:
    attention: AttentionConfig
    ffn: FFNConfig

    @property
    def name(self) -> str:
        return f"{self.attention.name}+{self.ffn.name}"

    @classmethod
    def from_name(cls, name: str) -> "BlockConfig":
        """"attn_g3+ffn_1536" -> BlockConfig(AttentionConfig(3), FFNConfig(1536)); "attn_g3+moe_e8k2_i64"."""
        if not isinstance(name, str) or name.count("+") != 1:
            raise BlockConfigError(f"unknown block {name!r} (expected <attention>+<ffn>, e.g. attn_g3+ffn_1536)")
        attention, ffn = name.split("+")
        return cls(AttentionConfig.from_name(attention), FFNConfig.from_name(ffn))

    def to_dict(self, hidden_size: int | None) -> dict[str, Any]:
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
