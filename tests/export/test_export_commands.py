"""`puzzle export` as a command: refusals are one line and exit code 2, before any file is written."""

import pytest
import torch

from puzzle.cli import main
from puzzle.errors import PuzzleError
from puzzle.export.commands import export

from tiny_children import make_child, save_child


def test_a_refused_child_is_one_line_and_exit_2(tmp_path, capsys):
    path = save_child(make_child(["attn_g2+ffn_128", "attn_g2+ffn_linear"]), tmp_path / "child")
    capsys.readouterr()  # saving the child showed progress
    assert main(["export", str(path), str(tmp_path / "x.gguf"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("puzzle: error: layer 1 (attn_g2+ffn_linear) cannot be exported to llama.cpp")
    assert "\n" not in err and not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("fmt, dtype", [("gguf", "bf16"), ("nemotron-nas", "q8_0"), ("anymodel", "f8")])
def test_a_dtype_the_format_cannot_hold_is_refused(tmp_path, fmt, dtype):
    path = save_child(make_child(["attn_g2+ffn_256"], intermediate_size=256), tmp_path / "child")  # on every grid
    with pytest.raises(PuzzleError, match=dtype):
        export(path, tmp_path / "out", format=fmt, dtype=dtype)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("fmt", ["gguf", "nemotron-nas", "anymodel"])
def test_a_family_the_formats_engines_misread_is_refused_in_one_line(family, fmt, tmp_path, capsys):
    """Qwen2's q/k/v-only biases, Qwen3's q/k norms and sliding windows are beyond the deci / nemotron-nas /
    AnyModel Llama loaders: refused before anything is written, naming the engines that serve such a child."""
    from conftest import make_family_parent, make_tokenizer

    from puzzle.model.checkpoint import save_model, to_puzzle

    path = save_model(to_puzzle(make_family_parent(family)), tmp_path / "child", make_tokenizer())
    capsys.readouterr()
    assert main(["export", str(path), str(tmp_path / "out"), "--format", fmt]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"cannot export as {fmt}" in err and "engines that can: transformers" in err
    assert not (tmp_path / "out").exists()


def test_a_mistral_child_without_a_window_exports_as_llama_does(tmp_path):
    from conftest import make_family_parent, make_tokenizer

    from puzzle.model.checkpoint import load_model, save_model, to_puzzle

    parent = to_puzzle(make_family_parent("mistral_nowindow", intermediate_size=256))  # on the ffn_mult grid
    path = save_model(parent, tmp_path / "child", make_tokenizer())
    out = export(path, tmp_path / "nas", format="nemotron-nas")
    x = torch.randint(3, 320, (1, 9))
    with torch.no_grad():
        assert torch.equal(load_model(out)(x).logits, parent(x).logits)


@pytest.mark.parametrize("fmt, engine, source", [
    ("gguf", None, "deci.cpp"),  # llama.cpp's deci graph keeps one full-attention KV cache
    ("nemotron-nas", "vllm", "nemotron_nas.py"),  # DeciLMDecoderLayer reads no window_length
    ("nemotron-nas", "sglang", "nemotron_nas.py"),
    ("nemotron-nas", "trtllm", "modeling_nemotron_nas.py"),
    ("anymodel", None, ""),
])
def test_a_window_variant_is_refused_by_every_engine_that_ignores_window_length(fmt, engine, source, tmp_path, capsys):
    """A Llama child with one window variant (layers on the ffn_mult grid): the engines that would build full
    attention there refuse it in one line citing their loader; the transformers nemotron-nas export writes it."""
    path = save_child(make_child(["attn_g2+ffn_256", "attn_g2_w4+ffn_256"], intermediate_size=256), tmp_path / "child")
    capsys.readouterr()
    argv = ["export", str(path), str(tmp_path / "out"), "--format", fmt] + (["--engine", engine] if engine else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "window" in err and source in err
    assert not (tmp_path / "out").exists()


def test_a_window_variant_exports_as_nemotron_nas_for_transformers(tmp_path):
    import json

    from puzzle.model.checkpoint import load_model

    child = make_child(["attn_g2+ffn_256", "attn_g2_w4+ffn_256"], intermediate_size=256)
    out = export(save_child(child, tmp_path / "child"), tmp_path / "nas", format="nemotron-nas", engine="transformers")
    attention = [b["attention"] for b in json.loads((out / "config.json").read_text())["block_configs"]]
    assert [a.get("window_length") for a in attention] == [None, 4]  # DeciLM's field, written only when set
    x = torch.randint(3, 320, (1, 11))
    with torch.no_grad():
        assert torch.equal(load_model(out)(x).logits, child(x).logits)
