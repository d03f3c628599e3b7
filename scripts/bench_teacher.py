"""Teacher correction (Minitron) on the quick pipeline: the same config run twice, without and with a
`teacher_correction:` section, on a corpus the parent was not tuned on (the quick config's: the Python
documentation; SmolLM2-135M-Instruct is a chat-tuned model). Writes benchmarks/teacher.json and
benchmarks/teacher.md.

Each run's models are compared twice:
- against the run's own parent, as `puzzle run` evaluated them (the corrected parent in the corrected run);
- against the original parent, one reference for both runs (`evaluate --parent ORIGINAL` in a scratch run
  directory holding the same prepared data), so the two children's KL and agreement are on one scale.
Perplexity and the cloze accuracy (the run's held-out documents, identical in both runs) need no parent.

    .venv/bin/python scripts/bench_teacher.py [--config configs/smollm2_quick.yaml]
        [--correction '{steps: 64, batch_size: 4, lr: 2.0e-5}'] [--resume] [--out benchmarks/teacher]

Both runs share nothing but the config: each prepares its own data (the same blocks: checked), converts
its own parent, and so on. --resume keeps the run directories (a rerun reuses what is complete).
"""

import argparse
import os
import platform
import shutil
from pathlib import Path

import torch
import transformers
import yaml

from puzzle.evaluate.commands import evaluate
from puzzle.io import atomic_write_json, atomic_write_text, read_json
from puzzle.pipeline import RunConfig, run
from puzzle.run_dir import PARENT_ORIGINAL, RunDir

REPO = Path(__file__).resolve().parents[1]
# the quick config's correction: 64 steps of 4 x 256 tokens (65K tokens), a fine-tune's learning rate
DEFAULT_CORRECTION = {"steps": 64, "batch_size": 4, "lr": 2e-5, "min_lr": 2e-6, "warmup_steps": 4, "val_every": 32,
                      "val_blocks": 8, "checkpoint_every": 32}
RUNS = ("plain", "corrected")


def write_configs(config: Path, root: Path, correction: dict) -> dict[str, Path]:
    """The config twice under `root`, paths made absolute; the second with `teacher_correction: correction`."""
    cfg = RunConfig.load(config)  # resolves parent / corpus the way `puzzle run` does
    raw = yaml.safe_load(config.read_text())
    raw.update(parent=str(cfg.parent.resolve()), corpus=str(cfg.corpus.resolve()))
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in RUNS:
        raw_run = {**raw, "run_dir": str((root / name).resolve())}
        if name == "corrected":
            raw_run["teacher_correction"] = correction
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(raw_run, sort_keys=False))
    return paths


def reference_dir(root: Path, plain: RunDir, corrected: RunDir) -> Path:
    """A scratch run directory holding the prepared data both runs share (no parent.json: any reference)."""
    meta = [read_json(r.data / "meta.json")["fingerprint"] for r in (plain, corrected)]
    if meta[0] != meta[1]:
        raise SystemExit("the two runs prepared different data; compare on one corpus and one tokenizer")
    ref = root / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    shutil.copytree(plain.data, ref / "data")
    return ref


def against_original(ref: Path, runs: dict[str, RunDir], original: Path, ev: dict) -> dict[str, dict]:
    """Every model both runs evaluated, against the original parent, on the same blocks and cloze items."""
    mc = [str(runs["plain"].mc_tasks)] if runs["plain"].mc_tasks.exists() else None
    out: dict[str, dict] = {}
    for run_name, rd in runs.items():
        for name in rd.eval_names():
            model = Path(read_json(rd.eval_result(name))["model"])
            result = evaluate(model=model, parent=original, run_dir=ref, name=f"{run_name}__{name}", measure=False,
                              budget=None, mc_tasks=mc, val_blocks=ev.get("val_blocks", 32),
                              batch_size=ev.get("batch_size", 4))
            out.setdefault(run_name, {})[name] = summary(result)
    return out


def summary(e: dict) -> dict:
    v = e["validation"]
    mc = next(iter(e.get("multiple_choice", {}).values()), None)
    return {"perplexity": v["perplexity"], "kl": v.get("kl"), "top1_agreement": v.get("top1_agreement"),
            "mc_acc": mc and mc["acc"], "mc_acc_norm": mc and mc["acc_norm"], "params": e.get("params")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "smollm2_quick.yaml")
    ap.add_argument("--correction", type=yaml.safe_load, default=DEFAULT_CORRECTION,
                    help="the teacher_correction section (YAML mapping)")
    ap.add_argument("--root", type=Path, default=REPO / "runs" / "bench_teacher", help="where the two runs go")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "teacher", help="writes OUT.json and OUT.md")
    ap.add_argument("--resume", action="store_true", help="keep the run directories")
    args = ap.parse_args()
    if args.root.exists() and not args.resume:
        shutil.rmtree(args.root)
    configs = write_configs(args.config, args.root, args.correction)
    runs = {}
    for name in RUNS:
        print(f"== {name} run ==", flush=True)
        run(configs[name])
        runs[name] = RunDir(args.root / name)
    original = Path(runs["corrected"].info()[PARENT_ORIGINAL])
    ev = (RunConfig.load(configs["plain"]).sections.get("evaluate") or [{}])[0]
    cross = against_original(reference_dir(args.root, runs["plain"], runs["corrected"]), runs, original, ev)
    own = {n: {name: summary(read_json(rd.eval_result(name))) for name in rd.eval_names()} for n, rd in runs.items()}
    teacher = read_json(runs["corrected"].teacher_record)
    payload = {
        "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
        "correction": args.correction,
        "teacher": {k: teacher.get(k) for k in ("step", "tokens", "val_before", "val")},
        "own_parent": own, "original_parent": cross,
        "wall_s": {n: round(sum(v["wall_s"] for v in read_json(rd.ledger).values()), 1) for n, rd in runs.items()},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__, "transformers": transformers.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), payload)
    atomic_write_text(args.out.with_suffix(".md"), render(payload))
    print(render(payload))


def _f(x, spec=".4f") -> str:
    return "–" if x is None else format(x, spec)


def _table(rows: dict[str, dict[str, dict]], reference: str) -> list[str]:
    lines = [f"| run | model | ppl | KL to {reference} | top-1 agreement | cloze acc (norm) |", "|---|---|---|---|---|---|"]
    for run_name, models in rows.items():
        # the parents first (the corrected run's parent is the corrected one), then the children
        for name, m in sorted(models.items(), key=lambda kv: (kv[0] != "parent", kv[0] != PARENT_ORIGINAL, kv[0])):
            mc = "–" if m["mc_acc"] is None else f"{m['mc_acc']:.3f} ({m['mc_acc_norm']:.3f})"
            lines.append(f"| {run_name} | {name} | {_f(m['perplexity'], '.3f')} | {_f(m['kl'])} "
                         f"| {_f(m['top1_agreement'], '.3f')} | {mc} |")
    return lines


def render(p: dict) -> str:
    m, t = p["machine"], p["teacher"]
    lines = [
        "# Teacher correction on the quick pipeline", "",
        f"Command: `.venv/bin/python scripts/bench_teacher.py` = `puzzle run {p['config']}` twice, the second with "
        f"`teacher_correction: {p['correction']}`. Machine: {m['cpus']} CPUs, torch {m['torch']} "
        f"({m['torch_threads']} threads), transformers {m['transformers']}, {m['platform']}.", "",
        f"Correction: {t['step']} steps, {t['tokens']:,} tokens; the parent's validation LM loss "
        f"{_f(t['val_before'].get('lm_loss'))} -> {_f(t['val'].get('lm_loss'))}. Pipeline wall time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in p["wall_s"].items()) + ".", "",
        "## Against the original parent (one reference for both runs)", "",
        *_table(p["original_parent"], "original parent"), "",
        "## Against each run's own parent (as `puzzle run` evaluated them; the corrected run's is the corrected parent)", "",
        *_table(p["own_parent"], "run's parent"), "",
        "Perplexity and cloze accuracy are on the run's validation blocks and held-out documents, identical in both "
        "runs (the same prepared data).", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
