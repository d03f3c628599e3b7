"""The MIP against brute force on small problems, for both backends; diversity; infeasibility; rounding."""

import itertools
import math
import re
from dataclasses import replace

import numpy as np
import pytest

from puzzle.errors import PuzzleError
from puzzle.solver import mip
from puzzle.solver.mip import explain_infeasible, find_solution, layers_differing, solve
from puzzle.solver.model import RawResult
from puzzle.solver.problem import GIB, Constraints, FixedCosts, LayerOptions, Option, SolverProblem, Workload

BACKENDS = ["pulp", "ortools"]


def random_problem(
    seed: int, num_layers: int = 4, n_att: int = 3, n_ffn: int = 4, independent_memory: bool = False
) -> SolverProblem:
    """Option 0 is the parent (largest, quality 0); smaller options cost less and lose more quality.
    With `independent_memory`, the memory of an option is unrelated to its speed."""
    rng = np.random.default_rng(seed)

    def options(n: int, kind: str) -> tuple[Option, ...]:
        out = []
        for i in range(n):
            shrink = 1.0 if i == 0 else rng.uniform(0.0, 0.9)
            size = rng.uniform(0.1, 1.5) if independent_memory and i else shrink
            params = int(1_000_000 * size * rng.uniform(0.8, 1.2))
            out.append(
                Option(
                    name=f"attn_g{i + 1}" if kind == "attn" else f"ffn_{64 * (n - i)}",
                    quality=0.0 if i == 0 else float(rng.uniform(0.01, 1.0) * (1.2 - shrink)),
                    params=params,
                    param_bytes=2 * params,
                    kv_cache_bytes=int(4_000_000 * size) if kind == "attn" else 0,
                    prefill_s=float(1e-3 * shrink * rng.uniform(0.5, 1.5)),
                    decode_s=float(1e-5 * (0.2 + shrink) * rng.uniform(0.5, 1.5)),
                    is_parent=i == 0,
                )
            )
        return tuple(out)

    layers = tuple(LayerOptions(options(n_att, "attn"), options(n_ffn, "ffn")) for _ in range(num_layers))
    fixed = FixedCosts(params=500_000, param_bytes=1_000_000, prefill_s=1e-3, decode_s=2e-5)
    return SolverProblem(layers, Workload(batch_size=8, input_len=128, output_len=64), fixed, profile="test")


def brute_force(problem: SolverProblem, constraints: Constraints, exclude=(), min_diff=0):
    """(objective, selection) of the best feasible choice by enumeration, or None."""
    per_layer = [list(itertools.product(range(len(l.attention)), range(len(l.ffn)))) for l in problem.layers]
    best = None
    for selection in itertools.product(*per_layer):
        if any(layers_differing(selection, e) < min_diff for e in exclude):
            continue
        pred = problem.evaluate(selection)
        if problem.violations(pred, constraints):
            continue
        if best is None or pred.quality < best[0]:
            best = (pred.quality, selection)
    return best


def parent_prediction(problem):
    return problem.evaluate(problem.parent_selection())


CONSTRAINT_SETS = [
    lambda p: Constraints(speedup=1.6),
    lambda p: Constraints(speedup=1.3, memory_gib=0.75 * parent_prediction(p).memory_bytes / GIB),
    lambda p: Constraints(latency_ms=0.7 * parent_prediction(p).latency_ms, max_params=0.6 * parent_prediction(p).params),
    lambda p: Constraints(
        throughput=1.2 * p.reference_throughput,
        memory_gib=0.8 * parent_prediction(p).memory_bytes / GIB,
        latency_ms=0.9 * parent_prediction(p).latency_ms,
        max_params=0.7 * parent_prediction(p).params,
    ),
]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("which", range(len(CONSTRAINT_SETS)))
def test_both_backends_find_the_brute_force_optimum(seed, which):
    problem = random_problem(seed)
    constraints = CONSTRAINT_SETS[which](problem)
    expected = brute_force(problem, constraints)
    assert expected is not None, "test problem should be feasible"
    for backend in BACKENDS:
        (sol,) = solve(problem, constraints, backend=backend)
        assert sol.status == "optimal" and sol.gap == 0.0
        assert sol.objective == pytest.approx(expected[0], rel=1e-9, abs=1e-12), backend
        assert sol.selection == expected[1], backend
        assert not problem.violations(sol.prediction, constraints)


def test_hand_made_problem_has_the_obvious_optimum():
    # Two layers; each can drop its FFN (saves 1 s of time). Layer 1's FFN is the cheaper loss, so a
    # budget that allows dropping exactly one FFN must drop layer 1's.
    def opt(name, quality, prefill, parent=False):
        return Option(name, quality, 10, 20, 0, prefill, 0.0, is_parent=parent)

    attn = (opt("attn_g1", 0.0, 1.0, True),)
    layers = (
        LayerOptions(attn, (opt("ffn_8", 0.0, 1.0, True), opt("ffn_noop", 0.5, 0.0))),
        LayerOptions(attn, (opt("ffn_8", 0.0, 1.0, True), opt("ffn_noop", 0.2, 0.0))),
    )
    problem = SolverProblem(layers, Workload(1, 1, 1), FixedCosts())
    assert problem.reference_throughput == pytest.approx(1 / 4.0)
    constraints = Constraints(speedup=4.0 / 3.0)  # time <= 3 s: one FFN must go
    for backend in BACKENDS:
        (sol,) = solve(problem, constraints, backend=backend)
        assert sol.selection == ((0, 0), (0, 1))
        assert sol.objective == pytest.approx(0.2)
        assert sol.prediction.time_s == pytest.approx(3.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_diversity_constraint_holds_and_each_solution_is_the_best_remaining(backend):
    problem = random_problem(7, num_layers=4)
    constraints = Constraints(speedup=1.4)
    solutions = solve(problem, constraints, backend=backend, num_solutions=4, diversity=0.5)
    assert len(solutions) == 4
    min_diff = 2  # ceil(0.5 * 4 layers)
    for i, j in itertools.combinations(range(4), 2):
        assert layers_differing(solutions[i].selection, solutions[j].selection) >= min_diff
    objectives = [s.objective for s in solutions]
    assert objectives == sorted(objectives)
    # The second is the optimum among choices at least two layers away from the first.
    expected = brute_force(problem, constraints, exclude=[solutions[0].selection], min_diff=min_diff)
    assert solutions[1].objective == pytest.approx(expected[0], rel=1e-9)


def test_diversity_stops_when_no_further_solution_exists():
    problem = random_problem(1, num_layers=1, n_att=2, n_ffn=1)
    solutions = solve(problem, Constraints(), num_solutions=5, diversity=0.0)
    assert len(solutions) == 2  # only two choices exist at all; "at least one layer" still applies
    assert solutions[0].selection != solutions[1].selection


def test_a_budget_no_choice_meets_names_it_and_the_best_reachable_value():
    problem = random_problem(2)
    smallest = problem.min_value("memory_bytes")
    with pytest.raises(PuzzleError) as err:
        solve(problem, Constraints(memory_gib=0.5 * smallest / GIB))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("infeasible: memory <= ")
    assert f"{smallest / GIB:,.3f} GiB" in message


@pytest.mark.parametrize("backend", BACKENDS)
def test_jointly_infeasible_budget_names_the_binding_constraint(backend):
    problem = random_problem(3, independent_memory=True)
    per_layer = [list(itertools.product(range(len(l.attention)), range(len(l.ffn)))) for l in problem.layers]
    predictions = [problem.evaluate(s) for s in itertools.product(*per_layer)]
    fastest = max(p.throughput for p in predictions)
    # A memory budget just below what the fastest choice needs.
    memory_gib = 0.85 * max(p.memory_bytes for p in predictions if p.throughput == fastest) / GIB
    best_tput = max(p.throughput for p in predictions if p.memory_bytes <= memory_gib * GIB)
    assert fastest > 1.02 * best_tput, "test problem: memory should cost speed"
    # Each constraint alone is met; together they are not.
    constraints = Constraints(throughput=(fastest + best_tput) / 2, memory_gib=memory_gib)
    assert brute_force(problem, replace(constraints, memory_gib=None)) is not None
    assert brute_force(problem, replace(constraints, throughput=None)) is not None
    with pytest.raises(PuzzleError) as err:
        solve(problem, constraints, backend=backend)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("infeasible: throughput >= ")
    m = re.search(r"best reachable under the memory constraint is ([\d,.]+) tok/s \(speedup ([\d.]+)x\)", message)
    assert m, message
    assert float(m.group(1).replace(",", "")) == pytest.approx(best_tput, rel=1e-3)
    assert float(m.group(2)) == pytest.approx(best_tput / problem.reference_throughput, rel=1e-3)


def test_a_budget_exactly_met_is_accepted():
    problem = random_problem(4)
    target = problem.evaluate(((1, 1),) * 4)
    constraints = Constraints(max_params=target.params)
    (sol,) = solve(problem, constraints)
    assert sol.prediction.params <= target.params


def test_solver_tolerance_never_lets_a_budget_slip(monkeypatch):
    """A backend that accepts rows up to 1e-6 over (as a solver's tolerance may): the verification
    must catch the overshoot, tighten the limit and solve again."""
    problem = random_problem(5)
    feasible = brute_force(problem, Constraints(speedup=1.5))
    # A budget 1e-7 (relative) below the optimum's memory: that choice is now infeasible by a hair.
    memory = problem.evaluate(feasible[1]).memory_bytes
    constraints = Constraints(speedup=1.5, memory_gib=memory * (1 - 1e-7) / GIB)
    real = mip._backend("pulp")
    calls = []

    def sloppy(model, time_limit_s):
        calls.append(1)
        rows = tuple(
            type(r)(r.index, r.coef, r.lo, r.hi + 1e-6 if len(r.index) == model.n_binary else r.hi) for r in model.rows
        )
        return real(type(model)(model.n_binary, model.n_continuous, model.objective, rows), time_limit_s)

    monkeypatch.setattr(mip, "_backend", lambda name: sloppy)
    (sol,) = solve(problem, constraints)
    assert len(calls) >= 2  # the first answer broke the memory budget and was re-solved
    assert sol.prediction.memory_bytes <= constraints.memory_gib * GIB
    assert sol.prediction.throughput >= 1.5 * problem.reference_throughput
    expected = brute_force(problem, constraints)
    assert sol.objective == pytest.approx(expected[0], rel=1e-9)


def test_time_limit_reports_incumbent_bound_and_gap(monkeypatch):
    problem = random_problem(6)
    real = mip._backend("pulp")

    def stopped_early(model, time_limit_s):
        raw = real(model, time_limit_s)
        return RawResult("feasible", raw.values, 0.5 * raw.bound)  # bound in the solver's scaled units

    monkeypatch.setattr(mip, "_backend", lambda name: stopped_early)
    (sol,) = solve(problem, Constraints(speedup=1.5))
    assert sol.status == "time_limit"
    assert sol.bound < sol.objective
    assert sol.gap == pytest.approx((sol.objective - sol.bound) / sol.objective)
    assert sol.to_dict()["gap"] == sol.gap


def test_time_limit_without_incumbent_is_an_error(monkeypatch):
    monkeypatch.setattr(mip, "_backend", lambda name: lambda model, t: RawResult("unknown", None, None))
    with pytest.raises(PuzzleError, match="time limit"):
        solve(random_problem(0), Constraints(speedup=1.2), time_limit_s=0.5)


def test_cbc_bound_is_read_from_its_log():
    from puzzle.solver.pulp_backend import parse_cbc_bound

    log = (
        "Cbc0005I Partial search - best objective 1.1480581 (best possible 1.1451696), took 0 iterations\n"
        "Result - Stopped on time limit\n\nObjective value:                1.14805814\n"
        "Lower bound:                    1.145\n"
    )
    assert parse_cbc_bound(log) == 1.1451696
    assert parse_cbc_bound("Lower bound:                    1.145\n") == 1.145
    assert parse_cbc_bound("Result - Optimal solution found\n") is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_sweep_keeps_the_best_batch(backend):
    base = random_problem(8)
    problems = [base.at_batch(b) for b in (4, 8, 16)]
    constraints = Constraints(speedup=1.5, memory_gib=0.9 * parent_prediction(base).memory_bytes / GIB)
    (best,) = solve(problems, constraints, backend=backend)
    singles = [find_solution(p, constraints, backend) for p in problems]
    feasible = [s.objective for s in singles if s is not None]
    assert best.objective == pytest.approx(min(feasible), rel=1e-9)
    assert best.prediction.batch_size in (4, 8, 16)
    # Each re-costed problem keeps the workload batch's parent as the speedup reference.
    assert all(p.reference_throughput == base.reference_throughput for p in problems)


def test_quality_objective_may_be_swapped_for_any_quantity():
    problem = random_problem(9)
    found = mip.optimise(problem, [], objective="params")
    assert problem.evaluate(found.selection).params == problem.min_value("params")


def test_no_constraint_gives_the_parent():
    problem = random_problem(10)
    (sol,) = solve(problem, Constraints(), backend="ortools")
    assert sol.selection == problem.parent_selection()
    assert sol.objective == 0.0 and math.isclose(sol.prediction.speedup, 1.0)


def test_explain_reports_when_no_single_relaxation_suffices():
    problem = random_problem(11)
    msg = explain_infeasible(
        problem,
        Constraints(speedup=1e6, memory_gib=1e-9, max_params=1.0),
    )
    assert msg.startswith("infeasible: ") and "\n" not in msg


def test_bad_arguments_are_user_errors():
    problem = random_problem(0)
    with pytest.raises(PuzzleError, match="backend"):
        solve(problem, Constraints(), backend="gurobi")
    with pytest.raises(PuzzleError, match="num-solutions"):
        solve(problem, Constraints(), num_solutions=0)
    with pytest.raises(PuzzleError, match="diversity"):
        solve(problem, Constraints(), diversity=1.5)
    with pytest.raises(PuzzleError, match="positive"):
        Constraints(speedup=-1.0)
