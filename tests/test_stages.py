"""The stage registry: one table for the CLI and `puzzle run`; adding a stage touches only the registry."""

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import puzzle.pipeline_stages as pipeline_stages
from puzzle import stages
from puzzle.cli import main
from puzzle.pipeline import RunConfig
from puzzle.stages import COMMANDS, SECTIONS, STAGES, Stage

REPO = Path(__file__).resolve().parents[1]


def test_every_stage_resolves_to_a_documented_function():
    for stage in STAGES:
        fn = stage.load()
        assert fn.__name__ == stage.name and inspect.getdoc(fn), stage.target


def test_cli_lists_the_registry_in_order(capsys):
    assert main(["--help"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS) == [s.command_name for s in STAGES if s.command]


def test_help_imports_no_torch():
    code = "import sys; from puzzle.cli import main; main(['--help']); assert 'torch' not in sys.modules, 'torch'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr


def _config(tmp_path, **sections):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"parent": str(tmp_path), "corpus": str(tmp_path), "run_dir": str(tmp_path / "r"),
                                    **sections}))
    return RunConfig.load(path)


def test_planner_sets_no_stage_defaults(tmp_path):
    """Every argument a step passes is the config's (or a path the pipeline owns): no hidden defaults."""
    cfg = _config(tmp_path, realize=[{"solution": "s"}], gkd={"steps": 1},
                  baselines=[{"name": "w", "ffn_size": 8}], evaluate={"val_blocks": 1})
    steps = {s.name: s for s in pipeline_stages.plan(cfg)}
    assert steps["gkd[s]"].args == {"steps": 1, "out": str(tmp_path / "r" / "children" / "s" / "gkd")}
    assert steps["gkd[w]"].args == {"steps": 1, "out": str(tmp_path / "r" / "baselines" / "w" / "gkd")}
    assert steps["score"].args == {} and steps["profile[0]"].args == {}
    # common values: only those the function takes
    assert set(steps["report"].common) == {"run_dir"}
    assert set(steps["prepare_data"].common) == {"run_dir", "parent", "corpus"}
    assert steps["evaluate[s+gkd]"].common["model"] == tmp_path / "r" / "children" / "s" / "gkd" / "model"


def test_a_new_stage_needs_only_a_registry_entry(tmp_path, monkeypatch):
    """A stage with a config section is known to the config loader, planned in registry order, and a command."""
    new = Stage("build_mc", "puzzle.evaluate.mc:build_mc", "a cloze task", section="cloze")
    registry = tuple(s for s in STAGES if s.name != "build_mc")
    at = [s.name for s in registry].index("evaluate")
    registry = registry[:at] + (new,) + registry[at:]
    monkeypatch.setattr(stages, "STAGES", registry)
    monkeypatch.setattr(pipeline_stages, "STAGES", registry)
    monkeypatch.setattr("puzzle.pipeline.SECTIONS", tuple(s.section for s in registry if s.section))
    cfg = _config(tmp_path, cloze={"items": 3}, evaluate={"val_blocks": 1})
    planned = pipeline_stages.plan(cfg)
    names = [s.name for s in planned]
    assert names.index("cloze") < names.index("evaluate[parent]")
    step = planned[names.index("cloze")]
    assert step.fn == "build_mc" and step.args == {"items": 3} and step.common == {"run_dir": tmp_path / "r"}


def test_unknown_section_names_the_registry(tmp_path):
    with pytest.raises(Exception, match="stages are " + ", ".join(SECTIONS)):
        _config(tmp_path, frobnicate={})


# (stage, its settings dataclass, the fields the stage resolves itself before building it)
STAGE_SETTINGS = [("distill", "puzzle.distill.trainer:DistillConfig", set()),
                  ("correct_teacher", "puzzle.distill.trainer:DistillConfig", set()),
                  ("build_library", "puzzle.library.bld:BLDSettings", {"device", "dtype"})]


@pytest.mark.parametrize("stage, target, resolved", STAGE_SETTINGS, ids=[s for s, _, _ in STAGE_SETTINGS])
def test_a_stage_and_its_settings_state_each_default_once(stage, target, resolved):
    """Every argument of a stage that is a field of its settings dataclass has the dataclass's default: a
    default changed on one side only (a literal in the signature) fails here."""
    fn = stages.BY_NAME[stage].load()
    cls = Stage("", target, "").load()
    params = inspect.signature(fn).parameters
    shared = [f for f in dataclasses.fields(cls) if f.name in params and f.name not in resolved]
    assert len(shared) >= 9
    differ = {f.name: (params[f.name].default, f.default) for f in shared if params[f.name].default != f.default}
    assert not differ, f"{stage}() and {cls.__name__} disagree on defaults (signature, dataclass): {differ}"


def test_settings_of_takes_each_field_from_the_stage_arguments():
    from puzzle.distill.trainer import DistillConfig

    arguments = {"steps": 7, "keep_checkpoints": 5, "layer_map": "1:2", "teacher": "t", "seed": 3}
    config = stages.settings_of(DistillConfig, arguments, layer_map=((1, 2),))
    assert (config.steps, config.keep_checkpoints, config.seed, config.layer_map) == (7, 5, 3, ((1, 2),))
    assert config.lr == DistillConfig.lr  # not an argument here: the dataclass's default
