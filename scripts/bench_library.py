"""Benchmark `puzzle build-library` on the reference parent (SmolLM2-135M) with search_spaces/llama_default.yaml.

Writes benchmarks/library.json and benchmarks/library.md: the number of variants, tokens per variant, wall
time, the normalised MSE at initialisation and after BLD by variant, and the training GFLOP/s achieved next
to this machine's fp32 matmul GFLOP/s measured in the same run with the same parallelism (one process per
Ray worker, `--threads` threads each), before and after the build.

    .venv/bin/python scripts/bench_library.py                       # all 30 layers, 16k tokens per variant
    .venv/bin/python scripts/bench_library.py --layers 0 1 --tokens-per-block 2048   # a quick look

Training FLOPs are counted per step by BLD itself with the functions `puzzle plan` and the worker split
use (puzzle/library/cost.py `variant_train_flops`, `parent_layer_flops`): 6 x the trained variant's matrix
parameters per token, the attention scores (forward + 2x backward, causal half, at most the layer's window),
the frozen parent FFN after an attention variant (forward + input-gradient backward, 4 x its parameters),
plus the parent forward that feeds each batch (2 x parameters up to the group's last layer). The rate is
those FLOPs over the span in which the workers' training loops ran (first loop start to last loop end).
"""

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PARENT = REPO / "assets" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS = REPO / "assets" / "corpus" / "python-docs"
OUT = REPO / "benchmarks"
# The BLD matmuls: a batch of 4 x 256 tokens through a 576 -> 1536 projection (SmolLM2's FFN).
MATMUL_SHAPE = (1024, 576, 1536)


def _matmul_worker(threads: int, seconds: float, queue) -> None:
    import torch

    torch.set_num_threads(threads)
    m, k, n = MATMUL_SHAPE
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(5):
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        best = max(best, 2 * m * k * n * 10 / (time.perf_counter() - t0))
    queue.put(best)


def matmul_gflops(processes: int, threads: int, seconds: float = 4.0) -> float:
    """Aggregate fp32 matmul GFLOP/s of `processes` processes of `threads` threads running at once (best
    10-matmul burst of each, summed): the machine's rate at the build's parallelism."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_matmul_worker, args=(threads, seconds, queue)) for _ in range(processes)]
    for p in procs:
        p.start()
    rates = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    return sum(rates) / 1e9


def by_variant(records: list[dict]) -> list[dict]:
    rows = []
    names = sorted({(r["kind"], r["variant"]) for r in records}, key=lambda kv: (kv[0], _order(*kv)))
    for kind, name in names:
        rs = [r for r in records if r["kind"] == kind and r["variant"] == name]
        init = np.array([r["loss_init"] for r in rs])
        final = np.array([r["loss_final"] for r in rs])
        rows.append({
            "kind": kind, "variant": name, "layers": len(rs), "source": rs[0]["source"], "init": rs[0]["init"],
            "trainer": rs[0].get("trainer", "-"), "tokens": int(np.median([r["tokens"] for r in rs])),
            "loss_init_mean": float(init.mean()), "loss_final_mean": float(final.mean()),
            "loss_init_median": float(np.median(init)), "loss_final_median": float(np.median(final)),
            "improved": int((final < init).sum()),
        })
    return rows


def _order(kind: str, name: str) -> tuple:
    """GQA by group size, SwiGLU widest first, then linear and no-op."""
    from puzzle.model.blocks import sublayer_from_name

    cfg = sublayer_from_name(kind, name)
    if cfg.no_op or cfg.replace_with_linear:
        return (1, name)
    return (0, cfg.n_heads_in_group if kind == "attention" else -cfg.intermediate_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "bench_library")
    parser.add_argument("--tokens-per-block", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, nargs="+", default=None)
    parser.add_argument("--data-tokens", type=int, default=1_000_000, help="corpus tokens to prepare")
    parser.add_argument("--out-dir", type=Path, default=OUT)
    args = parser.parse_args()
    if not PARENT.exists():
        sys.exit(f"reference parent missing: run scripts/fetch_reference_assets.sh ({PARENT})")

    import torch

    from puzzle.data.prepare import prepare_data
    from puzzle.library import store
    from puzzle.library.commands import build_library

    run_dir = args.run_dir.resolve()
    t0 = time.perf_counter()
    prepare_data(CORPUS, PARENT, run_dir, seq_len=256, max_tokens=args.data_tokens)
    prepare_s = time.perf_counter() - t0

    processes = max(1, args.workers)
    mm_before = matmul_gflops(processes, args.threads)
    print(json.dumps({"event": "matmul", "when": "before", "gflops": mm_before}), flush=True)
    t0 = time.perf_counter()
    summary = build_library(
        run_dir, PARENT, search_space="llama_default", tokens_per_block=args.tokens_per_block,
        batch_size=args.batch_size, lr=args.lr, layers=args.layers, workers=args.workers, threads=args.threads,
        ray=args.workers > 0, address="local", force=True,
    )
    build_s = time.perf_counter() - t0
    mm_after = matmul_gflops(processes, args.threads)
    print(json.dumps({"event": "matmul", "when": "after", "gflops": mm_after}), flush=True)

    manifest = store.read_manifest(run_dir)
    records = list(manifest["variants"].values())
    trained = [r for r in records if r["source"] == "trained"]
    groups = [g for g in summary["groups"] if g.get("trained")]
    variant_flops = sum(r["flops"] for r in trained)
    parent_flops = sum(g["parent_forward_flops"] for g in groups)
    span = max(g["loop_end"] for g in groups) - min(g["loop_start"] for g in groups)
    achieved = (variant_flops + parent_flops) / span / 1e9
    per_group = sum((g["variant_flops"] + g["parent_forward_flops"]) / g["loop_s"] for g in groups) / 1e9
    reference = max(mm_before, mm_after)
    result = {
        "parent": str(PARENT.relative_to(REPO)),
        "search_space": "llama_default",
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "load_average_at_end": os.getloadavg()},
        "settings": {**manifest["settings"], "workers": args.workers, "threads_per_worker": args.threads,
                     "layers": args.layers or "all"},
        "variants": len(records),
        "trained": len(trained),
        "parent_or_noop": len(records) - len(trained),
        "tokens_per_variant": int(np.median([r["tokens"] for r in trained])),
        "steps_per_variant": int(np.median([r["steps"] for r in trained])),
        "wall_s": {"prepare_data": prepare_s, "build_library": build_s,
                   "training_loops_span": span, "groups": [{k: g[k] for k in ("layers", "calibration_s", "loop_s", "parent_forward_s", "wall_s")} for g in groups]},
        "flops": {"variants": variant_flops, "parent_forward": parent_flops},
        "gflops": {"training_achieved": achieved, "training_per_group_sum": per_group,
                   "matmul_before": mm_before, "matmul_after": mm_after, "matmul_reference": reference,
                   "fraction_of_matmul": achieved / reference, "matmul_shape": MATMUL_SHAPE},
        "by_variant": by_variant(records),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "library.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "library.md").write_text(render(result))
    print(render(result))


def render(r: dict) -> str:
    g, s, w = r["gflops"], r["settings"], r["wall_s"]
    lines = [
        "# Block library build (BLD) on the reference parent",
        "",
        "Generated by `scripts/bench_library.py`; numbers from one run, measured side by side. "
        f"Parent `{r['parent']}` (SmolLM2-135M-Instruct, 30 layers), search space `{r['search_space']}`, "
        f"layers: {s['layers']}. Machine: {r['machine']['cpus']} CPUs ({r['machine']['processor']}), torch "
        f"{r['machine']['torch']}, shared with other work (load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in r['machine']['load_average_at_end'])}).",
        "",
        "## What ran",
        "",
        f"- `build_library(..., tokens_per_block={s['tokens_per_block']}, batch_size={s['batch_size']}, lr={s['lr']}, "
        f"workers={s['workers']}, threads={s['threads_per_worker']})` on an embedded Ray, from scratch (`force=True`).",
        f"- {r['variants']} variants: {r['trained']} trained, {r['parent_or_noop']} parent-identical or no-op "
        "(measured, not trained, no file).",
        f"- Tokens per trained variant: {r['tokens_per_variant']} ({r['steps_per_variant']} steps of "
        f"{s['batch_size']} x {s['seq_len'] or 256} tokens); held-out loss on {s['eval_tokens']} validation tokens; "
        f"initialisation from {s['calibration_tokens']} calibration tokens.",
        f"- Wall time: build-library {w['build_library']:.0f} s in all (Ray start, each worker loading the "
        f"parent, calibration, initialisation, BLD, writing); the training loops spanned "
        f"{w['training_loops_span']:.0f} s.",
        "",
        "## Throughput",
        "",
        "| | GFLOP/s |",
        "|---|---|",
        f"| BLD training achieved (variants + parent forward, over the loops' span) | {g['training_achieved']:.1f} |",
        f"| fp32 matmul {g['matmul_shape'][0]}x{g['matmul_shape'][1]} @ {g['matmul_shape'][1]}x{g['matmul_shape'][2]}, "
        f"{s['workers']} process(es) x {s['threads_per_worker']} thread(s), before the build | {g['matmul_before']:.1f} |",
        f"| same, after the build | {g['matmul_after']:.1f} |",
        f"| **achieved / matmul (best of before/after)** | **{g['fraction_of_matmul']:.0%}** |",
        "",
        f"Training FLOPs counted: {r['flops']['variants'] / 1e12:.2f} TFLOP in the variants' steps and "
        f"{r['flops']['parent_forward'] / 1e12:.2f} TFLOP in the parent forwards that fed them. "
        "Counting rule in the script's docstring (6 x trained params per token, attention scores, the "
        "frozen FFN's forward and input-gradient backward after attention variants).",
        "",
        "## Normalised MSE by variant (held-out tokens; 0 = the parent, 1 = removing the FFN)",
        "",
        "| kind | variant | layers | source | init | trainer | tokens | mean at init | mean after BLD | median at init | median after BLD | improved |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["by_variant"]:
        improved = f"{row['improved']}/{row['layers']}" if row["source"] == "trained" else "-"
        lines.append(
            f"| {row['kind']} | {row['variant']} | {row['layers']} | {row['source']} | {row['init']} | {row['trainer']} | "
            f"{row['tokens']} | {row['loss_init_mean']:.4f} | {row['loss_final_mean']:.4f} | "
            f"{row['loss_init_median']:.4f} | {row['loss_final_median']:.4f} | {improved} |"
        )
    lines += [
        "",
        "Loss: ||child - parent||^2 / ||parent - input||^2 over the layer's output, i.e. MSE(child, parent) / "
        "MSE(parent, 0) on what the block adds to the residual stream; attention variants are measured "
        "through the parent's frozen FFN. The linear FFN's BLD is its exact least-squares solution over the "
        "calibration and training tokens; every other trained variant takes AdamW steps with cosine decay.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
