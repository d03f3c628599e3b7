"""Pareto sweeps: solve for a range of speedup targets and keep predicted quality against speedup."""

import io
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_bytes, atomic_write_json
from puzzle.run_dir import RunDir
from puzzle.solver.mip import explain_infeasible, find_solution, optimise
from puzzle.solver.problem import Constraints, SolverProblem


def parse_sweep(spec: str) -> list[float]:
    """"1.2:3.0:0.2" -> [1.2, 1.4, ..., 3.0] (both ends included)."""
    parts = spec.split(":")
    try:
        start, stop, step = (float(p) for p in parts)
    except ValueError:
        raise PuzzleError(f"--sweep expects START:STOP:STEP speedups, e.g. 1.2:3.0:0.2, got {spec!r}") from None
    if not (start > 0 and step > 0 and stop >= start and all(map(math.isfinite, (start, stop, step)))):
        raise PuzzleError(f"--sweep {spec!r}: need 0 < START <= STOP and STEP > 0")
    n = int(math.floor((stop - start) / step + 1e-9)) + 1
    if n > 1000:
        raise PuzzleError(f"--sweep {spec!r} asks for {n} points; use a coarser step")
    return [round(start + i * step, 10) for i in range(n)]


def max_speedup(
    problems: Sequence[SolverProblem], constraints: Constraints, backend: str = "pulp", time_limit_s: float = 60.0
) -> float | None:
    """The highest predicted speedup any choice reaches under `constraints` less its throughput floor
    (over all batch sizes); None when those constraints alone are infeasible."""
    others = replace(constraints, speedup=None, throughput=None)
    best = None
    for p in problems:
        found = optimise(p, p.limits(others), "time_s", backend, time_limit_s)
        if found is not None:
            speedup = p.evaluate(found.selection).speedup
            best = speedup if best is None else max(best, speedup)
    return best


def sweep_speedups(
    problems: Sequence[SolverProblem],
    constraints: Constraints,
    speedups: Sequence[float],
    backend: str = "pulp",
    time_limit_s: float = 60.0,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], float]:
    """One point per speedup target: the best choice with throughput >= target x parent (and the other
    constraints), over all `problems` (batch sizes). Returns the points, in increasing target order,
    and the highest speedup reachable at all. Targets above that one are marked infeasible without
    solving, as is every target above one found infeasible (its throughput floor is stricter)."""
    fastest = max_speedup(problems, constraints, backend, time_limit_s)
    if fastest is None:
        raise PuzzleError(explain_infeasible(problems, replace(constraints, speedup=None, throughput=None), backend, time_limit_s))
    points: list[dict[str, Any]] = []
    out_of_reach = False
    for target in tqdm(sorted(speedups), desc="pareto", unit="point", disable=not progress):
        point: dict[str, Any] = {"target_speedup": target, "feasible": False}
        out_of_reach = out_of_reach or target > fastest * (1 + 1e-9)
        if not out_of_reach:
            budget = replace(constraints, speedup=target, throughput=None)
            found = [find_solution(p, budget, backend, time_limit_s) for p in problems]
            found = [s for s in found if s is not None]
            if found:
                best = min(found, key=lambda s: (round(s.objective, 12), -s.prediction.throughput))
                pred = best.prediction
                point.update(
                    feasible=True,
                    objective=best.objective,
                    speedup=pred.speedup,
                    throughput=pred.throughput,
                    memory_gib=pred.memory_gib,
                    params=pred.params,
                    latency_ms=pred.latency_ms,
                    batch_size=pred.batch_size,
                    status=best.status,
                    gap=best.gap,
                    choices=best.problem.choices(best.selection),
                )
            else:
                out_of_reach = True
        points.append(point)
    return points, fastest


def frontier(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The feasible points no other point beats on both speedup (higher) and objective (lower)."""
    feasible = sorted((p for p in points if p["feasible"]), key=lambda p: (-p["speedup"], p["objective"]))
    out, best = [], math.inf
    for p in feasible:  # from the fastest down: keep each point that improves the objective
        if p["objective"] < best - 1e-12:
            out.append(p)
            best = p["objective"]
    return out[::-1]


def write_pareto(
    run_dir: Path,
    points: Sequence[dict[str, Any]],
    problem: SolverProblem,
    constraints: Constraints,
    backend: str,
    fastest: float | None = None,
) -> tuple[Path, Path]:
    """The run's solutions/pareto.json (every point, the frontier, the context) and pareto.png."""
    front = frontier(points)
    payload = {
        "profile": problem.profile,
        "metric": problem.metric,
        "backend": backend,
        "workload": dict(problem.workload.__dict__),
        "parent_throughput": problem.reference_throughput,
        "constraints": {k: v for k, v in constraints.to_dict().items() if k not in ("speedup", "throughput")},
        "parent": {"speedup": 1.0, "objective": 0.0},
        "max_speedup": fastest,
        "points": list(points),
        "frontier": [p["target_speedup"] for p in front],
    }
    run = RunDir(run_dir)
    json_path = atomic_write_json(run.pareto_json, payload)
    png_path = plot_pareto(run.pareto_png, points, front, problem)
    return json_path, png_path


def plot_pareto(path: Path, points: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]], problem: SolverProblem) -> Path:
    # Figure without pyplot: the Agg canvas, no global backend state, safe in any process.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    ax = fig.add_subplot()
    feasible = [p for p in points if p["feasible"]]
    ax.scatter([p["speedup"] for p in feasible], [p["objective"] for p in feasible], s=18, color="0.6", label="solutions", zorder=2)
    ax.plot([1.0] + [p["speedup"] for p in front], [0.0] + [p["objective"] for p in front], "o-", color="C0", ms=4, label="Pareto frontier", zorder=3)
    ax.scatter([1.0], [0.0], marker="*", s=120, color="C3", label="parent", zorder=4)
    ax.set_xlabel(f"predicted speedup over the parent ({problem.profile or 'profile'})")
    ax.set_ylabel(f"summed replace-1-block {problem.metric} cost")
    ax.set_title("predicted quality against speedup (lower is better)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())
