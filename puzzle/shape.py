"""The one shape arithmetic: parameters, FLOPs, KV-cache and activation bytes of a model of any supported
family (puzzle/model/family.py), per block variant (AttentionConfig / FFNConfig / BlockConfig) and per fixed
part, from the parent's dimensions alone. No torch: the roofline, Minitron's shape search, the solver's synthetic problems and
BLD's FLOP accounting all count with this, and tests/test_shape.py checks it against real models.

Symbols: D hidden, H query heads, K KV heads of a variant, d head_dim, I FFN width, V vocabulary,
L layers, T tokens of a sequence, S keys a query attends to, e bytes per element.

  parameters  GQA attention: D*(H + 2K)*d (q, k, v) + H*d*D (o) + D (its pre-norm), plus the family's
              biases ((H + 2K)*d on q/k/v, D on o), q/k norms (2*d, shared by the heads) and attention
              sinks (H, one logit per query head: gpt-oss);
              SwiGLU FFN: 3*D*I + D; linear sublayer: D*D + D; no-op: 0 (no module, no norm);
              MoE FFN of E experts of width I, top-k: E*3*D*I (experts) + E*D (router) + D in all, of which a
              token uses k*3*D*I + E*D + D (`active_params`); a shared expert of width S adds 3*D*S (+ D for
              its gate) to both; a router bias adds E to both, expert biases (gpt-oss: gate, up and down)
              2*I + D per expert, k of them active.
              Fixed: embeddings V*D, final norm D, LM head V*D (0 when tied to the embeddings).
  FLOPs       forward, 2 per multiply-add: 2 x the matmul weights per token (an MoE FFN's active ones:
              the router and k experts), plus attention's
              QK^T and PV: 4*H*d*S per query over S keys. A causal sequence of T tokens has queries
              over 1..T keys: 2*H*d*T*(T+1) in all.
  KV cache    2*K*d*e bytes per cached token per layer (K and V); 0 without GQA attention.
  routing     n tokens each choosing k of E experts touch U = sum_j 1 - (1 - p_j)^n distinct experts in
              expectation (`expected_experts`; p_j = k/E when routing is uniform): the weights an MoE decode
              step reads.
  Mamba2      (a hybrid family's, NemotronH) heads Hm of P channels, inner I = Hm*P, state N, G groups of B/C,
              conv width K, conv channels C = I + 2*G*N, chunk Q (transformers `NemotronHMamba2Mixer`):
              parameters in_proj D*(2I + 2GN + Hm) (z, x, B, C, dt) + out_proj I*D + conv C*K (+ C bias)
              + dt_bias, A_log, D (3*Hm) + gated norm I + its pre-norm D (+ the projections' biases);
              FLOPs per token: 2 x the projections + conv 2*C*K + a prefill's chunked scan (SSD) per token
              2*Q*(G*N + Hm*P) (C B^T within a chunk, then its weights on x) + 4*Hm*P*N (chunk states,
              their read-out), or a decode step's recurrence 4*Hm*P*N (decay + outer product, read-out);
              no KV cache but a fixed state per sequence: conv (K-1)*C in the dtype and SSM Hm*P*N in fp32
              (vLLM's `mamba_ssm_cache_dtype` default float32; `recurrent_state_bytes`).
  relu2 FFN   (NemotronH) non-gated: up D*I, down I*D, so 2*D*I; its MoE experts and shared expert too.
  windows     an attention variant with sliding window W (blocks.py `AttentionConfig.window`, "attn_g3_w128")
              attends to at most W keys and an engine caches at most W tokens of a sequence there
              (vLLM, llama.cpp and transformers' sliding cache layers all bound it): S -> min(S, W); the
              causal sequence's queries see min(t, W) keys. The window is the variant's own: a parent
              whose family windows some layers has those windows on its blocks (`parent_blocks`).
"""

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from puzzle.errors import PuzzleError
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig, MoEConfig
from puzzle.model.family import config_family, is_hybrid, parent_ffns

Part = AttentionConfig | FFNConfig | BlockConfig
FIXED_PARTS = ("embeddings", "final_norm", "lm_head")
# The config.json fields an MoE parent names its experts by (`ModelShape.from_fields`), first found wins:
# the expert count (Mixtral, gpt-oss: num_local_experts; Qwen-MoE: num_experts; DeepSeek: n_routed_experts),
# the experts per token (transformers' num_experts_per_tok; gpt-oss's original experts_per_token) and an
# expert's width (Qwen-MoE, DeepSeek: moe_intermediate_size; Mixtral, gpt-oss: intermediate_size).
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "experts_per_token", "num_experts_per_token")
EXPERT_WIDTH_FIELDS = ("moe_intermediate_size", "intermediate_size")
SHARED_EXPERT_FIELD = "shared_expert_intermediate_size"  # Qwen2-MoE


def _first(raw: Mapping[str, Any], fields: Sequence[str]) -> Any:
    return next((raw[f] for f in fields if raw.get(f) is not None), None)


def expected_experts(num_experts: int, top_k: int, tokens: float, frequencies: Sequence[float] | None = None) -> float:
    """Expected number of distinct experts that `tokens` tokens route to, each token choosing `top_k` distinct
    experts. A token chooses expert j with probability p_j (sum_j p_j = k: the top-k are distinct, so p_j is
    the marginal and no independence within a token is assumed); tokens route independently, so no token of
    n chooses j with probability (1 - p_j)^n and, by linearity of expectation,
        E[distinct experts] = sum_j 1 - (1 - p_j)^n.
    `frequencies`: measured selection frequencies of the E experts on any scale (importance.py's
    `experts.frequency` sums to k, counts or shares summing to 1 as well): p_j = k f_j / sum f, capped at 1;
    None (or all zero): uniform, p_j = k / E, E[distinct] = E (1 - (1 - k/E)^n)."""
    if tokens <= 0:
        return 0.0
    if frequencies is not None and len(frequencies) != num_experts:
        raise ValueError(f"{len(frequencies)} expert frequencies for {num_experts} experts")
    total = 0.0 if frequencies is None else float(sum(frequencies))
    if total <= 0:
        return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)
    return sum(1.0 - (1.0 - min(1.0, top_k * f / total)) ** tokens for f in frequencies)


@dataclass(frozen=True)
class ModelShape:
    """The parent's dimensions: everything a child's counts depend on besides its blocks."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    num_hidden_layers: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # the family's attention parts (family.py)
    o_bias: bool = False
    qk_norm: bool = False
    sinks: bool = False  # a GQA attention has one sink logit per query head (gpt-oss)
    sliding_windows: tuple[int | None, ...] | None = None  # the parent's per layer; None: no layer has one
    # An MoE parent's FFN per layer, by name ("moe_e8k2_i64", or "ffn_768" for a dense layer of Qwen3-MoE's
    # mlp_only_layers); None: every layer the dense SwiGLU of `intermediate_size`
    parent_ffns: tuple[str, ...] | None = None
    shared_expert_gate: bool = False  # an MoE family's shared expert has a (1, D) sigmoid gate (Qwen2-MoE)
    router_bias: bool = False  # an MoE family's router has a bias (E,) and its experts biases (gpt-oss)
    expert_bias: bool = False
    # A hybrid parent (NemotronH): its attention slot per layer by name ("mamba_h64d64n128g8", "attn_g16",
    # "attn_noop"); None: the GQA of `num_key_value_heads` (with the layer's window) in every layer
    parent_attns: tuple[str, ...] | None = None
    dense_ffn: str = "swiglu"  # the family's FFN (family.py `DenseFFN`): "swiglu" or "relu2" (non-gated)
    conv_kernel: int = 4  # the Mamba2 mixers' conv width, chunk size and biases (the parent config's)
    chunk_size: int = 128
    conv_bias: bool = True
    mamba_bias: bool = False

    def __post_init__(self) -> None:
        for field in ("sliding_windows", "parent_ffns", "parent_attns"):  # read back from JSON as lists
            if getattr(self, field) is not None:
                object.__setattr__(self, field, tuple(getattr(self, field)))

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        """From a PuzzleConfig or a supported family's HF config (head_dim defaults to hidden / heads)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        family, windows = config_family(config)
        qkv_bias, o_bias = family.attention_biases(config)
        ffns = parent_ffns(config)
        hybrid = {}
        if is_hybrid(config):  # each layer's mixers by name (a child's blocks, or the parent's pattern)
            blocks = (config.blocks if getattr(config, "model_type", None) == "nemotron-nas"
                      else family.hybrid.parent_blocks(config, family.moe))
            hybrid = dict(parent_attns=tuple(b.attention.name for b in blocks),
                          parent_ffns=tuple(b.ffn.name for b in blocks), conv_kernel=int(getattr(config, "conv_kernel", 4)),
                          chunk_size=int(getattr(config, "chunk_size", 128)),
                          conv_bias=bool(getattr(config, "use_conv_bias", True)),
                          mamba_bias=bool(getattr(config, "use_bias", False)))
            windows = [None] * len(blocks)
        moe = family.moe
        layers = len(hybrid["parent_attns"]) if hybrid else config.num_hidden_layers
        return cls(
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=layers,
            vocab_size=config.vocab_size,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=family.qk_norm,
            sinks=family.sinks,
            sliding_windows=tuple(windows) if any(w is not None for w in windows) else None,
            parent_ffns=hybrid.pop("parent_ffns", None if ffns is None else tuple(f.name for f in ffns)),
            shared_expert_gate=moe is not None and moe.shared_expert_gate,
            # NemotronH's `e_score_correction_bias` (E,) is stored with the router as a bias is
            router_bias=moe is not None and (moe.router_bias or moe.score_bias),
            expert_bias=moe is not None and moe.expert_bias,
            dense_ffn=family.ffn,
            **hybrid,
        )

    @classmethod
    def from_fields(cls, raw: Mapping[str, Any]) -> "ModelShape":
        """From a config.json read as plain JSON, by field name: a parent whose family this build does not
        support (gpt_oss, ...) sized by `puzzle plan`, which reads the config only. The dense fields by
        transformers' LlamaConfig names (num_key_value_heads defaults to the query heads, head_dim to D / H),
        `attention_bias` (biases on q, k, v and o), the windows from `layer_types` + `sliding_window` (without
        layer_types: `sliding_window` on every layer unless `use_sliding_window` is false), and an MoE FFN
        from the fields `EXPERT_COUNT_FIELDS`, `TOP_K_FIELDS`, `EXPERT_WIDTH_FIELDS` name, in every layer or as
        Qwen-MoE places them (`decoder_sparse_step`, `mlp_only_layers`). What a family adds beyond these is not
        counted (gpt-oss's expert biases and attention sinks: 0.04% of its weights); a supported family is
        read by `from_config`, which knows it (q/k norms, gated shared experts)."""
        missing = [f for f in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size") if raw.get(f) is None]
        if missing:
            raise PuzzleError(f"config.json lacks {', '.join(missing)}: not a decoder config puzzle can size")
        D, H, L = int(raw["hidden_size"]), int(raw["num_attention_heads"]), int(raw["num_hidden_layers"])
        experts, top_k = _first(raw, EXPERT_COUNT_FIELDS), _first(raw, TOP_K_FIELDS)
        dense = raw.get("intermediate_size")
        if dense is None and not experts:
            raise PuzzleError("config.json lacks intermediate_size: not a decoder config puzzle can size")
        ffns = None
        if experts:
            if not top_k:
                raise PuzzleError(f"config.json has {experts} experts but no experts per token ({' / '.join(TOP_K_FIELDS)})")
            moe = MoEConfig(int(experts), int(top_k), int(_first(raw, EXPERT_WIDTH_FIELDS)),
                            raw.get(SHARED_EXPERT_FIELD) or None)
            step, dense_layers = int(raw.get("decoder_sparse_step") or 1), set(raw.get("mlp_only_layers") or ())
            ffns = tuple(moe.name if i not in dense_layers and (i + 1) % step == 0 else FFNConfig(intermediate_size=int(dense)).name
                         for i in range(L))
        window, types = raw.get("sliding_window"), raw.get("layer_types")
        if window is None or (types is None and raw.get("use_sliding_window") is False):
            windows = None
        elif types is not None:
            windows = tuple(int(window) if t == "sliding_attention" else None for t in types)
        else:
            windows = (int(window),) * L
        bias = bool(raw.get("attention_bias", False))
        return cls(
            hidden_size=D, num_attention_heads=H, num_key_value_heads=int(raw.get("num_key_value_heads") or H),
            head_dim=int(raw.get("head_dim") or D // H), intermediate_size=int(dense or 0), num_hidden_layers=L,
            vocab_size=int(raw["vocab_size"]), tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=bias, o_bias=bias, sliding_windows=windows if windows and any(w is not None for w in windows) else None,
            parent_ffns=ffns,
        )

    def with_(self, **changes: Any) -> "ModelShape":
        return replace(self, **changes)

    # ---- the parent's own block ---------------------------------------------------------------
    @property
    def parent_attention(self) -> AttentionConfig:
        """The parent's GQA attention, without a window: its KV heads (`parent_attentions`: with each
        layer's window)."""
        return AttentionConfig(n_heads_in_group=self.num_attention_heads // self.num_key_value_heads)

    @property
    def parent_attentions(self) -> list[AttentionConfig]:
        """The parent's attention in each layer: its GQA with the layer's sliding window, if any (a hybrid's:
        its Mamba2 mixer, GQA or no-op)."""
        if self.parent_attns is not None:
            return [AttentionConfig.from_name(a) for a in self.parent_attns]
        windows = self.sliding_windows or (None,) * self.num_hidden_layers
        return [self.parent_attention.with_window(w) for w in windows]

    @property
    def parent_ffn(self) -> FFNConfig:
        """The parent's FFN, the same in every layer; an MoE parent whose layers differ (Qwen3-MoE's dense
        mlp_only_layers) has none: `parent_blocks` lists them."""
        if self.parent_ffns is None:
            return FFNConfig(intermediate_size=self.intermediate_size)
        if len(set(self.parent_ffns)) != 1:
            raise ValueError(f"the parent's FFN differs by layer ({', '.join(sorted(set(self.parent_ffns)))})")
        return FFNConfig.from_name(self.parent_ffns[0])

    @property
    def parent_block(self) -> BlockConfig:
        """The parent's block without a window (its weights: what `params` counts); per layer: `parent_blocks`."""
        return BlockConfig(self.parent_attention, self.parent_ffn)

    @property
    def parent_blocks(self) -> list[BlockConfig]:
        """The parent's block in each layer (its window, its FFN)."""
        ffns = ([self.parent_ffn] * self.num_hidden_layers if self.parent_ffns is None
                else [FFNConfig.from_name(f) for f in self.parent_ffns])
        return [BlockConfig(a, f) for a, f in zip(self.parent_attentions, ffns)]

    @staticmethod
    def window(part: Part) -> int | None:
        """A variant's sliding window (its attention's); None for full attention and FFNs."""
        attention = part.attention if isinstance(part, BlockConfig) else part
        return attention.window if isinstance(attention, AttentionConfig) else None

    def keys(self, part: Part, context: float) -> float:
        """Keys one query of a variant attends to (and tokens of one sequence cached) at `context`."""
        window = self.window(part)
        return context if window is None else min(context, window)

    def kv_heads(self, part: Part) -> int:
        """KV heads of a variant's attention; 0 for linear, no-op attention and FFNs."""
        attention = part.attention if isinstance(part, BlockConfig) else part
        return attention.num_key_value_heads(self.num_attention_heads) if isinstance(attention, AttentionConfig) else 0

    # ---- Mamba2 and the FFN's matrices --------------------------------------------------------
    @property
    def ffn_matrices(self) -> int:
        """D x I matrices of a dense FFN or an expert: 3 for SwiGLU (gate, up, down), 2 for relu2 (up, down)."""
        return 2 if self.dense_ffn == "relu2" else 3

    @staticmethod
    def mamba_dims(part: Part) -> tuple[int, int, int, int, int] | None:
        """(Hm, P, N, G, I) of a Mamba2 variant; None for anything else."""
        attention = part.attention if isinstance(part, BlockConfig) else part
        if not isinstance(attention, AttentionConfig) or not attention.is_mamba:
            return None
        m = attention.mamba
        return m.num_heads, m.head_dim, m.state_dim, m.num_groups, m.inner_size

    def mamba_extra_params(self, part: AttentionConfig) -> int:
        """A Mamba2 mixer's weights outside its two projections: conv C*K (+ C), dt_bias, A_log, D, the gated
        norm I, and the projections' biases where the parent has them."""
        Hm, _, N, G, I = self.mamba_dims(part)
        C = I + 2 * G * N
        return C * self.conv_kernel + self.conv_bias * C + 3 * Hm + I + self.mamba_bias * (I + C + Hm + self.hidden_size)

    def mamba_flops_per_token(self, part: Part, prefill: bool) -> float:
        """A Mamba2 mixer's FLOPs per token outside its projections: the depthwise conv 2*C*K and the SSD scan,
        chunked in a prefill (2*Q*(G*N + Hm*P) + 4*Hm*P*N) or one recurrent step in a decode (4*Hm*P*N); 0
        for other variants."""
        dims = self.mamba_dims(part)
        if dims is None:
            return 0.0
        Hm, P, N, G, I = dims
        scan = 4 * Hm * P * N + (2 * self.chunk_size * (G * N + Hm * P) if prefill else 0)
        return 2 * (I + 2 * G * N) * self.conv_kernel + scan

    def recurrent_state_bytes(self, part: Part, dtype_bytes: int) -> int:
        """A Mamba2 layer's state per sequence, whatever its length: conv (K-1)*C in the dtype (vLLM keeps the
        last K-1 inputs) and the SSM state Hm*P*N in fp32; 0 for other variants."""
        dims = self.mamba_dims(part)
        if dims is None:
            return 0
        Hm, P, N, G, I = dims
        return (self.conv_kernel - 1) * (I + 2 * G * N) * dtype_bytes + Hm * P * N * 4

    # ---- parameters ---------------------------------------------------------------------------
    def matmul_params(self, part: Part) -> int:
        """Weights of the matmuls one token goes through in a variant (what its FLOPs scale with): its norms
        left out; an MoE FFN's router and top-k experts (its other experts are idle for that token)."""
        if isinstance(part, BlockConfig):
            return self.matmul_params(part.attention) + self.matmul_params(part.ffn)
        D = self.hidden_size
        if part.no_op:
            return 0
        if part.replace_with_linear:
            return D * D
        if isinstance(part, AttentionConfig) and part.is_mamba:
            Hm, _, N, G, I = self.mamba_dims(part)
            return D * (2 * I + 2 * G * N + Hm) + I * D  # in_proj (z, x, B, C, dt) and out_proj
        if isinstance(part, AttentionConfig):
            H, K, d = self.num_attention_heads, self.kv_heads(part), self.head_dim
            return D * (H + 2 * K) * d + H * d * D
        m = self.ffn_matrices
        if part.is_moe:
            moe = part.moe
            shared = 0 if moe.shared_expert_size is None else m * D * moe.shared_expert_size + self.shared_expert_gate * D
            return moe.top_k * m * D * moe.expert_size + moe.num_experts * D + shared
        return m * D * part.intermediate_size

    def params(self, part: Part) -> int:
        """Weights of a variant, its pre-norm(s) included (as `sublayer_state` stores a sublayer), a GQA
        attention's biases, q/k norms and sinks where the family has them, and every expert of an MoE FFN (and
        the router's and experts' biases)."""
        if isinstance(part, BlockConfig):
            return self.params(part.attention) + self.params(part.ffn)
        if part.no_op:
            return 0
        extra = 0
        if isinstance(part, AttentionConfig) and part.is_gqa:
            H, K, d = self.num_attention_heads, self.kv_heads(part), self.head_dim
            extra = self.qkv_bias * (H + 2 * K) * d + self.o_bias * self.hidden_size + self.qk_norm * 2 * d + self.sinks * H
        if isinstance(part, AttentionConfig) and part.is_mamba:
            extra = self.mamba_extra_params(part)
        if isinstance(part, FFNConfig) and part.is_moe:  # the experts no token of this one chose, and the biases
            moe = part.moe
            extra = ((moe.num_experts - moe.top_k) * self.ffn_matrices * self.hidden_size * moe.expert_size
                     + self.moe_biases(moe, moe.num_experts))
        return self.matmul_params(part) + self.hidden_size + extra

    def moe_biases(self, moe: Any, experts: int) -> int:
        """An MoE FFN's router bias (E) and the biases of `experts` of its experts (2I + D each), where the
        family has them."""
        return self.router_bias * moe.num_experts + self.expert_bias * experts * (2 * moe.expert_size + self.hidden_size)

    def active_params(self, part: Part) -> int:
        """Weights one token uses in a variant: `params` less an MoE FFN's experts outside its top-k."""
        if isinstance(part, BlockConfig):
            return self.active_params(part.attention) + self.active_params(part.ffn)
        if isinstance(part, FFNConfig) and part.is_moe:
            return self.matmul_params(part) + self.hidden_size + self.moe_biases(part.moe, part.moe.top_k)
        return self.params(part)

    def fixed_params(self, part: str) -> int:
        """Weights of a fixed part; a tied LM head shares the embeddings' weights and counts 0."""
        if part == "embeddings":
            return self.vocab_size * self.hidden_size
        if part == "final_norm":
            return self.hidden_size
        if part == "lm_head":
            return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        raise ValueError(f"unknown fixed part {part!r}; expected one of {FIXED_PARTS}")

    def layer_params(self, blocks: list[BlockConfig] | None = None) -> int:
        """Weights of all decoder layers (the parent's block in each of L layers by default)."""
        if blocks is None and self.parent_ffns is None:  # one block's count times L: Minitron's shape search calls this in a loop
            return self.num_hidden_layers * self.params(self.parent_block)
        return sum(self.params(b) for b in (self.parent_blocks if blocks is None else blocks))

    def active_layer_params(self, blocks: list[BlockConfig] | None = None) -> int:
        """Weights of all decoder layers one token uses (the parent's blocks by default)."""
        return sum(self.active_params(b) for b in (self.parent_blocks if blocks is None else blocks))

    def active_model_params(self, blocks: list[BlockConfig] | None = None) -> int:
        """Weights of the whole model one token uses: `total_params` less the experts outside its top-k, the
        embedding table counted (as Qwen's and Mistral's model cards count "activated" parameters: Qwen3-30B-A3B
        3.3B, Mixtral-8x7B 12.9B; OpenAI's card counts gpt-oss-120b's 5.1B without the embedding table, a
        lookup: `active_model_params() - fixed_params("embeddings")` where the LM head is untied)."""
        return self.active_layer_params(blocks) + self.fixed_params("final_norm") + self.embedding_params

    @property
    def embedding_params(self) -> int:
        """The embedding table and an untied LM head."""
        return self.fixed_params("embeddings") + self.fixed_params("lm_head")

    def non_embedding_params(self, blocks: list[BlockConfig] | None = None) -> int:
        """Every weight but the embedding table and the LM head (the final norm counts)."""
        return self.layer_params(blocks) + self.fixed_params("final_norm")

    def total_params(self, blocks: list[BlockConfig] | None = None) -> int:
        return self.non_embedding_params(blocks) + self.embedding_params

    # ---- FLOPs (forward) ----------------------------------------------------------------------
    def attention_flops(self, part: Part, keys: float) -> float:
        """QK^T and PV of one query token over `keys` keys (at most the variant's window): 4*H*d*keys;
        0 without GQA attention."""
        if self.kv_heads(part) == 0:
            return 0
        return 4 * self.num_attention_heads * self.head_dim * self.keys(part, keys)

    def causal_attention_flops(self, part: Part, seq_len: int) -> int:
        """QK^T and PV of a causal sequence of `seq_len` tokens (query t sees t keys, at most the
        window W): 2*H*d*T*(T+1); with T > W, 4*H*d*(W*(W+1)/2 + (T-W)*W)."""
        if self.kv_heads(part) == 0:
            return 0
        window = self.window(part)
        if window is None or seq_len <= window:
            return 2 * self.num_attention_heads * self.head_dim * seq_len * (seq_len + 1)
        pairs = window * (window + 1) // 2 + (seq_len - window) * window
        return 4 * self.num_attention_heads * self.head_dim * pairs

    def flops_per_token(self, part: Part, keys: float) -> float:
        """Forward FLOPs of one token through a variant whose attention sees `keys` keys (a decode
        step at context `keys`; `seq_len / 2` approximates a causal sequence's mean); a Mamba2 mixer's
        recurrent step."""
        return 2 * self.matmul_params(part) + self.attention_flops(part, keys) + self.mamba_flops_per_token(part, False)

    def prefill_flops(self, part: Part, seq_len: int) -> int:
        """Forward FLOPs of one causal sequence of `seq_len` tokens through a variant (a Mamba2 mixer's
        chunked scan)."""
        return (2 * self.matmul_params(part) * seq_len + self.causal_attention_flops(part, seq_len)
                + int(self.mamba_flops_per_token(part, True) * seq_len))

    def fixed_matmul_params(self, part: str) -> int:
        """Weights a fixed part's matmul reads: the LM head's V*D (tied or not); the embedding lookup is
        a gather and the final norm elementwise (0)."""
        if part not in FIXED_PARTS:
            raise ValueError(f"unknown fixed part {part!r}; expected one of {FIXED_PARTS}")
        return self.vocab_size * self.hidden_size if part == "lm_head" else 0

    def fixed_flops_per_token(self, part: str) -> int:
        """Forward FLOPs of a fixed part per token it processes (the LM head: 2*D*V)."""
        return 2 * self.fixed_matmul_params(part)

    def model_flops_per_token(self, blocks: list[BlockConfig] | None, keys: float) -> float:
        """Forward FLOPs of one token through the whole model (every layer, attention over `keys` keys,
        then the LM head); the parent's block in each layer by default."""
        if blocks is None:
            blocks = self.parent_blocks
        return sum(self.flops_per_token(b, keys) for b in blocks) + self.fixed_flops_per_token("lm_head")

    # ---- memory -------------------------------------------------------------------------------
    def model_bytes(self, blocks: list[BlockConfig] | None, dtype_bytes: int) -> int:
        """Weights of a whole model in memory (a tied LM head stored once)."""
        return self.total_params(blocks) * dtype_bytes

    @staticmethod
    def adamw_bytes(params: int, dtype_bytes: int = 4) -> int:
        """What training `params` weights with AdamW holds beside the weights: the gradient and the two
        moments (exp_avg, exp_avg_sq), each one element per weight (fp32 in torch's AdamW on fp32 weights)."""
        return 3 * params * dtype_bytes

    def kv_cache_bytes_per_token(self, part: Part, dtype_bytes: int) -> int:
        """KV-cache bytes one cached token costs in a layer with this variant: 2*K*d*e."""
        return 2 * self.kv_heads(part) * self.head_dim * dtype_bytes

    def kv_cache_bytes(self, blocks: list[BlockConfig] | None, tokens: int, dtype_bytes: int,
                       context: int | None = None) -> int:
        """KV cache of a whole model holding `tokens` tokens (batch x `context`); a windowed layer holds
        batch x min(context, window) of them (`context` None: as if no window binds). A Mamba2 layer holds
        its fixed state per sequence instead (`recurrent_state_bytes`; batch = tokens // context, or one
        sequence of `tokens` when `context` is None)."""
        if blocks is None:
            blocks = self.parent_blocks
        sequences = 1 if context is None else tokens // context
        total = 0
        for b in blocks:
            held = tokens if context is None else tokens // context * int(self.keys(b, context))
            total += self.kv_cache_bytes_per_token(b, dtype_bytes) * held + self.recurrent_state_bytes(b, dtype_bytes) * sequences
        return total

    def activation_bytes_per_token(self, part: Part, dtype_bytes: int) -> int:
        """Bytes of the tensors one token's forward writes through a variant (each op's output: what a
        backward pass keeps, and what a forward streams through memory):
          GQA attention  norm D, q/k/v (H + 2K)*d, attention output H*d, o_proj D
          SwiGLU FFN     norm D, gate and up 2I, silu(gate)*up I, down_proj D
          MoE FFN        norm D, router logits E, per chosen expert (k of them) gate, up, product 3I and
                         its output D, the weighted sum D; a shared expert 3S + D, its gate 1, the sum D
          linear         norm D, the map D;   no-op: 0."""
        if isinstance(part, BlockConfig):
            return self.activation_bytes_per_token(part.attention, dtype_bytes) + self.activation_bytes_per_token(part.ffn, dtype_bytes)
        D = self.hidden_size
        if part.no_op:
            elements = 0
        elif part.replace_with_linear:
            elements = 2 * D
        elif isinstance(part, AttentionConfig) and part.is_mamba:  # norm, in_proj, conv, scan y, gated norm, out
            Hm, _, N, G, I = self.mamba_dims(part)
            elements = D + (2 * I + 2 * G * N + Hm) + (I + 2 * G * N) + 2 * I + D
        elif isinstance(part, AttentionConfig):
            H, K, d = self.num_attention_heads, self.kv_heads(part), self.head_dim
            elements = D + (H + 2 * K) * d + H * d + D
        elif part.is_moe:  # relu2 experts: up and its square 2I (SwiGLU: 3I)
            moe = part.moe
            elements = D + moe.num_experts + moe.top_k * (self.ffn_matrices * moe.expert_size + D) + D
            if moe.shared_expert_size is not None:  # its gate, product and output, and the sum
                elements += self.ffn_matrices * moe.shared_expert_size + D + self.shared_expert_gate + D
        else:
            elements = D + self.ffn_matrices * part.intermediate_size + D
        return elements * dtype_bytes

    def fixed_activation_bytes_per_token(self, part: str, dtype_bytes: int) -> int:
        """Bytes a fixed part writes per token: the embedded row D, the normed state D, the logits V."""
        elements = {"embeddings": self.hidden_size, "final_norm": self.hidden_size, "lm_head": self.vocab_size}
        if part not in elements:
            raise ValueError(f"unknown fixed part {part!r}; expected one of {FIXED_PARTS}")
        return elements[part] * dtype_bytes
