"""The MIP search: pick one attention and one FFN variant per layer, minimising the summed quality cost
under the budget's limits; several diverse solutions; several batch sizes; honest diagnostics.

    x_att[l, a], x_ffn[l, f] in {0, 1}        sum_a x_att[l, a] = 1, sum_f x_ffn[l, f] = 1
    minimise   sum quality * x
    subject to constant_q + sum coef_q * x <= bound_q   for each limit (time, memory, params)

Diversity (`--num-solutions K`): solution k must differ from every earlier solution s in at least
`min_diff` layers, where a layer differs when its attention or its FFN differs. With a continuous
same[l] in [0, 1]: same[l] >= x_att[l, a_s] + x_ffn[l, f_s] - 1 and sum_l same[l] <= L - min_diff.

Every solution is re-checked by recomputing its costs in plain Python (`SolverProblem.evaluate`) and
comparing them with the user's budget exactly; a limit broken by the solver's tolerances is tightened
by the overshoot and the problem solved again.
"""

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from puzzle.errors import PuzzleError
from puzzle.solver.model import MipModel, RawResult, Row
from puzzle.solver.problem import Constraints, Limit, Prediction, Selection, SolverProblem
from puzzle.units import GIB

BACKENDS = ("pulp", "ortools")


def _backend(name: str):
    if name == "pulp":
        from puzzle.solver import pulp_backend

        return pulp_backend.solve
    if name == "ortools":
        from puzzle.solver import ortools_backend

        return ortools_backend.solve
    raise PuzzleError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


@dataclass(frozen=True)
class Solution:
    selection: Selection
    prediction: Prediction
    problem: SolverProblem
    status: str  # "optimal" | "time_limit"
    bound: float | None  # best proven lower bound on the objective (None if the backend gave none)
    backend: str
    solve_time_s: float

    @property
    def objective(self) -> float:
        return self.prediction.quality

    @property
    def gap(self) -> float | None:
        """Relative gap between the incumbent and the best bound (0 when proven optimal)."""
        if self.status == "optimal":
            return 0.0
        if self.bound is None:
            return None
        return max(self.objective - self.bound, 0.0) / max(abs(self.objective), 1e-12)

    def to_dict(self) -> dict[str, Any]:
        return {
            "block_configs": self.problem.block_configs(self.selection),
            "choices": self.problem.choices(self.selection),
            "objective": self.objective,
            "metric": self.problem.metric,
            "status": self.status,
            "bound": self.bound,
            "gap": self.gap,
            "backend": self.backend,
            "solve_time_s": self.solve_time_s,
            "predicted": self.prediction.to_dict(),
            "profile": self.problem.profile,
            "workload": dict(self.problem.workload.__dict__),
            "parent_throughput": self.problem.reference_throughput,
        }


# ---- building the program -----------------------------------------------------------------------
def _var_ids(problem: SolverProblem) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, the binary variable ids of its attention options and of its FFN options."""
    out, n = [], 0
    for layer in problem.layers:
        a = np.arange(n, n + len(layer.attention))
        n += len(layer.attention)
        f = np.arange(n, n + len(layer.ffn))
        n += len(layer.ffn)
        out.append((a, f))
    return out


def _coefficients(problem: SolverProblem, quantity: str) -> np.ndarray:
    return np.array(
        [
            problem.option_value(o, quantity)
            for layer in problem.layers
            for options in (layer.attention, layer.ffn)
            for o in options
        ],
        dtype=float,
    )


def build_model(
    problem: SolverProblem,
    limits: Sequence[Limit],
    objective: str = "quality",
    exclude: Sequence[Selection] = (),
    min_diff: int = 0,
) -> tuple[MipModel, float, list[tuple[np.ndarray, np.ndarray]]]:
    """The program for `problem`; returns it, the objective's scale (solver objective x scale = the
    quantity, less its constant) and the variable ids."""
    ids = _var_ids(problem)
    n_binary = sum(len(a) + len(f) for a, f in ids)
    rows: list[Row] = []
    for a, f in ids:
        rows.append(Row(a, np.ones(len(a)), 1.0, 1.0))
        rows.append(Row(f, np.ones(len(f)), 1.0, 1.0))
    everything = np.arange(n_binary)
    for limit in limits:
        coef = _coefficients(problem, limit.quantity)
        rhs = limit.bound - problem.constant(limit.quantity)
        # Rows scaled to O(1) so the solvers' absolute tolerances mean the same for bytes and seconds.
        scale = max(abs(rhs), float(np.abs(coef).max(initial=0.0)), 1e-300)
        rows.append(Row(everything, coef / scale, -math.inf, rhs / scale))
    n_cont = 0
    if min_diff > 0:
        for previous in exclude:
            same = np.arange(n_binary + n_cont, n_binary + n_cont + len(ids))
            n_cont += len(ids)
            for l, ((a_ids, f_ids), (a, f)) in enumerate(zip(ids, previous)):
                # x_att + x_ffn - same <= 1
                rows.append(Row(np.array([a_ids[a], f_ids[f], same[l]]), np.array([1.0, 1.0, -1.0]), -math.inf, 1.0))
            rows.append(Row(same, np.ones(len(same)), -math.inf, float(len(ids) - min_diff)))
    obj = _coefficients(problem, objective)
    obj_scale = float(np.abs(obj).max(initial=0.0)) or 1.0
    objective_vec = np.concatenate([obj / obj_scale, np.zeros(n_cont)])
    return MipModel(n_binary, n_cont, objective_vec, tuple(rows)), obj_scale, ids


def _decode(values: np.ndarray, ids: list[tuple[np.ndarray, np.ndarray]]) -> Selection:
    selection = []
    for l, (a_ids, f_ids) in enumerate(ids):
        a = np.flatnonzero(values[a_ids] > 0.5)
        f = np.flatnonzero(values[f_ids] > 0.5)
        if len(a) != 1 or len(f) != 1:
            raise RuntimeError(f"solver returned {len(a)} attention and {len(f)} FFN variants for layer {l}")
        selection.append((int(a[0]), int(f[0])))
    return tuple(selection)


@dataclass(frozen=True)
class _Optimum:
    selection: Selection
    status: str
    bound: float | None  # in the objective quantity's units


def optimise(
    problem: SolverProblem,
    limits: Sequence[Limit],
    objective: str = "quality",
    backend: str = "pulp",
    time_limit_s: float = 60.0,
    exclude: Sequence[Selection] = (),
    min_diff: int = 0,
) -> _Optimum | None:
    """Minimise `objective` under `limits`; None when the program is infeasible."""
    model, scale, ids = build_model(problem, limits, objective, exclude, min_diff)
    raw: RawResult = _backend(backend)(model, time_limit_s)
    if raw.status == "infeasible":
        return None
    if raw.status == "unknown":
        raise PuzzleError(
            f"no feasible choice found within the {time_limit_s:g} s time limit and infeasibility not "
            "proven; raise --time-limit-s"
        )
    bound = None if raw.bound is None else raw.bound * scale + problem.constant(objective)
    status = "optimal" if raw.status == "optimal" else "time_limit"
    return _Optimum(_decode(raw.values, ids), status, bound)


def layers_differing(a: Selection, b: Selection) -> int:
    return sum(x != y for x, y in zip(a, b))


def find_solution(
    problem: SolverProblem,
    constraints: Constraints,
    backend: str = "pulp",
    time_limit_s: float = 60.0,
    exclude: Sequence[Selection] = (),
    min_diff: int = 0,
) -> Solution | None:
    """The best choice under `constraints`, verified against the costs; None when none exists."""
    limits = problem.limits(constraints)
    margin: dict[str, float] = {}
    start = time.perf_counter()
    for _ in range(6):
        tightened = [replace(l, bound=l.bound - margin.get(l.name, 0.0)) for l in limits]
        found = optimise(problem, tightened, "quality", backend, time_limit_s, exclude, min_diff)
        if found is None:
            return None
        prediction = problem.evaluate(found.selection)
        broken = problem.violations(prediction, constraints)
        if not broken:
            for previous in exclude:
                if layers_differing(found.selection, previous) < min_diff:  # pragma: no cover - a solver bug
                    raise RuntimeError("solver broke the diversity constraint")
            return Solution(
                selection=found.selection,
                prediction=prediction,
                problem=problem,
                status=found.status,
                bound=found.bound,
                backend=backend,
                solve_time_s=time.perf_counter() - start,
            )
        # The solver's tolerance let a limit slip by `over`: tighten that limit and solve again.
        for l in limits:
            if l.name in broken:
                over = broken[l.name]
                margin[l.name] = max(2 * margin.get(l.name, 0.0), 2 * over, abs(l.bound) * 1e-12, 1e-300)
    raise RuntimeError(f"solutions keep breaking {sorted(broken)} after tightening")  # pragma: no cover


def solve(
    problems: SolverProblem | Sequence[SolverProblem],
    constraints: Constraints,
    backend: str = "pulp",
    time_limit_s: float = 60.0,
    num_solutions: int = 1,
    diversity: float = 0.1,
) -> list[Solution]:
    """Up to `num_solutions` solutions, best first; each differs from every earlier one in at least
    `ceil(diversity * layers)` layers (at least one). With several problems (one per batch size),
    each round keeps the best over them. Raises PuzzleError naming the binding constraint when the
    budget is infeasible; returns fewer than asked when diversity runs out (never none)."""
    problems = [problems] if isinstance(problems, SolverProblem) else list(problems)
    if not problems:
        raise PuzzleError("no batch size to solve for")
    if backend not in BACKENDS:
        raise PuzzleError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if num_solutions < 1:
        raise PuzzleError(f"--num-solutions must be at least 1, got {num_solutions}")
    if not 0.0 <= diversity <= 1.0:
        raise PuzzleError(f"--diversity must be a fraction of layers in [0, 1], got {diversity}")
    min_diff = max(1, math.ceil(diversity * problems[0].num_layers - 1e-9))
    solutions: list[Solution] = []
    for _ in range(num_solutions):
        exclude = [s.selection for s in solutions]
        found = [find_solution(p, constraints, backend, time_limit_s, exclude, min_diff) for p in problems]
        found = [s for s in found if s is not None]
        if not found:
            break
        # Best quality; among equals, the higher throughput.
        solutions.append(min(found, key=lambda s: (round(s.objective, 12), -s.prediction.throughput)))
    if not solutions:
        raise PuzzleError(explain_infeasible(problems, constraints, backend, time_limit_s))
    return solutions


# ---- diagnosis ----------------------------------------------------------------------------------
def _tokens_per_s(time_s: float, problem: SolverProblem) -> float:
    """The throughput of a model taking `time_s` for the workload: batch_size * output_len / time_s."""
    return problem.workload.batch_size * problem.workload.output_len / time_s


def _throughput(tput: float, problem: SolverProblem) -> str:
    return f"{tput:,.1f} tok/s (speedup {tput / problem.reference_throughput:.3f}x)"


def _describe(name: str, value: float, problem: SolverProblem) -> str:
    """A limit's quantity in the user's units: time_s -> throughput or latency, bytes -> GiB."""
    if name == "throughput":
        return _throughput(_tokens_per_s(value, problem), problem)
    if name == "latency":
        return f"{value * 1e3:,.2f} ms"
    if name == "memory":
        return f"{value / GIB:,.3f} GiB"
    return f"{value:,.0f} params"


def _requirement(name: str, constraints: Constraints, problem: SolverProblem) -> str:
    if name == "throughput":
        return f"throughput >= {_throughput(problem.throughput_floor(constraints), problem)}"
    if name == "latency":
        return f"latency <= {constraints.latency_ms:,.2f} ms"
    if name == "memory":
        return f"memory <= {constraints.memory_gib:,.3f} GiB"
    return f"params <= {constraints.max_params:,.0f}"


def _better(name: str, a: tuple[float, SolverProblem], b: tuple[float, SolverProblem]) -> bool:
    """Is reachable value a better than b (higher throughput, lower anything else)?"""
    if name == "throughput":
        return _tokens_per_s(*a) > _tokens_per_s(*b)
    return a[0] < b[0]


def explain_infeasible(
    problems: SolverProblem | Sequence[SolverProblem],
    constraints: Constraints,
    backend: str = "pulp",
    time_limit_s: float = 60.0,
) -> str:
    """One line: which constraint binds and the best value reachable for it (under the others)."""
    problems = [problems] if isinstance(problems, SolverProblem) else list(problems)
    names = [l.name for l in problems[0].limits(constraints)]
    multi = len(problems) > 1

    def where(p: SolverProblem) -> str:
        return f" (batch {p.batch_size})" if multi else ""

    # A limit no choice at all can meet, whatever the others say.
    for name in names:
        best = None
        for p in problems:
            limit = next(l for l in p.limits(constraints) if l.name == name)
            candidate = (p.min_value(limit.quantity), p)
            if best is None or _better(name, candidate, best):
                best = candidate
        limit = next(l for l in best[1].limits(constraints) if l.name == name)
        if best[0] > limit.bound:
            return (
                f"infeasible: {_requirement(name, constraints, best[1])} is out of reach of the whole search "
                f"space; the best any choice reaches is {_describe(name, best[0], best[1])}{where(best[1])}"
            )
    # Drop each limit in turn: the best value of its quantity reachable under the others.
    for name in names:
        best = None
        for p in problems:
            limits = p.limits(constraints)
            limit = next(l for l in limits if l.name == name)
            others = [l for l in limits if l.name != name]
            found = optimise(p, others, limit.quantity, backend, time_limit_s)
            if found is None:
                continue
            value = p.evaluate(found.selection)
            reached = {"time_s": value.time_s, "memory_bytes": value.memory_bytes, "params": value.params}
            candidate = (reached[limit.quantity], p)
            if best is None or _better(name, candidate, best):
                best = candidate
        if best is not None:
            others = [n for n in names if n != name]
            under = f"under the {', '.join(others)} constraint{'s' if len(others) > 1 else ''}" if others else "at all"
            return (
                f"infeasible: {_requirement(name, constraints, best[1])} cannot be met; the best reachable "
                f"{under} is {_describe(name, best[0], best[1])}{where(best[1])}"
            )
    reqs = "; ".join(_requirement(n, constraints, problems[0]) for n in names)
    return f"infeasible: no choice meets {reqs} together, nor all but any one of them; relax more than one"
