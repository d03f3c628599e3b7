"""Fit a profile's efficiency factors, per-kernel and per-step overheads to measured whole-model timings.

The roofline prices an op at max(flops / (peak * c), bytes / (bw * m)) + kernels * overhead + steps * step
(`roofline.op_time`; `step` is the engine's fixed work per forward pass). Once we know which side of the
max each op falls on, a model's time is linear in x = (1/c, 1/m, overhead, step):

    t = (1/c) * sum_compute_bound(flops / peak) + (1/m) * sum_memory_bound(bytes / bw)
        + overhead * sum(kernels) + step * sum(steps)

(sum(steps) is 1 for every sample: one forward pass, a prefill or a decode step. The per-kernel and the
per-step overheads are told apart by models of different depths: a child with fewer layers launches
fewer kernels but takes the same step.)

so the fit alternates: classify every op with the current factors, solve that linear least
squares problem (rows scaled by 1/t_measured: relative errors, so a 40 ms prefill and a 3 ms decode
step weigh alike), re-classify; it stops when the classification no longer changes.

Timings taken at different times on a shared machine run at different overall speeds (one run of a
benchmark 10% slower than the next). Samples carry a `group` (the models timed together, interleaved); each
group gets one speed factor g (geometric mean 1 over the groups) and the fit explains t / g: the ratios
inside a group, which are what a speedup is, are then not traded off against the drift between groups.
Without groups every sample is in one and g = 1.

MEASURED.json (what `puzzle profile --calibrate` reads):
    {"shape": {ModelShape fields},
     "samples": [{"name": "parent", "blocks": ["attn_g3+ffn_1536", ...] or [{attention:..., ffn:...}],
                  "phase": "prefill" | "decode", "seconds": 0.041, "group": "seed0"}, ...]}
`prefill` seconds: the whole prompt (workload.input_len tokens, batch workload.batch_size); `decode`
seconds: one generation step (the mean over the generation). Block lists give the model's depth. `group`
(optional): the samples timed together (one speed factor each, above).
"""

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_text
from puzzle.outputs import CALIBRATED_HEADER
from puzzle.model.blocks import BlockConfig
from puzzle.shape import FIXED_PARTS, ModelShape

from .hardware import HardwareProfile, resolve_profile_path
from .roofline import Op, Phase, fixed_ops, sublayer_ops

MAX_ROUNDS = 20


@dataclass(frozen=True)
class Sample:
    name: str
    blocks: tuple[BlockConfig, ...]
    phase: Phase
    seconds: float
    group: str = ""


@dataclass(frozen=True)
class Fit:
    compute_efficiency: float
    memory_efficiency: float
    kernel_overhead_s: float
    step_overhead_s: float
    rel_rms: float  # root mean square of (g * predicted - measured) / measured over the samples
    rounds: int
    group_speed: tuple[tuple[str, float], ...] = ()  # (group, g): measured = g * predicted; () for one group


def model_ops(shape: ModelShape, blocks: tuple[BlockConfig, ...], profile: HardwareProfile, phase: Phase) -> list[Op]:
    """Every roofline op of a whole model in one phase: fixed parts + both sublayers of every block."""
    w = profile.workload
    ops = [op for part in FIXED_PARTS for op in fixed_ops(shape, part, w, phase)]
    for block in blocks:
        ops += sublayer_ops(shape, "attention", block.attention, w, phase)
        ops += sublayer_ops(shape, "ffn", block.ffn, w, phase)
    return ops


def design_row(ops: list[Op], profile: HardwareProfile, c: float, m: float) -> np.ndarray:
    """(compute seconds at c=1, memory seconds at m=1, kernels, steps) of the ops, each op on its binding side."""
    peak = profile.device.peak_flops[profile.workload.dtype]
    bw = profile.device.memory_bandwidth
    row = np.zeros(4)
    for op in ops:
        compute, memory = op.flops / peak, op.bytes / bw
        if op.flops or op.bytes:
            if compute / c >= memory / m:
                row[0] += compute
            else:
                row[1] += memory
        row[2] += op.kernels
        row[3] += op.steps
    return row


# Starting efficiencies of the alternating fit besides the profile's own: which side of the roofline an op
# is on depends on them, and a fit that starts with every matmul on the compute side never moves it to the
# memory side when the compute coefficient comes out zero. The best fit over the starts is kept; among fits
# within 1% of its error, the one nearest the profile's own factors (a side no op is bound by is not
# identified by the timings, and stays where the profile put it rather than wandering to any large value).
STARTS = (0.05, 0.15, 0.4, 1.0, 2.5)
TIE = 1.01


def fit_factors(samples: list[Sample], shape: ModelShape, profile: HardwareProfile, fit_overhead: bool = True,
                fit_step: bool = True) -> Fit:
    """Least-squares (1/c, 1/m, overhead, step) for these samples, the best over starting factors (the
    profile's own and a grid). `fit_step` False keeps the profile's per-step overhead."""
    n_free = 2 + fit_overhead + fit_step
    if len(samples) < n_free:
        raise PuzzleError(f"calibration needs at least {n_free} timings, got {len(samples)}")
    ops = [model_ops(shape, s.blocks, profile, s.phase) for s in samples]
    t = np.array([s.seconds for s in samples])
    names = sorted({s.group for s in samples})
    group = np.array([names.index(s.group) for s in samples])
    d = profile.device
    starts = [(d.compute_efficiency, d.memory_efficiency)] + [(c, m) for c in STARTS for m in STARTS]
    fits = [_fit_from(ops, t, group, names, profile, c, m, fit_overhead, fit_step) for c, m in starts]
    best = min(f.rel_rms for f in fits)

    def distance(f: Fit) -> float:
        return abs(np.log(f.compute_efficiency / starts[0][0])) + abs(np.log(f.memory_efficiency / starts[0][1]))

    return min((f for f in fits if f.rel_rms <= best * TIE + 1e-12), key=distance)


# Alternations of (linear fit, group speed factors) inside one classification round; the factors settle
# in a few (the drift between groups is a few percent).
GROUP_ROUNDS = 8


def _fit_from(ops: list[list[Op]], t: np.ndarray, group: np.ndarray, names: list[str], profile: HardwareProfile,
              c: float, m: float, fit_overhead: bool, fit_step: bool) -> Fit:
    """Alternate: classify every op with the current factors, solve the linear problem (and the groups' speed
    factors), re-classify; stop when the classification no longer changes."""
    d = profile.device
    overhead = d.kernel_overhead_s if fit_overhead else 0.0
    step = d.step_overhead_s
    free = [0, 1] + [2] * fit_overhead + [3] * fit_step
    g = np.ones(len(names))  # each group's speed factor: measured = g * predicted
    previous = None
    for rounds in range(1, MAX_ROUNDS + 1):
        A = np.stack([design_row(o, profile, c, m) for o in ops])
        bound = tuple(tuple(r[:2] > 0) for r in A)
        cols = [j for j in free if A[:, j].any()]  # a side no op is bound by cannot be fitted
        known = A[:, 3] * step if not fit_step else 0.0  # a kept per-step overhead is known time
        for _ in range(GROUP_ROUNDS if len(names) > 1 else 1):
            te = t / g[group]  # the timings at the groups' common speed
            x = _solve(A[:, cols] / te[:, None], 1.0 - known / te)
            g = _group_speed(A[:, cols] @ x + known, t, group, len(names))
        coef = dict(zip(cols, x))
        c = 1.0 / coef[0] if coef.get(0, 0) > 0 else c
        m = 1.0 / coef[1] if coef.get(1, 0) > 0 else m
        overhead = max(coef.get(2, overhead if fit_overhead else 0.0), 0.0)
        step = max(coef.get(3, step), 0.0) if fit_step else step
        if bound == previous:
            break
        previous = bound
    pred = np.array([_predict(o, profile, c, m, overhead, step) for o in ops]) * g[group]
    rel = float(np.sqrt(np.mean(((pred - t) / t) ** 2)))
    speeds = tuple((n, float(v)) for n, v in zip(names, g)) if len(names) > 1 else ()
    return Fit(float(c), float(m), float(overhead), float(step), rel, rounds, speeds)


def _group_speed(pred: np.ndarray, t: np.ndarray, group: np.ndarray, n: int) -> np.ndarray:
    """Each group's g minimising sum((g * pred - t) / t)^2 over its samples (g = sum(r) / sum(r^2), r =
    pred / t), scaled to geometric mean 1 so the fitted factors keep the groups' common speed; all ones for
    one group."""
    if n == 1:
        return np.ones(1)
    r = pred / t
    g = np.bincount(group, r, n) / np.bincount(group, r * r, n)
    return g / np.exp(np.mean(np.log(g)))


def _solve(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients, exactly: the best of the unconstrained fits over every
    subset of the columns whose coefficients all come out non-negative (at most 4 columns: 15 subsets; a
    greedy drop of the most negative column can stop at a much worse fit)."""
    n = A.shape[1]
    best, best_err = None, np.inf
    for mask in range(1, 2 ** n):
        cols = [j for j in range(n) if mask >> j & 1]
        x, *_ = np.linalg.lstsq(A[:, cols], b, rcond=None)
        if (x < 0).any():
            continue
        err = float(np.sum((A[:, cols] @ x - b) ** 2))
        if err < best_err - 1e-15:
            best, best_err = np.zeros(n), err
            best[cols] = x
    if best is None:
        raise PuzzleError("calibration failed: no non-negative fit of the timings")
    return best


def _predict(ops: list[Op], profile: HardwareProfile, c: float, m: float, overhead: float, step: float) -> float:
    peak = profile.device.peak_flops[profile.workload.dtype]
    bw = profile.device.memory_bandwidth
    return sum(max(op.flops / (peak * c), op.bytes / (bw * m)) + op.kernels * overhead + op.steps * step for op in ops)


def predict_seconds(sample: Sample, shape: ModelShape, profile: HardwareProfile) -> float:
    """The roofline's seconds for one sample under the profile's own factors."""
    d = profile.device
    ops = model_ops(shape, sample.blocks, profile, sample.phase)
    return _predict(ops, profile, d.compute_efficiency, d.memory_efficiency, d.kernel_overhead_s, d.step_overhead_s)


def with_factors(profile: HardwareProfile, c: float, m: float, overhead: float, step: float | None = None) -> HardwareProfile:
    device = replace(profile.device, compute_efficiency=c, memory_efficiency=m, kernel_overhead_s=overhead,
                     step_overhead_s=profile.device.step_overhead_s if step is None else step)
    return replace(profile, device=device)


# --- files ----------------------------------------------------------------------------------------

def load_measured(path: Path) -> tuple[ModelShape, list[Sample]]:
    try:
        raw = json.loads(Path(path).read_text())
        shape = ModelShape(**raw["shape"])
        samples = []
        for s in raw["samples"]:
            blocks = tuple(BlockConfig.from_name(b) if isinstance(b, str) else BlockConfig.from_dict(b, shape.hidden_size)
                           for b in s["blocks"])
            if s["phase"] not in ("prefill", "decode"):
                raise ValueError(f"phase must be prefill or decode, got {s['phase']!r}")
            samples.append(Sample(str(s.get("name", "")), blocks, s["phase"], float(s["seconds"]), str(s.get("group", ""))))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PuzzleError(f"cannot read measured timings {path}: {e}") from e
    return shape, samples


def write_calibrated(profile_path: Path, fit: Fit, measured: Path, out: Path) -> Path:
    """The profile YAML with device.efficiency, kernel_overhead_s and step_overhead_s replaced by the fit, and
    its relative RMS error as device.calibration_error.

    An efficiency above 1 means the measured engine beats the profile's peak (e.g. llama.cpp's
    quantised kernels vs an fp32 torch peak): the peak is raised to the achieved rate and the
    efficiency set to 1, since profiles keep efficiencies in (0, 1].
    """
    raw = yaml.safe_load(Path(profile_path).read_text())
    device = raw["device"]
    eff = {"compute": fit.compute_efficiency, "memory": fit.memory_efficiency}
    if eff["compute"] > 1:
        device["peak_flops"] = {k: float(v) * eff["compute"] for k, v in device["peak_flops"].items()}
        eff["compute"] = 1.0
    if eff["memory"] > 1:
        device["memory_bandwidth"] = float(device["memory_bandwidth"]) * eff["memory"]
        eff["memory"] = 1.0
    device["efficiency"] = {k: round(v, 4) for k, v in eff.items()}
    device["kernel_overhead_s"] = float(f"{fit.kernel_overhead_s:.4g}")
    if fit.step_overhead_s or "step_overhead_s" in device:
        device["step_overhead_s"] = float(f"{fit.step_overhead_s:.4g}")
    # how far the fitted profile still is from the timings: `solve --margin calibrated` aims that much above
    device["calibration_error"] = round(fit.rel_rms, 4)
    header = (f"{CALIBRATED_HEADER} {measured}` from {Path(profile_path).name}:\n"
              f"# least squares over the measured timings, relative RMS error {fit.rel_rms:.3f}.\n")
    if fit.group_speed:
        speeds = ", ".join(f"{n} {v:.3f}" for n, v in fit.group_speed)
        header += f"# One speed factor per group of timings (measured = factor x predicted): {speeds}.\n"
    return atomic_write_text(out, header + yaml.safe_dump(raw, sort_keys=False))


def calibrate(measured: Path, budget: str, output: Path | None = None) -> tuple[Path, Fit]:
    """Fit `budget`'s factors to MEASURED.json; write PROFILE.calibrated.yaml beside it (or `output`)."""
    from .hardware import load_profile

    profile = load_profile(budget)
    shape, samples = load_measured(measured)
    fit = fit_factors(samples, shape, profile)
    from puzzle.outputs import check_output
    from puzzle.run_dir import safe_name

    name = safe_name(profile.name, "hardware profile name")
    out = Path(output) if output else Path(measured).with_name(f"{name}.calibrated.yaml")
    check_output(out, "profile", inputs=(measured, resolve_profile_path(budget)), file=True)
    return write_calibrated(resolve_profile_path(budget), fit, Path(measured), out), fit


def fit_report(fit: Fit) -> dict[str, Any]:
    return {"compute_efficiency": fit.compute_efficiency, "memory_efficiency": fit.memory_efficiency,
            "kernel_overhead_s": fit.kernel_overhead_s, "step_overhead_s": fit.step_overhead_s, "rel_rms": fit.rel_rms, "rounds": fit.rounds,
            "group_speed": dict(fit.group_speed)}
