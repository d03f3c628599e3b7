"""`puzzle report`: one Markdown page for a run: the chosen architectures, their predicted costs, and
every evaluated model against the parent, with the Pareto frontier as a picture, and (MoE models) each
layer's router load per expert as another."""

import io
import shutil
from pathlib import Path
from typing import Any

from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_bytes, atomic_write_text, read_json
from puzzle.run_dir import PARENT_ORIGINAL as ORIGINAL, RunDir, writes_run_dir


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _solutions_section(run: RunDir) -> list[str]:
    lines = ["## Solutions (predicted on the hardware profile)", "",
             "| solution | profile | objective | speedup | throughput tok/s | memory GiB | params | status |",
             "|---|---|---|---|---|---|---|---|"]
    found = False
    for name in run.solution_names():
        s = read_json(run.solution(name))
        p = s.get("predicted", {})
        found = True
        lines.append(f"| {name} | {s.get('profile', '–')} | {_fmt(s.get('objective'))} | {_fmt(p.get('speedup'), '.2f')}x "
                     f"| {_fmt(p.get('throughput'), ',.0f')} | {_fmt(p.get('memory_gib'), '.2f')} "
                     f"| {_fmt(p.get('params'), ',')} | {s.get('status', '–')} |")
    return lines + [""] if found else []


def _predicted_speedup(row: dict[str, Any], parent_row: dict[str, Any]) -> float | None:
    """The speedup `evaluate` predicted from the run's costs table (the one solve used); for results
    written before evaluate recorded it, the ratio of the two rows' predicted throughputs."""
    pred, parent_pred = row.get("predicted", {}), parent_row.get("predicted", {})
    if "speedup" in pred:
        return pred["speedup"]
    if pred.get("throughput_tokens_s") and parent_pred.get("throughput_tokens_s"):
        return pred["throughput_tokens_s"] / parent_pred["throughput_tokens_s"]
    return None


def _evaluation_section(run: RunDir) -> list[str]:
    rows = [read_json(run.eval_result(name)) for name in run.eval_names()]
    if not rows:
        return []
    lines = ["## Evaluation against the parent", "",
             "| model | params | val ppl | KL to parent | top-1 agreement | MC acc (norm) | prefill tok/s | decode tok/s | predicted speedup |",
             "|---|---|---|---|---|---|---|---|---|"]
    parent_row = next((r for r in rows if r.get("name") == "parent"), {})
    measured = {r.get("name"): r["measured"] for r in rows if r.get("measured")}
    borrowed = False
    # the parent first, then (after teacher correction) the parent it was corrected from, then the rest
    for r in sorted(rows, key=lambda r: (r.get("name") != "parent", r.get("name") != ORIGINAL, r.get("name"))):
        v, m = r.get("validation", {}), r.get("measured", {})
        after_gkd = RunDir.gkd_name(str(r.get("name")))
        if not m and after_gkd in measured:  # same architecture, so the same speed
            m, borrowed = measured[after_gkd], True
        elif not m and r.get("name") == ORIGINAL and "parent" in measured:  # the corrected parent's shapes
            m, borrowed = measured["parent"], True
        mc = next(iter(r.get("multiple_choice", {}).values()), {})
        mc_text = f"{mc['acc']:.3f} ({mc['acc_norm']:.3f})" if mc else "–"
        speedup = _predicted_speedup(r, parent_row)
        lines.append(f"| {r.get('name')} | {r.get('params', 0) / 1e6:.1f}M | {_fmt(v.get('perplexity'), '.3f')} "
                     f"| {_fmt(v.get('kl'))} | {_fmt(v.get('top1_agreement'), '.3f')} | {mc_text} "
                     f"| {_fmt(m.get('prefill_tokens_per_s'), ',.0f')} | {_fmt(m.get('decode_tokens_per_s'), ',.0f')} "
                     f"| {_fmt(speedup, '.2f')}{'x' if speedup else ''} |")
    notes = ["", "KL and agreement are per token on the validation blocks; tokens/s measured on this machine;"
             " the predicted speedup is the throughput ratio to the parent from the run's costs table for the"
             " hardware profile (the one solve used; the roofline for a model of another shape than the parent)."]
    if any(r.get("name") == ORIGINAL for r in rows):
        notes.append(f"`parent` is the teacher-corrected parent (the reference of every KL); `{ORIGINAL}` is the "
                     "parent before teacher correction, evaluated against it.")
    if borrowed:
        notes.append("A model before GKD shows the tokens/s measured after GKD: GKD changes weights, not shapes "
                     "(so does teacher correction: the original parent shows the corrected one's).")
    return lines + notes + [""]


def _teacher_lines(run: RunDir, info: dict[str, Any]) -> list[str]:
    """After teacher correction: both parents, and what the correction trained on."""
    if ORIGINAL not in info:
        return []
    record = read_json(run.teacher_record) if run.teacher_record.is_file() else {}
    before, after = record.get("val_before", {}), record.get("val", {})
    trained = (f" ({record.get('step')} steps, {record.get('tokens', 0):,} tokens; validation LM loss "
               f"{_fmt(before.get('lm_loss'))} -> {_fmt(after.get('lm_loss'))})") if record else ""
    return [f"Teacher correction: the parent above is `{info[ORIGINAL]}` fine-tuned on this run's data by "
            f"puzzle correct-teacher{trained}; every stage after prepare-data used the corrected parent.", ""]
def _router_section(run: RunDir) -> list[str]:
    """Each evaluated MoE model's router load (evaluate/router.py) as one panel: per layer, every expert's share
    of the routing as a point, the balanced share 1/E as a dash."""
    loads = {}
    for name in run.eval_names():
        row = read_json(run.eval_result(name))
        if row.get("router_load"):
            loads[row.get("name", name)] = row["router_load"]
    if not loads:
        return []
    plot_router_load(run.report_router_load, loads)
    return ["## Router load", "", f"![router load per expert and layer]({run.report_router_load.name})", "",
            "Each point is one expert's share of its layer's routing slots (a token sent to k experts fills k) on "
            "the validation blocks; the dash is the share of a balanced router, 1/E.", ""]


def plot_router_load(path: Path, loads: dict[str, dict[str, list[float]]]) -> Path:
    """One panel per model: x the layer, y each expert's load (fraction of the layer's routing)."""
    from matplotlib.figure import Figure  # the Agg canvas, no pyplot state (as solver/pareto.py)

    fig = Figure(figsize=(6.4, 2.4 * len(loads)), dpi=110)
    for row, (name, layers) in enumerate(sorted(loads.items(), key=lambda kv: (kv[0] != "parent", kv[0]))):
        ax = fig.add_subplot(len(loads), 1, row + 1)
        for layer, fractions in layers.items():
            x = int(layer)
            ax.scatter([x] * len(fractions), fractions, s=10, color="C0", alpha=0.7, zorder=3)
            ax.hlines(1 / len(fractions), x - 0.3, x + 0.3, color="C3", zorder=2)
        ax.set_xticks(sorted(int(layer) for layer in layers))
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("load")
        ax.grid(alpha=0.3)
    fig.axes[-1].set_xlabel("layer")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def _architectures_section(run: RunDir) -> list[str]:
    lines = []
    for arch in sorted(run.children.glob("*/architecture.md")):
        lines += [f"## Architecture of `{arch.parent.name}`", "", arch.read_text(), ""]
    return lines


def _stages_section(run: RunDir) -> list[str]:
    path = run.ledger
    if not path.exists():
        return []
    ledger = read_json(path)
    lines = ["## Stage wall times", "", "| stage | wall s |", "|---|---|"]
    lines += [f"| {name} | {entry.get('wall_s', 0):.1f} |" for name, entry in ledger.items()]
    total = sum(e.get("wall_s", 0) for e in ledger.values())
    return lines + [f"| **total** | **{total:.1f}** |", ""]


@writes_run_dir("report")
def report(run_dir: Path = Path("runs/default")) -> Path:
    """Write run_dir/report.md (and run_dir/pareto.png when a sweep was solved).

    Args:
        run_dir: the run directory to report on
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PuzzleError(f"run directory not found: {run_dir}")
    run = RunDir(run_dir)
    info = run.info()
    lines = [f"# Puzzle run `{run_dir.name}`", ""]
    if info:
        lines += [f"Parent: `{info.get('parent')}`; search space: `{info.get('search_space', '–')}`.", ""]
    lines += _teacher_lines(run, info)
    if run.pareto_png.exists():
        shutil.copyfile(run.pareto_png, run.report_pareto)
        lines += ["## Pareto frontier", "", f"![quality vs predicted speedup]({run.report_pareto.name})", ""]
    lines += _solutions_section(run) + _evaluation_section(run) + _router_section(run) + _architectures_section(run)
    lines += _stages_section(run)
    out = atomic_write_text(run.report, "\n".join(lines))
    print(f"wrote {out}")
    return out
