"""`teacher_correction:` in a pipeline config: correct-teacher runs right after prepare-data and every later
step (importance, the library, scoring, GKD's teacher, evaluate's reference) reads the corrected parent;
the original parent is evaluated against it and the report shows both."""

import json

import pytest
import yaml
from test_pipeline import tiny_config

from puzzle.cli import main
from puzzle.model.fingerprint import fingerprint
from puzzle.pipeline import RunConfig
from puzzle.pipeline_stages import plan
from puzzle.run_dir import RunDir

CORRECTION = {"steps": 2, "batch_size": 2, "val_every": 2, "val_blocks": 2, "checkpoint_every": 2, "warmup_steps": 1}


def _config(tmp_path, parent_dir, name="teacher", **changes):
    (tmp_path / name).mkdir()
    raw = {**tiny_config(tmp_path / name, parent_dir), "teacher_correction": CORRECTION, **changes}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in raw.items() if v is not None}))
    return path


def test_the_plan_uses_the_corrected_parent_after_prepare_data(tmp_path, tiny_parent_dir):
    config = _config(tmp_path, tiny_parent_dir)
    steps = plan(RunConfig.load(config))
    names = [s.name for s in steps]
    assert names[:2] == ["prepare_data", "teacher_correction"]
    teacher = RunDir(tmp_path / "teacher" / "run").teacher_model
    by_name = {s.name: s for s in steps}
    assert by_name["prepare_data"].common["parent"] == tiny_parent_dir  # tokenised before the correction
    assert by_name["teacher_correction"].common["parent"] == tiny_parent_dir
    assert by_name["teacher_correction"].args == CORRECTION and by_name["teacher_correction"].fn == "correct_teacher"
    later = [s for s in steps[2:] if "parent" in s.common]
    assert {s.name for s in later} >= {"importance", "build_library", "score", "prune[width]", "evaluate[fast]"}
    assert all(s.common["parent"] == teacher for s in later)
    assert by_name["gkd[fast]"].common["teacher"] == teacher
    original = by_name["evaluate[parent_original]"]
    assert original.common["model"] == tiny_parent_dir and original.common["parent"] == teacher
    assert by_name["evaluate[parent]"].common["model"] == teacher
    # without the section nothing changes: the parent is the config's throughout
    plain = plan(RunConfig.load(_config(tmp_path, tiny_parent_dir, "plain", teacher_correction=None)))
    assert "teacher_correction" not in [s.name for s in plain] and "evaluate[parent_original]" not in [s.name for s in plain]
    assert all(s.common.get("parent", tiny_parent_dir) == tiny_parent_dir for s in plain)


@pytest.mark.slow
def test_a_run_with_teacher_correction_uses_the_corrected_parent(tiny_parent_dir, tmp_path, capsys):
    config = _config(tmp_path, tiny_parent_dir, baselines=None,
                     solve=[{"budget": "h100_80gb", "speedup": 1.2, "name": "fast"}])
    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    run = RunDir(tmp_path / "teacher" / "run")
    teacher = run.teacher_model
    info = run.info()
    assert info["parent"] == str(teacher.resolve()) and info["parent_original"] == str(tiny_parent_dir.resolve())
    teacher_fp = fingerprint(teacher)
    assert teacher_fp != fingerprint(tiny_parent_dir)
    # every later stage read the corrected parent
    assert json.loads((run.importance / "settings.json").read_text())["parent_fingerprint"] == teacher_fp
    assert json.loads((run.library / "manifest.json").read_text())["parent_fingerprint"] == teacher_fp
    assert json.loads((run.scores / "scores.json").read_text())["settings"]["parent_fingerprint"] == teacher_fp
    gkd = json.loads((RunDir.gkd_dir(run.child("fast")) / "sources.json").read_text())
    assert gkd["teacher_fingerprint"] == teacher_fp
    evaluated = {p.stem: json.loads(p.read_text()) for p in run.eval.glob("*.json") if p.stem != "cloze"}
    assert all(e["parent_fingerprint"] == teacher_fp for e in evaluated.values())
    assert evaluated["parent"]["model_fingerprint"] == teacher_fp and evaluated["parent"]["validation"]["kl"] == 0.0
    original = evaluated["parent_original"]
    assert original["model"] == str(tiny_parent_dir) and original["validation"]["kl"] > 0
    assert "measured" not in original  # timed once: it has the corrected parent's shapes
    report = run.report.read_text()
    assert "| parent |" in report and "Teacher correction:" in report
    row = next(line for line in report.splitlines() if line.startswith("| parent_original |"))
    assert f"| {evaluated['parent']['measured']['decode_tokens_per_s']:,.0f} |" in row  # the corrected parent's speed
    capsys.readouterr()
    assert main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.count("complete, skipped") == len(plan(RunConfig.load(config)))
