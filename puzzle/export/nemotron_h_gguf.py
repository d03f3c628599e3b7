"""llama.cpp's `nemotron_h` / `nemotron_h_moe` architectures: a hybrid (NemotronH) child as one GGUF file.

What is written is what llama.cpp's own code reads (github.com/ggml-org/llama.cpp 0c1e57098, the tree
llama-cpp-python 0.3.36 vendors and the tests load; older trees, e.g. 0aebd861 `llm_build_nemotron_h`, read one
`n_expert_used` for every layer, so per-layer top-k and expert widths need 0c1e57098 or later):
- conversion/nemotron.py, `NemotronHModel.set_gguf_parameters` (over conversion/granite.py
  `GraniteHybridModel.set_gguf_parameters` and conversion/mamba.py `Mamba2Model.set_gguf_parameters`): the
  ssm.* keys (conv kernel, inner size = heads x head dim, state size, time-step rank = heads, group count), a
  per-block `attention.head_count_kv` array (0 where the block is not attention), a per-block
  `feed_forward_length` array (0 where the block is no FFN; an MoE block's expert width), key / value length
  = head_dim; for MoE (`NemotronHPuzzleModel.set_gguf_parameters`, Puzzle's own heterogeneous children)
  per-block `expert_feed_forward_length` and `expert_used_count` arrays beside the scalar expert count,
  shared-expert width, weights norm / scale and group count.
- conversion/mamba.py `Mamba2Model.modify_tensors` and conversion/nemotron.py `NemotronHModel.modify_tensors`:
  A = -exp(A_log) as (H, 1), D as (H, 1), conv1d (C, 1, K) squeezed to (C, K), the gated norm's weight as
  (groups, I / groups), dt_bias as `ssm_dt.bias`, experts stacked into one (E, ...) tensor per projection,
  the router's score-correction bias as `exp_probs_b.bias`. Tensor names: gguf's TENSOR_NAMES.
- conversion/base.py `ModelBase.prepare_tensors`: 1-D tensors, norms, names without ".weight" (ssm_a,
  ssm_d), ssm_conv1d and ffn_gate_inp stay f32.
- src/models/nemotron-h.cpp `llama_model_nemotron_h::load_arch_hparams`: a block is recurrent (Mamba2) iff its
  head_count_kv and feed_forward_length are both 0; else attention iff feed_forward_length is 0; else an FFN,
  MoE for every FFN block once expert_count > 0 (`load_arch_tensors`). The graph (`graph::graph`) runs each
  block as h + mixer(attn_norm(h)): puzzle's layer is h + attn(input_layernorm(h)), then h + ffn(
  post_attention_layernorm(h)), so each real sublayer is one GGUF block (a layer with both is two blocks, a
  layer with neither none: the identity is left out).
- src/llama-model.cpp `llama_model_base::load_hparams`: expert_used_count, feed_forward_length, head_count and
  head_count_kv are read as a key or a per-block array (`get_key_or_arr`); expert_count, the expert group
  count and group used count are scalars, with n_group_used < n_expert_groups asserted when groups > 1.

`check_nemotron_h_gguf` refuses, by layer, what those rules cannot hold (puzzle.engines `nemotron_h_*`), and the
family settings the graph does not compute (it adds the conv bias, has no in/out projection bias, no time-step
clamp, relu2 MLPs only).
"""

import math
from typing import Any, Callable, Iterator

import gguf
import torch

from puzzle.engines import RULES, get_engine, nemotron_h_gguf_violations
from puzzle.errors import PuzzleError

from .gguf_types import GGUF_DTYPES, gguf_type

_T = gguf.MODEL_TENSOR
# f32 whatever the export's dtype (conversion/base.py `ModelBase.prepare_tensors`)
_F32 = {gguf.TENSOR_NAMES[t].split(".")[-1] for t in (_T.SSM_CONV1D, _T.FFN_GATE_INP, _T.SSM_A, _T.SSM_D)}


def _sublayers(config: Any) -> list[tuple[int, str, str]]:
    """(puzzle layer, "attention" | "ffn" slot, block kind "mamba" | "attention" | "mlp" | "moe") of every real
    sublayer in order: the GGUF's blocks."""
    out = []
    for i, block in enumerate(config.blocks):
        if not block.attention.no_op:
            out.append((i, "attention", "mamba" if block.attention.is_mamba else "attention"))
        if not block.ffn.no_op:
            out.append((i, "ffn", "moe" if block.ffn.is_moe else "mlp"))
    return out


def _time_step_limit(config: Any) -> tuple[float, float]:
    limit = getattr(config, "time_step_limit", None) or (0.0, math.inf)
    return float(limit[0]), float(limit[1])


def check_nemotron_h_gguf(config: Any) -> None:
    """One line for the first thing llama.cpp's nemotron_h / nemotron_h_moe GGUF cannot hold of a hybrid child."""
    family = getattr(config, "family", None)
    if family != "nemotron_h":
        raise PuzzleError(f"GGUF export of hybrid children reads NemotronH (llama.cpp nemotron_h); this one is {family!r}")
    engine = get_engine("llamacpp")
    for layer, block, rule in nemotron_h_gguf_violations(config.blocks):
        raise PuzzleError(f"layer {layer} ({block.name}) cannot be exported to llama.cpp's nemotron_h GGUF: "
                          f"{RULES[rule]} [{engine.source(rule)}]")
    graph = "src/models/mamba-base.cpp: llm_build_mamba_base::build_mamba2_layer"
    if not getattr(config, "use_conv_bias", True):
        raise PuzzleError(f"llama.cpp's nemotron_h graph adds a conv1d bias to every Mamba2 layer; this parent has "
                          f"none (use_conv_bias false) [{graph}]")
    if getattr(config, "use_bias", False) or getattr(config, "mamba_proj_bias", False):
        raise PuzzleError(f"llama.cpp's nemotron_h graph has no Mamba2 in/out projection bias; this parent has one "
                          f"(use_bias) [{graph}]")
    if _time_step_limit(config) != (0.0, math.inf):
        raise PuzzleError(f"llama.cpp's nemotron_h graph does not clamp the Mamba2 time step; this parent's "
                          f"time_step_limit is {list(_time_step_limit(config))} [{graph}]")
    act = getattr(config, "mlp_hidden_act", "relu2")
    if act != "relu2":
        raise PuzzleError(f"llama.cpp's nemotron_h graph builds relu2 MLPs (LLM_FFN_RELU_SQR); this parent's "
                          f"mlp_hidden_act is {act!r} [src/models/nemotron-h.cpp: graph::build_ffn_layer]")
    if not _sublayers(config):
        raise PuzzleError("a child with no layer left cannot be exported to GGUF")


def arch_of(config: Any) -> gguf.MODEL_ARCH:
    """nemotron_h_moe where the child has an MoE block (conversion/nemotron.py `NemotronHModel.__init__`)."""
    moe = any(kind == "moe" for _, _, kind in _sublayers(config))
    return gguf.MODEL_ARCH.NEMOTRON_H_MOE if moe else gguf.MODEL_ARCH.NEMOTRON_H


def _mamba_shape(config: Any) -> tuple[int, int, int, int]:
    """(heads, head dim, state, groups) of the child's Mamba2 layers (one shape: checked), else the parent's."""
    m = next((b.attention.mamba for b in config.blocks if b.attention.is_mamba), None)
    if m is not None:
        return m.num_heads, m.head_dim, m.state_dim, m.num_groups
    return config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size, config.n_groups


def write_hparams(w: gguf.GGUFWriter, config: Any, dtype: str) -> None:
    """The hyperparameters as KV data (see the module docstring for the reader of each)."""
    subs = _sublayers(config)
    blocks = [config.blocks[i] for i, _, _ in subs]
    heads = config.num_attention_heads
    kv = [b.attention.num_key_value_heads(heads) if kind == "attention" else 0 for b, (_, _, kind) in zip(blocks, subs)]
    ff = [b.ffn.moe.expert_size if kind == "moe" else b.ffn.intermediate_size if kind == "mlp" else 0
          for b, (_, _, kind) in zip(blocks, subs)]
    w.add_block_count(len(subs))
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_eps(config.rms_norm_eps)  # read as f_norm_eps (load_arch_hparams: required)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(GGUF_DTYPES[dtype])
    n_heads, head_dim, state, groups = _mamba_shape(config)
    w.add_ssm_conv_kernel(int(getattr(config, "conv_kernel", 4)))
    w.add_ssm_inner_size(n_heads * head_dim)
    w.add_ssm_state_size(state)
    w.add_ssm_time_step_rank(n_heads)
    w.add_ssm_group_count(groups)
    moes = [b.ffn.moe for b, (_, _, kind) in zip(blocks, subs) if kind == "moe"]
    if not moes:
        return
    arch = w.arch
    # gguf 0.19's add_expert_used_count / add_expert_feed_forward_length take an int: the arrays by key
    w.add_array(gguf.Keys.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=arch), ff)
    w.add_array(gguf.Keys.LLM.EXPERT_USED_COUNT.format(arch=arch),
                [b.ffn.moe.top_k if kind == "moe" else 0 for b, (_, _, kind) in zip(blocks, subs)])
    w.add_expert_count(moes[0].num_experts)
    w.add_expert_shared_feed_forward_length(moes[0].shared_expert_size)
    w.add_expert_shared_count(1)
    w.add_expert_weights_norm(bool(getattr(config, "norm_topk_prob", True)))
    w.add_expert_weights_scale(float(getattr(config, "routed_scaling_factor", 1.0)))
    n_group, topk_group = int(getattr(config, "n_group", 1) or 1), int(getattr(config, "topk_group", 1) or 1)
    if 1 < n_group and topk_group < n_group:  # all groups kept is ungrouped routing (and llama.cpp asserts <)
        w.add_expert_group_count(n_group)
        w.add_expert_group_used_count(topk_group)


def _name(tensor: gguf.MODEL_TENSOR, block: int | None = None, suffix: str = ".weight") -> str:
    return gguf.TENSOR_NAMES[tensor].format(bid=block) + suffix


def tensor_type(name: str, shape, dtype: str) -> gguf.GGMLQuantizationType:
    """`gguf_type`, with the tensors llama.cpp's converter keeps in f32 whatever the dtype."""
    base = name.split(".")[2] if name.startswith("blk.") else name.split(".")[0]
    if base in _F32 or not name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    return gguf_type(name, shape, dtype)


def gguf_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Size, Callable[[], torch.Tensor]]]:
    """(GGUF name, shape, the tensor in llama.cpp's layout, computed when called) for every weight of a hybrid
    PuzzleForCausalLM, block by block."""
    config = model.config
    state = model.state_dict()
    out: list[tuple[str, Callable[[], torch.Tensor]]] = [
        (_name(_T.TOKEN_EMBD), lambda: state["model.embed_tokens.weight"]),
        (_name(_T.OUTPUT_NORM), lambda: state["model.norm.weight"]),
    ]
    if not config.tie_word_embeddings:  # absent: llama.cpp reuses token_embd (load_arch_tensors)
        out.append((_name(_T.OUTPUT), lambda: state["lm_head.weight"]))
    for b, (layer, slot, kind) in enumerate(_sublayers(config)):
        p = f"model.layers.{layer}."
        norm = "input_layernorm" if slot == "attention" else "post_attention_layernorm"
        out.append((_name(_T.ATTN_NORM, b), lambda k=f"{p}{norm}.weight": state[k]))
        if kind == "mamba":
            m = p + "self_attn."
            groups = config.blocks[layer].attention.mamba.num_groups
            out += [
                (_name(_T.SSM_IN, b), lambda m=m: state[m + "in_proj.weight"]),
                (_name(_T.SSM_CONV1D, b), lambda m=m: state[m + "conv1d.weight"].squeeze(1)),  # (C, 1, K) -> (C, K)
                (_name(_T.SSM_CONV1D, b, ".bias"), lambda m=m: state[m + "conv1d.bias"]),
                (_name(_T.SSM_DT, b, ".bias"), lambda m=m: state[m + "dt_bias"]),
                (_name(_T.SSM_A, b, ""), lambda m=m: -torch.exp(state[m + "A_log"].float()).reshape(-1, 1)),
                (_name(_T.SSM_D, b, ""), lambda m=m: state[m + "D"].reshape(-1, 1)),
                (_name(_T.SSM_NORM, b), lambda m=m, g=groups: state[m + "norm.weight"].reshape(g, -1)),
                (_name(_T.SSM_OUT, b), lambda m=m: state[m + "out_proj.weight"]),
            ]
        elif kind == "attention":  # no RoPE in NemotronH: Q and K rows stay in transformers' order
            a = p + "self_attn."
            out += [(_name(t, b), lambda k=f"{a}{n}.weight": state[k])
                    for t, n in ((_T.ATTN_Q, "q_proj"), (_T.ATTN_K, "k_proj"), (_T.ATTN_V, "v_proj"),
                                 (_T.ATTN_OUT, "o_proj"))]
        elif kind == "mlp":
            out += [(_name(_T.FFN_UP, b), lambda k=p + "mlp.up_proj.weight": state[k]),
                    (_name(_T.FFN_DOWN, b), lambda k=p + "mlp.down_proj.weight": state[k])]
        else:
            f = p + "mlp."
            n = config.blocks[layer].ffn.moe.num_experts
            out += [
                (_name(_T.FFN_GATE_INP, b), lambda f=f: state[f + "gate.weight"]),
                (_name(_T.FFN_EXP_PROBS_B, b, ".bias"), lambda f=f: state[f + "gate.e_score_correction_bias"]),
                (_name(_T.FFN_UP_EXP, b), _Stack(state, f, "up_proj", n)),
                (_name(_T.FFN_DOWN_EXP, b), _Stack(state, f, "down_proj", n)),
                (_name(_T.FFN_UP_SHEXP, b), lambda f=f: state[f + "shared_expert.up_proj.weight"]),
                (_name(_T.FFN_DOWN_SHEXP, b), lambda f=f: state[f + "shared_expert.down_proj.weight"]),
            ]
    for name, load in out:
        # every load but the experts' is a view or a (H, 1) vector: cheap to call for its shape here
        yield name, load.shape if isinstance(load, _Stack) else load().shape, load


class _Stack:
    """The n experts' `proj` weights of an MoE layer stacked (n, out, in), computed when called: the writer
    lists its shape first and holds the stack only while writing it."""

    def __init__(self, state: dict, prefix: str, proj: str, n: int) -> None:
        self.keys = [f"{prefix}experts.{e}.{proj}.weight" for e in range(n)]
        self.state = state
        self.shape = torch.Size((n, *state[self.keys[0]].shape))

    def __call__(self) -> torch.Tensor:
        return torch.stack([self.state[k] for k in self.keys])

