"""The quick config's stages on one CUDA GPU in bf16 -> benchmarks/gpu.md (run by scripts/gpu_check.sh).

    python scripts/gpu_check.py [--config configs/smollm2_quick.yaml] [--run-dir runs/gpu_check] [--out benchmarks/gpu.md]

1. Writes RUN_DIR/config.yaml: the quick config with `device: cuda, dtype: bf16` in every section whose
   stage takes them, the hardware profile of this GPU (the shipped profile whose device it is, see
   `Device.matches`; else the config's, which then falls back to the roofline) in place of the config's,
   a measuring `profile` (decode replayed from CUDA graphs) and BLD in this process when Ray is absent.
2. Runs it with `puzzle run` in a fresh RUN_DIR (--keep reuses it), timing each step and reading its peak GPU memory
   (torch.cuda.max_memory_allocated, reset before each step; every step runs in this process), and sets each
   CUDA step's peak beside `puzzle plan`'s GPU estimate for it (the stage's cost model on this GPU): the check
   fails (exit 1) when a measured peak is outside PLAN_BAND of its estimate, as the CPU calibrations in
   tests/test_plan.py hold host estimates.
3. Measures one decode step of the parent and of the 1.5x child (random weights of their shapes, the
   profile's workload, one CUDA graph replay each: `puzzle.profiling.measure.measure_decode_step`) and
   states the measured speedup next to the one the solver predicted.
4. Writes OUT (Markdown) and OUT with .json (the same figures).

--dry-run writes the config, prints it and the plan's GPU estimates, on any machine (the CPU skeleton of the check).
"""

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from puzzle.units import GIB  # noqa: E402

MODEL_SECTIONS = ("importance", "build_library", "score", "realize", "gkd", "evaluate", "baselines")
CHILD = "speedup_1.5"
PLAN_BAND = (2 / 3, 1.5)  # measured / planned GPU peak a step must stay within (the CPU calibrations' band)


def gpu_profile(default: str) -> str:
    """The shipped hardware profile of this machine's GPU; `default` when none names it (or no GPU)."""
    from puzzle.profiling.hardware import load_profile, shipped_profiles

    if not torch.cuda.is_available():
        return default
    name = torch.cuda.get_device_name()
    mine = [p for p in shipped_profiles() if (hw := load_profile(p)).device.kind == "gpu" and hw.device.matches(name)]
    return default if default in mine or not mine else mine[0]


def gpu_config(config: Path, run_dir: Path) -> tuple[dict[str, Any], str]:
    """The quick config rewritten for this GPU, and the hardware profile it uses."""
    raw = yaml.safe_load(config.read_text())
    base = config.parent.parent if config.parent.name == "configs" else config.parent
    for key in ("parent", "corpus"):  # relative to the project, as `puzzle run` resolves them
        raw[key] = str(p if (p := Path(raw[key])).is_absolute() else base / p)
    raw["run_dir"] = str(run_dir)
    default = next((s["budget"] for s in raw.get("profile") or [] if "budget" in s), "h100_80gb")
    profile = gpu_profile(default)
    for section in MODEL_SECTIONS:
        items = raw.get(section)
        for item in items if isinstance(items, list) else [items] if items else []:
            item.update(dtype="bf16")  # realize copies tensors: a dtype, no device
            if section != "realize":
                item.update(device="cuda")
            if section == "evaluate" and item.get("budget") == default:
                item["budget"] = profile
    for section in ("solve",):
        for item in raw.get(section) or []:
            if item.get("budget") == default:
                item["budget"] = profile
    raw["profile"] = [{"budget": profile, "device": "cuda"}]
    if importlib.util.find_spec("ray") is None:
        raw.setdefault("build_library", {})["ray"] = False  # BLD groups one after another in this process
    return raw, profile


def run_timed(config_path: Path) -> list[dict[str, Any]]:
    """`puzzle run` with each step's wall time and peak GPU memory recorded."""
    import puzzle.pipeline as pipeline

    rows: list[dict[str, Any]] = []
    call = pipeline._call

    def timed(fn, common, args):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = call(fn, common, args)
        torch.cuda.synchronize()
        label = args.get("name") or args.get("solution") or args.get("budget") or ""
        rows.append({"stage": fn.__name__, "label": str(label), "wall_s": time.perf_counter() - t0,
                     "peak_gpu_gib": torch.cuda.max_memory_allocated() / GIB})
        print(json.dumps(rows[-1]), flush=True)
        return out

    pipeline._call = timed
    try:
        pipeline.run(config_path)
    finally:
        pipeline._call = call
    return rows


def planned(config_path: Path, profile: str) -> list[dict[str, Any]]:
    """`puzzle plan`'s estimate of every step of the config on one GPU of this machine (the profile's GPU
    when there is none here), in step order."""
    from dataclasses import asdict

    from puzzle.plan import estimate, machine

    _, steps = estimate(config_path, machine("cuda", 1, None, None, profile, None))
    return [asdict(e) for e in steps]


def against_plan(rows: list[dict[str, Any]], plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each timed row with its planned step (the next unmatched step of its stage: `puzzle run` runs them in
    the plan's order) and, where the plan puts the step on CUDA, its planned GPU GiB and measured / plan."""
    left = list(plan)
    for row in rows:
        step = next((s for s in left if s["stage"] == row["stage"]), None)
        if step is None:
            continue
        left.remove(step)
        row["step"] = step["step"]
        if step["runs_on"] == "cuda" and step["gpu_bytes"] > 0:
            row["plan_gpu_gib"] = step["gpu_bytes"] / GIB
            row["measured_over_plan"] = row["peak_gpu_gib"] / row["plan_gpu_gib"]
    return rows


def outside_band(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    lo, hi = PLAN_BAND
    return [r for r in rows if "measured_over_plan" in r and not lo <= r["measured_over_plan"] <= hi]


def decode_speedup(run_dir: Path, profile: str) -> dict[str, Any]:
    """Measured decode step of the parent and of the 1.5x child on this GPU (CUDA graphs), and the prediction."""
    from puzzle.io import read_json
    from puzzle.model.checkpoint import load_config, puzzle_config_from
    from puzzle.profiling.hardware import load_profile
    from puzzle.profiling.measure import device_name, measure_decode_step
    from puzzle.run_dir import RunDir

    run = RunDir(run_dir)
    child_dir = run.child(CHILD)
    workload = load_profile(profile).workload
    device = torch.device("cuda")
    parent = puzzle_config_from(load_config(run.info()["parent"]))
    child = puzzle_config_from(load_config(child_dir))
    parent_s = measure_decode_step(parent, workload, device)
    child_s = measure_decode_step(child, workload, device)
    predicted = read_json(child_dir / "predicted_costs.json").get("speedup")
    return {"gpu": device_name(device), "profile": profile, "workload": vars(workload),
            "decode_context": workload.decode_context, "parent_decode_step_s": parent_s,
            "child_decode_step_s": child_s, "measured_speedup": parent_s / child_s, "predicted_speedup": predicted}


def markdown(rows: list[dict[str, Any]], decode: dict[str, Any], profile: str) -> str:
    gpu = decode["gpu"]
    lines = [
        "# GPU check: the quick config on CUDA in bf16",
        "",
        f"Regenerate: `bash scripts/gpu_check.sh` ({gpu}, torch {torch.__version__}, profile `{profile}`).",
        "Every stage ran in one process with `--device cuda --dtype bf16`; peak GPU memory is",
        "`torch.cuda.max_memory_allocated()` over the step (reset before it).",
        "",
        f"The plan column is `puzzle plan`'s GPU estimate of the step on this GPU (its stage's cost model); the check",
        f"holds measured / plan within {PLAN_BAND[0]:.2f}-{PLAN_BAND[1]:.2f} for every step the plan puts on CUDA.",
        "",
        "| step | wall s | peak GPU GiB | plan GPU GiB | measured / plan |",
        "|---|---:|---:|---:|---:|",
        *(f"| {r.get('step') or r['stage'] + ('[' + r['label'] + ']' if r['label'] else '')} | {r['wall_s']:.1f} | "
          f"{r['peak_gpu_gib']:.2f} | {format(r['plan_gpu_gib'], '.2f') if 'plan_gpu_gib' in r else '-'} | "
          f"{format(r['measured_over_plan'], '.2f') if 'measured_over_plan' in r else '-'} |"
          for r in rows),
        f"| **total** | {sum(r['wall_s'] for r in rows):.1f} | {max((r['peak_gpu_gib'] for r in rows), default=0):.2f} | | |",
        "",
        "## Decode speedup of the 1.5x child, measured",
        "",
        f"One decode step of the whole model (random weights of each model's shapes) at batch "
        f"{decode['workload']['batch_size']} and context {decode['decode_context']}, in "
        f"{decode['workload']['dtype']}, captured in one CUDA graph and replayed (what serving engines run);",
        "median of the replays.",
        "",
        "| model | decode step ms |",
        "|---|---:|",
        f"| parent | {decode['parent_decode_step_s'] * 1e3:.3f} |",
        f"| child `{CHILD}` | {decode['child_decode_step_s'] * 1e3:.3f} |",
        "",
        f"Measured speedup {decode['measured_speedup']:.2f}x; the solver predicted "
        f"{decode['predicted_speedup'] if decode['predicted_speedup'] is None else format(decode['predicted_speedup'], '.2f')}x "
        f"from the `{profile}` costs table.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "smollm2_quick.yaml")
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "gpu_check")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu.md")
    ap.add_argument("--dry-run", action="store_true", help="write and print the config only (any machine)")
    ap.add_argument("--keep", action="store_true", help="reuse RUN_DIR (finished stages are skipped; their times are not)")
    a = ap.parse_args()
    raw, profile = gpu_config(a.config, a.run_dir.resolve())
    if not a.dry_run and not a.keep:
        shutil.rmtree(a.run_dir, ignore_errors=True)  # a fresh run: every stage does its work, so its time is real
    a.run_dir.mkdir(parents=True, exist_ok=True)
    config_path = a.run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    if a.dry_run:
        print(config_path.read_text())
        from puzzle.pipeline import run

        run(config_path, check=True)  # the plan: every section's keys are its stage's arguments
        for step in planned(config_path, profile):
            if step["runs_on"] == "cuda":
                print(f"plan: {step['step']}: {step['gpu_bytes'] / GIB:.2f} GiB on the GPU")
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible", file=sys.stderr)
        return 2
    plan = planned(config_path, profile)  # before the run: its parent is the config's, not yet converted
    rows = against_plan(run_timed(config_path), plan)
    decode = decode_speedup(a.run_dir, profile)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(markdown(rows, decode, profile))
    a.out.with_suffix(".json").write_text(json.dumps({"steps": rows, "decode": decode}, indent=2) + "\n")
    print(a.out.read_text())
    bad = outside_band(rows)
    for r in bad:
        print(f"gpu_check: {r['step']}: measured {r['peak_gpu_gib']:.2f} GiB on the GPU, planned {r['plan_gpu_gib']:.2f} "
              f"({r['measured_over_plan']:.2f}x, outside {PLAN_BAND[0]:.2f}-{PLAN_BAND[1]:.2f})", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
