"""Pareto sweeps over speedup targets."""

import json

import pytest

from puzzle.errors import PuzzleError
from puzzle.solver.pareto import frontier, parse_sweep, sweep_speedups, write_pareto
from puzzle.solver.problem import Constraints, FixedCosts, Workload, problem_from_tables
from puzzle.solver.synthetic import synthetic_tables


@pytest.fixture(scope="module")
def problem():
    scores, costs, meta = synthetic_tables(num_layers=8, attention_variants=4, ffn_variants=6, seed=3)
    return problem_from_tables(scores, costs, Workload(**meta["workload"]), FixedCosts(**meta["fixed"]), profile="synthetic")


def test_parse_sweep():
    assert parse_sweep("1.2:3.0:0.2") == [1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 2.4, 2.6, 2.8, 3.0]
    assert parse_sweep("2:2:1") == [2.0]
    for bad in ("1:2", "a:b:c", "2:1:0.1", "1:2:0", "0:1:0.5"):
        with pytest.raises(PuzzleError):
            parse_sweep(bad)


def test_sweep_is_monotone_and_marks_out_of_reach_targets(problem):
    speedups = parse_sweep("1.2:40:4")
    points, fastest = sweep_speedups([problem], Constraints(), speedups, progress=False)
    assert 1.0 < fastest < 40
    assert [p["target_speedup"] for p in points] == speedups
    feasible = [p for p in points if p["feasible"]]
    assert feasible and not points[-1]["feasible"]  # 40x is beyond any choice
    # A stricter floor never buys a better objective.
    objectives = [p["objective"] for p in feasible]
    assert objectives == sorted(objectives)
    assert all(p["speedup"] >= p["target_speedup"] * (1 - 1e-12) for p in feasible)
    first_out = next(i for i, p in enumerate(points) if not p["feasible"])
    assert all(not p["feasible"] for p in points[first_out:])


def test_frontier_drops_dominated_points():
    points = [
        {"target_speedup": 1.0, "feasible": True, "speedup": 1.5, "objective": 0.3},
        {"target_speedup": 1.2, "feasible": True, "speedup": 1.4, "objective": 0.4},  # dominated
        {"target_speedup": 1.6, "feasible": True, "speedup": 2.0, "objective": 0.9},
        {"target_speedup": 9.0, "feasible": False},
    ]
    assert [p["target_speedup"] for p in frontier(points)] == [1.0, 1.6]


def test_write_pareto(problem, tmp_path):
    constraints = Constraints(memory_gib=100.0)
    points, fastest = sweep_speedups([problem], constraints, [1.5, 2.0], backend="ortools", progress=False)
    json_path, png_path = write_pareto(tmp_path, points, problem, constraints, "ortools", fastest)
    payload = json.loads(json_path.read_text())
    assert payload["constraints"] == {"memory_gib": 100.0}
    assert payload["frontier"] == [1.5, 2.0]
    assert payload["max_speedup"] == fastest
    assert payload["points"][0]["choices"][0]["layer"] == 0
    assert png_path.read_bytes()[:4] == b"\x89PNG"


def test_sweep_under_impossible_other_constraints_is_explained(problem):
    with pytest.raises(PuzzleError, match="infeasible: memory <= "):
        sweep_speedups([problem], Constraints(memory_gib=1e-6), [1.5], progress=False)
