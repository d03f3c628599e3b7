"""RunDir: the run directory's layout and naming rules, which solution `realize` takes by default, and the
one-writer-per-stage lock."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_json
from puzzle.run_dir import RunDir


def test_layout_is_the_documented_one(tmp_path):
    """Paths relative to the run's root: existing run directories must keep working, so this is the format."""
    run = RunDir(tmp_path)
    rel = lambda p: p.relative_to(tmp_path).as_posix()  # noqa: E731
    assert {name: rel(getattr(run, name)) for name in (
        "info_file", "converted_parent", "data", "importance", "library", "scores", "scores_table", "costs_dir",
        "solutions", "pareto_json", "pareto_png", "latest_solve", "children", "baselines", "eval", "mc_tasks",
        "ledger", "report", "report_pareto")} == {
        "info_file": "parent.json", "converted_parent": "parent", "data": "data", "importance": "importance",
        "library": "library", "scores": "scores", "scores_table": "scores/scores", "costs_dir": "costs",
        "solutions": "solutions", "pareto_json": "solutions/pareto.json", "pareto_png": "solutions/pareto.png",
        "latest_solve": "solutions/latest.txt", "children": "children", "baselines": "baselines", "eval": "eval",
        "mc_tasks": "eval/cloze.jsonl", "ledger": "pipeline.json", "report": "report.md",
        "report_pareto": "pareto.png"}
    assert rel(run.costs("h100_80gb")) == "costs/h100_80gb"
    assert rel(run.solution("fast")) == "solutions/fast.json"
    assert rel(run.child("fast")) == "children/fast"
    assert rel(run.baseline("width")) == "baselines/width"
    assert rel(run.eval_result("fast+gkd")) == "eval/fast+gkd.json"
    assert rel(RunDir.distilled_model(RunDir.gkd_dir(run.child("fast")))) == "children/fast/gkd/model"
    run.baseline("width").mkdir(parents=True)
    assert rel(RunDir.pruning_record(run.baseline("width"))) == "baselines/width/pruning.json"
    student = tmp_path / "students" / "s.safetensors"
    student.parent.mkdir()
    student.write_bytes(b"")
    assert rel(RunDir.pruning_record(student)) == "students/pruning.json"  # beside a single weights file
    assert rel(run.distill_out(student)) == "distill/s"


def test_naming_rules():
    assert [RunDir.solution_name("fast", k) for k in (1, 2, 3)] == ["fast", "fast-2", "fast-3"]
    assert RunDir.gkd_name("fast") == "fast+gkd"


def _solutions(run: RunDir, *names: str) -> None:
    for name in names:
        atomic_write_json(run.solution(name), {"block_configs": [], "name": name})


def test_find_solution_without_a_name(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(PuzzleError, match="run puzzle solve first"):
        run.find_solution()
    _solutions(run, "only")
    atomic_write_json(run.pareto_json, {"points": []})  # the sweep's file is not a solution
    assert run.solution_names() == ["only"] and run.find_solution() == run.solution("only")
    _solutions(run, "b", "b-2")
    with pytest.raises(PuzzleError, match=r"pass --solution NAME") as err:
        run.find_solution()
    assert "b-2, b, only" in str(err.value) and "\n" not in str(err.value)
    run.record_solve(["b", "b-2"])  # what the last solve wrote, best first
    assert run.find_solution() == run.solution("b")
    run.solution("b").unlink()  # a stale record is ignored, not followed
    with pytest.raises(PuzzleError, match="b-2, only"):
        run.find_solution()


def test_find_solution_by_name_or_path(tmp_path):
    run = RunDir(tmp_path)
    _solutions(run, "a")
    assert run.find_solution("a") == run.solution("a")
    assert run.find_solution(str(run.solution("a"))) == run.solution("a")
    with pytest.raises(PuzzleError, match="no solution 'z' .*solutions in .*: a"):
        run.find_solution("z")
    with pytest.raises(PuzzleError, match="solution file not found"):
        run.find_solution(str(tmp_path / "elsewhere.json"))


HOLD = """
import sys
from puzzle.run_dir import RunDir
with RunDir(sys.argv[1]).lock("score"):
    print("held", flush=True)
    sys.stdin.read()  # held until the test kills it (or its stdin closes), however long the test takes
"""


def test_lock_refuses_a_second_writer_and_names_the_holder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PuzzleError, match=rf"'score'.* pid {holder.pid} on {socket.gethostname()} since "):
            with RunDir(tmp_path).lock("score"):
                pass
        with RunDir(tmp_path).lock("profile"):  # another stage is another writer
            pass
    finally:
        holder.kill()
        holder.wait()
    with RunDir(tmp_path).lock("score"):  # a lock dies with its holder
        assert json.loads(RunDir(tmp_path).lock_file("score").read_text())["pid"] == os.getpid()


def test_a_holder_slow_to_write_its_name_is_still_named_however_busy_the_machine(tmp_path, monkeypatch):
    """The holder writes its name right after taking the lock; on a busy machine that gap can last seconds.
    A fake clock (each wait of the reader takes a virtual second) makes the holder's name appear after 10 s:
    the refused writer still names it, and one whose holder exits unnamed says so instead of waiting."""
    import fcntl
    import types

    from puzzle import run_dir as run_dir_module

    run = RunDir(tmp_path)
    path = run.lock_file("score")
    path.parent.mkdir(parents=True)
    clock = {"now": 0.0}
    holder = open(path, "a+")
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: the lock is held, no name yet

    def sleep(seconds: float) -> None:
        clock["now"] += 1.0
        if clock["now"] == 10:
            holder.write(json.dumps({"pid": 4242, "host": "elsewhere", "stage": "score", "since": "then"}))
            holder.flush()

    monkeypatch.setattr(run_dir_module, "time", types.SimpleNamespace(
        monotonic=lambda: clock["now"], sleep=sleep, strftime=run_dir_module.time.strftime))
    try:
        with pytest.raises(PuzzleError, match=r"'score' is being written by pid 4242 on elsewhere since then"):
            with run.lock("score"):
                pass
        holder.truncate(0)
        holder.flush()
        clock["now"] = 0.0

        def exits_unnamed(seconds: float) -> None:
            clock["now"] += 1.0
            if clock["now"] == 3:
                fcntl.flock(holder, fcntl.LOCK_UN)  # as its death would

        monkeypatch.setattr(run_dir_module.time, "sleep", exits_unnamed)
        assert run_dir_module._holder(path.resolve()) == "another process (it has exited since)"
        assert clock["now"] == 3  # it stopped waiting when the lock was let go
    finally:
        holder.close()


def test_a_stale_lock_file_does_not_block_and_a_lock_is_reentrant(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = RunDir(tmp_path)
    run.lock_file("score").parent.mkdir(parents=True)
    run.lock_file("score").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "stage": "score"}))
    with run.lock("score"):
        with run.lock("score"):  # a stage calling another function that locks the same stage
            pass
        assert json.loads(run.lock_file("score").read_text())["pid"] == os.getpid()
