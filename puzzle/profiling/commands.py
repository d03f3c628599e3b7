"""`puzzle profile`: latency and memory of every search-space variant on a hardware profile.

Writes, for profile P (file names use the profile's `name`):
  R/costs/P.parquet (+ .csv)  one row per (layer, kind, variant): layer, kind, variant, params,
      param_bytes, kv_cache_bytes (at the workload's batch and input+output context), prefill_s (the
      whole batch's prompt through this sublayer), decode_s (one decode step of the whole batch at
      context input_len + output_len // 2), source ("roofline" | "measured"), is_parent, batch_size.
  R/costs/P.json  profile, description, device, workload (+ decode_context, kv_context), constraints
      (solve's defaults), source, measured_on, parent_path, search_space, num_layers, hidden_size,
      model (the ModelShape + num_hidden_layers), fixed
      ({embeddings, final_norm, lm_head} -> {params, param_bytes, prefill_s, decode_s}), parent (whole
      parent figures from the table: see `roofline.combine_costs`), parent_roofline (the same,
      predicted), time_model (how the figures add up), fingerprint.

The parent: `--parent PATH` (recorded in R/parent.json as {"parent": absolute path, "search_space":
name} so later stages and reruns need not repeat it) or, without it, the one R/parent.json names.

Measured (torch timing on this machine) for `cpu_local`, and for a GPU profile when a CUDA GPU of the
profile's model is present (decode replayed from CUDA graphs, as serving engines run it: see measure.py);
the roofline otherwise (`--measure/--no-measure` overrides). A measurement is filed only under a profile
naming the device it ran on (`Device.matches`): `--measure` on another GPU is refused, the default falls
back to the roofline with a warning. Every distinct (kind, variant) is measured once and reused for all
layers that offer it (latency does not depend on the layer).
"""

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from puzzle.device import resolve_device
from puzzle.errors import PuzzleError
from puzzle.search_space import load_search_space, run_parent
from puzzle.run_dir import writes_run_dir
from puzzle.io import atomic_write_json, clean_stale_temps, read_json, read_table, table_problem, write_table
from puzzle.model.blocks import BlockConfig

from .costs import costs_path, load_costs  # noqa: F401  (load_costs: re-exported for callers of this module)
from .hardware import WHOLE_MODEL_ENGINES, HardwareProfile, Workload, load_profile
from .roofline import FIXED_PARTS, ModelShape, combine_costs, fixed_costs, sublayer_costs

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
COLUMNS = [
    "layer", "kind", "variant", "params", "param_bytes", "kv_cache_bytes", "prefill_s", "decode_s",
    "source", "is_parent", "batch_size",
]
TIME_MODEL = (
    "prefill_s: whole batch's prompts; decode_s: one step of the whole batch at decode_context; "
    "whole model = fixed parts + sum of sublayer rows; generation_s = prefill_s + output_len * decode_s; "
    "throughput_tokens_s = batch_size * output_len / generation_s; memory_bytes = param_bytes + kv_cache_bytes"
)


def table_model_costs(table: pd.DataFrame, meta: dict[str, Any], blocks: list[BlockConfig]) -> dict[str, Any]:
    """Whole-model figures of a child from a costs table (its rows for the child's choices + fixed)."""
    index = table.set_index(["layer", "kind", "variant"])
    rows = []
    for layer, block in enumerate(blocks):
        for kind, cfg in (("attention", block.attention), ("ffn", block.ffn)):
            key = (layer, kind, cfg.name)
            if key not in index.index:
                raise PuzzleError(f"layer {layer} {kind} variant {cfg.name!r} is not in the costs table; rerun `puzzle profile`")
            rows.append(index.loc[key].to_dict())
    workload = Workload(**{k: meta["workload"][k] for k in ("batch_size", "input_len", "output_len", "dtype")})
    return combine_costs(meta["fixed"], rows, workload)


def _should_measure(profile: HardwareProfile, measure: bool | None, device: str = "auto") -> torch.device | None:
    """The torch device to measure on, or None for the roofline. `device`: auto (the profile's kind: the
    CPU for a CPU profile, the current CUDA GPU for a GPU profile), cpu, cuda or cuda:N."""
    if profile.device.engine in WHOLE_MODEL_ENGINES:
        # llama.cpp and vLLM run whole models, not one sublayer: their timings calibrate the roofline instead
        # (scripts/bench_engine.py measures parent and children, `puzzle profile --calibrate` fits them).
        if measure:
            raise PuzzleError(f"{profile.name} is a {profile.device.engine} profile: per-variant timing needs torch; "
                              "measure whole models with scripts/bench_engine.py and fit them with --calibrate MEASURED.json")
        return None
    if measure is False:
        return None
    if profile.device.kind == "cpu":
        target = torch.device("cpu") if device == "auto" else resolve_device(device)
        if target.type != "cpu":
            raise PuzzleError(f"{profile.name} is a CPU profile; measure it with --device cpu (or auto)")
        return target
    if device == "auto" and not torch.cuda.is_available():
        if measure:
            raise PuzzleError(f"cannot measure {profile.name} here: no CUDA GPU; drop --measure to use the roofline")
        return None
    target = resolve_device("cuda" if device == "auto" else device)
    if target.type != "cuda":
        raise PuzzleError(f"{profile.name} is a GPU profile: it cannot be measured on the {target.type}; "
                          "drop --device (or --measure) to use the roofline")
    return _check_device(profile, target, measure)


def _check_device(profile: HardwareProfile, target: torch.device, measure: bool | None) -> torch.device | None:
    """`target` when it is the device the profile names; else a refusal (--measure) or the roofline (default)."""
    from .measure import device_name

    name = device_name(target)
    if profile.device.matches(name):
        return target
    why = f"this GPU is {name}, not the {profile.device.name} that {profile.name} describes"
    if measure:
        raise PuzzleError(f"cannot file a measurement under {profile.name}: {why}; pick its profile with --budget")
    log.warning("profile %s: %s; using the roofline (pass --budget for this GPU's profile to measure)", profile.name, why)
    return None


def _fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _measure_all(config: Any, variants: list[tuple[str, Any]], profile: HardwareProfile, device: torch.device, repeats: int) -> tuple[dict, dict]:
    from .measure import measure_fixed, measure_sublayer, torch_threads

    threads = profile.device.threads if device.type == "cpu" else None
    sub, fixed = {}, {}
    with torch_threads(threads):
        bar = tqdm(variants + [("fixed", p) for p in FIXED_PARTS], desc=f"profile {profile.name}", unit="variant")
        for kind, cfg in bar:
            if kind == "fixed":
                fixed[cfg] = measure_fixed(config, cfg, profile.workload, device, repeats=repeats)
                figures, name = fixed[cfg], cfg
            else:
                sub[(kind, cfg)] = measure_sublayer(config, kind, cfg, profile.workload, device, repeats=repeats)
                figures, name = sub[(kind, cfg)], cfg.name
            log.info(json.dumps({"event": "measured", "profile": profile.name, "kind": kind, "variant": name, **figures}))
    return sub, fixed


@writes_run_dir("profile")
def profile(
    run_dir: Path = Path("runs/default"),
    budget: str = "h100_80gb",
    parent: Path | None = None,
    search_space: str | None = None,
    measure: bool | None = None,
    repeats: int = 15,
    force: bool = False,
    calibrate: Path | None = None,
    output: Path | None = None,
    device: str = "auto",
) -> Path:
    """Latency and memory of every search-space variant on a hardware profile (roofline or measured).

    Args:
        run_dir: the run directory; the table goes to RUN_DIR/costs/BUDGET.{parquet,csv,json}
        budget: a hardware profile name (hardware_profiles/*.yaml) or a YAML path
        parent: the parent model (HF dir, .safetensors or .gguf); default: the one RUN_DIR/parent.json names
        search_space: a search space name or YAML path; default: the run's, else llama_default
        measure: time every variant on this machine (default: for cpu_local, and for GPU profiles when a GPU is present)
        repeats: timing samples per measurement (the median is kept)
        force: recompute even when the costs are up to date
        calibrate: instead of profiling, fit BUDGET's efficiencies and per-kernel overhead to the whole-model
            timings in this MEASURED.json (format: puzzle/profiling/calibrate.py) and write a calibrated profile
        output: with --calibrate, the calibrated profile's path (default: MEASURED's folder/BUDGET.calibrated.yaml)
        device: where to measure: auto (the CPU for a CPU profile, the CUDA GPU for a GPU profile), cpu, cuda or
            cuda:N; a GPU of another model than the profile's is refused (the dtype is the profile's workload's)
    """
    from puzzle.model.checkpoint import load_config, puzzle_config_from

    if calibrate is not None:
        from .calibrate import calibrate as fit_profile, fit_report

        out, fit = fit_profile(calibrate, budget, output)
        log.info(json.dumps({"event": "profile_calibrated", "path": str(out), **fit_report(fit)}))
        return out
    hw = load_profile(budget)
    if repeats <= 0:
        raise PuzzleError(f"--repeats must be positive, got {repeats}")
    parent_path, space_name = run_parent(run_dir, parent, search_space)
    config = load_config(parent_path)
    space = load_search_space(space_name, config)
    device = _should_measure(hw, measure, device)
    source = "roofline" if device is None else "measured"
    from .measure import decode_timing, device_name

    measured_on = None if device is None else f"{device.type}: {device_name(device)}"
    variants = list(space.variants())
    base = costs_path(run_dir, hw.name)
    clean_stale_temps(base.parent)
    fingerprint = _fingerprint({
        "version": FORMAT_VERSION, "profile": hw.to_dict(), "parent": str(parent_path), "config": config.to_dict(),
        "space": space_name,
        "variants": [(v.layer, v.kind, v.name) for v in variants], "source": source, "repeats": repeats,
        # a GPU measurement is of one GPU model (CPU tables keep the key they had before this field)
        **({"measured_on": measured_on} if device is not None and device.type == "cuda" else {}),
    })
    json_path = base.with_suffix(".json")
    if not force and json_path.exists() and table_problem(base.with_suffix(".parquet")) is None:
        if read_json(json_path).get("fingerprint") == fingerprint:
            log.info(json.dumps({"event": "profile_cached", "path": str(json_path)}))
            return json_path

    shape = ModelShape.from_config(config)
    fixed = fixed_costs(shape, hw)
    rows = []
    for v in variants:
        rows.append({"layer": v.layer, "kind": v.kind, "variant": v.name, **sublayer_costs(shape, v.kind, v.config, hw),
                     "source": "roofline", "is_parent": v.is_parent, "batch_size": hw.workload.batch_size})
    roofline_parent = combine_costs(fixed, [r for r in rows if r["is_parent"]], hw.workload)

    if device is not None:
        pconfig = puzzle_config_from(config)
        distinct = list(dict.fromkeys((v.kind, v.config) for v in variants))
        sub, fixed_measured = _measure_all(pconfig, distinct, hw, device, repeats)
        for row, v in zip(rows, variants):
            row.update(sub[(v.kind, v.config)], source="measured")
        for part in FIXED_PARTS:
            fixed[part].update(fixed_measured[part])

    table = pd.DataFrame(rows, columns=COLUMNS)
    write_table(table, base, rebuild=f"puzzle profile --run-dir {run_dir} --budget {budget}")
    workload = {**vars(hw.workload), "decode_context": hw.workload.decode_context, "kv_context": hw.workload.max_context}
    atomic_write_json(json_path, {
        "profile": hw.name,
        "description": hw.description,
        "device": vars(hw.device),
        "workload": workload,
        "constraints": hw.constraints,
        "source": source,
        "measured_on": measured_on,
        "decode_timing": None if device is None else decode_timing(device),
        "parent_path": str(parent_path),
        "search_space": space.name,
        "num_layers": space.num_layers,
        "hidden_size": shape.hidden_size,
        "model": {**asdict(shape), "num_hidden_layers": space.num_layers},
        "fixed": fixed,
        "parent": combine_costs(fixed, [r for r in rows if r["is_parent"]], hw.workload),
        "parent_roofline": roofline_parent,
        "time_model": TIME_MODEL,
        "fingerprint": fingerprint,
    })
    log.info(json.dumps({"event": "profile_written", "path": str(json_path), "rows": len(table), "source": source}))
    return json_path
