import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from puzzle.cli import main
from puzzle.errors import PuzzleError
from puzzle.model import PuzzleForCausalLM
from puzzle.model.checkpoint import load_model, save_checkpoint, save_model, to_puzzle
from puzzle.model.convert import convert

from conftest import make_llama


def run_cli(capsys, *argv):
    capsys.readouterr()  # drop what set-up printed (progress bars)
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_convert_hf_directory_writes_an_all_parent_child(tiny_parent_dir, tiny_llama, tmp_path, capsys):
    code, out, err = run_cli(capsys, "convert", tiny_parent_dir, tmp_path / "child")
    assert code == 0, err
    child = AutoModelForCausalLM.from_pretrained(tmp_path / "child")
    assert isinstance(child, PuzzleForCausalLM)
    config = json.loads((tmp_path / "child" / "config.json").read_text())
    assert len(config["block_configs"]) == 4
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_puzzle.PuzzleForCausalLM"
    assert (tmp_path / "child" / "tokenizer.json").exists()
    x = torch.randint(0, 320, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(child(x).logits, tiny_llama(x).logits, atol=1e-4, rtol=0)


def test_convert_from_a_single_safetensors_file(tiny_parent_dir, tiny_llama, tmp_path):
    convert(tiny_parent_dir / "model.safetensors", tmp_path / "child")
    child = load_model(tmp_path / "child")
    x = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(child(x).logits, tiny_llama(x).logits, atol=1e-4, rtol=0)


def test_unsupported_architecture_is_refused_in_one_line(tmp_path, capsys):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    gpt2.save_pretrained(tmp_path / "gpt2")
    code, _, err = run_cli(capsys, "convert", tmp_path / "gpt2", tmp_path / "out")
    assert code == 2
    assert err.count("\n") == 1
    assert "unsupported architecture 'gpt2'" in err and "llama" in err
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors_is_a_clear_error(tiny_parent_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_parent_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(PuzzleError, match="cannot load the weights"):
        load_model(broken)
    code, _, err = run_cli(capsys, "convert", broken, tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and "is the checkpoint complete" in err


def test_missing_parent_path(tmp_path, capsys):
    code, _, err = run_cli(capsys, "convert", tmp_path / "nope", tmp_path / "out")
    assert code == 2 and "model path not found" in err


def test_cli_lists_every_stage(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for stage in ["prepare-data", "importance", "build-library", "score", "profile", "solve", "realize",
                  "distill", "evaluate", "report", "run", "convert", "prune"]:
        assert f"  {stage} " in out
    code, _, err = run_cli(capsys, "frobnicate")
    assert code == 2 and "unknown command" in err


def _tiny_gguf(path):
    """A small, valid GGUF (llama metadata, a vocabulary, one tensor) written with the gguf package."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(8)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(8)])
    w.add_tensor("token_embd.weight", np.zeros((8, 16), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.6, 0.9])
def test_a_truncated_gguf_parent_is_one_line_exit_2(tmp_path, capsys, keep):
    from puzzle.cli import main

    full = _tiny_gguf(tmp_path / "full.gguf").read_bytes()
    parent = tmp_path / "parent.gguf"
    parent.write_bytes(full[: int(len(full) * keep)])
    assert main(["profile", "--parent", str(parent), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert str(parent) in err and "GGUF" in err


def test_the_gguf_header_reader_agrees_with_gguf_s_own(tmp_path):
    """`read_gguf_header` (which skips metadata payloads) reads the tensor table and scalars GGUFReader reads."""
    gguf = pytest.importorskip("gguf")
    from puzzle.model.dimensions import read_gguf_header

    path = _tiny_gguf(tmp_path / "p.gguf")
    header, reference = read_gguf_header(path), gguf.GGUFReader(str(path))
    assert header.shapes == {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reference.tensors}
    assert header.shapes["token_embd.weight"] == (8, 16)
    assert header.metadata["llama.block_count"] == 2 and header.metadata["general.architecture"] == "llama"
    assert header.array_lengths["tokenizer.ggml.tokens"] == 8


@pytest.mark.parametrize("at", [8, 16], ids=["tensor-count", "metadata-count"])
def test_a_gguf_count_larger_than_the_file_is_one_line_without_a_loop(tmp_path, capsys, at):
    """A damaged count (2^62 tensors or metadata entries) is compared with the bytes left before any loop."""
    data = bytearray(_tiny_gguf(tmp_path / "full.gguf").read_bytes())
    data[at:at + 8] = (1 << 62).to_bytes(8, "little")
    parent = tmp_path / "parent.gguf"
    parent.write_bytes(bytes(data))
    assert main(["convert", str(parent), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(parent) in err and "does not fit in the file" in err


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_checkpoint_streams_the_files_save_pretrained_writes(tmp_path, tied):
    """The streamed weights (and the config files transformers writes beside them) are save_pretrained's own,
    byte for byte: same tensors (a tied head left out), same order, same header."""
    model = make_llama(tie_word_embeddings=tied)
    save_checkpoint(model, tmp_path / "streamed")
    model.save_pretrained(tmp_path / "reference")
    assert _files(tmp_path / "streamed") == _files(tmp_path / "reference")


@pytest.mark.parametrize("lm_head_weight", [False, True])
def test_save_model_writes_the_weights_file_it_wrote_before_streaming(tmp_path, lm_head_weight):
    """A tied child, with and without the head stored by name (`lm_head_weight`): the weights file equals
    save_pretrained's, and with the head, that file with `lm_head.weight` added as safetensors writes it."""
    child = to_puzzle(make_llama(tie_word_embeddings=True))
    save_model(child, tmp_path / "child", lm_head_weight=lm_head_weight)
    child.save_pretrained(tmp_path / "reference")
    reference = tmp_path / "reference" / "model.safetensors"
    if lm_head_weight:  # what save_model did before: reload the file, add a copy of the embedding, save again
        state = load_file(str(reference))
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        save_file(state, str(reference), metadata={"format": "pt"})
    assert (tmp_path / "child" / "model.safetensors").read_bytes() == reference.read_bytes()
    assert ("lm_head.weight" in load_file(str(reference))) == lm_head_weight
