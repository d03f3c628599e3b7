"""Every name a user gives that becomes a path under the run directory is one safe path component
(`run_dir.safe_name`, called by each RunDir path builder), and the stage locks never follow a symlink."""

import pytest

from puzzle.errors import PuzzleError
from puzzle.run_dir import RunDir, safe_name

BAD = ["../../trav", "/abs/x", "..", ".", "", ".hidden", "a/b", "a\\b", "x\ny", "x\0y", "n" * 201]
BUILDERS = {
    "solution": lambda r, n: r.solution(n),
    "child": lambda r, n: r.child(n),
    "baseline": lambda r, n: r.baseline(n),
    "eval_result": lambda r, n: r.eval_result(n),
    "costs": lambda r, n: r.costs(n),
    "lock_file": lambda r, n: r.lock_file(n),
    "find_solution": lambda r, n: r.find_solution(n),
}


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize("name", BAD, ids=repr)
def test_every_path_builder_refuses_a_name_that_is_not_one_component(tmp_path, builder, name):
    with pytest.raises(PuzzleError) as err:
        BUILDERS[builder](RunDir(tmp_path / "run"), name)
    assert "\n" not in str(err.value).replace(repr(name), "")


@pytest.mark.parametrize("builder", [b for b in BUILDERS if b != "find_solution"])
@pytest.mark.parametrize("name", ["fast", "speedup_1.5", "fast-2", "fast+gkd", "h100_80gb", "Llama 3 (8B)"])
def test_ordinary_names_stay_one_component_under_the_run(tmp_path, builder, name):
    run = RunDir(tmp_path / "run")
    path = BUILDERS[builder](run, name)
    assert path.parent.parent == run.root and path.name.startswith(name)


def test_distill_out_of_any_student_is_under_the_run(tmp_path):
    run = RunDir(tmp_path / "run")
    for student in (tmp_path / "s", tmp_path / "s" / ".."):
        assert run.distill_out(student).parent == run.root / "distill"


def test_safe_name_gives_back_a_good_name():
    assert safe_name("fast-2") == "fast-2"


def test_a_symlinked_lock_directory_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".locks").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PuzzleError, match="symbolic link"):
        with RunDir(tmp_path / "run").lock("report"):
            pass
    assert list((tmp_path / "elsewhere").iterdir()) == []
