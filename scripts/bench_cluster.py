"""BLD and scoring wall time on 1 vs 2 Ray workers on this machine, and `puzzle plan`'s estimate for
Llama-3.1-70B on one 8xH100 node beside the reported setups -> benchmarks/cluster.{md,json}.

    python scripts/bench_cluster.py                       # the full table (minutes; run on an idle machine)
    python scripts/bench_cluster.py --layers 2 --hidden 64 --tokens-per-block 256 --blocks 4 --out /tmp/c

A random Llama parent of the given shape (saved as safetensors) and random prepared data; a local Ray head
started here (tests/ray_head.py `local_head`: `ray start --head --block`, 2 CPUs, stopped at the end) that each build joins; per worker
count a fresh run directory, `build_library(workers=N)` then `score(workers=N)`, timed from the call (Ray
tasks, the preflight, shipping inputs, streaming results included). The plan rows come from
`puzzle.plan.plan` on Meta's published Llama-3.1-70B config.json (written here, no weights), in bf16
(what `--dtype auto` resolves to on CUDA).

    python scripts/bench_cluster.py --plan-only           # only the plan section again, the timings kept
                                                          # from the existing benchmarks/cluster.json
"""

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "token")  # before ray is imported (it reads the token then)
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from ray_head import local_head  # noqa: E402

sys.path.insert(0, str(REPO))
from puzzle.units import GIB  # noqa: E402

# Meta's published Llama-3.1-70B config.json dimensions (as in tests/test_plan.py)
LLAMA_70B = dict(vocab_size=128256, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, intermediate_size=28672, max_position_embeddings=131072, rms_norm_eps=1e-5,
                 rope_theta=500000.0, tie_word_embeddings=False, dtype="bfloat16")
REPORTED = [  # what we could cite; "-" where the source we read does not say
    ("Puzzle paper (arXiv 2411.19146, abstract)", "Llama-3.1-70B-Instruct -> Nemotron-51B", "-",
     "<= 45B training tokens; the child fits one H100, 2.17x throughput"),
    ("Puzzletron (nvidia-modelopt `examples/puzzletron/README.md`, its progress log)", "Llama-3.1-8B-Instruct", "2x H100 80GB",
     "46 min: one-block scoring 38 min; no block training, distillation a separate NeMo step"),
]


def make_parent(out: Path, args: argparse.Namespace) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads // 2,
                         max_position_embeddings=args.seq_len, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


def write_data(run: Path, args: argparse.Namespace) -> Path:
    out = run / "data"
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = {"train": args.train_blocks, "val": args.blocks}
    for split, count in n.items():
        rng.integers(3, args.vocab, size=(count, args.seq_len), dtype=np.uint32).tofile(out / f"{split}.bin")
    meta = {"seq_len": args.seq_len, "dtype": "uint32", "n_train_blocks": n["train"], "n_val_blocks": n["val"],
            "fingerprint": "bench_cluster"}
    (out / "meta.json").write_text(json.dumps(meta))
    return run


def _imports() -> int:
    import puzzle.library.ray_jobs  # noqa: F401  (torch, transformers, puzzle: what every job imports first)
    import puzzle.scoring.ray_jobs  # noqa: F401

    return os.getpid()


def warm_workers(n: int) -> None:
    """Start `n` Ray worker processes and import the package in each, so neither column pays for a cold
    worker (several seconds here) that the other does not."""
    import ray

    # the runtime env the stages' tasks use: Ray starts separate workers per runtime env
    task = ray.remote(_imports).options(num_cpus=1, runtime_env={"env_vars": {"TQDM_DISABLE": "1"}})
    pids: set[int] = set()
    for _ in range(10):
        pids |= set(ray.get([task.remote() for _ in range(n)]))
        if len(pids) >= n:
            return


def time_stages(parent: Path, root: Path, workers: int, args: argparse.Namespace) -> dict:
    from puzzle.library.commands import build_library
    from puzzle.scoring.commands import score

    run = write_data(root / f"run-{workers}", args)  # fresh: nothing to resume
    t0 = time.perf_counter()
    build_library(run, parent, search_space=args.search_space, tokens_per_block=args.tokens_per_block, batch_size=4,
                  calibration_tokens=args.tokens_per_block, eval_tokens=args.seq_len * 4, workers=workers, threads=1)
    bld = time.perf_counter() - t0
    t0 = time.perf_counter()
    score(run, parent, search_space=args.search_space, blocks=args.blocks, batch_size=2, workers=workers)
    return {"workers": workers, "build_library_s": bld, "score_s": time.perf_counter() - t0}


def plan_70b(root: Path) -> dict:
    from transformers import LlamaConfig

    from puzzle.plan import plan

    parent = root / "llama-3.1-70b"
    LlamaConfig(**LLAMA_70B).save_pretrained(parent)
    (root / "corpus").mkdir(exist_ok=True)
    config = {"run_dir": str(root / "plan-run"), "parent": str(parent), "corpus": str(root / "corpus"),
              "search_space": "llama_default", "prepare_data": {"seq_len": 4096, "max_tokens": 1_000_000_000},
              "build_library": {"tokens_per_block": 1_000_000, "batch_size": 8, "workers": "auto", "dtype": "bf16"},
              "score": {"blocks": 64, "batch_size": 4, "device": "cuda", "workers": "auto", "dtype": "bf16"},
              "solve": [{"budget": "h100_80gb", "speedup": 2.0, "name": "s"}], "realize": [{"solution": "s"}]}
    path = root / "plan_70b.yaml"
    path.write_text(yaml.safe_dump(config))
    # one DGX H100 node: 8 x H100 80 GB, 2 TiB of host memory (NVIDIA's DGX H100 datasheet)
    return plan(path, device="cuda", gpus=8, gpu_memory_gib=80, host_memory_gib=2048, budget="h100_80gb",
                cpu_gflops=1000)


def write_report(out: Path, timings: list[dict], planned: dict, args: argparse.Namespace, command: str) -> None:
    one, two = timings
    steps = {s["step"]: s for s in planned["steps"]}
    lines = ["# Ray: 1 vs 2 workers, and the plan for Llama-3.1-70B on 8xH100", "",
             f"Regenerate: `{command}` (the plan section alone: `python scripts/bench_cluster.py --plan-only`). "
             "Parent: random Llama, "
             f"{args.layers} layers, hidden {args.hidden}, FFN {args.ffn}; search space `{args.search_space}`; "
             f"BLD {args.tokens_per_block} tokens per variant; score {args.blocks} blocks. A local Ray head with "
             "2 CPUs on this machine (shared with other work: treat single runs as indicative).", "",
             "| stage | 1 worker (s) | 2 workers (s) | ratio |", "|---|---:|---:|---:|"]
    for stage in ("build_library", "score"):
        a, b = one[f"{stage}_s"], two[f"{stage}_s"]
        lines.append(f"| {stage} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    lines += ["", "## `puzzle plan`: Llama-3.1-70B, one node of 8 x H100 80 GB, 2 TiB host", "",
              "Every stage in bf16 (`--dtype auto` on CUDA): the parent held in bf16; BLD's variants trained in fp32 "
              "with fp32 AdamW under bf16 autocast; times at the h100_80gb profile's bf16 peak x its efficiency.", "",
              "| step | runs on | workers | host GiB | GPU GiB (per GPU) | fits 80 GB | time |", "|---|---|---:|---:|---:|---|---:|"]
    gpu = planned["machine"]["gpu_bytes"]
    for name in ("build_library", "score"):
        s = steps[name]
        fits = "-" if s["runs_on"] != "cuda" else ("yes" if s["gpu_bytes"] <= gpu else "**no**")
        lines.append(f"| {name} | {s['runs_on']} {s['dtype']} | {s['workers']} | {s['host_bytes'] / GIB:.0f} | "
                     f"{s['gpu_bytes'] / GIB:.0f} | {fits} | {s['seconds'] / 3600:.1f} h |")
    lines += ["", f"build_library: {steps['build_library']['note']}. A BLD worker runs the parent up to its layers' "
              "last one: the worker of the last layers holds (almost) the whole bf16 parent. The bf16 70B parent "
              f"({planned['parent']['fp32_bytes'] / 2 / GIB:.0f} GiB) exceeds one H100: score and the late layers' BLD "
              "jobs cannot run on one GPU until the parent is split across GPUs (not implemented), whatever "
              "`worker_memory_gib` is."]
    lines += ["", "Warnings: " + ("; ".join(w for s in planned["steps"] for w in s["warnings"]) or "none"), "",
              "## Reported setups", "", "| source | parent -> child | hardware | reported |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in REPORTED]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"timings": timings, "plan_70b": {k: steps[k] for k in ("build_library", "score")},
                                                    "machine_70b": planned["machine"], "settings": vars(args),
                                                    "command": command}, indent=2, default=str) + "\n")


def plan_only(out: Path) -> None:
    """The plan section again from today's planner; the timings (and the settings that produced them) read
    back from `out`'s JSON, nothing timed."""
    from puzzle.errors import PuzzleError

    path = out.with_suffix(".json")
    if not path.exists():
        raise PuzzleError(f"--plan-only needs {path} from a full run (python scripts/bench_cluster.py)")
    before = json.loads(path.read_text())
    settings = {k: v for k, v in before["settings"].items() if k != "plan_only"}
    settings["out"] = out
    root = Path(tempfile.mkdtemp(prefix="bench_cluster_plan"))
    try:
        planned = plan_70b(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    command = before.get("command") or "python scripts/bench_cluster.py " + " ".join(  # a JSON from before "command"
        f"--{k.replace('_', '-')} {v}" for k, v in settings.items() if k != "out")
    write_report(out, before["timings"], planned, argparse.Namespace(**settings), command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=768)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--train-blocks", type=int, default=256)
    parser.add_argument("--tokens-per-block", type=int, default=4096)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--search-space", default="tiny")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "cluster")
    parser.add_argument("--plan-only", action="store_true",
                        help="recompute only the Llama-3.1-70B plan section; timings from the existing JSON")
    args = parser.parse_args()
    if args.plan_only:
        plan_only(args.out)
        print(args.out.with_suffix(".md").read_text())
        return

    import ray

    root = Path(tempfile.mkdtemp(prefix="bench_cluster"))
    parent = make_parent(root / "parent", args)
    with local_head(num_cpus=2, object_store_bytes=200 * 2**20) as head:
        ray.init(address=head.address, log_to_driver=False)
        try:
            warm_workers(2)
            time_stages(parent, root / "warm-up", 2, args)  # untimed: the preflight's probe workers, first imports
            timings = [time_stages(parent, root, n, args) for n in (1, 2)]
        finally:
            ray.shutdown()
    planned = plan_70b(root)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_report(args.out, timings, planned, args,
                 "python scripts/bench_cluster.py " + " ".join(a for a in sys.argv[1:]))
    shutil.rmtree(root, ignore_errors=True)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
