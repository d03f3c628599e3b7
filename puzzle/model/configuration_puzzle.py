"""Configuration of the heterogeneous child, in the Nemotron-NAS / DeciLM `block_configs` format.

This file travels with every saved checkpoint (it is copied next to config.json and named in
`auto_map`, with blocks.py and family.py), so it may import only the standard library, torch, transformers,
`.blocks` and `.family`: a process that never imported `puzzle` must be able to load a child with
`trust_remote_code=True`.

The parent's family (family.py: llama, mistral, qwen2, qwen3, qwen2_moe, qwen3_moe, mixtral, gpt_oss, nemotron_h) is
recorded in `family`; what a layer's attention consists of (biases, q/k norm, sinks) and how an MoE FFN routes and
activates follow from it (an MoE family's config fields, e.g. Qwen3-MoE's `norm_topk_prob` or gpt-oss's
`swiglu_limit`, are carried over from the parent's config as they are). A layer's sliding window is its
attention block's (`window_length`, blocks.py); children written before that kept them in a config-level
`sliding_windows` list, which loading folds into the blocks. A NemotronH child's Mamba2 and routing fields
(conv_kernel, chunk_size, time_step_limit, use_conv_bias, use_bias, n_group, topk_group, routed_scaling_factor,
...) are the parent's, carried over the same way; its norm epsilon is `rms_norm_eps` (NemotronH's
`layer_norm_epsilon`).

One `BlockConfig` per layer (see blocks.py): an attention choice and an FFN choice. It runs under every
transformers the project declares: 4.56-4.57 (keyword `__init__`, RoPE in `rope_theta` / `rope_scaling`)
and 5.x (dataclass `__post_init__`, RoPE in `rope_parameters`); tests/model/test_transformers_versions.py
loads a child under 4.56 and compares its logits.
"""


from typing import Any

from transformers import LlamaConfig

from .family import get_family

# blocks.py travels with this file (transformers' dynamic-module loader copies relative imports).
from .blocks import (  # noqa: F401  (re-exported: `from ...configuration_puzzle import BlockConfig` works)
    AttentionConfig,
    AttrDict,
    BlockConfig,
    BlockConfigError,
    FFNConfig,
    MoEConfig,
    parse_block_configs,
)

# transformers >= 5 builds configs as dataclasses (fields, then `__post_init__`) and keeps RoPE in
# `rope_parameters`; 4.56-4.57 take keyword arguments in `__init__` and read `rope_theta` / `rope_scaling`.
_DATACLASS_CONFIG = hasattr(LlamaConfig, "__post_init__")


def legacy_rope_fields(rope_parameters: dict | None) -> dict[str, Any]:
    """`rope_theta` and `rope_scaling` as transformers 4.x, SGLang and TensorRT-LLM read them, from
    transformers 5's `rope_parameters` ({"rope_type": ..., "rope_theta": ..., scaling keys})."""
    params = dict(rope_parameters or {})
    if "rope_theta" not in params:
        return {}
    theta = params.pop("rope_theta")
    scaling = None if params.get("rope_type", "default") == "default" else params
    return {"rope_theta": theta, "rope_scaling": scaling}


class PuzzleConfig(LlamaConfig):
    """A Llama-style config whose layers each carry their own `BlockConfig`, written as Nemotron-NAS / DeciLM.

    Global fields mean what they mean in `LlamaConfig` (hidden size, query heads, head_dim, RoPE, norms,
    vocabulary, tied embeddings, attention_bias); `num_key_value_heads` and `intermediate_size` are the
    parent's and serve only as the default for layers that `block_configs` does not describe.

    `block_configs` holds one `AttrDict` per layer: plain JSON dicts in config.json, attributes for
    engines (`config.block_configs[i].attention.no_op`); `blocks` parses them. `to_dict` writes a
    top-level `rope_theta` / `rope_scaling` beside transformers 5's `rope_parameters`.

    `family` names the parent's family descriptor (family.py; "llama" when absent). Each layer's sliding
    window is its block's (`block_configs[i].attention.window_length`). The child deliberately writes no
    transformers `sliding_window` / `layer_types`: generate() would then build sliding cache layers numbered
    by layer, while the child's cache numbers only its GQA layers (and masks each window itself).

    `sliding_windows` is read only: the per-layer list older children wrote at config level (None: full
    causal attention). Loading folds it into the blocks (a layer's window becomes its GQA block's
    `window`) and clears it, so the window lives in one place and to_dict writes none.
    """

    model_type = "nemotron-nas"
    block_configs: list | None = None
    family: str = "llama"
    sliding_windows: list | None = None

    if _DATACLASS_CONFIG:

        def __post_init__(self, **kwargs: Any) -> None:
            super().__post_init__(**kwargs)
            self._check_blocks()

        @property
        def rope_theta(self) -> float:
            """transformers 5 keeps it in `rope_parameters`; engines read it here (SGLang falls back to 10000)."""
            params = self.__dict__.get("rope_parameters") or {}
            if "rope_theta" not in params:
                raise AttributeError("rope_theta")
            return params["rope_theta"]

        @rope_theta.setter
        def rope_theta(self, value: float) -> None:
            """Engines assign it back (vLLM's `patch_rope_parameters` does `config.rope_theta = ...`): it lands
            in `rope_parameters`, the one place transformers 5 keeps it, so the two never disagree."""
            params = self.__dict__.get("rope_parameters")
            if params is None:
                self.rope_parameters = {"rope_type": "default", "rope_theta": value}
            else:
                params["rope_theta"] = value

    else:

        def __init__(self, block_configs: list | None = None, family: str = "llama",
                     sliding_windows: list | None = None, **kwargs: Any) -> None:
            # transformers 5's `rope_parameters` -> the rope_theta / rope_scaling 4.x reads (when absent)
            for key, value in legacy_rope_fields(kwargs.pop("rope_parameters", None)).items():
                kwargs.setdefault(key, value)
            self.block_configs = block_configs
            self.family = family
            self.sliding_windows = sliding_windows
            super().__init__(**kwargs)
            self._check_blocks()

    def _check_blocks(self) -> None:
        try:
            family = get_family(self.family)
        except ValueError as err:
            raise BlockConfigError(str(err)) from None
        windows = self._legacy_windows()
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
        if windows is not None:
            blocks = [_fold_window(i, b, w) for i, (b, w) in enumerate(zip(blocks, windows))]
        if family.moe is None and any(b.ffn.is_moe for b in blocks):  # the router's semantics are the family's
            raise BlockConfigError(f"block_configs has MoE FFNs but family {family.name!r} has none")
        if family.hybrid is None and any(b.attention.is_mamba for b in blocks):  # conv width, chunk: the family's
            raise BlockConfigError(f"block_configs has Mamba2 mixers but family {family.name!r} is not hybrid")
        self.block_configs = [AttrDict(b.to_dict(self.hidden_size)) for b in blocks]

    def _legacy_windows(self) -> list | None:
        """The older children's config-level `sliding_windows` (checked), cleared from the config."""
        if self.sliding_windows is None:
            return None
        windows = list(self.sliding_windows)
        self.sliding_windows = None
        if len(windows) != self.num_hidden_layers or any(
            w is not None and (isinstance(w, bool) or not isinstance(w, int) or w <= 0) for w in windows
        ):
            raise BlockConfigError(f"sliding_windows must list a positive window or null for each of the "
                                   f"{self.num_hidden_layers} layers, got {windows!r}")
        return windows

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("sliding_windows", None)  # read only (older children); the windows are the blocks'
        out["block_configs"] = [dict(b, attention=dict(b["attention"]), ffn=dict(b["ffn"])) for b in self.block_configs]
        if "rope_parameters" in out:  # transformers 5: also the 4.x fields (4.x writes them itself)
            out.update(legacy_rope_fields(out["rope_parameters"]))
        return out

    @property
    def blocks(self) -> list[BlockConfig]:
        return [BlockConfig.from_dict(d, self.hidden_size) for d in self.block_configs]

    @property
    def family_descriptor(self):
        """The parent family's `Family` (family.py): what a layer's attention consists of."""
        return get_family(self.family)

    def layer_window(self, layer: int) -> int | None:
        """Layer `layer`'s sliding window (its attention block's: keys in (t - window, t] for query t), None
        for full attention."""
        return self.blocks[layer].attention.window

    @property
    def num_cached_layers(self) -> int:
        """Layers that keep a KV cache: only GQA attention does."""
        return sum(b.attention.is_gqa for b in self.blocks)


def _fold_window(layer: int, block: BlockConfig, window: int | None) -> BlockConfig:
    """An older child's layer window (config-level `sliding_windows`) as its GQA block's own; a block that
    names another window already is a contradiction."""
    if window is None or not block.attention.is_gqa:
        return block
    if block.attention.window not in (None, window):
        raise BlockConfigError(f"block_configs[{layer}] has window_length={block.attention.window} but "
                               f"sliding_windows[{layer}]={window}")
    return BlockConfig(block.attention.with_window(window), block.ffn)
