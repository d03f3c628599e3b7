"""`puzzle report`: one Markdown page for a run: the chosen architectures, their predicted costs, and
every evaluated model against the parent, with the Pareto frontier as a picture."""

import shutil
from pathlib import Path
from typing import Any

from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_text, read_json
from puzzle.run_dir import read_run_info


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _solutions_section(run_dir: Path) -> list[str]:
    lines = ["## Solutions (predicted on the hardware profile)", "",
             "| solution | profile | objective | speedup | throughput tok/s | memory GiB | params | status |",
             "|---|---|---|---|---|---|---|---|"]
    found = False
    for path in sorted((run_dir / "solutions").glob("*.json")):
        if path.stem == "pareto":
            continue
        s = read_json(path)
        p = s.get("predicted", {})
        found = True
        lines.append(f"| {path.stem} | {s.get('profile', '–')} | {_fmt(s.get('objective'))} | {_fmt(p.get('speedup'), '.2f')}x "
                     f"| {_fmt(p.get('throughput'), ',.0f')} | {_fmt(p.get('memory_gib'), '.2f')} "
                     f"| {_fmt(p.get('params'), ',')} | {s.get('status', '–')} |")
    return lines + [""] if found else []


def _evaluation_section(run_dir: Path) -> list[str]:
    rows = [read_json(p) for p in sorted((run_dir / "eval").glob("*.json"))]
    if not rows:
        return []
    lines = ["## Evaluation against the parent", "",
             "| model | params | val ppl | KL to parent | top-1 agreement | MC acc (norm) | prefill tok/s | decode tok/s | predicted speedup |",
             "|---|---|---|---|---|---|---|---|---|"]
    parent_pred = next((r.get("predicted", {}) for r in rows if r.get("name") == "parent"), {})
    measured = {r.get("name"): r["measured"] for r in rows if r.get("measured")}
    borrowed = False
    for r in sorted(rows, key=lambda r: (r.get("name") != "parent", r.get("name"))):
        v, m = r.get("validation", {}), r.get("measured", {})
        if not m and f"{r.get('name')}+gkd" in measured:  # same architecture, so the same speed
            m, borrowed = measured[f"{r.get('name')}+gkd"], True
        mc = next(iter(r.get("multiple_choice", {}).values()), {})
        mc_text = f"{mc['acc']:.3f} ({mc['acc_norm']:.3f})" if mc else "–"
        pred = r.get("predicted", {})
        speedup = None
        if pred.get("throughput_tokens_s") and parent_pred.get("throughput_tokens_s"):
            speedup = pred["throughput_tokens_s"] / parent_pred["throughput_tokens_s"]
        lines.append(f"| {r.get('name')} | {r.get('params', 0) / 1e6:.1f}M | {_fmt(v.get('perplexity'), '.3f')} "
                     f"| {_fmt(v.get('kl'))} | {_fmt(v.get('top1_agreement'), '.3f')} | {mc_text} "
                     f"| {_fmt(m.get('prefill_tokens_per_s'), ',.0f')} | {_fmt(m.get('decode_tokens_per_s'), ',.0f')} "
                     f"| {_fmt(speedup, '.2f')}{'x' if speedup else ''} |")
    notes = ["", "KL and agreement are per token on the validation blocks; tokens/s measured on this machine;"
             " the predicted speedup is the roofline throughput ratio to the parent on the hardware profile."]
    if borrowed:
        notes.append("A model before GKD shows the tokens/s measured after GKD: GKD changes weights, not shapes.")
    return lines + notes + [""]


def _architectures_section(run_dir: Path) -> list[str]:
    lines = []
    for arch in sorted((run_dir / "children").glob("*/architecture.md")):
        lines += [f"## Architecture of `{arch.parent.name}`", "", arch.read_text(), ""]
    return lines


def _stages_section(run_dir: Path) -> list[str]:
    path = run_dir / "pipeline.json"
    if not path.exists():
        return []
    ledger = read_json(path)
    lines = ["## Stage wall times", "", "| stage | wall s |", "|---|---|"]
    lines += [f"| {name} | {entry.get('wall_s', 0):.1f} |" for name, entry in ledger.items()]
    total = sum(e.get("wall_s", 0) for e in ledger.values())
    return lines + [f"| **total** | **{total:.1f}** |", ""]


def report(run_dir: Path = Path("runs/default")) -> Path:
    """Write run_dir/report.md (and run_dir/pareto.png when a sweep was solved).

    Args:
        run_dir: the run directory to report on
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PuzzleError(f"run directory not found: {run_dir}")
    info = read_run_info(run_dir)
    lines = [f"# Puzzle run `{run_dir.name}`", ""]
    if info:
        lines += [f"Parent: `{info.get('parent')}`; search space: `{info.get('search_space', '–')}`.", ""]
    pareto = run_dir / "solutions" / "pareto.png"
    if pareto.exists():
        shutil.copyfile(pareto, run_dir / "pareto.png")
        lines += ["## Pareto frontier", "", "![quality vs predicted speedup](pareto.png)", ""]
    lines += _solutions_section(run_dir) + _evaluation_section(run_dir) + _architectures_section(run_dir)
    lines += _stages_section(run_dir)
    out = atomic_write_text(run_dir / "report.md", "\n".join(lines))
    print(f"wrote {out}")
    return out
