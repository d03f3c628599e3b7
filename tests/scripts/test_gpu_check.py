"""scripts/gpu_check.py's CPU skeleton: the quick config rewritten for one GPU in bf16 is a valid pipeline
config (every section key is its stage's argument), with the device and dtype in every model stage."""

import importlib.util
import sys
from pathlib import Path

import torch
import yaml

from puzzle.pipeline import run

REPO = Path(__file__).resolve().parents[2]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_config_puts_every_model_stage_on_cuda_in_bf16(tmp_path, tiny_parent_dir, monkeypatch, capsys):
    gpu_check = _gpu_check()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Some prose to calibrate on. " * 20)
    quick = yaml.safe_load((REPO / "configs" / "smollm2_quick.yaml").read_text())
    config = tmp_path / "quick.yaml"
    config.write_text(yaml.safe_dump({**quick, "parent": str(tiny_parent_dir), "corpus": str(corpus),
                                      "search_space": "tiny"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    raw, profile = gpu_check.gpu_config(config, tmp_path / "run")
    assert profile == "h200_141gb"  # this GPU's own profile, so the profile stage measures instead of refusing
    assert raw["profile"] == [{"budget": "h200_141gb", "device": "cuda"}]
    assert {s["budget"] for s in raw["solve"]} == {"h200_141gb"} and raw["evaluate"]["budget"] == "h200_141gb"
    for section in ("build_library", "score", "gkd", "evaluate", "realize"):
        items = raw[section] if isinstance(raw[section], list) else [raw[section]]
        assert all(item["dtype"] == "bf16" for item in items), section
        # realize copies tensors (streamed on the CPU): it takes no device
        assert all(item.get("device") == (None if section == "realize" else "cuda") for item in items), section
    out = tmp_path / "gpu.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run(out, check=True) == tmp_path / "run"  # check_plan: every key is its stage's argument
    assert "would run" in capsys.readouterr().out
