"""The two test tiers: `./scripts/test.sh` runs everything (CI), `./scripts/test.sh --fast` only the tests not
marked `slow`. The marker must be registered (pytest runs with --strict-markers, so a misspelt mark is an
error, not a silently fast test), and a test that starts Ray or runs on the reference parent is slow."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_slow_is_a_registered_marker_and_markers_are_strict():
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "slow" in {m.split(":")[0].strip() for m in options["markers"]}
    assert "--strict-markers" in options["addopts"].split()


def test_the_fast_flag_deselects_the_slow_tier():
    script = (REPO / "scripts" / "test.sh").read_text()
    assert 'if [ "$arg" = "--fast" ]; then args+=(-m "not slow")' in script


def test_tests_that_start_ray_or_load_the_reference_parent_are_marked_slow(request):
    """Over this session's selection: under `-m "not slow"` such a test, had it lost its mark, is here."""
    unmarked = [item.nodeid for item in request.session.items
                if (item.get_closest_marker("ray") or item.get_closest_marker("smoke"))
                and not item.get_closest_marker("slow")]
    assert unmarked == []
