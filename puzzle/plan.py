"""`puzzle plan CONFIG.yaml`: a dry run. Per pipeline step, the peak host and GPU memory, disk written,
FLOPs, estimated wall time and the workers/GPUs it can use, from the parent's config alone (no weights; a
GGUF parent's metadata only), the search space and the config's sections; one warning line per step
whose peak exceeds the memory at hand.

This module is the aggregator and the printer: the machine the plan is for, each step priced by its
stage's own cost model (puzzle/<package>/cost.py, named by its `Stage.cost` in puzzle/stages.py, on the
vocabulary of puzzle/footprint.py), its time from its FLOPs at the machine's rate, the table and the JSON.
Each cost model models what its stage's code holds (read from the code, cited in its docstring) on the
device and in the dtype its `--device` / `--dtype` resolve to on the planned machine (`Context.runtime`:
auto = CUDA + bf16 on a GPU machine, CPU + fp32 otherwise, as puzzle/device.py resolves them). Every count
comes from `ModelShape` (puzzle/shape.py), the one shape arithmetic. Times leave out loading and writing
weights (a GGUF parent's dequantisation included) and assume the stage runs at the stated matmul rate
(measured on an idle machine; a busy one measures less and predicts longer).
"""

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch

from puzzle.data.cost import train_tokens
from puzzle.errors import PuzzleError
from puzzle.footprint import DTYPE_BYTES, FP32, GIB, Context, Estimate, Machine, stage_settings
from puzzle.io import atomic_write_json, read_json
from puzzle.model.blocks import FFNConfig
from puzzle.model.checkpoint import load_config
from puzzle.outputs import JSON_KEY, check_output
from puzzle.pipeline import RunConfig, check_plan
from puzzle.pipeline_stages import plan as plan_steps
from puzzle.profiling.hardware import HardwareProfile, load_profile
from puzzle.profiling.roofline import serving_fit
from puzzle.search_space import load_search_space
from puzzle.shape import ModelShape
from puzzle.units import host_memory_bytes
from puzzle.stages import BY_NAME, stage_functions


# ----- the machine -----------------------------------------------------------------------------------


def measure_cpu_flops(n: int = 512, seconds: float = 0.3) -> float:
    """This machine's fp32 matmul rate (FLOP/s, torch's threads): n x n matmuls for about `seconds`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    count, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / elapsed


def machine(device: str, gpus: int | None, gpu_memory_gib: float | None, host_memory_gib: float | None,
            budget: str, cpu_gflops: float | None) -> Machine:
    """The machine the plan is for: given values, else this machine's (device auto: CUDA when present),
    else the hardware profile's GPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise PuzzleError(f"device must be auto, cpu or cuda, got {device!r}")
    here = torch.cuda.is_available()
    device = ("cuda" if here else "cpu") if device == "auto" else device
    for name, value in (("gpus", gpus), ("gpu-memory-gib", gpu_memory_gib), ("host-memory-gib", host_memory_gib),
                        ("cpu-gflops", cpu_gflops)):
        if value is not None and value <= 0:
            raise PuzzleError(f"{name} must be positive, got {value}")
    host = host_memory_gib * GIB if host_memory_gib else host_memory_bytes()
    cpu = cpu_gflops * 1e9 if cpu_gflops else measure_cpu_flops()
    cpu_note = f"CPU: {cpu / 1e9:.0f} GFLOP/s fp32 ({'given' if cpu_gflops else 'measured matmul rate'})"
    if device == "cpu":
        return Machine("cpu", 0, host, 0.0, cpu, 0.0, cpu_note)
    profile = load_profile(budget)
    if gpu_memory_gib:
        gpu_mem = gpu_memory_gib * GIB
    elif here:
        gpu_mem = float(torch.cuda.get_device_properties(0).total_memory)
    else:
        gpu_mem = profile.device.memory_bytes
    efficiency = profile.device.compute_efficiency
    rates = {k: v * efficiency for k, v in profile.device.peak_flops.items()}
    peaks = ", ".join(f"{k} {v / 1e12:.0f}" for k, v in profile.device.peak_flops.items())
    note = (f"{cpu_note}; GPU: {profile.name} peak TFLOP/s {peaks} x efficiency {efficiency} "
            "(each step at its dtype's rate)")
    count = gpus or (torch.cuda.device_count() if here else 1)
    return Machine("cuda", count, host, gpu_mem, cpu, max(rates.values()), note, rates)


# ----- putting it together ---------------------------------------------------------------------------


def estimate_time(e: Estimate, m: Machine) -> None:
    """Wall time from FLOPs at the step's device's rate (unless its estimator set one)."""
    if e.seconds is None:
        rate = m.gpu_rate(e.dtype) * max(1, min(e.workers, m.gpus)) if e.runs_on == "cuda" else m.cpu_flops
        e.seconds = e.flops / rate + e.io_seconds


def check_fit(e: Estimate, m: Machine) -> None:
    """One warning line per memory the step's peak exceeds."""
    if e.host_bytes > m.host_bytes:
        e.warnings.append(f"warning: {e.step} needs ~{e.host_bytes / GIB:.1f} GiB of host memory; "
                          f"{m.host_bytes / GIB:.1f} GiB available")
    if e.gpu_bytes > m.gpu_bytes and e.runs_on == "cuda":
        e.warnings.append(f"warning: {e.step} needs ~{e.gpu_bytes / GIB:.1f} GiB of GPU memory; "
                          f"{m.gpu_bytes / GIB:.1f} GiB per GPU available")


def estimate(config: Path, m: Machine) -> tuple[ModelShape, list[Estimate]]:
    """Every step of a pipeline config, estimated by its stage's own cost model (`Stage.estimate`; the
    parent's config is read, never its weights)."""
    cfg = RunConfig.load(Path(config))
    if not cfg.parent.exists():
        raise PuzzleError(f"parent not found: {cfg.parent}")
    parent_config = load_config(cfg.parent)
    space = load_search_space(cfg.search_space, parent_config)
    fns = stage_functions()
    steps = plan_steps(cfg, fns)
    check_plan(cfg, steps, fns, inputs=False)
    prep = stage_settings(fns["prepare_data"], next((s.args for s in steps if s.fn == "prepare_data"), {}))
    shape = ModelShape.from_config(parent_config)
    ctx = Context(parent_config, shape, space, prep.seq_len, train_tokens(prep, cfg.corpus), m)
    out = []
    for step in steps:
        e = BY_NAME[step.fn].estimate(ctx, {**step.common, **step.args})  # paths too: evaluate reads them
        if e is None:  # report, build_mc: no model-sized work
            out.append(Estimate(step.name, step.fn, seconds=0.0, note="not modelled (small)"))
            continue
        e.step = step.name
        estimate_time(e, m)
        check_fit(e, m)
        out.append(e)
    return shape, out


# ----- the parent alone: its size and where it serves --------------------------------------------------

SERVING_GPUS = (1, 8)  # the fit lines: one GPU, one 8-GPU node (and the planned machine's count)


def parent_shape(path: Path) -> tuple[ModelShape, str | None]:
    """The parent's shape from its config alone: a supported family as it reads its config (`load_config`),
    else its config.json read by field name (`ModelShape.from_fields`: an MoE family this build lacks, such as
    gpt_oss, is still sized), with a note saying so."""
    where = path.parent if path.suffix == ".json" else path
    try:
        config = load_config(where)
    except PuzzleError as err:
        config_json = path if path.suffix == ".json" else path / "config.json"
        if not str(err).startswith("unsupported architecture") or not config_json.is_file():
            raise
        raw = read_json(config_json)
        if not isinstance(raw, dict):
            raise PuzzleError(f"{config_json}: expected a JSON object") from None
        return ModelShape.from_fields(raw), (f"model_type {raw.get('model_type')!r} is not a family this build runs: "
                                             "sized from config.json by field name")
    return ModelShape.from_config(config), None


def parent_lines(shape: ModelShape, profile: HardwareProfile, gpus: tuple[int, ...]) -> tuple[list[str], dict[str, Any]]:
    """The parent's size (total and, for an MoE parent, active parameters) and where it serves: weights + KV
    cache of the budget profile's workload on 1 and 8 of its GPUs (`roofline.serving_fit`)."""
    total, active = shape.total_params(), shape.active_model_params()
    lines = [f"parent: {total / 1e9:.3f}B parameters ({_gib(shape.model_bytes(None, FP32))} GiB in fp32, "
             f"{_gib(shape.model_bytes(None, DTYPE_BYTES['bf16']))} in bf16), "
             f"{shape.num_hidden_layers} layers, hidden {shape.hidden_size}"]
    moe = [FFNConfig.from_name(f).moe for f in shape.parent_ffns or () if f.startswith("moe_")]
    if moe:
        kinds = ", ".join(f"{m.num_experts} experts of width {m.expert_size}, top-{m.top_k}"
                          + (f", a shared expert of {m.shared_expert_size}" if m.shared_expert_size else "")
                          for m in dict.fromkeys(moe))
        lookup = active - shape.fixed_params("embeddings") if not shape.tie_word_embeddings else active
        lines.append(f"MoE: {len(moe)} of {shape.num_hidden_layers} layers ({kinds}); active per token "
                     f"{active / 1e9:.3f}B of {total / 1e9:.3f}B ({100 * active / total:.1f}%; "
                     f"{lookup / 1e9:.3f}B without the embedding lookup)")
    w, device = profile.workload, profile.device.model or profile.device.name
    if shape.parent_attns is not None:  # a hybrid: its layers by mixer, and the fixed state a sequence holds
        mixers = [b.attention.name.split("_")[0] if b.ffn.no_op else b.ffn.name.split("_")[0] for b in shape.parent_blocks]
        state = sum(shape.recurrent_state_bytes(b, DTYPE_BYTES[w.dtype]) for b in shape.parent_blocks)
        lines.append("hybrid: " + ", ".join(f"{mixers.count(k)} {k}" for k in dict.fromkeys(mixers))
                     + f" layers; Mamba2 state per sequence {state / 2**20:.1f} MiB (no KV cache in those layers)")
    fits = [serving_fit(shape, profile, g) for g in gpus]
    lines.append(f"serving in {w.dtype} ({profile.name} workload: batch {w.batch_size} x {w.max_context} tokens): "
                 f"weights {_gib(fits[0]['weight_bytes'])} GiB + KV cache {_gib(fits[0]['kv_cache_bytes'])} GiB")
    for f in fits:
        verdict = "fits" if f["fits"] else "does not fit"
        batch = (f"largest batch at {w.max_context} tokens: {f['max_batch']}" if f["max_batch"]
                 else "the weights alone exceed it")
        lines.append(f"  {f['gpus']} x {device}: {verdict} ({_gib(f['per_gpu_bytes'])} GiB per GPU of "
                     f"{_gib(f['usable_bytes'])} usable); {batch}")
    return lines, {"total_params": total, "active_params": active, "serving": fits}


def parent_report(path: Path, budget: str, gpus: int | None = None) -> tuple[list[str], dict[str, Any]]:
    """The lines and figures `puzzle plan PARENT` prints and writes, from the parent's config alone."""
    shape, note = parent_shape(path)
    profile = load_profile(budget)
    lines, figures = parent_lines(shape, profile, tuple(sorted({*SERVING_GPUS, gpus or 1})))
    config_json = path if path.suffix == ".json" else path / "config.json"
    quantized = config_json.is_file() and isinstance(raw := read_json(config_json), dict) and raw.get("quantization_config")
    if isinstance(quantized, dict):  # gpt-oss: MXFP4 experts; the figures above are the unquantised model's
        lines.append(f"note: the checkpoint stores quantized weights ({quantized.get('quant_method', 'quantization_config')}); "
                     f"the sizes above are {profile.workload.dtype}")
    return ([note] if note else []) + lines, {
        "parent": {"params": shape.total_params(), "fp32_bytes": shape.model_bytes(None, FP32), **asdict(shape),
                   **figures, "note": note}}


def plan_parent(path: Path, budget: str, gpus: int | None) -> dict[str, Any]:
    """`puzzle plan PARENT`: the parent's size and serving fit, from its config alone."""
    lines, result = parent_report(path, budget, gpus)
    print("\n".join(lines))
    return result


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def table(shape: ModelShape, estimates: list[Estimate], m: Machine, parent: list[str]) -> str:
    lines = [*parent, f"machine: {m.device}, {m.gpus} GPU(s) x {_gib(m.gpu_bytes)} GiB, host {_gib(m.host_bytes)} GiB",
             f"throughput: {m.throughput_note}", ""]
    head = f"{'step':<28} {'runs on':>12} {'workers':>7} {'host GiB':>9} {'GPU GiB':>8} {'disk GiB':>9} {'TFLOP':>10} {'time':>9}"
    lines += [head, "-" * len(head)]
    for e in estimates:
        lines.append(f"{e.step:<28} {e.runs_on + ' ' + e.dtype:>12} {e.workers:>7} {_gib(e.host_bytes):>9} {_gib(e.gpu_bytes):>8} "
                     f"{_gib(e.disk_bytes):>9} {e.flops / 1e12:>10.2f} {_duration(e.seconds):>9}  {e.note}")
    total = sum(e.seconds or 0 for e in estimates)
    lines += ["-" * len(head), f"{'total':<28} {'':>12} {'':>7} {_gib(max(e.host_bytes for e in estimates)):>9} "
              f"{_gib(max(e.gpu_bytes for e in estimates)):>8} {_gib(sum(e.disk_bytes for e in estimates)):>9} "
              f"{sum(e.flops for e in estimates) / 1e12:>10.2f} {_duration(total):>9}  (peaks: max; disk, FLOPs, time: sums)"]
    return "\n".join(lines)


def plan(
    config: Path,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    gpus: int | None = None,
    gpu_memory_gib: float | None = None,
    host_memory_gib: float | None = None,
    budget: str = "h100_80gb",
    cpu_gflops: float | None = None,
    json: Path | None = None,
) -> dict[str, Any]:
    """Dry run: per step, peak host/GPU memory, disk, FLOPs and time of a pipeline config, from the parent's config alone

    Reads the parent's config.json (a GGUF's metadata), never its weights. Each stage is modelled as the
    code runs it on the planned machine, in the dtype each step's --dtype resolves to there (auto: bf16 on
    CUDA, fp32 on the CPU). Prints the parent's size (total and, for an MoE parent, active parameters) and
    whether it serves on 1 and 8 of the budget's GPUs (weights + KV cache of its workload), a table and one
    warning line per step whose peak exceeds the memory given (or this machine's); exits 0 with warnings.
    Given a parent instead of a pipeline, prints the parent's lines only (a config.json of a family this
    build does not run is read by field name).

    Args:
        config: pipeline YAML (as for puzzle run), or a parent: model directory, config.json, .gguf
        device: where the stages that can use a GPU run (auto: CUDA when this machine has one); a step's
            own device / dtype arguments in the config take precedence
        gpus: GPUs available (default: this machine's, or 1)
        gpu_memory_gib: memory of one GPU (default: this machine's GPU, else the budget profile's)
        host_memory_gib: host memory (default: this machine's)
        budget: hardware profile whose GPU peak FLOP/s x efficiency sets GPU time (and GPU memory
            when there is no GPU here), and whose workload and memory the parent's serving lines use
        cpu_gflops: CPU fp32 matmul rate (default: measured here for a fraction of a second)
        json: also write the numbers to this JSON file
    """
    if json is not None:
        check_output(Path(json), "plan", inputs=(config,), file=True)  # before any work: never over a user's file
    if Path(config).suffix not in (".yaml", ".yml"):  # a parent, not a pipeline
        result = plan_parent(Path(config), budget, gpus)
        if json is not None:
            atomic_write_json(json, {**result, JSON_KEY: "plan"})
        return result
    m = machine(device, gpus, gpu_memory_gib, host_memory_gib, budget, cpu_gflops)
    shape, estimates = estimate(Path(config), m)
    parent, figures = parent_lines(shape, load_profile(budget), tuple(sorted({*SERVING_GPUS, m.gpus or 1})))
    print(table(shape, estimates, m, parent))
    for e in estimates:
        for w in e.warnings:
            print(w)
    result = {"parent": {"params": shape.total_params(), "fp32_bytes": shape.model_bytes(None, FP32), **asdict(shape),
                         **figures},
              "machine": asdict(m), "steps": [asdict(e) for e in estimates],
              "total_seconds": sum(e.seconds or 0 for e in estimates)}
    if json is not None:
        atomic_write_json(json, {**result, JSON_KEY: "plan"})
    return result
