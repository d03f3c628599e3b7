"""puzzle.device: the one resolver of every stage's --device and --dtype."""

import pytest
import torch

from puzzle.device import CPU_FP32, place, resolve, resolve_device, resolve_dtype, resolve_remote
from puzzle.errors import PuzzleError
from puzzle.model.checkpoint import to_puzzle
from conftest import make_llama


def test_auto_is_the_cpu_in_fp32_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runtime = resolve("auto", "auto")
    assert runtime == CPU_FP32 and runtime.dtype == torch.float32
    assert not runtime.mixed and runtime.settings() == {}  # fp32 adds nothing to any stage's cache key


def test_auto_is_cuda_in_bf16_with_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_dtype("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # e.g. a V100 or T4
    assert resolve_dtype("auto", "cuda") == "fp16"


@pytest.mark.parametrize("name, expected", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                            ("fp16", torch.float16), ("float32", torch.float32), ("FP32", torch.float32)])
def test_dtype_names(name, expected):
    runtime = resolve("cpu", name)
    assert runtime.dtype == expected and runtime.device == torch.device("cpu")
    assert runtime.mixed == (expected != torch.float32)
    assert runtime.settings() == ({} if expected == torch.float32 else {"dtype": runtime.dtype_name})


@pytest.mark.parametrize("device, dtype, message", [
    ("cuda", "auto", "no CUDA GPU is visible"),
    ("cuda:1", "auto", "no CUDA GPU is visible"),
    ("tpu", "auto", "unknown device 'tpu'"),
    ("cuda:x", "auto", "unknown device"),
    ("cpu", "int8", "unknown dtype 'int8'"),
])
def test_mistakes_are_one_line(monkeypatch, device, dtype, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PuzzleError, match=message) as err:
        resolve(device, dtype)
    assert "\n" not in str(err.value)


def test_a_gpu_index_past_the_visible_ones_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(PuzzleError, match="only 2 CUDA GPU"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("device, dtype, expected", [
    ("cuda", "auto", ("cuda", "bf16")), ("cuda:3", "fp32", ("cuda", "fp32")), ("cpu", "auto", ("cpu", "fp32")),
    ("auto", "auto", ("cpu", "fp32")), ("auto", "bf16", ("cpu", "bf16")),
])
def test_a_driver_without_a_gpu_names_what_its_ray_workers_run(monkeypatch, device, dtype, expected):
    """Ray stages resolve on the driver, whose GPUs may be none: names only, one dtype for every worker."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runtime = resolve_remote(device, dtype)
    assert (runtime.device.type, runtime.dtype_name) == expected
    for bad in (("tpu", "auto"), ("cuda:x", "auto"), ("cuda", "int8")):
        with pytest.raises(PuzzleError, match="unknown"):
            resolve_remote(*bad)


def test_cpu_autocast_is_bf16_only_when_mixed():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with resolve("cpu", "bf16").autocast():
        assert (x @ w).dtype == torch.bfloat16
    with CPU_FP32.autocast():
        assert (x @ w).dtype == torch.float32
    assert not CPU_FP32.grad_scaler().is_enabled() and not resolve("cpu", "fp16").grad_scaler().is_enabled()


def test_place_casts_parameters_and_keeps_rope_in_fp32():
    model = to_puzzle(make_llama(num_hidden_layers=2))
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    place(model, "cpu", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.rotary_emb.inv_freq, inv_freq)
    assert model.lm_head.weight is not model.model.embed_tokens.weight or model.config.tie_word_embeddings


def test_a_bf16_parent_becomes_a_bf16_child_with_fp32_rope(tmp_path):
    from puzzle.model.checkpoint import load_model

    make_llama(num_hidden_layers=1).save_pretrained(tmp_path / "parent")
    parent = load_model(tmp_path / "parent", dtype=torch.bfloat16)
    child = to_puzzle(parent)
    assert next(child.parameters()).dtype == torch.bfloat16
    assert child.model.rotary_emb.inv_freq.dtype == parent.model.rotary_emb.inv_freq.dtype == torch.float32
