"""Fit a profile's efficiency factors and per-kernel overhead to measured whole-model timings.

The roofline prices an op at max(flops / (peak * c), bytes / (bw * m)) + kernels * overhead
(`roofline.op_time`). Once we know which side of the max each op falls on, a model's time is linear
in x = (1/c, 1/m, overhead):

    t = (1/c) * sum_compute_bound(flops / peak) + (1/m) * sum_memory_bound(bytes / bw) + overhead * sum(kernels)

so `fit_factors` alternates: classify every op with the current factors, solve that linear least
squares problem (rows scaled by 1/t_measured: relative errors, so a 40 ms prefill and a 3 ms decode
step weigh alike), re-classify; it stops when the classification no longer changes.

MEASURED.json (what `puzzle profile --calibrate` reads):
    {"shape": {ModelShape fields},
     "samples": [{"name": "parent", "blocks": ["attn_g3+ffn_1536", ...] or [{attention:..., ffn:...}],
                  "phase": "prefill" | "decode", "seconds": 0.041}, ...]}
`prefill` seconds: the whole prompt (workload.input_len tokens, batch workload.batch_size); `decode`
seconds: one generation step (the mean over the generation). Block lists give the model's depth.
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


@dataclass(frozen=True)
class Fit:
    compute_efficiency: float
    memory_efficiency: float
    kernel_overhead_s: float
    rel_rms: float  # root mean square of (predicted - measured) / measured over the samples
    rounds: int


def model_ops(shape: ModelShape, blocks: tuple[BlockConfig, ...], profile: HardwareProfile, phase: Phase) -> list[Op]:
    """Every roofline op of a whole model in one phase: fixed parts + both sublayers of every block."""
    w = profile.workload
    ops = [op for part in FIXED_PARTS for op in fixed_ops(shape, part, w, phase)]
    for layer, block in enumerate(blocks):
        ops += sublayer_ops(shape, "attention", block.attention, w, phase, layer)
        ops += sublayer_ops(shape, "ffn", block.ffn, w, phase, layer)
    return ops


def design_row(ops: list[Op], profile: HardwareProfile, c: float, m: float) -> np.ndarray:
    """(compute seconds at c=1, memory seconds at m=1, kernels) of the ops, each op on its binding side."""
    peak = profile.device.peak_flops[profile.workload.dtype]
    bw = profile.device.memory_bandwidth
    row = np.zeros(3)
    for op in ops:
        compute, memory = op.flops / peak, op.bytes / bw
        if compute / c >= memory / m:
            row[0] += compute
        else:
            row[1] += memory
        row[2] += op.kernels
    return row


def fit_factors(samples: list[Sample], shape: ModelShape, profile: HardwareProfile, fit_overhead: bool = True) -> Fit:
    """Least-squares (1/c, 1/m, overhead) for these samples, starting from the profile's own factors."""
    if len(samples) < 2 + fit_overhead:
        raise PuzzleError(f"calibration needs at least {2 + fit_overhead} timings, got {len(samples)}")
    ops = [model_ops(shape, s.blocks, profile, s.phase) for s in samples]
    t = np.array([s.seconds for s in samples])
    c, m = profile.device.compute_efficiency, profile.device.memory_efficiency
    overhead = profile.device.kernel_overhead_s if fit_overhead else 0.0
    previous = None
    for rounds in range(1, MAX_ROUNDS + 1):
        A = np.stack([design_row(o, profile, c, m) for o in ops])
        bound = tuple(tuple(r[:2] > 0) for r in A)
        cols = [0, 1, 2] if fit_overhead else [0, 1]
        cols = [j for j in cols if A[:, j].any()]  # a side no op is bound by cannot be fitted
        x = _solve(A[:, cols] / t[:, None], np.ones(len(t)))
        coef = dict(zip(cols, x))
        c = 1.0 / coef[0] if coef.get(0, 0) > 0 else c
        m = 1.0 / coef[1] if coef.get(1, 0) > 0 else m
        overhead = max(coef.get(2, overhead if fit_overhead else 0.0), 0.0)
        if bound == previous:
            break
        previous = bound
    pred = np.array([_predict(o, profile, c, m, overhead) for o in ops])
    rel = float(np.sqrt(np.mean(((pred - t) / t) ** 2)))
    return Fit(float(c), float(m), float(overhead), rel, rounds)


def _solve(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients: drop a column that comes out negative and refit."""
    cols = list(range(A.shape[1]))
    while cols:
        x, *_ = np.linalg.lstsq(A[:, cols], b, rcond=None)
        if (x >= 0).all():
            out = np.zeros(A.shape[1])
            out[cols] = x
            return out
        cols.pop(int(np.argmin(x)))
    raise PuzzleError("calibration failed: no non-negative fit of the timings")


def _predict(ops: list[Op], profile: HardwareProfile, c: float, m: float, overhead: float) -> float:
    peak = profile.device.peak_flops[profile.workload.dtype]
    bw = profile.device.memory_bandwidth
    return sum(max(op.flops / (peak * c), op.bytes / (bw * m)) + op.kernels * overhead for op in ops)


def predict_seconds(sample: Sample, shape: ModelShape, profile: HardwareProfile) -> float:
    """The roofline's seconds for one sample under the profile's own factors."""
    d = profile.device
    ops = model_ops(shape, sample.blocks, profile, sample.phase)
    return _predict(ops, profile, d.compute_efficiency, d.memory_efficiency, d.kernel_overhead_s)


def with_factors(profile: HardwareProfile, c: float, m: float, overhead: float) -> HardwareProfile:
    device = replace(profile.device, compute_efficiency=c, memory_efficiency=m, kernel_overhead_s=overhead)
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
            samples.append(Sample(str(s.get("name", "")), blocks, s["phase"], float(s["seconds"])))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PuzzleError(f"cannot read measured timings {path}: {e}") from e
    return shape, samples


def write_calibrated(profile_path: Path, fit: Fit, measured: Path, out: Path) -> Path:
    """The profile YAML with device.efficiency and kernel_overhead_s replaced by the fit.

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
    header = (f"{CALIBRATED_HEADER} {measured}` from {Path(profile_path).name}:\n"
              f"# least squares over the measured timings, relative RMS error {fit.rel_rms:.3f}.\n")
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
            "kernel_overhead_s": fit.kernel_overhead_s, "rel_rms": fit.rel_rms, "rounds": fit.rounds}
