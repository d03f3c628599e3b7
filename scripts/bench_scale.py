"""Memory and time per stage on random Llama parents of growing size, next to `puzzle plan`'s prediction.

For each shape: a random-initialised Llama saved as bf16 safetensors (built on the meta device and filled
layer by layer, so writing it holds one copy), a small corpus, then each stage as its own `puzzle` process
with small token budgets: prepare-data, build-library (--no-ray, one worker, --worker-memory-gib), score,
profile (roofline), solve, realize, evaluate. For each stage: the peak RSS of the whole process tree
(psutil, polled every 50 ms over the process and its children), the wall time, and the host memory
`puzzle plan`'s estimator (puzzle/plan.py ESTIMATORS, the function `puzzle plan` calls) predicts for the
same arguments, and the bf16 bytes of the parent.

    python scripts/bench_scale.py --shapes smollm2 --out benchmarks/scale      -> benchmarks/scale.{md,json}
    python scripts/bench_scale.py --shapes tiny --out /tmp/scale_check          (a check that it runs)

The large shapes (1b, 8b_slice) need ~10-30 GiB of free host memory; run them on a machine of their own.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))

GIB = 2**30
# name -> LlamaConfig fields (the shapes: the reference SmolLM2 parent, a ~1.2B Llama, and a slice of
# a few Llama-3.1-8B layers); `tiny` only checks that the script runs.
SHAPES = {
    "tiny": dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "8b_slice": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}
SEQ_LEN = 64
# Small token budgets: memory is what is measured; time scales with these.
STAGE_ARGS = {
    "build_library": dict(tokens_per_block=512, batch_size=4, calibration_tokens=512, eval_tokens=256, workers=1),
    "score": dict(blocks=4, batch_size=4),
    "evaluate": dict(val_blocks=4, batch_size=4),
}


def write_parent(out: Path, fields: dict) -> Path:
    """A random Llama in bf16 safetensors (+ the tests' tiny tokenizer: ids < 320 fit every vocabulary)."""
    import torch
    from conftest import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    config = LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, **fields)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    model.to(torch.bfloat16)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.02) if p.ndim == 2 else p.fill_(1.0)
    model.save_pretrained(out, safe_serialization=True)
    make_tokenizer().save_pretrained(out)
    return out


def write_corpus(out: Path) -> Path:
    from conftest import SAMPLE_TEXT

    out.mkdir(parents=True, exist_ok=True)
    for i in range(8):
        (out / f"doc{i}.txt").write_text("\n".join(SAMPLE_TEXT * 40))
    return out


def run_measured(argv: list[str]) -> dict:
    """`puzzle ARGV` in a fresh process: peak RSS of its process tree (bytes) and wall seconds."""
    cmd = [sys.executable, "-c", "import sys; from puzzle.cli import main; sys.exit(main(sys.argv[1:]))", *argv]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"puzzle {' '.join(argv)} failed:\n{out[-3000:]}")
    return {"peak_bytes": peak, "wall_s": time.perf_counter() - t0}


def flags(args: dict) -> list[str]:
    out = []
    for k, v in args.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def predicted(parent: Path, stage: str, space: str, args: dict) -> float:
    """The host bytes `puzzle plan` predicts for this stage and these arguments."""
    from puzzle import plan as planner
    from puzzle.model.checkpoint import load_config
    from puzzle.search_space import load_search_space
    from puzzle.shape import ModelShape
    from puzzle.stages import BY_NAME

    config = load_config(parent)
    machine = planner.Machine("cpu", 0, host_bytes=0, gpu_bytes=0, cpu_flops=1, gpu_flops=0, throughput_note="")
    ctx = planner.Context(config, ModelShape.from_config(config), load_search_space(space, config), SEQ_LEN, 0, machine)
    return planner.ESTIMATORS[stage](ctx, planner.stage_arguments(BY_NAME[stage].load(), args)).host_bytes


def bench_shape(name: str, work: Path, space: str, worker_gib: float | None) -> dict:
    from puzzle.shape import ModelShape
    from puzzle.model.checkpoint import load_config

    parent = write_parent(work / name / "parent", SHAPES[name])
    corpus = write_corpus(work / "corpus")
    run = work / name / "run"
    shape = ModelShape.from_config(load_config(parent))
    bld = dict(STAGE_ARGS["build_library"], **({"worker_memory_gib": worker_gib} if worker_gib else {}))
    bld["calibration_tokens"] = max(bld["calibration_tokens"], shape.hidden_size)  # a linear FFN's least squares
    steps = [
        ("prepare_data", ["prepare-data", str(corpus), str(parent), "--run-dir", str(run), "--seq-len", str(SEQ_LEN)], None),
        ("build_library", ["build-library", "--run-dir", str(run), "--parent", str(parent), "--search-space", space,
                           "--no-ray", *flags(bld)], bld),
        ("score", ["score", "--run-dir", str(run), *flags(STAGE_ARGS["score"])], STAGE_ARGS["score"]),
        ("profile", ["profile", "--run-dir", str(run), "--budget", "h100_80gb"], None),
        ("solve", ["solve", "--run-dir", str(run), "--budget", "h100_80gb", "--speedup", "1.5", "--name", "s15"], None),
        ("realize", ["realize", "--run-dir", str(run), "--solution", "s15"], {}),
        ("evaluate", ["evaluate", str(run / "children" / "s15"), "--run-dir", str(run), "--budget", "none",
                      "--no-measure", *flags(STAGE_ARGS["evaluate"])], STAGE_ARGS["evaluate"]),
    ]
    rows = []
    for stage, argv, args in steps:
        measured = run_measured(argv)
        plan = predicted(parent, stage, space, {k: v for k, v in args.items()}) if args is not None else None
        rows.append({"stage": stage, **measured, "plan_bytes": plan})
        print(f"{name} {stage}: {measured['peak_bytes'] / GIB:.2f} GiB, {measured['wall_s']:.1f} s"
              + (f", plan {plan / GIB:.2f} GiB" if plan else ""), flush=True)
    return {"shape": name, "fields": SHAPES[name], "params": shape.total_params(),
            "bf16_bytes": shape.model_bytes(None, 2), "worker_memory_gib": worker_gib, "stages": rows}


def markdown(results: list[dict]) -> str:
    lines = ["# Memory and time per stage at scale (scripts/bench_scale.py)", "",
             "Random Llama parents in bf16 safetensors; each stage a fresh `puzzle` process with small token budgets "
             f"(seq_len {SEQ_LEN}; {json.dumps(STAGE_ARGS)}). Peak RSS of the whole process tree (psutil, 50 ms); "
             "`plan`: puzzle/plan.py's estimator for the same arguments (it leaves out the interpreter and torch, "
             "~0.3-0.5 GiB: prepare-data's row is about that baseline). Calibration tokens are raised to the hidden "
             "size where smaller (the linear FFN's least squares). The stages load the parent in fp32 today (the "
             "dtype work makes that bf16); realize stores the child in the parent's bf16.", ""]
    missing = [s for s in SHAPES if s != "tiny" and s not in {r["shape"] for r in results}]
    if missing:
        lines += [f"Not measured here: {', '.join(missing)} (`--shapes {' '.join(missing)}` on a machine of their "
                  "own: they need ~10-30 GiB of free host memory).", ""]
    for r in results:
        lines += [f"## {r['shape']}: {r['params'] / 1e9:.3f}B parameters, {r['bf16_bytes'] / GIB:.2f} GiB in bf16"
                  + (f", --worker-memory-gib {r['worker_memory_gib']}" if r["worker_memory_gib"] else ""), "",
                  "| stage | peak RSS GiB | plan GiB | measured / plan | peak / bf16 parent | wall s |",
                  "|---|---|---|---|---|---|"]
        for s in r["stages"]:
            plan = s["plan_bytes"]
            ratio = f"{s['peak_bytes'] / plan:.2f}" if plan else "-"
            lines.append(f"| {s['stage']} | {s['peak_bytes'] / GIB:.2f} | {plan / GIB:.2f} | {ratio} | "
                         f"{s['peak_bytes'] / r['bf16_bytes']:.2f} | {s['wall_s']:.1f} |" if plan else
                         f"| {s['stage']} | {s['peak_bytes'] / GIB:.2f} | - | - | "
                         f"{s['peak_bytes'] / r['bf16_bytes']:.2f} | {s['wall_s']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["smollm2", "1b", "8b_slice"], choices=list(SHAPES))
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_scale")
    ap.add_argument("--search-space", default="tiny")
    ap.add_argument("--worker-memory-gib", type=float, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "scale")
    a = ap.parse_args()
    results = [bench_shape(name, a.work, a.search_space, a.worker_memory_gib) for name in a.shapes]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    a.out.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {a.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
