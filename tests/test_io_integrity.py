"""Tables carry a checksum checked on read; damaged or truncated tables and stale temp files of atomic
writes are handled in one line, never a traceback or a silently changed value."""

import os
import time

import pandas as pd
import pytest

from puzzle.cli import main
from puzzle.errors import PuzzleError
from puzzle.io import (atomic_write_json, atomic_write_text, clean_stale_temps, read_table, table_checksum_path,
                       table_problem, write_table)
from puzzle.solver.problem import Workload
from puzzle.solver.synthetic import synthetic_tables

BUDGET = "toy_gpu"


def _flip_byte(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _table():
    return pd.DataFrame({"layer": [0, 1, 2], "variant": ["a", "b", "c"], "kl": [0.125, 0.25, 0.5]})


def test_a_flipped_byte_in_a_table_is_refused_naming_the_file_and_the_fix(tmp_path):
    path = write_table(_table(), tmp_path / "scores", rebuild="puzzle score")
    pd.testing.assert_frame_equal(read_table(path), _table())
    # the first data page starts after the 4-byte magic: flip a byte of the first column's values
    _flip_byte(path, 8)
    with pytest.raises(PuzzleError) as err:
        read_table(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "puzzle score" in message


def test_a_table_without_its_checksum_sidecar_is_refused_naming_the_file_and_the_fix(tmp_path):
    """Every table we write has a sidecar: without one it cannot be verified, so it is not read (it was read
    silently before: deleting the sidecar bypassed the checksum). The command named is the caller's."""
    path = write_table(_table(), tmp_path / "scores", rebuild="puzzle score --run-dir R")
    table_checksum_path(path).unlink()
    assert table_problem(path) is not None
    with pytest.raises(PuzzleError) as err:
        read_table(path, rebuild="puzzle score --run-dir R")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "sha256" in message and "puzzle score --run-dir R" in message


@pytest.fixture
def solve_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scores, costs, meta = synthetic_tables(num_layers=4, attention_variants=3, ffn_variants=3, seed=1,
                                           workload=Workload(8, 256, 64))
    run = tmp_path / "run"
    write_table(scores, run / "scores" / "scores")
    write_table(costs, run / "costs" / BUDGET)
    atomic_write_json(run / "costs" / f"{BUDGET}.json", {**meta, "profile": BUDGET, "constraints": {"speedup": 1.5}})
    return run


@pytest.mark.parametrize("table", ["scores/scores.parquet", f"costs/{BUDGET}.parquet"])
@pytest.mark.parametrize("checksum", [True, False], ids=["with-checksum", "without-checksum"])
def test_a_truncated_table_ends_in_one_line_exit_2(solve_run, capsys, table, checksum):
    path = solve_run / table
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    if not checksum:  # its sidecar deleted as well: refused for that alone
        for sidecar in path.parent.glob(f"{path.name}.*"):
            sidecar.unlink()
    assert main(["solve", "--run-dir", str(solve_run), "--budget", BUDGET]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert str(path) in err


def test_stale_temp_files_of_atomic_writes_are_cleaned_and_nothing_else(tmp_path):
    stale = tmp_path / ".scores.parquet.abc123xy.tmp"
    fresh = tmp_path / ".costs.parquet.zz9k2l1m.tmp"  # another writer's, younger than this process
    keep = [tmp_path / "notes.tmp", tmp_path / "scores.parquet", tmp_path / ".hidden"]
    for p in [stale, fresh, *keep]:
        p.write_text("x")
    old = time.time() - 3600
    for p in [stale, *keep]:
        os.utime(p, (old, old))
    removed = clean_stale_temps(tmp_path)
    assert removed == [stale]
    assert not stale.exists() and fresh.exists() and all(p.exists() for p in keep)


def test_atomic_writes_match_the_stale_temp_pattern(tmp_path, monkeypatch):
    """A temp file left by a crash mid-write (here: os.replace fails) is one `clean_stale_temps` removes."""
    def crash(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", crash)
    monkeypatch.setattr("pathlib.Path.unlink", lambda self, missing_ok=False: None)  # kill -9: no cleanup runs
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(tmp_path / "a.json", "{}")
    monkeypatch.undo()
    (left,) = list(tmp_path.iterdir())
    old = time.time() - 3600
    os.utime(left, (old, old))
    assert clean_stale_temps(tmp_path) == [left]
    assert list(tmp_path.iterdir()) == []
