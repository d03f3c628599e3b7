"""`puzzle export --format anymodel`, loaded by NVIDIA Puzzletron's own loader (PyPI nvidia-modelopt,
modelopt/torch/puzzletron: `load_and_shard_model` with its `LlamaModelDescriptor`) with the child's logits.

nvidia-modelopt 0.47 declares transformers >=4.57,<5.15 and its Llama descriptor breaks on the venv's newer
one (`LlamaRotaryEmbedding(config, device)`), so the loader runs in a subprocess on transformers 5.14 from a
`pip install --target` directory outside the checkout (`~/.cache/puzzle/modelopt-transformers`, or
$PUZZLE_CACHE/...), installed on first use: 5.14 with the tokenizers / huggingface_hub it pins, a `datasets`
that works with that hub (Puzzletron imports it), and that hub's HTTP client. torch and the rest: the venv's.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from puzzle.errors import PuzzleError
from puzzle.export.anymodel import SUBBLOCKS_DIR, subblock_of
from puzzle.export.commands import export

from safetensors_reference import reference_bytes
from tiny_children import logits, make_child, save_child

TRANSFORMERS = ("transformers==5.14.*", "tokenizers>=0.22,<=0.23.0", "huggingface_hub>=1.5,<2", "datasets<5",
                "httpx", "httpcore")
CACHE = Path(os.environ.get("PUZZLE_CACHE", Path.home() / ".cache" / "puzzle")) / "modelopt-transformers"
# Every block kind Puzzletron's Llama descriptor builds: GQA at every group size, pruned FFNs, no-op sublayers.
BLOCKS = ["attn_g2+ffn_128", "attn_noop+ffn_96", "attn_g4+ffn_noop", "attn_g1+ffn_64", "attn_noop+ffn_noop",
          "attn_g2+ffn_128"]
TOKENS = [5, 17, 300, 42, 7, 99, 123, 250, 8, 64, 11]


def unavailable(reason: str) -> None:
    if os.environ.get("CI"):  # the test extras and this cache are installable there: a failure, not a skip
        pytest.fail(reason)
    pytest.skip(reason)


def modelopt_transformers() -> Path:
    """The --target directory with the transformers nvidia-modelopt supports (about a minute, once)."""
    if importlib.util.find_spec("modelopt") is None:
        unavailable("nvidia-modelopt is not installed (pip install -e '.[test]' installs it)")
    if (CACHE / ".complete").exists():
        return CACHE
    tmp = CACHE.with_name(f"{CACHE.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp), *TRANSFORMERS]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        unavailable(f"cannot install {TRANSFORMERS[0]} for nvidia-modelopt ({run.stderr.strip().splitlines()[-1:]})")
    (tmp / ".complete").write_text(" ".join(TRANSFORMERS) + "\n")
    if CACHE.exists():  # another run finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, CACHE)
    return CACHE


# Puzzletron's loader on one CPU process. `load_and_shard_model` puts the model on torch.device(local_rank), a GPU
# index: the rank's device is named "cpu" instead. It leaves every tensor bf16, RoPE frequencies included: the
# model goes back to float32 and Puzzletron's own descriptor re-makes its rotary embedding, so only the weights
# stay rounded.
LOADER = """
import sys, torch, transformers
from types import SimpleNamespace
from safetensors.torch import save_file
import modelopt.torch.utils.distributed as dist
dist.local_rank = lambda: "cpu"
from modelopt.torch.puzzletron.anymodel.models.llama import LlamaModelDescriptor
from modelopt.torch.puzzletron.tools.sharded_checkpoint_utils import load_and_shard_model
model = load_and_shard_model(LlamaModelDescriptor, {path!r}).float().eval()
LlamaModelDescriptor.init_rotary_embedding(model, SimpleNamespace(device=torch.device("cpu")))
assert "puzzle" not in sys.modules
with torch.no_grad():
    save_file({{"logits": model(torch.tensor([{tokens}])).logits[0]}}, {out!r})
print(transformers.__version__, [type(layer.mlp).__name__ for layer in model.model.layers])
"""


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.slow
def test_puzzletron_loads_the_export_with_equal_logits(tmp_path, tied):
    target = modelopt_transformers()
    rope = {"rope_type": "llama3", "rope_theta": 40000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}  # Puzzletron must read both
    child = make_child(BLOCKS, tie_word_embeddings=tied, rope_parameters=rope)
    path = export(save_child(child, tmp_path / "child"), tmp_path / "anymodel", format="anymodel")
    script = textwrap.dedent(LOADER.format(path=str(path), tokens=TOKENS, out=str(tmp_path / "logits.safetensors")))
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    version, mlps = run.stdout.strip().splitlines()[-1].split(" ", 1)  # Puzzletron logs to stdout before it
    assert version.startswith("5.14") and "MatchingZeros" in mlps  # Puzzletron's own no-op FFN in layer 2
    with torch.no_grad():  # the child with Puzzletron's bf16 weights, computed in float32
        for p in child.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    want = logits(child, TOKENS)
    got = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    assert want.abs().max() > 1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_layout_is_puzzletrons(tmp_path):
    child = make_child(BLOCKS, tie_word_embeddings=True)
    out = export(save_child(child, tmp_path / "child"), tmp_path / "anymodel", format="anymodel")
    config = json.loads((out / "config.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    kv = [b["attention"]["num_key_value_heads"] for b in config["block_configs"]]
    ffn = [b["ffn"]["intermediate_size"] for b in config["block_configs"]]
    assert kv == [2, None, 1, 4, None, 2] and ffn == [128, 96, None, 64, None, 128]
    assert "lm_head.weight" not in index  # tied: Puzzletron's own save leaves it out
    assert index["model.layers.3.mlp.down_proj.weight"] == "subblocks_safetensors/block_3_ffn.safetensors"
    assert index["model.norm.weight"] == "subblocks_safetensors/lm_head.safetensors"
    assert not any(".layers.4." in name for name in index)  # a fully no-op layer has no weights


@pytest.mark.parametrize("dtype", ["auto", "bf16"])
def test_the_streamed_subblock_files_are_the_serialised_ones(tmp_path, dtype):
    """Each subblock file streamed tensor by tensor, converted as each is written: the bytes of its converted
    tensors serialised at once (what the export wrote before)."""
    child = make_child(BLOCKS, tie_word_embeddings=True)
    out = export(save_child(child, tmp_path / "child"), tmp_path / "anymodel", format="anymodel", dtype=dtype)
    to = torch.bfloat16 if dtype == "bf16" else torch.float32
    groups = {}
    for name, tensor in child.state_dict().items():
        if "rotary_emb" not in name and name != "lm_head.weight":  # tied: left out
            groups.setdefault(subblock_of(name), {})[name] = tensor.detach().to(to)
    assert sorted(p.stem for p in (out / SUBBLOCKS_DIR).iterdir()) == sorted(groups)
    for group, tensors in groups.items():
        assert (out / SUBBLOCKS_DIR / f"{group}.safetensors").read_bytes() == reference_bytes(tensors, {"format": "pt"}), group


@pytest.mark.parametrize("blocks", [["attn_g2+ffn_128", "attn_linear+ffn_128"], ["attn_g2+ffn_128", "attn_g2+ffn_linear"]])
def test_linear_blocks_are_refused_by_layer(tmp_path, blocks):
    path = save_child(make_child(blocks), tmp_path / "child")
    with pytest.raises(PuzzleError, match=r"^layer 1 .* cannot be exported as anymodel: .* builds no linear"):
        export(path, tmp_path / "anymodel", format="anymodel")
    assert not (tmp_path / "anymodel").exists()
