import pandas as pd
import pytest
import torch

from puzzle.cli import main
from puzzle.errors import PuzzleError
from puzzle.io import read_json
from puzzle.model.checkpoint import load_config, load_model
from puzzle.profiling.commands import COLUMNS, load_costs, profile, table_model_costs
from puzzle.profiling.hardware import load_profile
from puzzle.profiling.roofline import parent_blocks, predict_model_costs



def test_roofline_costs_table_follows_the_contract(tmp_path, tiny_parent_dir):
    run = tmp_path / "run"
    out = profile(run_dir=run, budget="h100_80gb", parent=tiny_parent_dir)
    assert out == run / "costs" / "h100_80gb.json"
    table = pd.read_parquet(run / "costs" / "h100_80gb.parquet")
    assert list(table.columns) == COLUMNS
    assert (run / "costs" / "h100_80gb.csv").exists()
    # llama_default on the tiny parent (4 heads / 2 KV heads, FFN 128): 4 attention + 9 FFN variants per layer
    assert len(table) == 4 * 13
    assert not table.duplicated(["layer", "kind", "variant"]).any()
    assert (table["source"] == "roofline").all() and (table["batch_size"] == 64).all()
    parents = table[table["is_parent"]]
    assert sorted(parents["variant"].unique()) == ["attn_g2", "ffn_128"] and len(parents) == 8
    noop = table[table["variant"].isin(["attn_noop", "ffn_noop"])]
    assert (noop[["params", "kv_cache_bytes", "prefill_s", "decode_s"]] == 0).all().all()

    meta = read_json(out)
    assert meta["constraints"] == {"speedup": 1.5, "memory_gib": 67.0}
    assert meta["hidden_size"] == 64
    assert meta["workload"]["decode_context"] == 1024 + 512
    assert set(meta["fixed"]) == {"embeddings", "final_norm", "lm_head"}
    # the whole parent = fixed + its rows, and equals the roofline prediction from its blocks alone
    config = load_config(tiny_parent_dir)
    predicted = predict_model_costs(config, parent_blocks(config), load_profile("h100_80gb"))
    for key in ("params", "kv_cache_bytes", "prefill_s", "decode_s", "throughput_tokens_s"):
        assert meta["parent"][key] == pytest.approx(predicted[key])
    assert meta["parent"]["params"] == sum(p.numel() for p in load_model(tiny_parent_dir).parameters())
    assert table_model_costs(*load_costs(run, "h100_80gb"), parent_blocks(config))["decode_s"] == pytest.approx(
        meta["parent"]["decode_s"]
    )
    from puzzle.model.fingerprint import fingerprint

    assert read_json(run / "parent.json") == {"parent": str(tiny_parent_dir.resolve()), "search_space": "llama_default",
                                              "parent_fingerprint": fingerprint(tiny_parent_dir)}


def test_reruns_find_the_parent_reuse_what_is_complete_and_refuse_another_parent(tmp_path, tiny_parent_dir):
    run = tmp_path / "run"
    out = profile(run_dir=run, budget="a100_80gb", parent=tiny_parent_dir)
    stamp = out.stat().st_mtime_ns
    assert profile(run_dir=run, budget="a100_80gb") == out  # parent from parent.json, nothing to redo
    assert out.stat().st_mtime_ns == stamp
    profile(run_dir=run, budget="a100_80gb", search_space="tiny")  # a changed space is recomputed
    assert out.stat().st_mtime_ns != stamp and read_json(run / "parent.json")["search_space"] == "tiny"
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((tiny_parent_dir / "config.json").read_text())
    with pytest.raises(PuzzleError, match="belongs to parent"):
        profile(run_dir=run, budget="a100_80gb", parent=other)
    with pytest.raises(PuzzleError, match="pass --parent"):
        profile(run_dir=tmp_path / "fresh")


def test_cpu_profile_is_measured(tmp_path, tiny_parent_dir, tiny_cpu_profile):
    run = tmp_path / "run"
    out = profile(run_dir=run, budget=str(tiny_cpu_profile), parent=tiny_parent_dir, search_space="tiny", repeats=3)
    table, meta = load_costs(run, "tiny_cpu")
    assert meta["source"] == "measured" and meta["measured_on"].startswith("cpu")
    assert (table["source"] == "measured").all()
    runs = table[~table["variant"].isin(["attn_noop", "ffn_noop"])]
    assert (runs["prefill_s"] > 0).all() and (runs["decode_s"] > 0).all()
    # one measurement per distinct variant, shared by every layer offering it
    per_variant = table.groupby(["kind", "variant"])["decode_s"].nunique()
    assert (per_variant == 1).all()
    assert meta["parent_roofline"]["decode_s"] > 0 and meta["parent"]["decode_s"] > 0
    roofline = profile(run_dir=run, budget=str(tiny_cpu_profile), measure=False)
    assert read_json(roofline)["source"] == "roofline"


def test_cli_reports_user_errors_in_one_line(tmp_path, tiny_parent_dir, capsys):
    assert main(["profile", "--run-dir", str(tmp_path), "--budget", "h900", "--parent", str(tiny_parent_dir)]) == 2
    assert "unknown hardware profile 'h900'" in capsys.readouterr().err
    if torch.cuda.is_available():
        return
    assert main(["profile", "--run-dir", str(tmp_path / "r"), "--parent", str(tiny_parent_dir), "--measure"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_a_damaged_costs_table_is_rebuilt_by_rerunning_profile(tmp_path, tiny_parent_dir):
    run = tmp_path / "run"
    profile(run_dir=run, budget="h100_80gb", parent=tiny_parent_dir)
    table = run / "costs" / "h100_80gb.parquet"
    good = table.read_bytes()
    table.write_bytes(good[: len(good) // 2])
    with pytest.raises(PuzzleError, match="puzzle profile"):
        load_costs(run, "h100_80gb")
    profile(run_dir=run, budget="h100_80gb", parent=tiny_parent_dir)  # no --force: the damage is seen
    assert table.read_bytes() == good


def test_stale_temp_files_in_costs_are_cleaned_when_profile_starts(tmp_path, tiny_parent_dir):
    import os
    import time

    run = tmp_path / "run"
    stale = run / "costs" / ".h100_80gb.parquet.q8w7e6r5.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a table")
    os.utime(stale, (time.time() - 3600,) * 2)
    profile(run_dir=run, budget="h100_80gb", parent=tiny_parent_dir)
    assert not stale.exists() and (run / "costs" / "h100_80gb.parquet").exists()


def _fake_gpu(monkeypatch, name):
    import puzzle.profiling.measure as measure

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(measure, "device_name", lambda device: name if device.type == "cuda" else "cpu")


def test_a_measurement_is_filed_only_under_the_profile_of_the_device_it_ran_on(monkeypatch):
    from puzzle.profiling.commands import _should_measure

    _fake_gpu(monkeypatch, "NVIDIA H200")
    assert _should_measure(load_profile("h200_141gb"), None) == torch.device("cuda", 0)
    with pytest.raises(PuzzleError, match="cannot file a measurement under h100_80gb: this GPU is NVIDIA H200") as err:
        _should_measure(load_profile("h100_80gb"), True)
    assert "\n" not in str(err.value)
    assert _should_measure(load_profile("h100_80gb"), None) is None  # the default falls back to the roofline
    assert _should_measure(load_profile("h100_80gb"), False) is None
    with pytest.raises(PuzzleError, match="CPU profile"):
        _should_measure(load_profile("cpu_local"), None, "cuda")
    with pytest.raises(PuzzleError, match="GPU profile"):
        _should_measure(load_profile("h200_141gb"), True, "cpu")


def test_without_a_gpu_a_gpu_profile_uses_the_roofline_and_cuda_is_refused(monkeypatch):
    from puzzle.profiling.commands import _should_measure

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _should_measure(load_profile("h100_80gb"), None) is None
    assert _should_measure(load_profile("cpu_local"), None) == torch.device("cpu")
    with pytest.raises(PuzzleError, match="no CUDA GPU"):
        _should_measure(load_profile("h100_80gb"), None, "cuda")
