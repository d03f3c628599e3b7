"""A child loads with `trust_remote_code=True` under the oldest transformers the project declares
(pyproject.toml: transformers>=4.56) in a process that never imports `puzzle`, and computes the logits puzzle
computes under the newest (the venv's).

The old release goes into its own `pip install --target` directory, outside the checkout and reused across
runs (`~/.cache/puzzle/tf456`, or $PUZZLE_CACHE/tf456): transformers 4.56 with the tokenizers and
huggingface_hub it pins; everything else (torch, safetensors, numpy) comes from the venv.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from puzzle.model import AttentionConfig, FFNConfig
from puzzle.model.checkpoint import save_model, to_puzzle
from puzzle.model.surgery import replace_sublayer

from conftest import SAMPLE_TEXT, make_llama, make_tokenizer

pytestmark = pytest.mark.slow  # each test reloads a child under an older transformers in a subprocess

OLDEST = "4.56"
# transformers 4.56's own pins (its setup.py): tokenizers>=0.22,<=0.23.0, huggingface-hub>=0.34,<1.0
OLD_PACKAGES = (f"transformers=={OLDEST}.*", "tokenizers>=0.22,<=0.23.0", "huggingface_hub>=0.34,<1.0")
CACHE = Path(os.environ.get("PUZZLE_CACHE", Path.home() / ".cache" / "puzzle")) / "tf456"


def oldest_transformers() -> Path:
    """The --target directory holding transformers 4.56 (installed on first use, about a minute)."""
    if (CACHE / ".complete").exists():
        return CACHE
    tmp = CACHE.with_name(f"{CACHE.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp), *OLD_PACKAGES]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = f"cannot install transformers {OLDEST} ({run.stderr.strip().splitlines()[-1:]})"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    (tmp / ".complete").write_text(" ".join(OLD_PACKAGES) + "\n")
    if CACHE.exists():  # another run finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, CACHE)
    return CACHE


def every_kind_child(tied: bool):
    """A child with llama3-scaled RoPE at a non-default base (4.x must read both from config.json) and every
    block kind: no-op and linear attention, one KV head, linear and smaller FFNs, a no-op FFN."""
    rope = {"rope_type": "llama3", "rope_theta": 40000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    child = to_puzzle(make_llama(rope_parameters=rope, tie_word_embeddings=tied))
    torch.manual_seed(2)
    replace_sublayer(child, 0, "attention", AttentionConfig(no_op=True))
    replace_sublayer(child, 1, "ffn", FFNConfig(replace_with_linear=True))
    replace_sublayer(child, 1, "attention", AttentionConfig(replace_with_linear=True))
    replace_sublayer(child, 2, "attention", AttentionConfig(n_heads_in_group=4))
    replace_sublayer(child, 2, "ffn", FFNConfig(no_op=True))
    replace_sublayer(child, 3, "ffn", FFNConfig(intermediate_size=48))
    for p in child.parameters():
        if p.ndim == 2:
            p.data.normal_(0, 0.08)
    return child.eval()


@pytest.mark.parametrize("tied", [False, True])
def test_child_loads_under_the_oldest_declared_transformers_with_equal_logits(tied, tmp_path):
    old = oldest_transformers()
    child = every_kind_child(tied)
    tokenizer = make_tokenizer()
    out = save_model(child, tmp_path / "child", tokenizer, lm_head_weight=tied)
    x = torch.randint(0, 320, (2, 40))  # past original_max_position_embeddings: the llama3 scaling matters
    with torch.no_grad():
        save_file({"input_ids": x, "logits": child(x).logits}, str(tmp_path / "expected.safetensors"))
    ids = tokenizer(SAMPLE_TEXT[1])["input_ids"]
    script = textwrap.dedent(
        f"""
        import json, sys, torch, transformers
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
        assert transformers.__version__.startswith({OLDEST + "."!r}), transformers.__version__
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert "puzzle" not in sys.modules, "the child must load without the puzzle package"
        x = load_file({str(tmp_path / "expected.safetensors")!r})["input_ids"]
        with torch.no_grad():
            save_file({{"logits": model(x).logits}}, {str(tmp_path / "got.safetensors")!r})
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        model.train()  # gradient checkpointing per layer (GradientCheckpointingLayer) under 4.56: same gradients
        def grads():
            model.zero_grad()
            model(x).logits.square().mean().backward()
            return [p.grad.clone() for p in model.parameters() if p.grad is not None]
        plain = grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={{"use_reentrant": False}})
        checkpointed = grads()
        same = len(plain) == len(checkpointed) > 0 and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))
        print(json.dumps({{"checkpointing": [model.model.layers[0].gradient_checkpointing, same],
                          "module": type(model).__module__, "rope_theta": model.config.rope_theta,
                          "rope_scaling": model.config.rope_scaling,
                          "no_op": [[b.attention.no_op, b.ffn.no_op] for b in model.config.block_configs],
                          "ids": tok({SAMPLE_TEXT[1]!r})["input_ids"]}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(old)}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["module"].startswith("transformers_modules")  # the checkpoint's own modeling file
    assert seen["rope_theta"] == 40000.0 and seen["rope_scaling"]["rope_type"] == "llama3"
    assert seen["ids"] == ids
    assert seen["checkpointing"] == [True, True]
    # block_configs read as attributes under 4.x too (vLLM and TensorRT-LLM releases pinned to it read them so)
    assert seen["no_op"] == [[b.attention.no_op, b.ffn.no_op] for b in child.config.blocks]
    expected = load_file(str(tmp_path / "expected.safetensors"))["logits"]
    got = load_file(str(tmp_path / "got.safetensors"))["logits"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_family_children_load_under_the_oldest_declared_transformers(tmp_path):
    """Mistral (windowed), Qwen2 (biases, windows) and Qwen3 (q/k norms, head_dim 24) children with other KV
    widths and FFN sizes: family.py, the config's family and the blocks' window_length work under 4.56 too."""
    from conftest import FAMILY_WINDOW, make_family_parent, reload_elsewhere

    old = oldest_transformers()
    x = torch.randint(3, 320, (2, 3 * FAMILY_WINDOW))
    dirs, expected = {}, {}
    for family in ("mistral", "qwen2", "qwen3"):
        child = to_puzzle(make_family_parent(family))
        torch.manual_seed(1)
        replace_sublayer(child, 0, "attention", AttentionConfig(n_heads_in_group=4))
        replace_sublayer(child, 3, "ffn", FFNConfig(intermediate_size=48))
        dirs[family] = save_model(child.eval(), tmp_path / family, make_tokenizer())
        with torch.no_grad():
            expected[family] = child(x).logits
    got, stdout = reload_elsewhere(dirs, x, tmp_path, remote_code=True, pythonpath=str(old))
    assert f"transformers {OLDEST}." in stdout
    for family in dirs:
        torch.testing.assert_close(got[family], expected[family], atol=1e-5, rtol=0)


def test_every_directory_we_write_has_a_tokenizer_transformers_4_loads(tmp_path):
    """A child, and its nemotron-nas and anymodel exports: AutoTokenizer under 4.56 reads each and gives the
    ids we give (issue 24: the exports wrote transformers 5's "TokenizersBackend", which 4.x does not know)."""
    from puzzle.export.commands import export

    old = oldest_transformers()
    child = make_llama(0, intermediate_size=256)  # on the ffn_mult grid the nemotron-nas export requires
    tokenizer = make_tokenizer()
    dirs = {"child": save_model(to_puzzle(child), tmp_path / "child", tokenizer)}
    for fmt in ("nemotron-nas", "anymodel"):
        dirs[fmt] = export(dirs["child"], tmp_path / fmt, format=fmt)
    script = textwrap.dedent(
        f"""
        import json, transformers
        from transformers import AutoTokenizer
        assert transformers.__version__.startswith({OLDEST + "."!r}), transformers.__version__
        dirs = {json.dumps({k: str(v) for k, v in dirs.items()})}
        print(json.dumps({{k: AutoTokenizer.from_pretrained(d)({SAMPLE_TEXT[1]!r})["input_ids"] for k, d in dirs.items()}}))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(old)})
    assert run.returncode == 0, run.stderr[-3000:]
    ids = tokenizer(SAMPLE_TEXT[1])["input_ids"]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {name: ids for name in dirs}
