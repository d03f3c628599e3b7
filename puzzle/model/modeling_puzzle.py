"""The heterogeneous decoder: every layer picks its own attention and FFN (see configuration_puzzle.py).

Travels with every saved checkpoint next to configuration_puzzle.py, so it imports only torch and
transformers. RoPE and RMSNorm are transformers' own Llama modules (Mistral's, Qwen2's and Qwen3's are the
same code; gpt-oss's computes the same angles), and a layer's attention is built as its family (family.py)
says: q/k/v and o biases, per-head q/k RMSNorm, attention sinks, a sliding window; an MoE block's FFN routes
and activates as its family's `MoESpec` says (`MoEFFN`); so a child whose blocks are all the parent's computes
the parent's logits. A hybrid family's (NemotronH) layer holds one
mixer in one slot: a Mamba2 mixer (mamba.py) or an attention without RoPE in the attention slot, a relu2 MLP
or an MoE with sigmoid, grouped routing in the FFN slot.

Shapes: B batch, T new tokens, S = past + T keys, D hidden, H query heads, K kv heads, d head_dim.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from .blocks import AttentionConfig, FFNConfig, MoEConfig
from .configuration_puzzle import PuzzleConfig
from .mamba import Mamba2Mixer


# The output field holding the KV cache: `cache` from transformers 5.2x on, `past_key_values` before.
_CACHE_FIELD = "cache" if "cache" in getattr(BaseModelOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"

class PuzzleRMSNorm(LlamaRMSNorm):
    """transformers' LlamaRMSNorm (`w * x.to(dtype)`), or with `cast_last` GptOssRMSNorm's (and NemotronHRMSNorm's) order: the weight
    applied in float32 and the product cast, `(w * x).to(dtype)` (family.py `Family.norm_cast_last`). A
    LlamaRMSNorm either way: code that finds the norms by class finds these."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, cast_last: bool = False) -> None:
        super().__init__(hidden_size, eps=eps)
        self.cast_last = cast_last

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.cast_last:
            return super().forward(hidden_states)
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * h).to(dtype)


def build_norm(config: PuzzleConfig) -> PuzzleRMSNorm:
    """A pre-norm (or the final norm) over the hidden size, as the config's family computes it."""
    return PuzzleRMSNorm(config.hidden_size, config.rms_norm_eps, config.family_descriptor.norm_cast_last)


class GQAttention(nn.Module):
    """Grouped-query attention with `num_kv_heads` KV heads (divides the query heads), built as the parent
    family's attention: q/k/v and o biases, and for Qwen3 an RMSNorm over head_dim on each query and key head
    before RoPE (one (d,) weight shared by the heads: transformers `Qwen3Attention.q_norm` / `k_norm`); for
    gpt-oss `sinks` (H,), one logit per query head added to every softmax's denominator (`sink_attention`).
    `window`: the block's sliding window (`attention.window`: query t sees keys in (t - window, t], as
    transformers masking_utils `sliding_window_overlay`), applied here so that every caller of the layer gets
    it, the cache keeping every key; None: full causal."""

    def __init__(self, config: PuzzleConfig, attention: AttentionConfig) -> None:
        super().__init__()
        family = config.family_descriptor
        self.window = attention.window
        self.rope = family.rope  # NemotronHAttention rotates nothing
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = attention.num_key_value_heads(config.num_attention_heads)
        self.head_dim = config.head_dim
        qkv_bias, o_bias = family.attention_biases(config)
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=o_bias)
        if family.qk_norm:
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        # zeros: a sink of logit 0 until the parent's is loaded or BLD trains it (transformers draws N(0, std))
        self.sinks = nn.Parameter(torch.zeros(self.num_heads)) if family.sinks else None

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D), already normed
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,  # bool (B, 1, T, S) or None for plain causal
        past_key_values: Cache | None = None,
        cache_index: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # (B, T, H, d)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, K, d)
        if self.q_norm is not None:  # over d, per head
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, d), (B, K, T, d)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope:
            cos, sin = position_embeddings
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, cache_index)  # (B, K, S, d): every past key (a full cache)
        if self.window is not None and k.shape[2] > self.window:
            attention_mask = window_mask(attention_mask, T, k.shape[2], self.window, x.device)
        if self.sinks is not None:
            y = sink_attention(q, k, v, self.sinks, attention_mask)
        else:
            # Plain causal when every query sees exactly its prefix; a single decode token sees everything.
            is_causal = attention_mask is None and T > 1 and k.shape[2] == T
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask, is_causal=is_causal, enable_gqa=self.num_kv_heads != self.num_heads
            )  # (B, H, T, d)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


def sink_attention(
    q: torch.Tensor,  # (B, H, T, d)
    k: torch.Tensor,  # (B, K, S, d)
    v: torch.Tensor,  # (B, K, S, d)
    sinks: torch.Tensor,  # (H,)
    attention_mask: torch.Tensor | None,  # bool (B or 1, 1, T, S), or None: causal over the last T of S
) -> torch.Tensor:
    """Attention whose softmax has one more term per head, exp(sink_h), with no value behind it: transformers
    gpt_oss `eager_attention_forward` concatenates the sinks to the scaled logits and drops their column after
    the softmax. Here the sink is one extra key of zeros (its logit q . 0 = 0) and zero value, whose additive
    mask is the sink itself, so SDPA computes it in one call: (B, H, T, d)."""
    B, H, T, d = q.shape
    S = k.shape[2]
    if attention_mask is None:  # causal: query t (position S - T + t) sees keys s <= S - T + t
        q_pos = torch.arange(S - T, S, device=q.device)[:, None]
        attention_mask = (torch.arange(S, device=q.device)[None, :] <= q_pos)[None, None]
    zeros = k.new_zeros(B, k.shape[1], 1, d)
    k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)  # (B, K, S + 1, d)
    bias = torch.zeros(attention_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attention_mask, float("-inf"))
    M = bias.shape[0]
    sink = sinks.to(q.dtype).view(1, H, 1, 1).expand(M, H, T, 1)
    mask = torch.cat([bias.expand(M, H, T, S), sink], dim=-1)  # (M, H, T, S + 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != H)


def window_mask(attention_mask: torch.Tensor | None, T: int, S: int, window: int, device: torch.device) -> torch.Tensor:
    """The bool mask (B or 1, 1, T, S) of the last T of S positions under a sliding window: causal (or
    `attention_mask`, already causal) and key s > query t - window."""
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    band = ((k_pos > q_pos - window) & (k_pos <= q_pos))[None, None]  # (1, 1, T, S)
    return band if attention_mask is None else attention_mask & band


class LinearAttention(nn.Module):
    """Attention replaced by one hidden->hidden map per token (no mixing across tokens, no KV cache)."""

    def __init__(self, config: PuzzleConfig) -> None:
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.linear_attn(x)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Relu2MLP(nn.Module):
    """NemotronH's non-gated FFN (transformers `NemotronHMLP`, `ACT2FN["relu2"]`): down(relu(up(x))^2)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.square(F.relu(self.up_proj(x))))


def dense_ffn(config: PuzzleConfig, intermediate_size: int, bias: bool = False) -> nn.Module:
    """The family's dense FFN (`Family.ffn`): SwiGLU or NemotronH's relu2 MLP."""
    cls = Relu2MLP if config.family_descriptor.ffn == "relu2" else SwiGLU
    return cls(config.hidden_size, intermediate_size, bias)


class SigmoidRouter(nn.Module):
    """NemotronH's router (transformers `NemotronHTopkRouter`): an fp32 linear D -> E without bias and the per-expert
    `e_score_correction_bias` (E,) buffer that shifts the choice, not the weights; parameters named as its."""

    def __init__(self, hidden_size: int, num_experts: int, score_bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        if score_bias:  # the family's `MoESpec.score_bias`
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> fp32 logits (N, E)."""
        return F.linear(x.float(), self.weight.float())


class ClampedSwiGLU(SwiGLU):
    """gpt-oss's expert (transformers `GptOssExperts._apply_gate`): the gate clamped above at `limit`, the up
    projection to [-limit, limit], then down((up + 1) * gate * sigmoid(alpha * gate)). The same parameters as
    `SwiGLU` (gate, up, down; biases where the family has them)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, alpha: float, limit: float) -> None:
        super().__init__(hidden_size, intermediate_size, bias)
        self.alpha, self.limit = alpha, limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x).clamp(max=self.limit)
        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return self.down_proj((up + 1) * (gate * torch.sigmoid(gate * self.alpha)))


def build_expert(config: PuzzleConfig, intermediate_size: int) -> nn.Module:
    """One routed expert of the config's MoE family: its activation and biases (family.py `MoESpec`), a
    relu2 MLP where the family's dense FFN is one (NemotronH)."""
    spec = config.family_descriptor.moe
    if spec.activation == "clamped_swiglu":
        return ClampedSwiGLU(config.hidden_size, intermediate_size, spec.expert_bias, *spec.clamp(config))
    return dense_ffn(config, intermediate_size, spec.expert_bias)


class MoEFFN(nn.Module):
    """A Mixture-of-Experts FFN: a router `gate` (D -> E logits, a bias where the family has one) and E SwiGLU
    `experts` (`build_expert`: the family's activation and biases), routed as the parent family says
    (family.py `MoESpec`, the same steps as transformers' `<X>TopKRouter` and `<X>Experts`): softmax over the
    E logits in float32, the top-k probabilities, divided by their sum where the family renormalises (and cast
    to the input's dtype where it does so), or (gpt-oss) the top-k logits and a softmax over those k; each
    chosen expert's output times its weight, in the input's dtype, summed over experts in ascending order
    (transformers' index_add_).

    Experts are separate modules (`experts.{j}.gate_proj.weight`, the hub checkpoints' layout), so keeping a
    subset of experts or narrowing one is a module-level edit. Only the experts some token chose run. A
    shared expert (`moe.shared_expert_size`) runs on every token and is added, scaled by
    sigmoid(`shared_expert_gate`(x)) where the family gates it (Qwen2MoeSparseMoeBlock)."""

    def __init__(self, config: PuzzleConfig, moe: MoEConfig) -> None:
        super().__init__()
        spec = config.family_descriptor.moe
        if spec is None:
            raise ValueError(f"family {config.family!r} has no MoE FFN; an MoE block needs an MoE family")
        self.top_k = moe.top_k
        self.routing = spec.routing
        self.renormalise = spec.renormalise(config)
        self.weights_in_input_dtype = spec.weights_in_input_dtype
        self.sigmoid = spec.scoring == "sigmoid"
        self.n_group, self.topk_group = spec.groups(config)
        self.scaling = spec.scaling(config)
        if self.sigmoid:
            if self.n_group > 1 and (moe.num_experts % self.n_group or moe.num_experts // self.n_group < 2):
                raise ValueError(f"{moe.num_experts} experts do not split into {self.n_group} routing groups of two "
                                 "or more (a group is scored by its two best experts)")
            self.gate = SigmoidRouter(config.hidden_size, moe.num_experts, spec.score_bias)
        else:
            self.gate = nn.Linear(config.hidden_size, moe.num_experts, bias=spec.router_bias)
        self.experts = nn.ModuleList(build_expert(config, moe.expert_size) for _ in range(moe.num_experts))
        self.shared_expert = self.shared_expert_gate = None
        if moe.shared_expert_size is not None:  # NemotronHMoE's shared expert takes `mlp_bias`, Qwen2-MoE's none
            bias = config.mlp_bias if spec.scoring == "sigmoid" else False
            self.shared_expert = dense_ffn(config, moe.shared_expert_size, bias)
            if spec.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) -> the top-k weights (N, k) (float32, or x's dtype where the family casts them) and the
        chosen experts (N, k)."""
        if self.sigmoid:
            return self.route_sigmoid(x)
        logits = self.gate(x)
        if self.routing == "topk_softmax":  # GptOssTopKRouter: a softmax over the top-k logits, in their dtype
            top, chosen = torch.topk(logits, self.top_k, dim=-1)
            return F.softmax(top, dim=-1, dtype=top.dtype), chosen
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype) if self.weights_in_input_dtype else weights, chosen

    def route_sigmoid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers `NemotronHTopkRouter.forward`: sigmoid scores (fp32); the experts chosen by score +
        correction bias among the `topk_group` best of `n_group` groups (a group scored by its two best), the
        weights the chosen scores, renormalised (+1e-20) where the config says, times `routed_scaling_factor`."""
        scores = self.gate(x).sigmoid()  # (N, E) fp32
        bias = self.gate.e_score_correction_bias
        choice = scores if bias is None else scores + bias
        N, E = choice.shape
        if self.n_group > 1 or self.topk_group < self.n_group:
            group_scores = choice.view(N, self.n_group, E // self.n_group).topk(2, dim=-1)[0].sum(dim=-1)
            group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)  # (N, n_group)
            allowed = group_mask.unsqueeze(-1).expand(N, self.n_group, E // self.n_group).reshape(N, E)
            choice = choice.masked_fill(~allowed.bool(), float("-inf"))
        chosen = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, chosen)
        if self.renormalise:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, D)
        weights, chosen = self.route(flat)
        out = torch.zeros_like(flat)
        for j in torch.unique(chosen).tolist():
            token, slot = torch.where(chosen == j)
            y = self.experts[j](flat[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        return out.view(shape)


class LinearFFN(nn.Module):
    def __init__(self, config: PuzzleConfig) -> None:
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_mlp(x)


def build_attention(config: PuzzleConfig, attention: AttentionConfig, layer: int | None = None) -> nn.Module | None:
    """The attention module of a variant (a GQA one with its own sliding window, if any); `layer` is the layer
    whose decode state a Mamba2 mixer keeps in the cache (None: none, e.g. a module profiled alone)."""
    if attention.no_op:
        return None
    if attention.replace_with_linear:
        return LinearAttention(config)
    if attention.is_mamba:
        return Mamba2Mixer(config, attention.mamba, layer)
    return GQAttention(config, attention)


def build_ffn(config: PuzzleConfig, ffn: FFNConfig) -> nn.Module | None:
    if ffn.no_op:
        return None
    if ffn.replace_with_linear:
        return LinearFFN(config)
    if ffn.is_moe:
        return MoEFFN(config, ffn.moe)
    return dense_ffn(config, ffn.intermediate_size, config.mlp_bias)


class PuzzleDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual block; a no-op sublayer has neither its module nor its norm (as in DeciLM).
    `gradient_checkpointing_enable()` recomputes it in the backward (transformers' GradientCheckpointingLayer,
    as LlamaDecoderLayer; its inputs are passed positionally, as that class requires)."""

    def __init__(self, config: PuzzleConfig, layer_idx: int) -> None:
        super().__init__()
        block = config.blocks[layer_idx]
        self.layer_idx = layer_idx
        self.self_attn = build_attention(config, block.attention, layer_idx)
        self.mlp = build_ffn(config, block.ffn)
        self.input_layernorm = build_norm(config) if self.self_attn is not None else None
        self.post_attention_layernorm = build_norm(config) if self.mlp is not None else None

    @property
    def has_kv_cache(self) -> bool:
        return isinstance(self.self_attn, GQAttention)

    def attention_residual(self, h: torch.Tensor, *attn_args) -> torch.Tensor:
        """(B, T, D) -> h + attention(input_layernorm(h)); h itself where attention is a no-op.
        `attn_args` as `forward` takes them after the hidden states."""
        return attention_residual(self.input_layernorm, self.self_attn, h, *attn_args)

    def ffn_residual(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> h + mlp(post_attention_layernorm(h)); h itself where the FFN is a no-op."""
        return ffn_residual(self.post_attention_layernorm, self.mlp, h)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        cache_index: int = 0,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if isinstance(self.self_attn, Mamba2Mixer):  # its state is keyed by layer; padding is zeroed, not masked
            h = attention_residual(self.input_layernorm, self.self_attn, hidden_states,
                                   mamba_args=(padding_mask, past_key_values))
        else:
            h = self.attention_residual(hidden_states, position_embeddings, attention_mask, past_key_values, cache_index)
        return self.ffn_residual(h)


def attention_residual(norm: nn.Module | None, attn: nn.Module | None, h: torch.Tensor, *attn_args,
                       mamba_args: tuple = ()) -> torch.Tensor:
    """The attention sublayer's pre-norm residual step, h + attn(norm(h)) (B, T, D); h for a no-op (attn None).
    `attn_args` go to the attention module as they are: position_embeddings, then optionally attention_mask,
    past_key_values, cache_index (GQAttention.forward). A Mamba2 mixer takes none of them (no positions, its
    own causal scan) but `mamba_args` (padding_mask, cache: the decoder layer's); without them it runs the
    whole sequence unpadded and uncached, as a sublayer trained or scored alone does. A function of the parts
    so that a sublayer trained alone (BLD) runs the decoder layer's own code."""
    if attn is None:
        return h
    if isinstance(attn, Mamba2Mixer):
        return h + attn(norm(h), *mamba_args)
    return h + attn(norm(h), *attn_args)


def ffn_residual(norm: nn.Module | None, mlp: nn.Module | None, h: torch.Tensor) -> torch.Tensor:
    """The FFN sublayer's pre-norm residual step, h + mlp(norm(h)) (B, T, D); h for a no-op (mlp None)."""
    if mlp is None:
        return h
    return h + mlp(norm(h))


class PuzzlePreTrainedModel(PreTrainedModel):
    # get/set_input_embeddings and get/set_output_embeddings are transformers' own (EmbeddingAccessMixin in
    # modeling_utils.py, 4.56 on): they find `embed_tokens`, `model.embed_tokens` and `lm_head`, as for Llama.
    config_class = PuzzleConfig
    config: PuzzleConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PuzzleDecoderLayer"]
    _supports_sdpa = True
    _skip_keys_device_placement = ["past_key_values"]


def build_attention_mask(
    attention_mask: torch.Tensor | None, T: int, past: int, dtype_device: torch.Tensor
) -> torch.Tensor | None:
    """Bool mask (B, 1, T, past+T), or None where plain causal attention (or none at all) is exact.

    `attention_mask` is the usual 2D (B, past+T) padding mask (1 = real token), or a ready 4D bool mask
    (B, 1, T, past+T), True = may attend, used as it is (as transformers does with custom 4D masks).
    A layer with a sliding window narrows it further itself (`GQAttention.window`).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool:
            raise ValueError("a 4D attention mask must be bool (True = may attend)")
        return attention_mask
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (past == 0 or T == 1):
        return None
    S = past + T
    device = dtype_device.device
    q_pos = torch.arange(past, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if padded:
        keys = attention_mask[:, None, None, -S:].bool()  # (B, 1, 1, S)
        # A query always sees itself, so rows of left padding stay finite (their outputs are ignored).
        mask = (mask & keys) | (k_pos == q_pos)[None, None]
    return mask


def recurrent_padding_mask(attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """The (B, T) padding mask a Mamba2 mixer zeroes its inputs with (transformers masking_utils
    `create_recurrent_attention_mask`): the 2D mask's last T columns, or None for a custom 4D mask, a single
    decoded token or no padding at all."""
    if attention_mask is None or attention_mask.dim() != 2 or T == 1 or bool(attention_mask.all()):
        return None
    return attention_mask[:, -T:]


class PuzzleModel(PuzzlePreTrainedModel):
    def __init__(self, config: PuzzleConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(PuzzleDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = build_norm(config)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    @property
    def has_mamba(self) -> bool:
        """Whether some layer is a Mamba2 mixer (read each time: surgery may swap a layer's module, and task
        depth pruning a run of layers for a module of its own, pruning/task_depth.py)."""
        return any(isinstance(getattr(layer, "self_attn", None), Mamba2Mixer) for layer in self.layers)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if past_key_values is None:  # transformers >= 5.2x names the cache `cache` (generate passes that)
            past_key_values = kwargs.get("cache")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training and self.layers[0].gradient_checkpointing and torch.is_grad_enabled():
            use_cache = False  # a checkpointed layer recomputed in the backward would write its KV cache again
        if use_cache and past_key_values is None:
            # Cache slots are numbered over GQA layers only: no-op and linear attention keep nothing.
            past_key_values = DynamicCache()
        B, T, _ = inputs_embeds.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=inputs_embeds.device)[None].expand(B, T)
        mask = build_attention_mask(attention_mask, T, past, inputs_embeds)
        padding = recurrent_padding_mask(attention_mask, T) if self.has_mamba else None

        h = inputs_embeds
        position_embeddings = self.rotary_emb(h, position_ids)
        all_hidden = [h] if output_hidden_states else None
        cache_index = 0
        for layer in self.layers:
            h = layer(h, position_embeddings, mask, past_key_values, cache_index, padding)
            cache_index += layer.has_kv_cache
            if all_hidden is not None:
                all_hidden.append(h)
        h = self.norm(h)
        return BaseModelOutputWithPast(
            last_hidden_state=h,
            **{_CACHE_FIELD: past_key_values if use_cache else None},
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )


class PuzzleForCausalLM(PuzzlePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PuzzleConfig) -> None:
        super().__init__(config)
        self.model = PuzzleModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # The parameters are spelled out again (in LlamaForCausalLM's order) because GenerationMixin reads this
    # signature: it passes attention_mask, position_ids and logits_to_keep only where forward names them.
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values if past_key_values is not None else kwargs.get("cache"),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)}
        )
