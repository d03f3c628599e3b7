"""`puzzle run` end to end on a tiny parent and corpus, twice: the second run does no work."""

import json

import pytest
import yaml

from puzzle.cli import main
from puzzle.pipeline import RunConfig
from puzzle.pipeline_stages import plan

from conftest import SAMPLE_TEXT


def write_corpus(root):
    root.mkdir()
    for i in range(8):
        text = " ".join(SAMPLE_TEXT[i % 5:] + SAMPLE_TEXT[: i % 5]) * 6
        (root / f"doc{i}.txt").write_text(text)
    return root


def tiny_config(tmp_path, parent_dir):
    return {
        "run_dir": str(tmp_path / "run"),
        "parent": str(parent_dir),
        "corpus": str(write_corpus(tmp_path / "corpus")),
        "search_space": "tiny",
        "prepare_data": {"seq_len": 32, "val_fraction": 0.25},
        "importance": {"n_samples": 8, "batch_size": 4, "drop_samples": 4},
        "build_library": {"tokens_per_block": 256, "batch_size": 4, "calibration_tokens": 128, "eval_tokens": 64,
                          "ray": False},
        "score": {"blocks": 2, "batch_size": 2},
        "profile": [{"budget": "h100_80gb"}],
        "solve": [{"budget": "h100_80gb", "speedup": 1.2, "name": "fast"},
                  {"budget": "h100_80gb", "sweep": "1.1:1.5:0.2"}],
        "realize": [{"solution": "fast"}],
        "gkd": {"steps": 2, "batch_size": 2, "val_every": 2, "val_blocks": 2, "checkpoint_every": 2, "warmup_steps": 1},
        "baselines": [{"name": "width", "ffn_size": 64}],
        "evaluate": {"val_blocks": 2, "batch_size": 2, "mc_items": 4, "measure": False, "budget": "h100_80gb"},
    }


def test_run_end_to_end_then_rerun_does_nothing(tiny_parent_dir, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, tiny_parent_dir)))
    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    run = tmp_path / "run"
    report = (run / "report.md").read_text()
    assert "fast" in report and "Evaluation against the parent" in report and (run / "pareto.png").exists()
    evaluated = {p.stem for p in (run / "eval").glob("*.json")}
    assert {"parent", "fast", "fast+gkd", "width", "width+gkd"} <= evaluated
    child = json.loads((run / "eval" / "fast+gkd.json").read_text())
    assert child["validation"]["kl"] >= 0 and child["predicted"]["throughput_tokens_s"] > 0
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()

    assert main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    n_steps = len(plan(RunConfig.load(config)))
    assert out.count("complete, skipped") == n_steps
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == stamps


def test_bad_config_is_one_line(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("parent: x\ncorpus: y\nsolver: {}\n")
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown keys ['solver']" in err
