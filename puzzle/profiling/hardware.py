"""Hardware profiles: a device, a default workload and default `solve` constraints, read from YAML.

A profile is `hardware_profiles/<name>.yaml` (or any YAML path):

    name: h100_80gb
    description: free text
    device:
      name: NVIDIA H100 SXM5 80GB
      kind: gpu                       # gpu | cpu
      peak_flops: {bf16: 989.4e+12, fp8: 1978.9e+12}   # dense FLOP/s per dtype
      memory_bandwidth: 3.35e+12      # bytes/s
      memory_bytes: 80.0e+9
      efficiency: {compute: 0.7, memory: 0.8}          # achievable share of the peaks, in (0, 1]
      kernel_overhead_s: 0.0          # optional: fixed cost per kernel launch / eager op
      step_overhead_s: 0.0            # optional: fixed cost per forward pass of the whole model (an engine's
                                      # scheduler, input preparation and sampler), the same for every child
      threads: null                   # optional, cpu only: torch threads while measuring
      engine: torch                   # optional: torch (measurable per sublayer) | llamacpp | vllm (whole
                                      # models only: the roofline, calibrated by scripts/bench_engine.py)
      interconnect_bandwidth: 450.0e+9  # optional: bytes/s one GPU sends to the others (NVLink); needed
                                        # by expert_parallel > 1
      calibration_error: 0.0          # optional: the relative RMS error of the fit `puzzle profile --calibrate`
                                      # made to measured timings (it writes it); `solve --margin calibrated`
                                      # aims that much above the speed constraints
    workload: {batch_size: 64, input_len: 1024, output_len: 1024, dtype: bf16}
    # optional in workload: expert_parallel: 8  -- an MoE model's experts split over 8 such GPUs (roofline.py
    # `moe_ops`): the costs are one GPU's, its 1/8 of the experts, plus an all-reduce of each MoE output
    constraints: {speedup: 1.5, memory_gib: 67.0}

Constraints `solve` understands (all optional, as in `puzzle.solver.problem.Constraints`): `speedup`
(child tokens/s over the parent's, on this profile at its workload), `throughput` (generated tokens/s),
`memory_gib` (weights + KV cache, GiB), `latency_ms` (one whole batch: prefill + output_len decode
steps), `max_params` (a number, or a count such as 80M / 1.5B).

YAML 1.1 reads `1e12` (no dot, no exponent sign) as a string; such strings are accepted as numbers.
"""

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from puzzle.dtypes import BYTES as DTYPE_BYTES, name_of
from puzzle.errors import PuzzleError
from puzzle.units import parse_count
from puzzle.io import read_yaml

PROFILES_DIR = Path(__file__).resolve().parents[2] / "hardware_profiles"
_VENDORS = {"NVIDIA", "AMD", "INTEL", "GEFORCE", "TESLA", "RTX"}
CONSTRAINT_KEYS = ("speedup", "throughput", "memory_gib", "latency_ms", "max_params")


@dataclass(frozen=True)
class Device:
    name: str
    kind: Literal["gpu", "cpu"]
    peak_flops: dict[str, float]  # dtype -> dense FLOP/s
    memory_bandwidth: float  # bytes/s
    memory_bytes: float
    compute_efficiency: float
    memory_efficiency: float
    kernel_overhead_s: float = 0.0
    step_overhead_s: float = 0.0  # per forward pass of the whole model, whatever its blocks
    threads: int | None = None
    engine: str = "torch"  # what runs the model: torch (profile can time each sublayer) | llamacpp | vllm
    interconnect_bandwidth: float = 0.0  # bytes/s one GPU sends to its peers; 0: none given (one GPU)
    calibration_error: float = 0.0  # relative RMS of the calibration fit to measured timings; 0: not calibrated

    def flops_per_s(self, dtype: str) -> float:
        """Achievable FLOP/s in `dtype`: peak x compute efficiency."""
        if dtype not in self.peak_flops:
            raise PuzzleError(f"{self.name} has no {dtype} peak; it has {', '.join(self.peak_flops)}")
        return self.peak_flops[dtype] * self.compute_efficiency

    @property
    def model(self) -> str | None:
        """The device's model token in `name`: the first word with a digit after the vendor's name
        ("NVIDIA H100 SXM5 80GB" -> "H100", "NVIDIA L40S 48GB" -> "L40S"); None when the name has none."""
        words = [w for w in self.name.replace("-", " ").split() if w.upper() not in _VENDORS]
        return next((w.upper() for w in words if any(c.isdigit() for c in w)), None)

    def matches(self, device_name: str) -> bool:
        """Whether a measuring device (torch.cuda.get_device_name: "NVIDIA H100 80GB HBM3") is this
        profile's: its name holds this profile's model token as a word. A CPU profile names this machine's
        CPU, whatever it is; a name without a model token cannot be checked and passes."""
        if self.kind == "cpu" or self.model is None:
            return True
        return self.model in device_name.upper().replace("-", " ").split()

    @property
    def bytes_per_s(self) -> float:
        """Achievable memory bandwidth: peak x memory efficiency."""
        return self.memory_bandwidth * self.memory_efficiency


@dataclass(frozen=True)
class Workload:
    batch_size: int
    input_len: int  # prompt tokens per request
    output_len: int  # generated tokens per request
    dtype: str  # weights, activations and KV cache
    expert_parallel: int = 1  # GPUs an MoE model's experts are split over; the costs are one GPU's

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def decode_context(self) -> int:
        """Keys one decode step attends to, on average over the generation: input + output/2.

        Attention work per step grows linearly with the context, so output_len steps at this mean
        context cost what the real steps cost in total.
        """
        return self.input_len + self.output_len // 2

    @property
    def max_context(self) -> int:
        """Tokens the KV cache must hold per request at the end of the generation."""
        return self.input_len + self.output_len


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    device: Device
    workload: Workload
    constraints: dict[str, float] = field(default_factory=dict)
    description: str = ""

    def with_workload(self, **changes: Any) -> "HardwareProfile":
        """The same profile with some workload fields changed (e.g. batch_size=32)."""
        workload = replace(self.workload, **changes)
        _check_workload(workload, self.device, self.name)
        return replace(self, workload=workload)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        # fields a profile leaves at their defaults are left out: profiles without them keep the costs
        # fingerprint they had
        for part, key, default in (("device", "step_overhead_s", 0.0), ("device", "interconnect_bandwidth", 0.0),
                                   ("device", "calibration_error", 0.0), ("workload", "expert_parallel", 1)):
            if out[part][key] == default:
                del out[part][key]
        return out


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def resolve_profile_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise PuzzleError(f"hardware profile not found: {path}")
        return path
    candidate = PROFILES_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        raise PuzzleError(f"unknown hardware profile {str(name_or_path)!r}; shipped: {', '.join(shipped_profiles())}")
    return candidate


def profile_name(name_or_path: str | Path) -> str:
    """The name a profile's costs are filed under (costs/NAME.*): a shipped profile's name as given, a YAML
    file's own `name`, so `--budget my/gpu.yaml` finds what `puzzle profile --budget my/gpu.yaml` wrote."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return load_profile(path).name
    return str(name_or_path)


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A shipped profile by name (`h100_80gb`, `cpu_local`, ...) or a YAML path, validated."""
    path = resolve_profile_path(name_or_path)
    return parse_profile(read_yaml(path), default_name=path.stem)


def _number(where: str, value: Any, *, positive: bool = True, integer: bool = False) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise PuzzleError(f"{where} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PuzzleError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value):  # YAML's .inf / .nan: a profile of infinite bandwidth predicts anything
        raise PuzzleError(f"{where} must be a finite number, got {value!r}")
    if integer and value != int(value):
        raise PuzzleError(f"{where} must be an integer, got {value!r}")
    if (positive and not value > 0) or (not positive and value < 0):
        raise PuzzleError(f"{where} must be {'positive' if positive else 'non-negative'}, got {value!r}")
    return int(value) if integer else float(value)


def _mapping(where: str, raw: Any, allowed: set[str], required: set[str]) -> dict:
    if not isinstance(raw, dict):
        raise PuzzleError(f"{where} must be a mapping, got {type(raw).__name__}")
    unknown = set(raw) - allowed
    if unknown:
        raise PuzzleError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    missing = required - set(raw)
    if missing:
        raise PuzzleError(f"{where}: missing keys {sorted(missing)}")
    return raw


def _parse_device(raw: Any, where: str) -> Device:
    keys = {"name", "kind", "peak_flops", "memory_bandwidth", "memory_bytes", "efficiency", "kernel_overhead_s",
            "step_overhead_s", "threads", "engine", "interconnect_bandwidth", "calibration_error"}
    raw = _mapping(where, raw, keys, {"name", "peak_flops", "memory_bandwidth", "memory_bytes"})
    kind = raw.get("kind", "gpu")
    if kind not in ("gpu", "cpu"):
        raise PuzzleError(f"{where}.kind must be 'gpu' or 'cpu', got {kind!r}")
    peaks = raw["peak_flops"]
    if isinstance(peaks, dict):  # keyed by dtype: torch's names accepted, held under the vocabulary's
        peaks = {name_of(k) or k: v for k, v in peaks.items()}
    peaks = _mapping(f"{where}.peak_flops", peaks, set(DTYPE_BYTES), set())
    if not peaks:
        raise PuzzleError(f"{where}.peak_flops needs at least one of {sorted(DTYPE_BYTES)}")
    eff = _mapping(f"{where}.efficiency", raw.get("efficiency", {}), {"compute", "memory"}, set())
    efficiency = {k: _number(f"{where}.efficiency.{k}", eff.get(k, 1.0)) for k in ("compute", "memory")}
    for k, v in efficiency.items():
        if v > 1:
            raise PuzzleError(f"{where}.efficiency.{k} must be in (0, 1], got {v}")
    threads = raw.get("threads")
    return Device(
        name=str(raw["name"]),
        kind=kind,
        peak_flops={k: _number(f"{where}.peak_flops.{k}", v) for k, v in peaks.items()},
        memory_bandwidth=_number(f"{where}.memory_bandwidth", raw["memory_bandwidth"]),
        memory_bytes=_number(f"{where}.memory_bytes", raw["memory_bytes"]),
        compute_efficiency=efficiency["compute"],
        memory_efficiency=efficiency["memory"],
        kernel_overhead_s=_number(f"{where}.kernel_overhead_s", raw.get("kernel_overhead_s", 0.0), positive=False),
        step_overhead_s=_number(f"{where}.step_overhead_s", raw.get("step_overhead_s", 0.0), positive=False),
        threads=None if threads is None else _number(f"{where}.threads", threads, integer=True),
        engine=_engine(raw.get("engine", "torch"), where),
        interconnect_bandwidth=_number(f"{where}.interconnect_bandwidth", raw.get("interconnect_bandwidth", 0.0), positive=False),
        calibration_error=_number(f"{where}.calibration_error", raw.get("calibration_error", 0.0), positive=False),
    )


ENGINES = ("torch", "llamacpp", "vllm")
# Engines that run whole models only: `puzzle profile` prices their variants with the roofline, which
# scripts/bench_engine.py's timings calibrate (`puzzle profile --calibrate`).
WHOLE_MODEL_ENGINES = ("llamacpp", "vllm")


def _engine(value: Any, where: str) -> str:
    if value not in ENGINES:
        raise PuzzleError(f"{where}.engine must be one of {', '.join(ENGINES)}, got {value!r}")
    return value


def _check_workload(workload: Workload, device: Device, where: str) -> None:
    if workload.dtype not in DTYPE_BYTES:
        raise PuzzleError(f"{where}: workload dtype must be one of {sorted(DTYPE_BYTES)}, got {workload.dtype!r}")
    if workload.dtype not in device.peak_flops:
        raise PuzzleError(
            f"{where}: workload dtype {workload.dtype} has no peak on {device.name} (it has {', '.join(device.peak_flops)})"
        )
    for key in ("batch_size", "input_len", "output_len", "expert_parallel"):
        value = getattr(workload, key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise PuzzleError(f"{where}: workload {key} must be a positive integer, got {value!r}")
    if workload.expert_parallel > 1 and not device.interconnect_bandwidth:
        raise PuzzleError(f"{where}: workload expert_parallel {workload.expert_parallel} needs the device's "
                          "interconnect_bandwidth (bytes/s one GPU sends to the others)")


def _parse_workload(raw: Any, device: Device, where: str) -> Workload:
    keys = {"batch_size", "input_len", "output_len", "dtype"}
    raw = _mapping(where, raw, keys | {"expert_parallel"}, keys)
    workload = Workload(
        batch_size=_number(f"{where}.batch_size", raw["batch_size"], integer=True),
        input_len=_number(f"{where}.input_len", raw["input_len"], integer=True),
        output_len=_number(f"{where}.output_len", raw["output_len"], integer=True),
        dtype=name_of(raw["dtype"]) or str(raw["dtype"]),  # torch's names accepted; _check_workload names the rest
        expert_parallel=_number(f"{where}.expert_parallel", raw.get("expert_parallel", 1), integer=True),
    )
    _check_workload(workload, device, where)
    return workload


def parse_constraints(raw: Any, where: str = "constraints") -> dict[str, float]:
    """Validated `solve` constraints: a subset of CONSTRAINT_KEYS, each a positive number."""
    raw = _mapping(where, raw or {}, set(CONSTRAINT_KEYS), set())
    out = {}
    for key, value in raw.items():
        if key == "max_params" and isinstance(value, str):
            value = parse_count(value)
        out[key] = _number(f"{where}.{key}", value)
    return out


def parse_profile(raw: Any, default_name: str = "custom") -> HardwareProfile:
    """A HardwareProfile from a parsed YAML mapping; every error names the key it is about."""
    where = f"hardware profile {default_name!r}"
    raw = _mapping(where, raw, {"name", "description", "device", "workload", "constraints"}, {"device", "workload"})
    name = str(raw.get("name", default_name))
    where = f"hardware profile {name!r}"
    device = _parse_device(raw["device"], f"{where} device")
    return HardwareProfile(
        name=name,
        device=device,
        workload=_parse_workload(raw["workload"], device, f"{where} workload"),
        constraints=parse_constraints(raw.get("constraints"), f"{where} constraints"),
        description=str(raw.get("description", "")),
    )
