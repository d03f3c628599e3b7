import pytest
from conftest import make_llama_config

from puzzle.errors import PuzzleError
from puzzle.io import JsonlLog, atomic_write_json, read_json
from puzzle.search_space import resolve_run_info, run_parent
from puzzle.units import parse_count


def test_jsonl_log_survives_a_torn_last_line(tmp_path):
    log = JsonlLog(tmp_path / "log.jsonl")
    log.write(step=1, loss=0.5)
    with open(log.path, "a") as f:
        f.write('{"step": 2, "lo')  # a crash mid-write
    log.write(step=3, loss=0.25)
    assert [r["step"] for r in log.read()] == [1, 3]


def test_atomic_json_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert read_json(tmp_path / "a.json") == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(PuzzleError, match="not valid JSON"):
        read_json(tmp_path / "b.json")


def test_a_run_belongs_to_one_parent(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for parent in (a, b):  # a config is all a run's parent needs to be recorded (no weights are read)
        make_llama_config().save_pretrained(parent)
    run = tmp_path / "run"
    with pytest.raises(PuzzleError, match="pass --parent"):
        run_parent(run)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PuzzleError, match="config.json"):  # validated before it is recorded
        run_parent(run, tmp_path / "empty")
    assert run_parent(run, a) == (a.resolve(), "llama_default")
    assert run_parent(run, search_space="tiny") == (a.resolve(), "tiny")
    assert resolve_run_info(run)["search_space"] == "tiny"
    with pytest.raises(PuzzleError, match="belongs to parent"):
        run_parent(run, b)


def test_counts():
    assert parse_count("80M") == 80e6 and parse_count("1.2B") == 1.2e9 and parse_count("250k") == 250e3
    assert parse_count("80e6") == 80e6 and parse_count(7) == 7 and parse_count(None) is None
    with pytest.raises(PuzzleError, match="not a count"):
        parse_count("eighty")
