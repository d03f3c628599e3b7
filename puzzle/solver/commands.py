"""`puzzle solve`: read a run's scores and a profile's costs, solve the MIP, write the solution(s)."""

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from puzzle.errors import PuzzleError
from puzzle.units import parse_count
from puzzle.io import atomic_write_json, read_json, read_table, read_yaml
from puzzle.profiling.costs import costs_path, load_costs
from puzzle.profiling.hardware import load_profile, profile_name
from puzzle.run_dir import RunDir, safe_name, writes_run_dir
from puzzle.solver.mip import Solution
from puzzle.solver.problem import (
    Constraints,
    FixedCosts,
    LayerOptions,
    SolverProblem,
    Workload,
    option_config,
    problem_from_tables,
)

REPO = Path(__file__).resolve().parents[2]
CONSTRAINT_KEYS = ("speedup", "throughput", "memory_gib", "latency_ms", "max_params")
_ALIASES = {
    "batch_size": ("batch_size", "batch"),
    "input_len": ("input_len", "input_length", "prompt_len", "input_tokens"),
    "output_len": ("output_len", "output_length", "gen_len", "output_tokens"),
}


# ---- reading the run directory --------------------------------------------------------------------
def _pick(mapping: dict[str, Any], field: str, where: str) -> Any:
    for key in _ALIASES[field]:
        if key in mapping:
            return mapping[key]
    raise PuzzleError(f"{where}: workload lacks {field!r}")


def _fixed_costs(meta: dict[str, Any], where: str) -> FixedCosts:
    raw = meta.get("fixed", meta.get("fixed_costs"))
    if raw is None:
        raise PuzzleError(f"{where}: no 'fixed' costs (embeddings, final norm, LM head)")
    # Either one flat mapping or one mapping per component ({"embeddings": {...}, "lm_head": {...}}).
    parts = list(raw.values()) if raw and all(isinstance(v, dict) for v in raw.values()) else [raw]
    total = {k: sum(part.get(k, 0) or 0 for part in parts) for k in FixedCosts.__dataclass_fields__}
    integral = ("params", "param_bytes", "kv_cache_bytes")
    return FixedCosts(**{k: int(v) if k in integral else float(v) for k, v in total.items()})


def _costs_json(run_dir: Path, budget: str) -> str:
    return str(costs_path(run_dir, profile_name(budget)).with_suffix(".json"))


def problem_from_meta(
    scores: pd.DataFrame,
    costs: pd.DataFrame,
    meta: dict[str, Any],
    metric: str = "kl",
    batch_size: int | None = None,
    where: str = "costs JSON",
) -> SolverProblem:
    w = meta["workload"]
    workload = Workload(int(_pick(w, "batch_size", where)), int(_pick(w, "input_len", where)), int(_pick(w, "output_len", where)))
    hidden = meta.get("hidden_size") or (meta.get("model") or {}).get("hidden_size") or (meta.get("parent") or {}).get("hidden_size")
    return problem_from_tables(
        scores,
        costs,
        workload,
        _fixed_costs(meta, where),
        metric=metric,
        profile=str(meta.get("profile", "")),
        hidden_size=int(hidden) if hidden else None,
        batch_size=batch_size,
    )


def for_engine(problem: SolverProblem, engine_name: str) -> SolverProblem:
    """The problem without the options the target engine cannot build (puzzle/engines.py); a PuzzleError if
    that takes a parent's own option (the engine cannot serve the parent)."""
    from puzzle.engines import RULES, get_engine, sublayer_violations

    engine = get_engine(engine_name)
    if engine.ffn_mult_grid and problem.hidden_size is None:
        raise PuzzleError(f"the costs JSON has no hidden_size: cannot check FFN widths against {engine.name}'s ffn_mult grid")
    layers = []
    for i, layer in enumerate(problem.layers):
        # the parent's attention: the KV heads every layer keeps where the engine has no variable GQA
        kv_reference = next((option_config("attention", i, o) for o in layer.attention if o.is_parent), None)
        kept = []
        for kind, options in (("attention", layer.attention), ("ffn", layer.ffn)):
            ok = []
            for o in options:
                broken = sublayer_violations(engine, option_config(kind, i, o), problem.hidden_size,
                                             first=i == 0, kv_reference=kv_reference)
                if broken and o.is_parent:
                    raise PuzzleError(f"target engine {engine.name} cannot serve the parent's own {o.name} in layer {i}: "
                                      f"{RULES[broken[0]]}")
                if not broken:
                    ok.append(o)
            kept.append(tuple(ok))
        layers.append(LayerOptions(*kept))
    return replace(problem, layers=tuple(layers))


def profile_constraints(meta: dict[str, Any], budget: str) -> dict[str, Any]:
    """The profile's default constraints: the costs JSON's "constraints", else the profile YAML's."""
    found, where = meta.get("constraints"), "costs JSON"
    if found is None:
        for root in (Path.cwd(), REPO):
            path = root / "hardware_profiles" / f"{budget}.yaml"
            if path.exists():
                found, where = (read_yaml(path) or {}).get("constraints"), str(path)
                break
    found = found or {}
    if not isinstance(found, dict):
        raise PuzzleError(f"{where}: 'constraints' must be a mapping")
    unknown = set(found) - set(CONSTRAINT_KEYS)
    if unknown:
        raise PuzzleError(f"{where}: unknown constraint(s) {sorted(unknown)}; known: {', '.join(CONSTRAINT_KEYS)}")
    return {k: v for k, v in found.items() if v is not None}


def merge_constraints(defaults: dict[str, Any], **flags: Any) -> Constraints:
    """Flags override the profile's defaults; `speedup` and `throughput` are one floor, so either flag
    replaces both defaults."""
    merged = dict(defaults)
    if flags.get("speedup") is not None or flags.get("throughput") is not None:
        merged.pop("speedup", None)
        merged.pop("throughput", None)
    merged.update({k: v for k, v in flags.items() if v is not None})
    if "max_params" in merged:
        merged["max_params"] = parse_count(merged["max_params"])
    for key, value in merged.items():
        if isinstance(value, str):
            raise PuzzleError(f"constraint {key} must be a number, got {value!r}")
    return Constraints(**{k: float(v) for k, v in merged.items()})


def resolve_margin(margin: float | str, budget: str) -> float:
    """`--margin` as a fraction: a number >= 0, or `calibrated` for the profile's device.calibration_error."""
    if isinstance(margin, str) and margin.strip().lower() == "calibrated":
        error = load_profile(budget).device.calibration_error
        if not error:
            raise PuzzleError(f"--margin calibrated: profile {budget} records no calibration_error (write one with "
                              f"`puzzle profile --calibrate MEASURED.json --budget {budget}`), or give a number")
        return error
    try:
        value = float(margin)
    except ValueError:
        raise PuzzleError(f"--margin must be a fraction >= 0 or 'calibrated', got {margin!r}") from None
    if not (math.isfinite(value) and 0 <= value < 1):
        raise PuzzleError(f"--margin must be a fraction in [0, 1) or 'calibrated', got {margin!r}")
    return value


def with_margin(constraints: Constraints, margin: float) -> Constraints:
    """The speed constraints `margin` tighter: floors x (1 + margin), the latency ceiling / (1 + margin)."""
    if not margin:
        return constraints
    scale = 1.0 + margin
    return replace(constraints,
                   speedup=None if constraints.speedup is None else constraints.speedup * scale,
                   throughput=None if constraints.throughput is None else constraints.throughput * scale,
                   latency_ms=None if constraints.latency_ms is None else constraints.latency_ms / scale)


# ---- output ---------------------------------------------------------------------------------------
def _fmt_params(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def summary_line(solution: Solution) -> str:
    p = solution.prediction
    s = (
        f"summed {solution.problem.metric} {solution.objective:.6g} | speedup {p.speedup:.3f}x "
        f"({p.throughput:,.1f} tok/s) | memory {p.memory_gib:,.3f} GiB | {_fmt_params(p.params)} params | "
        f"latency {p.latency_ms:,.2f} ms | batch {p.batch_size} | {solution.backend} {solution.solve_time_s:.2f} s"
    )
    if solution.status == "optimal":
        return s + " | optimal"
    bound = "unknown" if solution.bound is None else f"{solution.bound:.6g}"
    gap = "unknown" if solution.gap is None else f"{100 * solution.gap:.2f}%"
    return s + f" | stopped at the time limit: incumbent {solution.objective:.6g}, best bound {bound}, gap {gap}"


def layer_table(solution: Solution) -> str:
    problem, rows = solution.problem, []
    rows.append(f"{'layer':>5}  {'attention':<14} {'ffn':<14} {problem.metric + ' cost':>12}")
    for i, (layer, (a, f)) in enumerate(zip(problem.layers, solution.selection)):
        att, ffn = layer.attention[a], layer.ffn[f]
        mark = lambda o: o.name + (" *" if o.is_parent else "")  # noqa: E731
        rows.append(f"{i:>5}  {mark(att):<14} {mark(ffn):<14} {att.quality + ffn.quality:>12.6g}")
    rows.append("(* = the parent's variant)")
    return "\n".join(rows)


def _check_scored_parent(run: RunDir) -> None:
    """One line when the scores were computed from other weights than the run's parent holds now (it was
    overwritten in place since): solve does not rescore. A parent no longer on disk, or scores written
    before they recorded the parent's fingerprint, pass."""
    from puzzle.model.fingerprint import fingerprint

    meta = run.scores / "scores.json"
    scored = read_json(meta).get("settings", {}).get("parent_fingerprint") if meta.exists() else None
    parent = run.info().get("parent")
    if scored and parent and Path(parent).exists() and fingerprint(parent) != scored:
        raise PuzzleError(f"the scores in {run.scores} were computed from other weights than the parent {parent} "
                          "holds now; rerun puzzle build-library and puzzle score (puzzle run does) first")


@writes_run_dir("solve")
def solve(
    run_dir: Path = Path("runs/default"),
    budget: str = "h100_80gb",
    speedup: float | None = None,
    throughput: float | None = None,
    memory_gib: float | None = None,
    latency_ms: float | None = None,
    max_params: float | str | None = None,
    metric: str = "kl",
    backend: Literal["pulp", "ortools"] = "pulp",
    num_solutions: int = 1,
    diversity: float = 0.1,
    batch_sizes: list[int] | None = None,
    sweep: str | None = None,
    time_limit_s: float = 60.0,
    name: str | None = None,
    target_engine: str | None = None,
    margin: float | str = 0.0,
) -> list[Path]:
    """MIP: one attention and one FFN variant per layer under a hardware budget.

    Args:
        run_dir: the run directory (reads scores/ and costs/, writes solutions/)
        budget: hardware profile name; its costs/<budget>.parquet and default constraints are used
        speedup: throughput floor relative to the parent on this profile (e.g. 2.0)
        throughput: throughput floor in generated tokens per second (batch x output tokens / time)
        memory_gib: memory ceiling in GiB: weights plus KV cache at the workload's batch and context
        latency_ms: ceiling on one workload batch's time, prefill plus all decode steps, in ms
        max_params: parameter ceiling, embeddings included (80e6, 80M, 1.5B)
        metric: scores column to minimise (kl, lm_loss; top1_agreement, cosine count their drop)
        backend: MIP backend: pulp (CBC) or ortools (SCIP)
        num_solutions: how many solutions, each differing from all earlier ones in --diversity of layers
        diversity: fraction of layers each further solution must change (at least one layer)
        batch_sizes: solve for each batch size and keep the best (costs re-scaled from the workload's)
        sweep: START:STOP:STEP speedup targets; writes solutions/pareto.json and pareto.png
        time_limit_s: per-solve time limit; a stopped search reports its incumbent and gap
        name: solution name (solutions/<name>.json); default: the budget's name
        target_engine: only variants this engine builds (vllm, sglang, trtllm, llamacpp; puzzle/engines.py);
            recorded in the solution, where realize reads it. Default: every variant of the tables
        margin: aim this fraction above the speed constraints (speedup and throughput floors x (1 + margin),
            the latency ceiling / (1 + margin)) so a child meets them when measured despite the profile's
            prediction error; `calibrated`: the profile's device.calibration_error (the relative RMS of
            `puzzle profile --calibrate`'s fit to measured timings). The solution records both budgets
    """
    run = RunDir(run_dir)
    base = safe_name(name or profile_name(budget), "solution name")  # before any work: files solutions/BASE.json
    margin = resolve_margin(margin, budget)
    if margin and sweep is not None:
        raise PuzzleError("--margin scales one speed target; --sweep sets its own (drop one of them)")
    scores = read_table(run.scores_table.with_suffix(".parquet"), rebuild=f"puzzle score --run-dir {run_dir}")
    _check_scored_parent(run)
    costs, meta = load_costs(run_dir, budget)
    where = _costs_json(run_dir, budget)
    problems = [problem_from_meta(scores, costs, meta, metric, where=where)]
    if batch_sizes:
        problems = [problem_from_meta(scores, costs, meta, metric, b, where=where) for b in dict.fromkeys(batch_sizes)]
    if target_engine is not None:
        problems = [for_engine(p, target_engine) for p in problems]
    defaults = profile_constraints(meta, budget)
    flags = dict(speedup=speedup, throughput=throughput, memory_gib=memory_gib, latency_ms=latency_ms, max_params=max_params)

    if sweep is not None:
        from puzzle.solver.pareto import parse_sweep, sweep_speedups, write_pareto

        if speedup is not None or throughput is not None:
            raise PuzzleError("--sweep sets the throughput floor itself; drop --speedup/--throughput")
        if num_solutions != 1:
            raise PuzzleError("--num-solutions cannot be combined with --sweep")
        speedups = parse_sweep(sweep)
        constraints = replace(merge_constraints(defaults, **flags), speedup=None, throughput=None)
        points, fastest = sweep_speedups(problems, constraints, speedups, backend, time_limit_s)
        json_path, png_path = write_pareto(run.root, points, problems[0], constraints, backend, fastest)
        for p in points:
            if p["feasible"]:
                print(f"speedup >= {p['target_speedup']:.3f}: summed {metric} {p['objective']:.6g} at {p['speedup']:.3f}x ({p['status']})")
            else:
                print(f"speedup >= {p['target_speedup']:.3f}: infeasible")
        print(f"highest reachable speedup: {fastest:.3f}x")
        if not any(p["feasible"] for p in points):
            raise PuzzleError(
                f"no speedup in {sweep} is reachable; the highest under the other constraints is {fastest:.3f}x "
                f"(wrote {json_path})"
            )
        print(f"wrote {json_path} and {png_path}")
        return [json_path, png_path]

    from puzzle.solver.mip import solve as solve_mip

    requested = merge_constraints(defaults, **flags)
    constraints = with_margin(requested, margin)
    if not constraints.to_dict():
        print("no constraint given or in the profile: the parent itself is the optimum")
    if constraints != requested:
        print(f"aiming {margin:.1%} above the speed constraints (--margin): " + ", ".join(
            f"{k} {v:g}" for k, v in constraints.to_dict().items() if requested.to_dict()[k] != v))
    solutions = solve_mip(problems, constraints, backend, time_limit_s, num_solutions, diversity)
    paths = []
    for rank, sol in enumerate(solutions, start=1):
        sol_name = RunDir.solution_name(base, rank)
        payload = sol.to_dict()
        payload["name"] = sol_name
        payload["rank"] = rank
        if target_engine is not None:
            payload["target_engine"] = target_engine
        floor = sol.problem.throughput_floor(constraints)
        payload["constraints"] = {**constraints.to_dict(), **({"throughput_floor": floor} if floor else {})}
        if constraints != requested:  # what the user asked for; `constraints` is what the solver met
            payload["margin"] = margin
            payload["requested_constraints"] = requested.to_dict()
        paths.append(atomic_write_json(run.solution(sol_name), payload))
    run.record_solve([p.stem for p in paths])
    print(layer_table(solutions[0]))
    for sol, path in zip(solutions, paths):
        print(f"{path.stem}: {summary_line(sol)}")
    if len(solutions) < num_solutions:
        print(
            f"only {len(solutions)} of {num_solutions} solutions exist that differ from each other in "
            f"at least {max(1, math.ceil(diversity * solutions[0].problem.num_layers - 1e-9))} layers"
        )
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return paths
