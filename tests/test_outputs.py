"""puzzle/outputs.py and the atomic directory commit under it: what a named output may replace, and the
last check before anything is deleted (tests/safety/test_output_paths.py holds the CLI reproductions)."""

import errno
import json
import os
import time

import pytest

from puzzle.cli import main
from puzzle.errors import PuzzleError
from puzzle.io import JsonlLog, atomic_write_json, atomic_write_text, clean_stale_temps
from puzzle.model.checkpoint import atomic_dir, atomic_directory, commit_dir
from puzzle.outputs import ANY, MARKER, check_output, marker, owner, replaceable, write_marker


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run"
    atomic_write_json(run / "parent.json", {"parent": "p"})
    return run


def test_a_new_or_empty_path_and_an_own_earlier_output_may_be_written(tmp_path):
    assert check_output(tmp_path / "new", "realize") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", "realize")
    write_marker(tmp_path / "ours", "realize")
    check_output(tmp_path / "ours", "realize")


def test_another_commands_output_needs_force_and_a_users_never_goes(tmp_path):
    write_marker(tmp_path / "exported", "export")
    with pytest.raises(PuzzleError, match="puzzle export; pass --force"):
        check_output(tmp_path / "exported", "realize")
    check_output(tmp_path / "exported", "realize", force=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("x")
    for force in (False, True):
        with pytest.raises(PuzzleError, match="was not written by puzzle"):
            check_output(tmp_path / "mine", "realize", force=force)


@pytest.mark.parametrize("where", ["", "library", "library/x", "scores", "solutions", "costs", "eval", "data",
                                   "importance", ".locks", "parent", "children", "baselines", "distill",
                                   "pipeline.json", "report.md", "parent.json"])
def test_the_run_directory_and_its_own_areas_are_never_an_output(run, where):
    for command in ("realize", "export", "convert" if where != "parent" else "realize"):
        with pytest.raises(PuzzleError):
            check_output(run / where, command, force=True)


def test_model_directories_of_the_run_may_be_written_and_an_ancestor_of_the_run_may_not(run, tmp_path):
    for where in ("children/fast", "baselines/b", "distill/s", "children/fast/gkd", "x.gguf"):
        check_output(run / where, "realize")
    check_output(run / "parent", "convert")  # the pipeline's converted parent
    with pytest.raises(PuzzleError, match="run directory"):
        check_output(tmp_path, "realize", run_dir=run, force=True)


def test_an_input_or_a_directory_holding_one_is_never_an_output(tmp_path):
    (tmp_path / "child").mkdir()
    for out in (tmp_path / "child", tmp_path):
        with pytest.raises(PuzzleError, match="input"):
            check_output(out, "export", inputs=[tmp_path / "child"], force=True)


def test_a_symlink_is_never_an_output(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(PuzzleError, match="symbolic link"):
        check_output(tmp_path / "link", "realize", force=True)


def test_file_outputs_refuse_a_directory_and_a_users_file(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(PuzzleError, match="is a directory"):
        check_output(tmp_path / "d", "export", file=True)
    for name in ("k.gguf", "p.yaml", "plan.json"):
        (tmp_path / name).write_text("{}")
        with pytest.raises(PuzzleError, match="not written by puzzle"):
            check_output(tmp_path / name, "export", file=True, force=True)


def test_owner_reads_each_kind_of_marker(tmp_path, run):
    write_marker(tmp_path / "d", "prune")
    assert owner(tmp_path / "d") == "prune"
    (tmp_path / "p.yaml").write_text("# Calibrated by `puzzle profile --calibrate m.json` from x.yaml:\n")
    assert owner(tmp_path / "p.yaml") == "profile"
    atomic_write_json(tmp_path / "plan.json", {"steps": [], "puzzle_output": "plan"})
    assert owner(tmp_path / "plan.json") == "plan"
    (run / "children" / "old").mkdir(parents=True)  # a pipeline child from before markers
    (run / "children" / "old" / "config.json").write_text("{}")
    assert owner(run / "children" / "old") == ANY
    (run / "parent").mkdir()  # the pipeline's converted parent, from before markers
    (run / "parent" / "config.json").write_text("{}")
    assert owner(run / "parent") == ANY
    assert owner(tmp_path) is None


def test_commit_dir_never_deletes_a_directory_not_ours(tmp_path):
    """The last check, whatever the caller checked: a user's directory stays, the new one is not committed."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "a.txt").write_text("keep")
    with pytest.raises(PuzzleError):
        with atomic_directory(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
    assert (out / "a.txt").read_text() == "keep" and list(tmp_path.iterdir()) == [out]
    assert not replaceable(out)
    write_marker(out, "realize")
    tmp = atomic_dir(out)
    commit_dir(tmp, out)
    assert list(tmp_path.iterdir()) == [out] and not any(out.iterdir())


def test_marker_is_the_extra_json_of_a_save(tmp_path):
    assert json.loads(json.dumps(marker("realize")))[MARKER]["command"] == "realize"


# ---- temporaries ---------------------------------------------------------------------------------------------

def test_stale_temp_directories_are_cleaned_and_a_live_or_foreign_one_is_not(tmp_path):
    old = time.time() - 3600
    stale = [tmp_path / ".best.tmp-0123abcd", tmp_path / ".best.old-89abcdef", tmp_path / "ck" / ".step_000004.tmp-00ff00ff"]
    live, foreign = tmp_path / ".other.tmp-0123abcd", tmp_path / ".cache"
    for d in [*stale, live, foreign]:
        d.mkdir(parents=True)
        (d / "f").write_text("x")
    for d in [*stale, foreign]:
        for p in (d, d / "f"):
            os.utime(p, (old, old))
    os.utime(live, (old, old))  # its directory is old, but a file inside is being written now
    assert set(clean_stale_temps(tmp_path, recursive=True)) == set(stale)
    assert live.exists() and foreign.exists()


def test_a_name_restricts_cleaning_to_that_outputs_temporaries(tmp_path):
    old = time.time() - 3600
    mine, theirs = tmp_path / ".k.gguf.ab12cd34.tmp", tmp_path / ".notes.ab12cd34.tmp"
    for p in (mine, theirs):
        p.write_text("x")
        os.utime(p, (old, old))
    assert clean_stale_temps(tmp_path, name="k.gguf") == [mine] and theirs.exists()


def test_atomic_dir_names_match_the_cleaner(tmp_path):
    tmp = atomic_dir(tmp_path / "child")  # as a kill -9 leaves it
    old = time.time() - 3600
    os.utime(tmp, (old, old))
    atomic_dir(tmp_path / "child")  # the next write of that output removes it first
    assert not tmp.exists()


# ---- symlinks planted in the run directory ----------------------------------------------------------------

def test_a_log_planted_as_a_symlink_is_never_appended_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "log.jsonl").symlink_to(victim)
    with pytest.raises(OSError) as err:
        JsonlLog(tmp_path / "log.jsonl").write(step=1)
    assert err.value.errno == errno.ELOOP and victim.read_text() == "precious"


def test_atomic_writes_replace_a_planted_symlink_not_its_target(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "report.md").symlink_to(victim)
    atomic_write_text(tmp_path / "report.md", "new")
    assert victim.read_text() == "precious" and not (tmp_path / "report.md").is_symlink()


# ---- OSError in the CLI ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("code, rc", [(errno.ENOSPC, 1), (errno.EACCES, 2), (errno.EISDIR, 2), (errno.EIO, 1)])
def test_an_os_error_is_one_line_naming_the_path(monkeypatch, capsys, code, rc):
    def fail(run_dir: str = "r"):
        raise OSError(code, os.strerror(code), "/some/where")

    monkeypatch.setattr("puzzle.stages.Stage.load", lambda self: fail)
    assert main(["report"]) == rc
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("puzzle: error: /some/where: ")
