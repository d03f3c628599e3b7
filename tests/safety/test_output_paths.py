"""Issue 22, items 1, 4, 6 and 7, reproduced as a user would type them (`puzzle.cli.main([...])`):
an output path is never deleted, every name stays inside the run directory, no temporary of ours is left
behind for good, and an I/O error is one line."""

import errno
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_llama, make_tokenizer
from puzzle.cli import main
from puzzle.io import atomic_write_json, write_table
from puzzle.model.checkpoint import load_config, puzzle_config_from, save_model, to_puzzle
MARKER = ".puzzle-output.json"  # puzzle/outputs.py MARKER, spelled out so this file also runs against older code
from puzzle.solver.problem import Workload
from puzzle.solver.synthetic import synthetic_tables

BUDGET = "toy_gpu"
OLD = time.time() - 3600  # older than this process: a leftover of a killed one


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` and its bytes (the stage locks a command takes aside)."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and ".locks" not in p.parts}


@pytest.fixture
def realize_run(tmp_path, tiny_parent_dir):
    """A run directory realize can work in: the parent recorded, an all-parent solution `best`, and some of
    the run's own files (a library manifest, scores) that nothing may delete."""
    run = tmp_path / "run"
    blocks = puzzle_config_from(load_config(tiny_parent_dir)).blocks
    atomic_write_json(run / "parent.json", {"parent": str(tiny_parent_dir), "search_space": "llama_default"})
    atomic_write_json(run / "solutions" / "best.json", {"block_configs": [b.to_dict(64) for b in blocks]})
    atomic_write_json(run / "library" / "manifest.json", {"variants": {}})
    (run / "scores").mkdir()
    (run / "scores" / "scores.csv").write_text("layer,kl\n0,0.5\n")
    return run


def _user_dir(tmp_path) -> Path:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("three years of work")
    return mine


# ---- 1. an output path is never deleted -------------------------------------------------------------------

def test_realize_out_onto_the_run_directory_is_refused_and_deletes_nothing(realize_run, capsys):
    before = _tree(realize_run)
    assert main(["realize", "--run-dir", str(realize_run), "--solution", "best", "--out", str(realize_run)]) == 2
    assert "run directory" in _one_line_error(capsys)
    assert _tree(realize_run) == before


@pytest.mark.parametrize("area", ["library", "scores", "solutions", "children", "."])
def test_realize_out_inside_the_runs_own_areas_is_refused(realize_run, capsys, area):
    before = _tree(realize_run)
    assert main(["realize", "--run-dir", str(realize_run), "--out", str(realize_run / area), "--force"]) == 2
    _one_line_error(capsys)
    assert _tree(realize_run) == before


@pytest.mark.parametrize("force", [False, True])
def test_realize_out_onto_a_users_directory_is_refused_even_with_force(realize_run, tmp_path, capsys, force):
    mine = _user_dir(tmp_path)
    assert main(["realize", "--run-dir", str(realize_run), "--out", str(mine)] + (["--force"] if force else [])) == 2
    assert "--force" in _one_line_error(capsys)
    assert (mine / "thesis.tex").read_text() == "three years of work"


def test_realize_replaces_its_own_earlier_output_and_the_pipelines_children(realize_run, tmp_path, capsys):
    out = tmp_path / "child"
    for target in (out, realize_run / "children" / "best"):
        for dtype in ("fp32", "bf16"):  # the second call realises something else: the first is replaced
            args = ["realize", "--run-dir", str(realize_run), "--dtype", dtype]
            assert main(args + (["--out", str(target)] if target == out else [])) == 0
            assert json.loads((target / "realized.json").read_text())["dtype"] == dtype
            assert json.loads((target / MARKER).read_text())["command"] == "realize"


def test_a_pipeline_child_written_before_markers_is_still_replaced(realize_run, capsys):
    child = realize_run / "children" / "best"
    assert main(["realize", "--run-dir", str(realize_run)]) == 0
    (child / MARKER).unlink()  # as an older puzzle left it
    assert main(["realize", "--run-dir", str(realize_run), "--dtype", "bf16"]) == 0
    assert json.loads((child / "realized.json").read_text())["dtype"] == "bf16"


def test_another_commands_output_is_replaced_only_with_force(realize_run, tmp_path, capsys):
    out = tmp_path / "served"
    assert main(["realize", "--run-dir", str(realize_run), "--out", str(out)]) == 0
    child = realize_run / "children" / "c"
    assert main(["realize", "--run-dir", str(realize_run), "--out", str(child)]) == 0
    capsys.readouterr()
    assert main(["export", str(child), str(out), "--format", "anymodel"]) == 2
    assert "--force" in _one_line_error(capsys) and (out / "realized.json").exists()
    assert main(["export", str(child), str(out), "--format", "anymodel", "--force"]) == 0
    assert json.loads((out / MARKER).read_text())["command"] == "export" and not (out / "realized.json").exists()


def _child(tmp_path) -> Path:
    return save_model(to_puzzle(make_llama()), tmp_path / "child", make_tokenizer())


def _prepared_data(run: Path) -> None:
    """data/ as prepare-data leaves it: 16 train and 4 validation blocks of 16 tokens."""
    (run / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 4)):
        rng.integers(3, 320, (n, 16)).astype(np.uint16).tofile(run / "data" / f"{split}.bin")
    (run / "data" / "meta.json").write_text(json.dumps({"dtype": "uint16", "seq_len": 16, "n_train_blocks": 16,
                                                        "n_val_blocks": 4}))


@pytest.fixture
def work_run(tmp_path):
    """(a parent every format can carry, a run with prepared data and importance scores): every command
    below would succeed, so on older code it replaced the output directory."""
    import torch

    from puzzle.pruning.importance import ImportanceSettings, compute_importance, save_importance, settings_json

    parent = tmp_path / "parent"
    llama = make_llama(intermediate_size=256)  # on the ffn_mult grid nemotron-nas engines derive widths from
    llama.save_pretrained(parent)
    make_tokenizer().save_pretrained(parent)
    run = tmp_path / "run"
    _prepared_data(run)
    scores = compute_importance(to_puzzle(llama), [torch.randint(3, 320, (4, 16))], progress=False)
    save_importance(run, scores, settings_json(ImportanceSettings("l2", "mean", (1,))))
    return parent, run


@pytest.mark.parametrize("command", [
    ["prune", "{parent}", "{out}", "--run-dir", "{run}", "--hidden-size", "48"],
    ["export", "{parent}", "{out}", "--format", "nemotron-nas"],
    ["export", "{parent}", "{out}", "--format", "anymodel"],
    ["convert", "{parent}", "{out}"],
    ["distill", "--teacher", "{parent}", "--student", "{parent}", "--run-dir", "{run}", "--out", "{out}",
     "--steps", "1", "--batch-size", "2", "--val-blocks", "2"],
], ids=lambda c: "-".join(c[:1] + [a for a in c if a in ("nemotron-nas", "anymodel")]))
@pytest.mark.parametrize("force", [False, True])
def test_every_directory_output_refuses_a_users_directory(tmp_path, work_run, capsys, command, force):
    mine = _user_dir(tmp_path)
    parent, run = work_run
    args = [a.format(parent=parent, out=mine, run=run) for a in command] + (["--force"] if force else [])
    assert main(args) == 2
    assert "was not written by puzzle" in _one_line_error(capsys)
    assert _tree(mine) == {"thesis.tex": b"three years of work"}


@pytest.mark.parametrize("command", [
    ["export", "{child}", "{out}", "--format", "anymodel"],
    ["convert", "{child}", "{out}"],
], ids=["export", "convert"])
def test_an_output_that_is_or_holds_an_input_is_refused(tmp_path, capsys, command):
    child = _child(tmp_path)
    before = _tree(child)
    for out in (child, tmp_path):
        assert main([a.format(child=child, out=out) for a in command] + ["--force"]) == 2
        assert "input" in _one_line_error(capsys)
    assert _tree(child) == before


def test_a_gguf_export_never_replaces_a_users_file_but_replaces_its_own(tmp_path, capsys):
    child = _child(tmp_path)
    theirs = tmp_path / "theirs.gguf"
    theirs.write_bytes(b"GGUF not ours")
    assert main(["export", str(child), str(theirs), "--force"]) == 2
    _one_line_error(capsys)
    assert theirs.read_bytes() == b"GGUF not ours"
    ours = tmp_path / "k.gguf"
    assert main(["export", str(child), str(ours)]) == 0
    first = ours.stat().st_mtime_ns
    assert main(["export", str(child), str(ours), "--dtype", "f32"]) == 0
    assert ours.stat().st_mtime_ns != first


# ---- 4. paths stay inside the run directory -----------------------------------------------------------------

@pytest.fixture
def solve_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scores, costs, meta = synthetic_tables(num_layers=4, attention_variants=3, ffn_variants=3, seed=1,
                                           workload=Workload(8, 256, 64))
    run = tmp_path / "deep" / "er" / "run"
    write_table(scores, run / "scores" / "scores")
    write_table(costs, run / "costs" / BUDGET)
    atomic_write_json(run / "costs" / f"{BUDGET}.json", {**meta, "profile": BUDGET, "constraints": {"speedup": 1.5}})
    return run


def _files_outside(run: Path, top: Path) -> set[Path]:
    return {p for p in top.rglob("*") if p.is_file() and run not in p.parents}


@pytest.mark.parametrize("name", ["../../trav", "{abs}", "..", ".hidden", "a/b", "a\\b", "x\ny"])
def test_solve_name_outside_the_run_directory_is_refused(solve_run, tmp_path, capsys, name):
    before = _files_outside(solve_run, tmp_path)
    name = name.format(abs=tmp_path / "abs" / "x")
    assert main(["solve", "--run-dir", str(solve_run), "--budget", BUDGET, "--name", name]) == 2
    assert "invalid solution name" in _one_line_error(capsys)
    assert _files_outside(solve_run, tmp_path) == before
    assert not (solve_run / "solutions").exists()


def test_realize_solution_name_outside_the_run_directory_is_refused(realize_run, tmp_path, capsys):
    atomic_write_json(tmp_path / "evil.json", {"block_configs": []})
    assert main(["realize", "--run-dir", str(realize_run), "--solution", "../../evil"]) == 2
    assert "invalid solution name" in _one_line_error(capsys)


def test_a_planted_lock_symlink_is_refused_and_its_target_untouched(solve_run, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (solve_run / ".locks").mkdir()
    (solve_run / ".locks" / "solve.lock").symlink_to(victim)
    assert main(["solve", "--run-dir", str(solve_run), "--budget", BUDGET]) == 2
    assert "symbolic link" in _one_line_error(capsys)
    assert victim.read_text() == "precious"


# ---- 6. no leaked temporaries -------------------------------------------------------------------------------

def _age(*paths: Path) -> None:
    for path in paths:
        for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
            os.utime(p, (OLD, OLD))


def _leftover_dir(parent: Path, name: str, kind: str = "tmp") -> Path:
    left = parent / f".{name}.{kind}-0123abcd"
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"half a model")
    _age(left)
    return left


def test_realize_removes_what_a_killed_realize_left(realize_run, capsys):
    children = realize_run / "children"
    left = [_leftover_dir(children, "best"), _leftover_dir(children, "other"), _leftover_dir(children, "best", "old")]
    fresh = _leftover_dir(children, "live")
    os.utime(fresh / "model.safetensors")  # a live writer's: written just now
    assert main(["realize", "--run-dir", str(realize_run)]) == 0
    assert not any(p.exists() for p in left) and fresh.exists()


def test_a_gguf_export_removes_what_a_killed_export_of_that_file_left(tmp_path, capsys):
    child = _child(tmp_path)
    left, other = tmp_path / ".k.gguf.ab12cd34.tmp", tmp_path / ".notes.txt.ab12cd34.tmp"
    for p in (left, other):
        p.write_bytes(b"half")
    _age(left, other)
    assert main(["export", str(child), str(tmp_path / "k.gguf")]) == 0
    assert not left.exists() and other.exists()  # only that output's temporaries: the folder is the user's


def test_a_killed_gkd_checkpoint_is_removed_when_distill_starts_again(tmp_path, tiny_parent_dir, capsys):
    run = tmp_path / "run"
    _prepared_data(run)
    out = tmp_path / "gkd"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"command": "distill"}))  # as the killed distill left it
    left = _leftover_dir(out / "checkpoints", "step_000002")
    model_left = _leftover_dir(out, "model")
    assert main(["distill", "--teacher", str(tiny_parent_dir), "--student", str(tiny_parent_dir), "--run-dir", str(run),
                 "--out", str(out), "--steps", "1", "--batch-size", "2", "--val-blocks", "2"]) == 0
    assert not left.exists() and not model_left.exists()


# ---- 7. I/O errors are one line -----------------------------------------------------------------------------

def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing_half_written(solve_run, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert main(["solve", "--run-dir", str(solve_run), "--budget", BUDGET, "--name", "fast"]) == 1
    err = _one_line_error(capsys)
    assert str(solve_run / "solutions" / "fast.json") in err and "free space" in err
    assert not (solve_run / "solutions" / "fast.json").exists()
    assert not list((solve_run / "solutions").glob(".*"))  # no temp file left either


def test_a_gguf_export_onto_an_existing_directory_is_one_line_exit_2(tmp_path, capsys):
    child = _child(tmp_path)
    target = tmp_path / "exports"
    target.mkdir()
    capsys.readouterr()
    assert main(["export", str(child), str(target)]) == 2
    assert "is a directory" in _one_line_error(capsys)
    assert list(target.iterdir()) == []
