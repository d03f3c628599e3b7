"""llama.cpp's `deci` architecture: a child as one GGUF file, written with the `gguf` package.

What is written is what llama.cpp's own code reads (github.com/ggml-org/llama.cpp):
- convert_hf_to_gguf.py, class `DeciModel`: per-layer `deci.attention.head_count` / `head_count_kv` arrays
  (GQA: H and H / n_heads_in_group; linear attention: H and 0; no-op attention: 0 and 0), a per-layer
  `deci.feed_forward_length` array (0 for a no-op FFN), rope base and dimension, RMS eps, key / value length,
  vocabulary size. Q and K rows go from transformers' rotate-half layout to GGML's adjacent pairs
  (`DeciModel.permute`; K with its layer's KV heads). Tensor names: gguf's own `TensorNameMap` for DECI
  (`self_attn.linear_attn` -> `attn_output`). A tied LM head is not written (llama.cpp reuses `token_embd`).
- convert_hf_to_gguf.py, `ModelBase.prepare_tensors`: 1-D tensors and norms stay f32; q8_0 falls back to f16
  for a tensor whose rows are not whole 32-value blocks (`gguf.quants.QuantError`).
- src/models/deci.cpp, `load_arch_tensors`: linear attention = `attn_norm` + an n_embd x n_embd `attn_output`;
  a layer with n_ff > 0 loads `ffn_norm`, `ffn_gate`, `ffn_up`, `ffn_down` (SwiGLU, no other FFN).
- src/models/deci.cpp, the graph: n_head == 0 passes h through the attention step; n_head_kv == 0 applies
  `attn_output` to the normed input (linear attention); n_ff == 0 `continue`s before the layer's output is
  stored (dropping a real attention's output) and after the last layer picked its output rows (left unused:
  llama.cpp 0c1e57098 aborts with GGML_ASSERT(buffer) when it sets that input).

`check_llamacpp` refuses, by layer, the blocks that graph cannot run (the rules are `puzzle.engines`').
A hybrid (NemotronH) child is written as llama.cpp's `nemotron_h` / `nemotron_h_moe` instead
(export/nemotron_h_gguf.py: its keys, tensors and rules); `write_gguf` streams either.
"""

import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import gguf
import numpy as np
import torch

from puzzle.engines import RULES, get_engine, violations
from puzzle.errors import PuzzleError
from puzzle.io import clean_stale_temps, naming
from puzzle.model.blocks import BlockConfig
from puzzle.model.family import is_hybrid
from puzzle.outputs import GGUF_KEY

from .fields import rope
from .gguf_types import GGUF_DTYPES, encode, gguf_nbytes, gguf_type


def check_llamacpp(blocks: list[BlockConfig], hidden_size: int) -> None:
    """Refuse the first layer whose block llama.cpp's deci graph cannot run (`puzzle.engines` "llamacpp"), in
    one line. The GGUF carries each layer's exact FFN width, so the ffn_mult grid (a rule of llama.cpp's own
    converter from a nemotron-nas checkpoint) does not apply here."""
    engine = get_engine("llamacpp")
    for layer, block, rule in violations(engine, blocks, hidden_size):
        if rule != "ffn_mult_grid":
            raise PuzzleError(f"layer {layer} ({block.name}) cannot be exported to llama.cpp: {RULES[rule]} "
                              f"[{engine.source(rule)}]")


def permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(n_heads * d, ...) rows: each head's two rotate-half halves -> adjacent (even, odd) pairs, the order
    GGML's normal RoPE rotates (convert_hf_to_gguf.py `DeciModel.permute`)."""
    d_half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, d_half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _layer(name: str) -> int:
    return int(name.split(".")[2])  # model.layers.{i}.


def _in_layout(tensor: torch.Tensor, n_heads: int | None) -> torch.Tensor:
    return tensor if n_heads is None else permute(tensor, n_heads)


def gguf_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Size, Callable[[], torch.Tensor]]]:
    """(GGUF name, shape, the tensor in llama.cpp's layout computed when called) for every weight of a
    PuzzleForCausalLM: the writer lists every tensor's shape first and computes each as it writes it."""
    config = model.config
    blocks = config.blocks
    heads = config.num_attention_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if "rotary_emb" in name or (config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise RuntimeError(f"no GGUF tensor name for {name}")  # a module this writer does not know: a bug
        n_heads = None  # the rows' order is transformers' own
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            n_heads = heads
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            n_heads = blocks[_layer(name)].attention.num_key_value_heads(heads)
        yield gguf_name, tensor.shape, functools.partial(_in_layout, tensor, n_heads)


def llama3_rope_factors(scaling: dict[str, Any], theta: float, dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3 RoPE (dim/2,) f32: the `rope_freqs` tensor DeciModel writes
    (`generate_extra_tensors`). Wavelengths below original_context / high_freq_factor keep their frequency,
    those above original_context / low_freq_factor are divided by `factor`, the band between is blended."""
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    context = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * np.pi / freqs
    smooth = (context / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < context / high, 1.0, np.where(wavelen > context / low, factor, blended))
    return out.astype(np.float32)


def _write_hparams(w: gguf.GGUFWriter, config: Any, blocks: list[BlockConfig], dtype: str) -> dict[str, np.ndarray]:
    """The hyperparameters as KV data; returns the tensors they add (llama3 RoPE's `rope_freqs`), written
    before the model's."""
    heads = config.num_attention_heads
    theta, scaling = rope(config)
    w.add_rope_freq_base(theta)
    w.add_head_count_kv([b.attention.num_key_value_heads(heads) for b in blocks])
    w.add_head_count([0 if b.attention.no_op else heads for b in blocks])
    w.add_feed_forward_length([b.ffn.intermediate_size if b.ffn.is_swiglu else 0 for b in blocks])
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_file_type(GGUF_DTYPES[dtype])
    w.add_vocab_size(config.vocab_size)
    w.add_rope_dimension_count(config.head_dim)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise PuzzleError(f"RoPE scaling {kind!r} cannot be exported to llama.cpp's deci architecture "
                              "(it reads plain and llama3 RoPE)")
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        return {name: llama3_rope_factors(scaling, theta, config.head_dim)}
    return {}


# llama.cpp's BPE pre-tokenizer names (src/llama-vocab.cpp) for the tokenizer.json pre-tokenizers they split
# text like: GPT-2's byte-level regex alone, or after single digits (SmolLM).
_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
_PRE_TOKENIZERS = (
    ("gpt-2", [_BYTE_LEVEL]),
    ("smollm", [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]),
)


def _pre_tokenizer(spec: dict[str, Any] | None) -> str:
    steps = (spec or {}).get("pretokenizers", [spec]) if (spec or {}).get("type") == "Sequence" else [spec]
    for name, pattern in _PRE_TOKENIZERS:
        if len(steps) == len(pattern) and all(
            s and all(s.get(k) == v for k, v in p.items()) for s, p in zip(steps, pattern)
        ):
            return name
    raise PuzzleError(f"the tokenizer's pre-tokenizer {json.dumps(spec)} has no llama.cpp equivalent here "
                      f"(known: {', '.join(n for n, _ in _PRE_TOKENIZERS)})")


def token_list(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id with llama.cpp token types, as convert_hf_to_gguf.py `get_vocab_base` lists them: ids the
    tokenizer lacks are `[PAD{i}]` (unused), added special tokens control, other added tokens user-defined."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _write_vocab(w: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """A byte-level BPE tokenizer as llama.cpp's `gpt2` vocabulary: tokens, types, merges, special ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    if spec.get("model", {}).get("type") != "BPE":
        raise PuzzleError("only byte-level BPE tokenizers (tokenizer.json with a BPE model) can be exported to "
                          f"GGUF here; this one is {spec.get('model', {}).get('type') or type(tokenizer).__name__}")
    tokens, types = token_list(tokenizer, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer")))
    w.add_token_list(tokens)
    w.add_token_types(types)
    with tempfile.TemporaryDirectory() as files:  # SpecialVocab reads merges and special ids from the files
        tokenizer.save_pretrained(files)
        gguf.SpecialVocab(files, load_merges=True, n_vocab=vocab_size).add_to_gguf(w, quiet=True)


def write_gguf(model: torch.nn.Module, tokenizer: Any, out: Path, dtype: str = "f16", name: str = "puzzle-child") -> Path:
    """Write a PuzzleForCausalLM (+ its tokenizer) to `out` as a llama.cpp `deci` GGUF (a hybrid child: a
    `nemotron_h` / `nemotron_h_moe` one, export/nemotron_h_gguf.py), atomically, streamed:
    every tensor's name, shape and type first (GGUF's header lists them before the data), then each tensor
    computed in llama.cpp's layout, converted and written in turn, so one converted tensor is held at a
    time (gguf's `add_tensor_info` + `write_tensor_data`; `add_tensor` would hold them all until written)."""
    if dtype not in GGUF_DTYPES:
        raise PuzzleError(f"GGUF dtype {dtype!r} not supported; choose {', '.join(GGUF_DTYPES)}")
    config = model.config
    blocks = config.blocks
    if is_hybrid(config):  # NemotronH: llama.cpp's nemotron_h / nemotron_h_moe (export/nemotron_h_gguf.py)
        from . import nemotron_h_gguf as hybrid

        hybrid.check_nemotron_h_gguf(config)
        arch, typed, tensors_of = hybrid.arch_of(config), hybrid.tensor_type, hybrid.gguf_tensors
        write_hparams = functools.partial(hybrid.write_hparams, config=config, dtype=dtype)
    else:
        check_llamacpp(blocks, config.hidden_size)
        arch, typed, tensors_of = gguf.MODEL_ARCH.DECI, gguf_type, gguf_tensors
        write_hparams = functools.partial(_write_hparams, config=config, blocks=blocks, dtype=dtype)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out.parent, name=out.name)  # what a killed export of this file left (.NAME.XXXXXXXX.tmp)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_string(GGUF_KEY, "export")  # an earlier export may be replaced by the next (puzzle.outputs)
        extra = write_hparams(w) or {}
        _write_vocab(w, tokenizer, config.vocab_size)
        listed = [(n, a.shape, functools.partial(torch.from_numpy, a)) for n, a in extra.items()]
        tensors = [(n, shape, load, typed(n, shape, dtype)) for n, shape, load in [*listed, *tensors_of(model)]]
        for gguf_name, shape, _, qtype in tensors:
            # the element shape: gguf reads a uint8 array's shape as bytes, any other dtype's as elements
            w.add_tensor_info(gguf_name, shape, np.float32, gguf_nbytes(shape, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, _, load, qtype in tensors:
            w.write_tensor_data(encode(load(), qtype))  # gguf checks its bytes against the listed size
        w.close()
        os.replace(tmp, out)
    except OSError as err:  # a full disk: named, and nothing half-written left
        Path(tmp).unlink(missing_ok=True)
        raise naming(err, out) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
