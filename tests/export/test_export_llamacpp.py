"""`puzzle export --format gguf` run by llama.cpp itself (llama-cpp-python, built from source by
scripts/install.sh): a child of every block kind llama.cpp's deci graph runs gives puzzle's logits."""

import math
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from puzzle.errors import PuzzleError
from puzzle.export.commands import export
from puzzle.engines import RULES
from puzzle.export.llamacpp import _write_hparams, _write_vocab, gguf_tensors, permute, write_gguf
from puzzle.model.checkpoint import load_puzzle, load_tokenizer
from puzzle.outputs import GGUF_KEY

from conftest import make_llama, make_tokenizer
from memory import traced_peak
from tiny_children import logits, make_child, save_child

from llamacpp_engine import llama_cpp, needs_llamacpp

# Every block kind llama.cpp's deci graph runs: GQA at every group size, linear attention, no-op attention,
# a whole no-op layer, pruned FFN widths (48: rows that are not whole q8_0 blocks).
ALLOWED = ["attn_g2+ffn_128", "attn_noop+ffn_96", "attn_linear+ffn_64", "attn_g4+ffn_48", "attn_noop+ffn_noop",
           "attn_g1+ffn_32", "attn_g2+ffn_128"]
TOL = 1e-3  # max abs logit difference allowed between llama.cpp (f32 GGUF) and puzzle (issue 14)
TOKENS = [5, 17, 300, 42, 7, 99, 123, 250, 8, 64, 11, 3, 260, 1, 77, 18, 201, 45]


def run_llamacpp(path, tokens: list[int], every_token: bool = True) -> np.ndarray:
    """llama.cpp's logits for `tokens`: (T, vocab), or (vocab,) of the last token alone as in generation; with an
    f32 KV cache (its default f16 cache rounds K and V)."""
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, logits_all=every_token, vocab_only=False,
                          verbose=False, type_k=gguf.GGMLQuantizationType.F32, type_v=gguf.GGMLQuantizationType.F32)
    llm.eval(tokens)
    scores = np.array(llm.scores[: len(tokens)]) if every_token else np.array(llm.scores[len(tokens) - 1])
    llm.close()
    return scores


@pytest.fixture(scope="module")
def child_gguf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    child = make_child(ALLOWED)
    out = export(save_child(child, tmp / "child"), tmp / "child.gguf", format="gguf", dtype="f32")
    return child, out


@needs_llamacpp
def test_llamacpp_runs_every_allowed_block_kind_with_puzzles_logits(child_gguf):
    child, path = child_gguf
    got = run_llamacpp(path, TOKENS)
    want = logits(child, TOKENS).numpy()
    assert np.abs(want).max() > 1  # the comparison would be empty on a degenerate model
    assert np.abs(got - want).max() <= TOL


@needs_llamacpp
def test_llamacpp_tokenizes_like_the_parents_tokenizer(child_gguf):
    _, path = child_gguf
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    tokenizer = make_tokenizer()
    for text in ["The quick brown fox jumps over the lazy dog.", "A tuple is an immutable sequence; 1234 lists!"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text)
    assert llm.token_bos() == tokenizer.bos_token_id and llm.token_eos() == tokenizer.eos_token_id
    llm.close()


@needs_llamacpp
@pytest.mark.parametrize("tied", [False, True])
def test_a_parent_exports_as_an_all_parent_child(tmp_path, tied):
    """The engine benchmark exports the parent itself: a plain Llama directory, tied head or not."""
    parent = make_llama(tie_word_embeddings=tied)
    parent.save_pretrained(tmp_path / "parent")
    make_tokenizer().save_pretrained(tmp_path / "parent")
    path = export(tmp_path / "parent", tmp_path / "parent.gguf", format="gguf", dtype="f32")
    reader = gguf.GGUFReader(path)
    assert ("output.weight" in {t.name for t in reader.tensors}) is not tied  # llama.cpp reuses token_embd
    with torch.no_grad():
        want = parent(torch.tensor([TOKENS])).logits[0].numpy()
    assert np.abs(run_llamacpp(path, TOKENS) - want).max() <= TOL


@needs_llamacpp
def test_llama3_rope_runs_in_llamacpp(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    child = make_child(["attn_g2+ffn_128", "attn_g4+ffn_64"], rope_parameters=rope)
    path = export(save_child(child, tmp_path / "child"), tmp_path / "child.gguf", format="gguf", dtype="f32")
    assert np.abs(run_llamacpp(path, TOKENS) - logits(child, TOKENS).numpy()).max() <= TOL


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_f16_and_q8_0_hold_the_weights_within_their_rounding(child_gguf, tmp_path, dtype):
    child, _ = child_gguf
    path = export(save_child(child, tmp_path / "child"), tmp_path / f"child.{dtype}.gguf", format="gguf", dtype=dtype)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    k_rows = permute(child.model.layers[3].self_attn.k_proj.weight.detach(), 1)  # one KV head (attn_g4)
    cases = {"blk.3.attn_k.weight": k_rows, "blk.3.ffn_down.weight": child.model.layers[3].mlp.down_proj.weight,
             "blk.2.attn_output.weight": child.model.layers[2].self_attn.linear_attn.weight,
             "blk.0.attn_norm.weight": child.model.layers[0].input_layernorm.weight}
    for name, weight in cases.items():
        t = tensors[name]
        weight = weight.detach().numpy()
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(weight.shape)
        if weight.ndim == 1:  # norms stay f32
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, weight)
        elif dtype == "q8_0" and weight.shape[1] % 32 == 0:
            # 32 values share a scale d = max|w| / 127 stored in f16: error <= d / 2 + 127 |d - f16(d)|
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            d = np.abs(weight.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
            assert (np.abs(got - weight).reshape(-1, 32) <= d * (0.5 + 127 * 2.0**-11)).all()
        else:  # f16, and q8_0's fallback for rows of 48 values
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            assert np.array_equal(got, weight.astype(np.float16).astype(np.float32))


@needs_llamacpp
@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
@pytest.mark.slow
def test_llamacpp_runs_f16_and_q8_0(child_gguf, tmp_path, dtype):
    child, f32_path = child_gguf
    path = export(save_child(child, tmp_path / "child"), tmp_path / "child.gguf", format="gguf", dtype=dtype)
    got, exact = run_llamacpp(path, TOKENS), run_llamacpp(f32_path, TOKENS)
    assert np.isfinite(got).all()
    # rounding the weights moves the logits, but much less than they differ between tokens
    assert np.abs(got - exact).max() < np.abs(exact - exact.mean(axis=1, keepdims=True)).max() / 10


def test_permute_pairs_each_heads_rotate_half_halves():
    """Rows (h0: a0 a1 b0 b1) -> (a0 b0 a1 b1): GGML rotates adjacent pairs, transformers the two halves."""
    w = torch.arange(16).reshape(8, 2)
    rows = permute(w, 2)[:, 0].tolist()
    assert rows == [0, 4, 2, 6, 8, 12, 10, 14]


@pytest.mark.parametrize("blocks, rule", [
    (["attn_g2+ffn_128", "attn_g2+ffn_linear"], "linear_ffn"),
    (["attn_g2+ffn_128", "attn_linear+ffn_noop", "attn_g2+ffn_128"], "noop_ffn_after_attention"),
    (["attn_g2+ffn_128", "attn_g4+ffn_noop", "attn_g2+ffn_128"], "noop_ffn_after_attention"),
    (["attn_g2+ffn_128", "attn_noop+ffn_noop"], "noop_ffn_last_layer"),
])
def test_blocks_llamacpp_cannot_run_are_refused_by_layer(tmp_path, blocks, rule):
    path = save_child(make_child(blocks), tmp_path / "child")
    with pytest.raises(PuzzleError, match=r"^layer 1 \(" + blocks[1].replace("+", r"\+") + r"\) cannot be "
                       r"exported to llama.cpp: ") as err:
        export(path, tmp_path / "x.gguf", format="gguf")
    assert RULES[rule] in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x.gguf").exists()


@needs_llamacpp
@pytest.mark.slow
def test_the_refused_blocks_do_break_in_llamacpp(tmp_path, monkeypatch):
    """Written anyway (rules off), llama.cpp gets them wrong: the rules are llama.cpp's, not caution. A no-op FFN
    after an attention loses the attention; in the last layer llama.cpp aborts (so in a subprocess)."""
    monkeypatch.setattr("puzzle.export.llamacpp.check_llamacpp", lambda blocks, hidden_size: None)
    child = make_child(["attn_g2+ffn_128", "attn_g4+ffn_noop", "attn_g2+ffn_128"])
    path = export(save_child(child, tmp_path / "a"), tmp_path / "a.gguf", format="gguf", dtype="f32")
    assert np.abs(run_llamacpp(path, TOKENS) - logits(child, TOKENS).numpy()).max() > TOL

    last = make_child(["attn_g2+ffn_128", "attn_noop+ffn_noop"])
    path = export(save_child(last, tmp_path / "b"), tmp_path / "b.gguf", format="gguf", dtype="f32")
    script = f"import llama_cpp; llama_cpp.Llama({str(path)!r}, n_ctx=64, verbose=False).eval({TOKENS})"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert run.returncode != 0 and "GGML_ASSERT" in run.stderr


@needs_llamacpp
def test_llamacpp_builds_a_window_variant_as_full_attention(tmp_path, monkeypatch):
    """Written anyway (rules off), a window variant's layer runs in llama.cpp with every key: its logits are the
    unwindowed child's, not the windowed one's (why the `sliding_window` rule refuses it)."""
    monkeypatch.setattr("puzzle.export.commands.check_family", lambda engine, config: None)
    monkeypatch.setattr("puzzle.export.llamacpp.check_llamacpp", lambda blocks, hidden_size: None)
    windowed = make_child(["attn_g2+ffn_128", "attn_g2_w3+ffn_128"])
    full = make_child(["attn_g2+ffn_128", "attn_g2+ffn_128"])  # the same weights (same seed), no window
    assert len(TOKENS) > 3
    path = export(save_child(windowed, tmp_path / "w"), tmp_path / "w.gguf", format="gguf", dtype="f32")
    got = run_llamacpp(path, TOKENS)
    assert np.abs(got - logits(full, TOKENS).numpy()).max() <= TOL
    assert np.abs(got - logits(windowed, TOKENS).numpy()).max() > TOL


def reference_gguf(model, tokenizer, out, dtype: str, name: str) -> None:
    """The file as the export wrote it before streaming: every tensor converted (q8_0 tried, f16 on
    `QuantError`) and handed to gguf's in-memory `add_tensor`, then `write_tensors_to_file`."""
    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DECI])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_string(GGUF_KEY, "export")  # the marker that lets a later export replace this file (puzzle.outputs)
    for rope_name, factors in _write_hparams(w, model.config, model.config.blocks, dtype).items():
        w.add_tensor(rope_name, factors)
    _write_vocab(w, tokenizer, model.config.vocab_size)
    for gguf_name, _, load in gguf_tensors(model):
        data = load().detach().float().numpy()
        if dtype == "f32" or data.ndim <= 1 or gguf_name.endswith("_norm.weight"):
            w.add_tensor(gguf_name, data.astype(np.float32), raw_dtype=gguf.GGMLQuantizationType.F32)
            continue
        if dtype == "q8_0":
            try:
                w.add_tensor(gguf_name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                             raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                continue
            except gguf.quants.QuantError:
                pass
        w.add_tensor(gguf_name, data.astype(np.float16), raw_dtype=gguf.GGMLQuantizationType.F16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_the_streamed_gguf_is_the_one_written_in_memory(tmp_path, dtype):
    """Listed first, written tensor by tensor: the bytes of gguf's in-memory path, with llama3 RoPE's extra
    tensor, a tied head left out and q8_0's f16 fallback (rows of 48)."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    child_dir = save_child(make_child(ALLOWED, rope_parameters=rope, tie_word_embeddings=True), tmp_path / "child")
    model, tokenizer = load_puzzle(child_dir, dtype=None), load_tokenizer(child_dir)
    write_gguf(model, tokenizer, tmp_path / "streamed.gguf", dtype, name="child")
    reference_gguf(model, tokenizer, tmp_path / "reference.gguf", dtype, name="child")
    streamed, reference = gguf.GGUFReader(tmp_path / "streamed.gguf"), gguf.GGUFReader(tmp_path / "reference.gguf")
    assert "rope_freqs.weight" in {t.name for t in streamed.tensors}
    assert {t.tensor_type for t in streamed.tensors} >= (
        {gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16} if dtype == "q8_0" else set())
    assert [(t.name, t.tensor_type, t.data.tobytes()) for t in streamed.tensors] == \
        [(t.name, t.tensor_type, t.data.tobytes()) for t in reference.tensors]
    assert (tmp_path / "streamed.gguf").read_bytes() == (tmp_path / "reference.gguf").read_bytes()


@pytest.mark.slow
def test_the_gguf_export_holds_one_converted_tensor_at_a_time(tmp_path):
    """tracemalloc sees numpy's buffers (the converted tensors), not torch's: streaming peaks below twice the
    largest converted tensor (plus the vocabulary's KV data), the in-memory path at every converted tensor."""
    blocks = ["attn_g2+ffn_1024", "attn_g4+ffn_512", "attn_noop+ffn_1024", "attn_g2+ffn_768"]
    child = make_child(blocks, vocab_size=4096, hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                       num_key_value_heads=2)
    child_dir = save_child(child, tmp_path / "child")
    model, tokenizer = load_puzzle(child_dir, dtype=None), load_tokenizer(child_dir)
    sizes = [math.prod(shape) * (4 if len(shape) == 1 or n.endswith("_norm.weight") else 2)
             for n, shape, _ in gguf_tensors(model)]  # f16, norms f32
    streamed = traced_peak(lambda: write_gguf(model, tokenizer, tmp_path / "s.gguf", "f16", name="c"))
    in_memory = traced_peak(lambda: reference_gguf(model, tokenizer, tmp_path / "r.gguf", "f16", name="c"))
    print(f"peak: streamed {streamed / max(sizes):.2f}x the largest tensor, in memory {in_memory / sum(sizes):.2f}x "
          f"all {len(sizes)} ({sum(sizes)} bytes)")
    assert streamed < 2 * max(sizes) < sum(sizes) / 2  # the bound itself is far below the total
    assert in_memory >= sum(sizes)
    assert (tmp_path / "s.gguf").read_bytes() == (tmp_path / "r.gguf").read_bytes()
