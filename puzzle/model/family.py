"""Parent families as data: what one decoder layer of each supported Hugging Face family consists of.

One frozen `Family` per family; everything that differs between them is a field here, and the rest of the
code reads the descriptor instead of branching on a model_type:

  model construction   modeling_puzzle.py `GQAttention` (biases, q/k norm, sinks; a window is the block's,
                       blocks.py), `MoEFFN` (routing, router and expert biases, the experts' activation),
                       `build_norm` (the RMSNorm's cast)
  conversion           checkpoint.py `puzzle_config_from` (`layer_windows` become the parent blocks' windows),
                       `puzzle_moe_state` (the fused expert layout, the router's name, MXFP4 blocks)
  pruning / slicing    pruning/slicing.py (a bias or a sink is cut with its heads, a q/k norm is per head_dim
                       and stays), prune.py (the Minitron output is the family's own plain class: `config_class`)
  library init         library/init.py (q/k norms, q bias and sinks copied, k/v biases pooled with their heads)
  shape / roofline     shape.py `ModelShape` (bias, sink and q/k-norm parameters, router and expert biases; a
                       window bounds KV cache and keys)
  export               `engines`: the engines whose loader builds this family's layer (puzzle/engines.py
                       `serving_engines` narrows them by the engines' rules, a sliding window among them)

Every supported family is a pre-norm RMSNorm decoder with SwiGLU FFNs, RoPE from transformers'
`rope_parameters` (plain, llama3, yarn, ... as the family's own rotary class computes them) and the same
weight names as transformers' class (`model.layers.{i}.self_attn.q_proj.weight`, `...q_norm.weight`), so
conversion is a straight state-dict copy. A family with another norm placement (Gemma's sandwich norms),
other names or another FFN adds a field here, its part in modeling_puzzle.py and a parity test.

MoE families (`moe`: an `MoESpec`) have an MoE FFN (blocks.py `MoEConfig`) in some or all layers: a router
`mlp.gate.weight` (E, D) and experts `mlp.experts.{j}.{gate,up,down}_proj.weight` (the hub checkpoints'
per-expert layout, which transformers 5 fuses into 3-D `gate_up_proj` / `down_proj` parameters: conversion
unfuses them, checkpoint.py `puzzle_moe_state`, in the layout `MoESpec.fused_layout` names).

gpt-oss (`gpt_oss`) is the one family that is not a plain SwiGLU decoder: its attention has attention sinks
(`sinks`: a learned logit per query head in every softmax's denominator, `self_attn.sinks` (H,)), biases on
q/k/v/o and alternating sliding / full layers (`layer_types`); its MoE FFN routes top-k of the biased router's
logits then a softmax over those k, and its experts have biases and a clamped SwiGLU (`MoESpec.activation`).
Its hub checkpoints store the experts MXFP4-packed (`*_blocks` / `*_scales`), dequantised on load
(checkpoint.py `dequantize_mxfp4`). Its RMSNorm casts after the weight (`norm_cast_last`).

Hybrid families (`hybrid`: a `HybridSpec`; NemotronH) have one mixer per layer, named by the config's
`layers_block_type` / `hybrid_override_pattern`: a Mamba2 mixer or an attention (the block's attention slot,
its FFN a no-op), or an MLP or an MoE (the FFN slot, attention a no-op). Each is a pre-norm residual block
with one norm, so the two-slot decoder layer computes it exactly (a no-op slot has neither module nor norm).

Standard library only: this file travels with every saved child checkpoint (configuration_puzzle.py imports
it relatively), so a process without `puzzle` builds the child's layers from it.
"""

from dataclasses import dataclass
from typing import Any, Literal

from .blocks import AttentionConfig, BlockConfig, FFNConfig, MambaConfig, MoEConfig

# How a family's HF config says which layers attend through a sliding window.
WindowRule = Literal["none", "all", "layer_types"]
FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' `layer_types` values


# How the router's logits become the top-k weights: "softmax_topk" softmax over all E logits (float32), then the
# top-k probabilities (Mixtral, Qwen-MoE); "topk_softmax" the top-k logits, then a softmax over those k in the
# logits' dtype (GptOssTopKRouter)
RoutingOrder = Literal["softmax_topk", "topk_softmax"]
# An expert's activation: "silu" down(silu(gate) * up); "clamped_swiglu" GptOssExperts._apply_gate:
# gate clamped above at `limit`, up to [-limit, limit], down((up + 1) * gate * sigmoid(alpha * gate))
ExpertActivation = Literal["silu", "clamped_swiglu"]
# The clamped SwiGLU's constants where a config does not carry them (transformers 4.x GptOssExperts hard-codes
# alpha; 5.x reads `swiglu_alpha` / `swiglu_limit`)
CLAMPED_SWIGLU_ALPHA, CLAMPED_SWIGLU_LIMIT = 1.702, 7.0
# How transformers' class fuses an MoE layer's experts into 3-D parameters (conversion unfuses them):
#   "gate_up_rows"         `gate_up_proj` (E, 2I, D): each expert's gate rows then its up rows; `down_proj`
#                          (E, D, I): nn.Linear's (out, in) per expert (Mixtral, Qwen-MoE in transformers 5)
#   "gate_up_interleaved"  `gate_up_proj` (E, D, 2I), applied as x @ W: gate at the even columns, up at the odd
#                          ones, and so `gate_up_proj_bias` (E, 2I); `down_proj` (E, I, D), `down_proj_bias`
#                          (E, D) (GptOssExperts, also the hub layout of gpt-oss)
FusedLayout = Literal["gate_up_rows", "gate_up_interleaved"]


# Which layers of an MoE family's HF config are MoE ("all"; "qwen": every `decoder_sparse_step`-th layer not in
# `mlp_only_layers`, the others dense SwiGLU of `intermediate_size`, as Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer)
SparseRule = Literal["all", "qwen", "pattern"]  # "pattern": a hybrid family's "moe" layers (`HybridSpec`)
# How a dense FFN (and an MoE's experts) computes: SwiGLU down(silu(gate(x)) * up(x)), or NemotronH's
# non-gated down(relu(up(x))^2) (transformers `NemotronHMLP`, `ACT2FN["relu2"]`)
DenseFFN = Literal["swiglu", "relu2"]


@dataclass(frozen=True)
class MoESpec:
    """How an MoE family's FFN routes, read from transformers' `<X>TopKRouter` / `<X>SparseMoeBlock` (the
    reference for every field). The block (blocks.py `MoEConfig`) says how many experts and how wide; this says
    how the router's logits become each token's top-k weights, the same for every layer of a family:

      softmax over all experts' logits (in float32), then the top-k of those probabilities, then divided by
      their sum when renormalising; each chosen expert's SwiGLU output is scaled by its weight and summed.

    experts_field, expert_size_field  the HF config fields of the expert count and an expert's width
    norm_topk    True: always renormalise the top-k probabilities (Mixtral); None: the config's
                 `norm_topk_prob` decides (Qwen2-MoE, Qwen3-MoE)
    sparse       which layers are MoE (`SparseRule`)
    shared_expert_field  the HF config field of the shared expert's width (Qwen2-MoE: a SwiGLU every token
                 goes through, added to the routed experts' sum, `mlp.shared_expert`); None: no shared expert
    shared_expert_gate   the shared expert's output is scaled by sigmoid(x . w) (`mlp.shared_expert_gate`,
                 a (1, D) weight; Qwen2-MoE)
    weights_in_input_dtype  the top-k weights are cast to the hidden states' dtype before they scale the
                 experts' outputs (Qwen's `router_top_value.to(router_logits.dtype)`); False: they stay fp32
                 (Mixtral). The same in fp32; one rounding apart in bf16.
    scoring      "softmax" (above) or "sigmoid": NemotronH's `NemotronHTopkRouter` (and DeepSeek-V3's):
                 fp32 logits of an fp32 router, scores = sigmoid(logits); the experts are chosen by
                 scores + `e_score_correction_bias` (a per-expert (E,) buffer of the router, `score_bias`),
                 their weights are the scores without it; renormalised as `renormalise` says (plus 1e-20), then
                 times the config's `scaling_field` (`routed_scaling_factor`)
    group_fields the config fields (n_group, topk_group) of grouped top-k: experts in n_group equal groups, a
                 group scored by the sum of its two best scores, only the topk_group best groups' experts
                 may be chosen; None: no grouping
    routing      the order of top-k and softmax (`RoutingOrder`); "topk_softmax" weights sum to 1 by
                 construction (no renormalising) and are in the logits' dtype
    router_bias  the router has a bias (E,) (`mlp.router.bias`, gpt-oss)
    expert_bias  each expert's gate, up and down projections have biases (gpt-oss)
    activation   the experts' activation (`ExpertActivation`); the clamped SwiGLU's alpha and limit are the
                 config's `swiglu_alpha` / `swiglu_limit` (`clamp`)
    fused_layout how transformers' class fuses the experts (`FusedLayout`)
    router_name  the router's module name in transformers' class and the hub checkpoints (`mlp.gate`,
                 gpt-oss `mlp.router`); puzzle's is `mlp.gate` in every family
    hub_fused    the hub checkpoints hold the experts fused in `fused_layout`, as transformers' class (4.x and
                 5.x) does (gpt-oss); False: one tensor per expert, which transformers 5 fuses on load
    """

    experts_field: str
    expert_size_field: str
    norm_topk: bool | None
    sparse: SparseRule = "all"
    shared_expert_field: str | None = None
    shared_expert_gate: bool = False
    weights_in_input_dtype: bool = True
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    score_bias: bool = False
    group_fields: tuple[str, str] | None = None
    scaling_field: str | None = None
    routing: RoutingOrder = "softmax_topk"
    router_bias: bool = False
    expert_bias: bool = False
    activation: ExpertActivation = "silu"
    fused_layout: FusedLayout = "gate_up_rows"
    router_name: str = "gate"
    hub_fused: bool = False

    def groups(self, config: Any) -> tuple[int, int]:
        """(n_group, topk_group) of grouped routing; (1, 1): every expert may be chosen."""
        if self.group_fields is None:
            return 1, 1
        return tuple(int(getattr(config, f, 1) or 1) for f in self.group_fields)

    def scaling(self, config: Any) -> float:
        """The factor the routed experts' weights are scaled by (1.0 where the family has none)."""
        return 1.0 if self.scaling_field is None else float(getattr(config, self.scaling_field, 1.0))

    def clamp(self, config: Any) -> tuple[float, float]:
        """(alpha, limit) of the clamped SwiGLU, from the config (a child's carries the parent's fields)."""
        return (float(getattr(config, "swiglu_alpha", None) or CLAMPED_SWIGLU_ALPHA),
                float(getattr(config, "swiglu_limit", None) or CLAMPED_SWIGLU_LIMIT))

    def renormalise(self, config: Any) -> bool:
        """Whether the top-k probabilities are divided by their sum (a child's config carries the parent's
        `norm_topk_prob`)."""
        return self.norm_topk if self.norm_topk is not None else bool(getattr(config, "norm_topk_prob", False))

    def is_moe_layer(self, config: Any, layer: int) -> bool:
        if self.sparse == "all":
            return True
        if self.sparse == "pattern":
            return layer_kinds(config)[layer] == "moe"
        step = getattr(config, "decoder_sparse_step", 1) or 1
        return (layer not in (getattr(config, "mlp_only_layers", None) or [])
                and getattr(config, self.experts_field) > 0 and (layer + 1) % step == 0)

    def block(self, config: Any) -> FFNConfig:
        """The MoE FFN of the HF config's MoE layers."""
        shared = getattr(config, self.shared_expert_field) if self.shared_expert_field else None
        return FFNConfig(moe=MoEConfig(getattr(config, self.experts_field), config.num_experts_per_tok,
                                       getattr(config, self.expert_size_field), shared or None))

    def parent_ffns(self, config: Any) -> list[FFNConfig]:
        """Each layer's FFN in the HF config: the MoE block, or the dense SwiGLU of `intermediate_size`."""
        moe = self.block(config)
        dense = FFNConfig(intermediate_size=config.intermediate_size)
        return [moe if self.is_moe_layer(config, i) else dense for i in range(config.num_hidden_layers)]


# A hybrid config's per-layer kinds: transformers 5's `layers_block_type` values and the older
# `hybrid_override_pattern` characters (NemotronHConfig `_pattern_to_list`), each as the block it is.
_LAYER_KINDS = {"linear_attention": "mamba", "mamba": "mamba", "M": "mamba", "full_attention": "attention",
                "attention": "attention", "*": "attention", "mlp": "mlp", "-": "mlp", "moe": "moe", "E": "moe"}


def layer_kinds(config: Any) -> list[str]:
    """Each layer of a hybrid HF config as "mamba" | "attention" | "mlp" | "moe", read from
    `layers_block_type` (a list) or `hybrid_override_pattern` (a string such as "M-M*-E")."""
    raw = getattr(config, "layers_block_type", None) or getattr(config, "hybrid_override_pattern", None) or []
    kinds = [_LAYER_KINDS.get(k) for k in raw]
    if not kinds or None in kinds:
        raise ValueError(f"unreadable hybrid layer pattern {raw!r} (expected mamba/attention/mlp/moe per layer)")
    return kinds


@dataclass(frozen=True)
class HybridSpec:
    """A hybrid family's per-layer mixers (transformers `NemotronHBlock`: norm, one mixer, residual), read
    from the config's pattern (`layer_kinds`). Mamba2 layers take their shape from these config fields, the
    same for every layer; attention layers are GQA of `num_key_value_heads`; MLP layers are the family's dense
    FFN of `intermediate_size`; MoE layers as `Family.moe` reads them.

    layout_fields  the config fields that describe the layer layout, replaced by `block_configs` in a child
    """

    num_heads_field: str = "mamba_num_heads"
    head_dim_field: str = "mamba_head_dim"
    state_field: str = "ssm_state_size"
    groups_field: str = "n_groups"
    layout_fields: tuple[str, ...] = ("layers_block_type", "hybrid_override_pattern", "layer_types",
                                      "mtp_layers_block_type", "mtp_hybrid_override_pattern")

    def mamba(self, config: Any) -> MambaConfig:
        return MambaConfig(*(int(getattr(config, f)) for f in (self.num_heads_field, self.head_dim_field,
                                                               self.state_field, self.groups_field)))

    def parent_blocks(self, config: Any, moe: "MoESpec | None") -> list[BlockConfig]:
        """Each layer of the HF config as a block: its mixer in the attention or the FFN slot, the other a no-op."""
        noop_attention, noop_ffn = AttentionConfig(no_op=True), FFNConfig(no_op=True)
        blocks = []
        for kind in layer_kinds(config):
            if kind == "mamba":
                blocks.append(BlockConfig(AttentionConfig(mamba=self.mamba(config)), noop_ffn))
            elif kind == "attention":
                group = config.num_attention_heads // config.num_key_value_heads
                blocks.append(BlockConfig(AttentionConfig(n_heads_in_group=group), noop_ffn))
            elif kind == "mlp":
                blocks.append(BlockConfig(noop_attention, FFNConfig(intermediate_size=config.intermediate_size)))
            else:
                if moe is None:
                    raise ValueError("an MoE layer in a family without MoE routing")
                blocks.append(BlockConfig(noop_attention, moe.block(config)))
        return blocks


@dataclass(frozen=True)
class Family:
    """One HF decoder family (transformers' `<X>Attention` / `<X>Config` are the reference for every field).

    qkv_bias, o_bias  whether q/k/v_proj and o_proj have biases; None: the config's `bias_field` decides
                      (Llama and Qwen3 put `attention_bias` on all four; Qwen2 hard-codes q/k/v on, o off;
                      Qwen2-MoE reads q/k/v's from `qkv_bias`, o off; Mistral none)
    qk_norm           an RMSNorm over head_dim applied to every query and key head before RoPE, one weight
                      vector (head_dim,) shared by all heads (transformers `Qwen3Attention.q_norm` / `k_norm`)
    windows           which layers of the HF config use `sliding_window` (keys in (t - window, t] for query
                      t): "none"; "all" when the config sets it (Mistral); "layer_types" per layer (Qwen2/3).
                      Conversion makes each one the parent's attention block's own window (blocks.py)
    sinks             attention sinks: a learned logit per query head (`self_attn.sinks` (H,)) joins every
                      query's softmax over its keys as one more term of the denominator, with no value
                      (transformers `GptOssAttention` / `eager_attention_forward`)
    norm_cast_last    the RMSNorms multiply by their weight in float32 and cast the product to the input's dtype
                      (transformers `GptOssRMSNorm`: `(w * x).to(dtype)`); False: Llama's `w * x.to(dtype)`.
                      The same in fp32, one rounding apart in bf16
    moe               how the family's MoE FFNs route (`MoESpec`); None for a dense family
    rope              whether attention rotates q/k (NemotronH's `NemotronHAttention` applies no position
                      embedding: its attention layers see positions only through the Mamba2 layers)
    ffn               how a dense FFN and an MoE expert compute (`DenseFFN`): "swiglu" or NemotronH's "relu2"
    hybrid            a hybrid family's per-layer mixers (`HybridSpec`); None: every layer attention + FFN
    engines           the target engines (puzzle.engines) that serve this family's children: their nemotron-nas /
                      deci loaders build Llama's attention only; llama.cpp's own qwen2 / qwen3 loaders build every
                      layer at layer 0's KV and FFN widths (llama.cpp 0c1e57098 `check_tensor_dims` refuses a
                      per-layer head_count_kv or feed_forward_length), so Qwen children are transformers'
    """

    name: str
    model_types: tuple[str, ...]
    config_class: str  # transformers' config and causal-LM classes: Minitron writes these plain checkpoints
    causal_lm_class: str
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    qk_norm: bool = False
    sinks: bool = False
    norm_cast_last: bool = False
    windows: WindowRule = "none"
    engines: tuple[str, ...] = ("transformers",)
    moe: MoESpec | None = None
    bias_field: str = "attention_bias"
    rope: bool = True
    ffn: DenseFFN = "swiglu"
    hybrid: HybridSpec | None = None

    def attention_biases(self, config: Any) -> tuple[bool, bool]:
        """(q/k/v bias, o bias) of a config of this family (a PuzzleConfig or the HF config)."""
        default = bool(getattr(config, self.bias_field, False))
        return (default if self.qkv_bias is None else self.qkv_bias,
                default if self.o_bias is None else self.o_bias)

    def layer_windows(self, config: Any) -> list[int | None]:
        """The HF config's sliding window per layer (None: full causal attention), as transformers applies it."""
        n = config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        if self.windows == "none" or window is None:
            return [None] * n
        if self.windows == "all":  # MistralModel: create_sliding_window_causal_mask for every layer
            return [window] * n
        # Qwen2/Qwen3 configs resolve use_sliding_window and max_window_layers into layer_types themselves
        types = getattr(config, "layer_types", None) or [FULL] * n
        return [window if t == SLIDING else None for t in types]


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", ("llama",), "LlamaConfig", "LlamaForCausalLM",
                    engines=("transformers", "vllm", "sglang", "trtllm", "llamacpp")),
    "mistral": Family("mistral", ("mistral",), "MistralConfig", "MistralForCausalLM", qkv_bias=False, o_bias=False,
                      windows="all", engines=("transformers", "vllm", "sglang", "trtllm", "llamacpp")),
    "qwen2": Family("qwen2", ("qwen2",), "Qwen2Config", "Qwen2ForCausalLM", qkv_bias=True, o_bias=False,
                    windows="layer_types"),
    "qwen3": Family("qwen3", ("qwen3",), "Qwen3Config", "Qwen3ForCausalLM", qk_norm=True, windows="layer_types"),
    # MoE families: Qwen3's attention (q/k norm, attention_bias on all four; its config resolves
    # use_sliding_window into `sliding_window`, applied to every layer); Mistral's attention (no biases).
    # Served by transformers only until the engines' loaders read per-layer MoE blocks.
    # Qwen2's attention (q/k/v biases per the config's `qkv_bias`, windowed layers from `layer_types`), MoE FFNs
    # with a gated shared expert
    "qwen2_moe": Family("qwen2_moe", ("qwen2_moe",), "Qwen2MoeConfig", "Qwen2MoeForCausalLM", o_bias=False,
                        bias_field="qkv_bias", windows="layer_types",
                        moe=MoESpec("num_experts", "moe_intermediate_size", None, "qwen",
                                    shared_expert_field="shared_expert_intermediate_size", shared_expert_gate=True)),
    "qwen3_moe": Family("qwen3_moe", ("qwen3_moe",), "Qwen3MoeConfig", "Qwen3MoeForCausalLM", qk_norm=True,
                        windows="all", moe=MoESpec("num_experts", "moe_intermediate_size", None, "qwen")),
    "mixtral": Family("mixtral", ("mixtral",), "MixtralConfig", "MixtralForCausalLM", qkv_bias=False, o_bias=False,
                      windows="all", moe=MoESpec("num_local_experts", "intermediate_size", True, weights_in_input_dtype=False)),
    # Hybrid: Mamba2 / attention / relu2 MLP / MoE layers (transformers models/nemotron_h). Attention without
    # biases (NemotronHAttention hard-codes bias=False whatever `attention_bias` says) and without RoPE; MoE
    # with sigmoid, bias-corrected, grouped routing (NemotronHTopkRouter), non-gated relu2 experts and an
    # ungated shared expert of `moe_shared_expert_intermediate_size` (NemotronHMoE builds it whatever
    # `n_shared_experts` says); the top-k weights stay fp32 (`top_k_weights` scale the experts' outputs).
    "nemotron_h": Family("nemotron_h", ("nemotron_h",), "NemotronHConfig", "NemotronHForCausalLM",
                         qkv_bias=False, o_bias=False, rope=False, ffn="relu2", norm_cast_last=True,
                         hybrid=HybridSpec(),
                         moe=MoESpec("n_routed_experts", "moe_intermediate_size", None, "pattern",
                                     shared_expert_field="moe_shared_expert_intermediate_size",
                                     weights_in_input_dtype=False, scoring="sigmoid", score_bias=True,
                                     group_fields=("n_group", "topk_group"), scaling_field="routed_scaling_factor")),
    # gpt-oss: attention_bias on all four, sinks, sliding / full layers from `layer_types`; every layer MoE
    # (experts of `intermediate_size`), its router and experts as GptOssTopKRouter / GptOssExperts
    "gpt_oss": Family("gpt_oss", ("gpt_oss",), "GptOssConfig", "GptOssForCausalLM", sinks=True, norm_cast_last=True,
                      windows="layer_types",
                      moe=MoESpec("num_local_experts", "intermediate_size", False, routing="topk_softmax",
                                  router_bias=True, expert_bias=True, activation="clamped_swiglu",
                                  fused_layout="gate_up_interleaved", router_name="router", hub_fused=True)),
}
DEFAULT_FAMILY = "llama"


def get_family(name: str | None) -> Family:
    """The descriptor recorded in a child's config (`family`; absent in children older than families: llama)."""
    family = FAMILIES.get(name or DEFAULT_FAMILY)
    if family is None:
        raise ValueError(f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}")
    return family


def family_of_model_type(model_type: str) -> Family | None:
    """The family whose HF `model_type` this is, or None."""
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


def window_layer_types(windows: list[int | None]) -> tuple[int | None, list[str] | None]:
    """(sliding_window, layer_types) that describe per-layer windows in transformers' fields; (None, None)
    when no layer has one. One window size per model (as every supported family has)."""
    sizes = {w for w in windows if w is not None}
    if not sizes:
        return None, None
    if len(sizes) > 1:
        raise ValueError(f"layers with different sliding windows {sorted(sizes)} are not supported")
    return sizes.pop(), [FULL if w is None else SLIDING for w in windows]


def parent_ffns(config: Any) -> list[FFNConfig] | None:
    """Each layer's FFN of an MoE parent: a supported MoE family's HF config as the family reads it, a puzzle
    child's `block_configs` where some layer is MoE; None for a dense parent (every layer `intermediate_size`)."""
    if getattr(config, "model_type", None) == "nemotron-nas":
        ffns = [b.ffn for b in config.blocks]
        return ffns if any(f.is_moe for f in ffns) else None
    family = family_of_model_type(getattr(config, "model_type", ""))
    if family is not None and family.hybrid is not None:
        ffns = [b.ffn for b in family.hybrid.parent_blocks(config, family.moe)]
        return ffns if any(f.is_moe for f in ffns) else None
    return family.moe.parent_ffns(config) if family is not None and family.moe is not None else None


def is_hybrid(config: Any) -> bool:
    """Whether a config is a hybrid family's (NemotronH) parent or child, or a child with a Mamba2 block."""
    if getattr(config, "model_type", None) == "nemotron-nas":
        family = FAMILIES.get(getattr(config, "family", None) or DEFAULT_FAMILY)
        return (family is not None and family.hybrid is not None) or any(b.attention.is_mamba for b in config.blocks)
    family = family_of_model_type(getattr(config, "model_type", ""))
    return family is not None and family.hybrid is not None


def has_moe(config: Any) -> bool:
    """Whether a puzzle child's config (an MoE block in some layer) or a supported HF config (an MoE family)
    has MoE FFNs."""
    return parent_ffns(config) is not None


def config_family(config: Any) -> tuple[Family, list[int | None]]:
    """(family, each layer's sliding window) of a puzzle child's config (its `family`; the windows are its
    attention blocks') or of a supported family's HF config (read as transformers does); an unknown model_type
    reads as Llama."""
    if getattr(config, "model_type", None) == "nemotron-nas":
        return get_family(getattr(config, "family", None)), [b.attention.window for b in config.blocks]
    family = family_of_model_type(getattr(config, "model_type", "")) or FAMILIES[DEFAULT_FAMILY]
    return family, family.layer_windows(config)
