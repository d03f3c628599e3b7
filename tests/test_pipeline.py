"""`puzzle run` end to end on a tiny parent and corpus, twice: the second run does no work."""

import json
from pathlib import Path

import pytest
import yaml

from puzzle.cli import main
from puzzle.errors import PuzzleError
from puzzle.pipeline import RunConfig, check_plan
from puzzle.pipeline_stages import plan
from puzzle.stages import stage_functions

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

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
        "gkd": {"hidden_loss": "cosine", "steps": 2, "batch_size": 2, "val_every": 2, "val_blocks": 2, "checkpoint_every": 2, "warmup_steps": 1},
        "baselines": [{"name": "width", "ffn_size": 64}],
        "evaluate": {"val_blocks": 2, "batch_size": 2, "mc_items": 4, "budget": "h100_80gb"},
    }


@pytest.mark.slow
def test_run_end_to_end_then_rerun_does_nothing(tiny_parent_dir, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    # convert_parent (automatic for GGUF parents) writes the parent into the run once; every stage loads that
    config.write_text(yaml.safe_dump({**tiny_config(tmp_path, tiny_parent_dir), "convert_parent": True}))
    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    run = tmp_path / "run"
    assert json.loads((run / "parent.json").read_text())["parent"] == str(run / "parent")
    assert json.loads((run / "eval" / "parent.json").read_text())["validation"]["kl"] == 0.0
    report = (run / "report.md").read_text()
    assert "fast" in report and "Evaluation against the parent" in report and (run / "pareto.png").exists()
    evaluated = {p.stem for p in (run / "eval").glob("*.json")}
    assert {"parent", "fast", "fast+gkd", "width", "width+gkd"} <= evaluated
    child = json.loads((run / "eval" / "fast+gkd.json").read_text())
    assert child["validation"]["kl"] >= 0 and child["predicted"]["throughput_tokens_s"] > 0
    # one prediction per child: evaluate's is the one solve made from the same costs table
    solution = json.loads((run / "solutions" / "fast.json").read_text())
    assert child["predicted"]["speedup"] == pytest.approx(solution["predicted"]["speedup"], rel=1e-9)
    # speed is measured once per architecture (after GKD); the report shows it for the model before GKD too
    assert "measured" in child and "measured" not in json.loads((run / "eval" / "fast.json").read_text())
    evaluation = report.split("## Evaluation against the parent", 1)[1]
    fast_row = next(line for line in evaluation.splitlines() if line.startswith("| fast |"))
    assert f"| {child['measured']['decode_tokens_per_s']:,.0f} |" in fast_row and "GKD changes weights, not shapes" in report
    def stamps_of(run):  # every file but the lock files, which each run takes anew
        return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and ".locks" not in p.parts}

    stamps = stamps_of(run)
    capsys.readouterr()

    assert main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    n_steps = len(plan(RunConfig.load(config)))
    assert out.count("complete, skipped") == n_steps
    assert stamps_of(run) == stamps

    # --check reads the same ledger: nothing left to run; a changed GKD setting reruns GKD and what follows
    assert main(["run", str(config), "--check"]) == 0
    out = capsys.readouterr().out
    assert out.count(": complete") == n_steps and "would run" not in out
    changed = yaml.safe_load(config.read_text())
    changed["gkd"]["lr"] = 3e-4
    config.write_text(yaml.safe_dump(changed))
    assert main(["run", str(config), "--check"]) == 0
    states = dict(line.split("] ", 1)[1].split(": ") for line in capsys.readouterr().out.splitlines() if line.startswith("["))
    first_gkd = list(states).index("gkd[fast]")
    assert all(v == "complete" for v in list(states.values())[:first_gkd])
    assert all(v == "would run" for v in list(states.values())[first_gkd:])
    assert stamps_of(run) == stamps


def check_states(config, capsys) -> dict[str, str]:
    assert main(["run", str(config), "--check"]) == 0
    out = capsys.readouterr().out
    return dict(line.split("] ", 1)[1].rsplit(": ", 1) for line in out.splitlines() if line.startswith("["))


def test_ledger_follows_the_search_space_and_profile_contents(tiny_parent_dir, tmp_path, capsys):
    """Editing a search space or hardware profile file (not renaming it) makes the stages that read it,
    and all after them, due again; an edited comment does not."""
    space = tmp_path / "space.yaml"
    space.write_text((REPO / "search_spaces" / "tiny.yaml").read_text())
    profile = tmp_path / "gpu.yaml"
    profile.write_text((REPO / "hardware_profiles" / "h100_80gb.yaml").read_text())
    raw = tiny_config(tmp_path, tiny_parent_dir)
    raw.update(search_space=str(space), importance=None, gkd=None, baselines=None, evaluate=None,
               profile=[{"budget": str(profile)}], solve=[{"budget": str(profile), "speedup": 1.2, "name": "fast"}])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in raw.items() if v is not None}))
    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert set(check_states(config, capsys).values()) == {"complete"}

    space.write_text("# a comment\n" + space.read_text())
    assert set(check_states(config, capsys).values()) == {"complete"}
    space.write_text(space.read_text().replace("no_op: true", "no_op: false", 1))
    states = check_states(config, capsys)
    assert states["prepare_data"] == "complete"
    assert all(v == "would run" for k, v in states.items() if k != "prepare_data")

    space.write_text((REPO / "search_spaces" / "tiny.yaml").read_text())
    assert set(check_states(config, capsys).values()) == {"complete"}
    profile.write_text(profile.read_text() + "\n# edited\n")
    assert set(check_states(config, capsys).values()) == {"complete"}
    data = yaml.safe_load(profile.read_text())
    data["workload"]["batch_size"] = 2 * data["workload"]["batch_size"]
    profile.write_text(yaml.safe_dump(data))
    states = check_states(config, capsys)
    first = list(states).index(f"profile[{profile}]")
    assert all(v == "complete" for v in list(states.values())[:first])
    assert all(v == "would run" for v in list(states.values())[first:])


def test_bad_config_is_one_line(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("parent: x\ncorpus: y\nsolver: {}\n")
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown keys ['solver']" in err


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_configs_pass_the_check(config):
    """Every stage argument, search space, hardware profile and solution name in configs/*.yaml is valid,
    so a multi-hour config cannot fail on a typo after hours of work (the parent and corpus are assets
    fetched by scripts/, not checked here)."""
    cfg = RunConfig.load(config)
    steps = plan(cfg)
    check_plan(cfg, steps, stage_functions(), inputs=False)
    assert any(s.fn == "evaluate" for s in steps) and steps[-1].name == "report"


@pytest.mark.parametrize("mistake, message", [
    ({"evaluate": {"val_blockz": 2}}, "config section 'evaluate[parent]': unknown arguments ['val_blockz']"),
    ({"realize": [{"solution": "fastest"}]}, "realize: no solve entry names its solution 'fastest'"),
    ({"profile": [{"budget": "h900"}]}, "unknown hardware profile 'h900'"),
    ({"search_space": "nope"}, "search space"),
    ({"build_library": {"tokens_per_block": "lots"}},
     "config section 'build_library': argument tokens_per_block expects int, got 'lots' (str)"),
    ({"score": {"blocks": 2.5}}, "argument blocks expects int, got 2.5 (float)"),
    ({"build_library": {"ray": "no"}}, "argument ray expects bool, got 'no' (str)"),
    ({"build_library": {"ffn_init": "random"}}, "argument ffn_init expects one of 'auto', 'channel_contribution', 'minitron'"),
    ({"build_library": {"layers": [0, "one"]}}, "argument layers expects list[int] or None, got [0, 'one'] (list)"),
])
def test_config_mistakes_fail_before_any_stage_runs(tiny_parent_dir, tmp_path, capsys, mistake, message):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**tiny_config(tmp_path, tiny_parent_dir), **mistake}))
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()  # not even prepare_data ran


def test_check_names_a_missing_parent(tiny_parent_dir, tmp_path):
    raw = {**tiny_config(tmp_path, tiny_parent_dir), "parent": str(tmp_path / "missing")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = RunConfig.load(tmp_path / "c.yaml")
    with pytest.raises(PuzzleError, match="parent not found"):
        check_plan(cfg, plan(cfg), stage_functions())


def _check(tmp_path, raw, capsys) -> str:
    """`puzzle run --check` on a config: exit code 2 and the one line it printed."""
    config = tmp_path / "check.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", str(config), "--check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("mistake, message", [
    ({"score": {"blocks": 0}}, "config section 'score': blocks must be a positive number, got 0"),
    ({"build_library": {"tokens_per_block": -256}}, "config section 'build_library': tokens_per_block must be a positive"),
    ({"build_library": {"workers": -1}}, "workers must not be negative, got -1"),
    ({"gkd": {"lr": 0.0}}, "config section 'gkd[fast]': lr must be a positive number, got 0.0"),
    ({"gkd": {"nproc": 0}}, "config section 'gkd[fast]': nproc must be a positive number, got 0"),
    ({"importance": {"block_sizes": [1, 0]}}, "block_sizes must be positive numbers, got [1, 0]"),
])
def test_check_catches_bad_argument_values(tiny_parent_dir, tmp_path, capsys, mistake, message):
    err = _check(tmp_path, {**tiny_config(tmp_path, tiny_parent_dir), **mistake}, capsys)
    assert message in err, err


def test_check_catches_an_unsupported_parent(tiny_parent_dir, tmp_path, capsys):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=320).save_pretrained(tmp_path / "gpt2")
    err = _check(tmp_path, {**tiny_config(tmp_path, tiny_parent_dir), "parent": str(tmp_path / "gpt2")}, capsys)
    assert "unsupported architecture 'gpt2'" in err


def test_check_resolves_the_search_space_against_the_parent(tiny_parent_dir, tmp_path, capsys):
    space = tmp_path / "three_kv.yaml"
    space.write_text("attention: {kv_heads: [3]}\n")  # 3 KV heads cannot serve the parent's 4 query heads
    err = _check(tmp_path, {**tiny_config(tmp_path, tiny_parent_dir), "search_space": str(space)}, capsys)
    assert "three_kv" in err and "3" in err


@pytest.mark.parametrize("content, message", [(None, "holds no text files"),
                                              (b"\x00\x01\x02\xff" * 64, "no text in its 1 file(s)")],
                         ids=["empty", "binary"])
def test_check_needs_a_readable_corpus(tiny_parent_dir, tmp_path, capsys, content, message):
    raw = tiny_config(tmp_path, tiny_parent_dir)
    corpus = Path(raw["corpus"])
    for f in corpus.iterdir():
        f.unlink()
    if content is not None:
        (corpus / "noise.txt").write_bytes(content)
    err = _check(tmp_path, raw, capsys)
    assert str(corpus) in err and message in err, err


def test_an_edited_library_setting_retrains_the_library_not_just_its_header(tiny_parent_dir, tmp_path, capsys):
    raw = {k: v for k, v in tiny_config(tmp_path, tiny_parent_dir).items()
           if k not in ("importance", "solve", "realize", "gkd", "baselines", "evaluate")}
    config = tmp_path / "lib.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", str(config)]) == 0
    manifest = tmp_path / "run" / "library" / "manifest.json"
    before = json.loads(manifest.read_text())["variants"]
    trained = sorted(k for k, r in before.items() if r["source"] == "trained")
    capsys.readouterr()

    raw["build_library"] = {**raw["build_library"], "tokens_per_block": 512}
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", str(config)]) == 0
    assert f"({len(trained)} trained now, 0 recorded without training, {len(before) - len(trained)} already there)" \
        in capsys.readouterr().out
    after = json.loads(manifest.read_text())["variants"]
    assert sorted(k for k in before if after[k]["tokens"] != before[k]["tokens"]) == trained
