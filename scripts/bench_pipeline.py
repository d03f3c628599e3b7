"""Wall time of the quick config end to end on the reference parent, from a fresh run directory.

Runs `puzzle run configs/smollm2_quick.yaml --run-dir runs/bench_pipeline` (the demo's job; the run
directory is removed first unless --resume) and reports each stage's wall time as the pipeline's ledger
recorded it, against the 20-minute goal for 2 CPU cores, with the metrics of the child it produced (so
the timing is of a run that did its work). Writes benchmarks/pipeline.json and benchmarks/pipeline.md.

    .venv/bin/python scripts/bench_pipeline.py [--config configs/smollm2_quick.yaml] [--resume]
"""

import argparse
import os
import platform
import shutil
from pathlib import Path

import torch
import transformers

from puzzle.io import atomic_write_json, atomic_write_text, read_json
from puzzle.pipeline import run
from puzzle.run_dir import RunDir

REPO = Path(__file__).resolve().parents[1]
GOAL_S = 20 * 60


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "smollm2_quick.yaml")
    ap.add_argument("--run-dir", type=Path, default=REPO / "runs" / "bench_pipeline")
    ap.add_argument("--resume", action="store_true", help="keep the run directory (stage times stay from the ledger)")
    args = ap.parse_args()
    if args.run_dir.exists() and not args.resume:
        shutil.rmtree(args.run_dir)
    run(args.config, run_dir=args.run_dir)
    rd = RunDir(args.run_dir)
    ledger = read_json(rd.ledger)
    evals = {name: read_json(rd.eval_result(name)) for name in rd.eval_names()}
    payload = {
        "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
        "stages": {k: v["wall_s"] for k, v in ledger.items()},
        "total_s": round(sum(v["wall_s"] for v in ledger.values()), 1),
        "goal_s": GOAL_S,
        "first_finished_at": min(v["finished_at"] for v in ledger.values()),
        "last_finished_at": max(v["finished_at"] for v in ledger.values()),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "models": {name: {"kl": e["validation"].get("kl"), "perplexity": e["validation"]["perplexity"],
                          "top1_agreement": e["validation"].get("top1_agreement"), "params": e["params"],
                          "mc": next(iter(e.get("multiple_choice", {}).values()), None),
                          "decode_tokens_per_s": e.get("measured", {}).get("decode_tokens_per_s")}
                   for name, e in evals.items()},
    }
    atomic_write_json(REPO / "benchmarks" / "pipeline.json", payload)
    atomic_write_text(REPO / "benchmarks" / "pipeline.md", render(payload))
    print(render(payload))


def render(p: dict) -> str:
    m = p["machine"]
    verdict = "within" if p["total_s"] <= p["goal_s"] else "over"
    lines = [
        "# The quick config end to end (SmolLM2-135M-Instruct)", "",
        f"Command: `.venv/bin/python scripts/bench_pipeline.py` = `puzzle run {p['config']}` in a fresh run directory. "
        f"Machine: {m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), transformers {m['transformers']}, "
        f"{m['platform']}. Stage times are the pipeline ledger's (`pipeline.json`), stages finished "
        f"{p['first_finished_at']} .. {p['last_finished_at']}.", "",
        f"**Total: {p['total_s']:.0f} s ({p['total_s'] / 60:.1f} min), {verdict} the {p['goal_s'] // 60}-minute goal.**", "",
        "| stage | s |", "|---|---|",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in p["stages"].items()]
    lines += ["", "What the run produced (validation KL / perplexity against the parent):", "",
              "| model | params | KL | ppl | top-1 agreement | cloze MC acc (norm) | CPU decode tok/s |",
              "|---|---|---|---|---|---|---|"]
    for name, e in p["models"].items():
        kl = "–" if e["kl"] is None else f"{e['kl']:.4f}"
        agree = "–" if e["top1_agreement"] is None else f"{e['top1_agreement']:.3f}"
        mc = "–" if not e.get("mc") else f"{e['mc']['acc']:.3f} ({e['mc']['acc_norm']:.3f})"
        decode = "–" if e.get("decode_tokens_per_s") is None else f"{e['decode_tokens_per_s']:.1f}"
        lines.append(f"| {name} | {e['params'] / 1e6:.1f}M | {kl} | {e['perplexity']:.2f} | {agree} | {mc} | {decode} |")
    if any(e.get("decode_tokens_per_s") is None and RunDir.gkd_name(n) in p["models"] for n, e in p["models"].items()):
        lines += ["", "A model before GKD is not timed on the CPU: GKD changes its weights, not its shapes, so its"
                  " speed is the GKD model's."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
