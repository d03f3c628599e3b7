"""Memory and time per stage on random Llama parents of growing size, next to `puzzle plan`'s prediction.

For each shape: a random-initialised Llama saved as bf16 safetensors (built on the meta device and filled
layer by layer, so writing it holds one copy), a small corpus, then each stage as its own `puzzle` process
with small token budgets and `--dtype bf16`: prepare-data, importance, build-library (--no-ray, one worker,
--worker-memory-gib), score, profile (roofline), solve, realize, evaluate, distill (GKD). `--dtype bf16` on
the CPU runs the code path a GPU run takes (the parent / teacher held in bf16, BLD variants and the GKD
student trained in fp32 under bf16 autocast), so the host memory measured here is what a bf16 run holds.
For each stage: the peak RSS of the whole process tree (psutil, polled every 50 ms over the process and its
children), the wall time, the host memory `puzzle plan`'s estimator (the stage's cost model, `Stage.estimate`,
what `puzzle plan` calls) predicts for the same arguments on a CPU machine, and the issue's goal: what
the stage must hold (the parent layers it uses and its activations in bf16 + its own trained state, in fp32
as autocast with fp32 AdamW requires and, strictly, at bf16's 2 bytes; computed here from ModelShape,
independently of plan.py) against the measured peak less the process baseline.

Then an extrapolation: `puzzle plan` of a Llama-3.1-8B config.json (written as tests/test_plan.py writes
it, no weights) on one and on two H100 80GB, the stages' default budgets.

    python scripts/bench_scale.py --shapes smollm2 1b --out benchmarks/scale      -> benchmarks/scale.{md,json}
    python scripts/bench_scale.py --shapes 1b --stages realize distill  (those stages again, the other rows kept)
    python scripts/bench_scale.py --shapes tiny --out /tmp/scale_check              (a check that it runs)
    python scripts/bench_scale.py --replan        (the plan columns and the extrapolation again, nothing run)
    python scripts/bench_scale.py --extrapolation-only   (the 8B extrapolation alone, from config.json files)

The large shapes (1b, 8b_slice) need ~5-30 GiB of free host memory; a stage whose plan exceeds 80% (or
--available-share) of the memory available when it starts is not run (its row says so).
"""

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))

from puzzle.dtypes import BYTES  # noqa: E402
from puzzle.units import GIB  # noqa: E402

BF16 = BYTES["bf16"]
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
DTYPE = "bf16"
# Small token budgets: memory is what is measured; time scales with these.
STAGE_ARGS = {
    "importance": dict(n_samples=8, batch_size=4, drop_samples=0),
    "build_library": dict(tokens_per_block=512, batch_size=4, calibration_tokens=512, eval_tokens=256, workers=1),
    "score": dict(blocks=2, batch_size=2),
    "evaluate": dict(val_blocks=4, batch_size=4),
    "distill": dict(steps=2, batch_size=2, val_every=2, val_blocks=2, checkpoint_every=2),
}
# Smaller still where a shape's time would run past a shared machine's half hour.
# build-library's --worker-memory-gib per shape: jobs sized to fit (the whole build at once would hold every
# variant's fp32 AdamW state: ~24 GiB for the 1b shape).
SHAPE_ARGS = {
    "smollm2": {"build_library": dict(worker_memory_gib=0.75)},
    "1b": {"importance": dict(n_samples=4, batch_size=2),
           "build_library": dict(tokens_per_block=256, batch_size=2, worker_memory_gib=4),
           "score": dict(blocks=1, batch_size=1), "evaluate": dict(val_blocks=2, batch_size=2)},
    "8b_slice": {"importance": dict(n_samples=4, batch_size=2),
                 "build_library": dict(tokens_per_block=256, batch_size=2, worker_memory_gib=8),
                 "score": dict(blocks=1, batch_size=1), "evaluate": dict(val_blocks=2, batch_size=2)},
}
# What a shape's run left out or needs said, in its section.
SHAPE_NOTES = {
    "1b": ("GKD (the realised 1.5x child, 1.03B parameters, from the parent) was run with `--available-share "
           "0.97`: its plan (21 GiB) is above the default 80% of this 24 GiB machine's free memory."),
    "8b_slice": ("Four Llama-3.1-8B layers (hidden 4096, FFN 14336, untied 128K vocabulary). GKD not run: "
                 "its plan (the child's fp32 weights, gradient and AdamW moments: 16 bytes x 1.6B parameters, and "
                 "the teacher) exceeds this machine's memory; on a GPU the plan puts it at 16 bytes per student "
                 "parameter on the device, or on the host with `cpu_offload`."),
}
# How benchmarks/scale.md was produced (said in its text): the shapes in turn, a stage measured again after a change
PRODUCED_BY = ("`python scripts/bench_scale.py --shapes smollm2 8b_slice --work W --out OUT` (OUT.{md,json} copied "
               "to benchmarks/scale.*), `--shapes 1b --available-share 0.97`, `--shapes 1b --stages distill "
               "--available-share 0.97` (the 1b's GKD again once the machine's other work had ended: the first "
               "found too little memory free), then `--replan` (every plan column from the estimators as committed)")
AVAILABLE_SHARE = 0.8  # run a stage only when its plan is below this share of the memory available


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
        if isinstance(v, bool):
            out.append(f"--{'' if v else 'no-'}{k.replace('_', '-')}")
        elif isinstance(v, list):  # list[int] arguments take several values (puzzle/cli.py: nargs "+")
            out += [f"--{k.replace('_', '-')}", *map(str, v)]
        else:
            out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def context(parent: Path, space: str):
    """The cost models' Context for `parent` on a CPU machine (this one: the stages run here)."""
    from puzzle.footprint import Context, Machine
    from puzzle.model.checkpoint import load_config
    from puzzle.search_space import load_search_space
    from puzzle.shape import ModelShape

    config = load_config(parent)
    machine = Machine("cpu", 0, host_bytes=psutil.virtual_memory().total, gpu_bytes=0, cpu_flops=1,
                      gpu_flops=0, throughput_note="")
    return Context(config, ModelShape.from_config(config), load_search_space(space, config), SEQ_LEN, 0, machine)


def predicted(ctx, stage: str, args: dict) -> float:
    """The host bytes `puzzle plan` predicts for this stage and these arguments (its baseline included)."""
    from puzzle.stages import BY_NAME

    return BY_NAME[stage].estimate(ctx, args).host_bytes


# ----- what a stage must hold, in bf16 (the goal), from ModelShape alone ------------------------


# Bytes per trained parameter of its weights, gradient and two AdamW moments together: 16 in fp32 (what the
# issue's "autocast with fp32 optimizer state" requires), 8 at bf16's 2 bytes each (the strict reading of
# "the bf16 bytes").
FP32_STATE, BF16_STATE = 16, 8


def must_hold(stage: str, shape, space, args: dict, run: Path, parent: Path, state_bytes: int = FP32_STATE) -> int | None:
    """Bytes of what `stage` must hold: the parent layers it uses in bf16 + its own trained state (at
    `state_bytes` per parameter) + its activations in bf16; None for the stages that hold no model
    (prepare-data, profile's roofline, solve)."""
    from puzzle.library.bld import BLDSettings
    from puzzle.library.ray_jobs import plan_jobs
    from puzzle.model.checkpoint import load_config

    D, V, L = shape.hidden_size, shape.vocab_size, shape.num_hidden_layers
    parent_bf16 = shape.model_bytes(None, BF16)
    layer_act = shape.activation_bytes_per_token(shape.parent_block, BF16)
    if stage == "importance":  # the LM head and logits only for drop-layer losses
        b, drop = args["batch_size"] * SEQ_LEN, args.get("drop_samples", 1) > 0
        return parent_bf16 - (0 if drop else shape.fixed_params("lm_head") * BF16) + b * (layer_act + drop * V * BF16)
    if stage == "build_library":  # the largest of the jobs the build runs one after another (the same partition)
        settings = BLDSettings(**{k: v for k, v in args.items() if k in BLDSettings.__dataclass_fields__ and k != 'dtype'},
                               dtype=DTYPE)
        budget = args.get("worker_memory_gib")
        layers = sorted(set(args.get("layers") or range(L)))
        jobs = plan_jobs(space, load_config(parent), settings, layers, 1, SEQ_LEN, budget * GIB if budget else None)
        b = settings.batch_size * SEQ_LEN

        def job_bytes(job) -> int:
            layers = (shape.fixed_params("embeddings") + (max(job.layers) + 1) * shape.params(shape.parent_block)) * BF16
            trained = [v for v in job.variants if not (v.is_parent or v.config.no_op)]
            state = sum(shape.params(v.config) for v in trained) * state_bytes
            act = max((shape.activation_bytes_per_token(v.config, BF16) * b for v in trained), default=0)
            held = len(job.layers) * 3 * D * BF16 * (settings.eval_tokens + b)  # h, a, o per layer
            return layers + state + act + held

        return max(job_bytes(job) for job in jobs)
    if stage == "score":
        b = args["batch_size"] * SEQ_LEN
        largest = max(shape.params(v.config) for v in space.variants())
        return parent_bf16 + largest * BF16 + b * (layer_act + V * BF16)
    blocks = load_config(run / "children" / "s15").blocks if (run / "children" / "s15").exists() else None
    child = shape.model_bytes(blocks, BF16)
    if stage == "realize":
        return child
    if stage == "evaluate":  # the parent against itself (no child realised) is one model
        b = args["batch_size"] * SEQ_LEN
        return parent_bf16 + (child if blocks else 0) + b * (layer_act + 2 * V * BF16)
    if stage == "distill":  # the teacher, the realised child trained, its activations for backward, the logits
        b = args["batch_size"] * SEQ_LEN
        act = sum(shape.activation_bytes_per_token(blk, BF16) for blk in blocks) if blocks else L * layer_act
        return parent_bf16 + shape.total_params(blocks) * state_bytes + b * (act + 2 * V * BF16)
    return None


def stage_args(name: str, stage: str) -> dict:
    return {**STAGE_ARGS.get(stage, {}), **SHAPE_ARGS.get(name, {}).get(stage, {})}


def bench_shape(name: str, work: Path, space: str, worker_gib: float | None, stages: list[str], out: Path,
                done: list[dict], prior: dict | None = None, share: float = AVAILABLE_SHARE) -> dict:
    """Run `stages` of shape `name`; the rows of the other stages are kept from `prior` (an earlier run's
    result for this shape), so one stage can be measured again after a change."""
    from puzzle.model.checkpoint import load_config

    parent = write_parent(work / name / "parent", SHAPES[name])
    corpus = write_corpus(work / "corpus")
    run = work / name / "run"
    ctx = context(parent, space)
    shape = ctx.shape
    bld = {**stage_args(name, "build_library"), **({"worker_memory_gib": worker_gib} if worker_gib else {})}
    worker_gib = bld.get("worker_memory_gib")
    bld["calibration_tokens"] = max(bld["calibration_tokens"], shape.hidden_size)  # a linear FFN's least squares
    low = {"dtype": DTYPE}
    gkd = stage_args(name, "distill")
    child = run / "children" / "s15"
    evaluated = child if "realize" in stages or child.exists() else parent  # the realised child, else the parent
    steps = [
        ("prepare_data", ["prepare-data", str(corpus), str(parent), "--run-dir", str(run), "--seq-len", str(SEQ_LEN)], None),
        ("importance", ["importance", str(parent), "--run-dir", str(run), *flags({**stage_args(name, "importance"), **low})],
         {**stage_args(name, "importance"), **low}),
        ("build_library", ["build-library", "--run-dir", str(run), "--parent", str(parent), "--search-space", space,
                           "--no-ray", *flags({**bld, **low})], {**bld, **low, "ray": False}),
        ("score", ["score", "--run-dir", str(run), "--no-ray", *flags({**stage_args(name, "score"), **low})],
         {**stage_args(name, "score"), **low, "ray": False}),
        ("profile", ["profile", "--run-dir", str(run), "--budget", "h100_80gb"], None),
        ("solve", ["solve", "--run-dir", str(run), "--budget", "h100_80gb", "--speedup", "1.5", "--name", "s15"], None),
        ("realize", ["realize", "--run-dir", str(run), "--solution", "s15"], {}),
        ("evaluate", ["evaluate", str(evaluated), "--run-dir", str(run), "--budget", "none",
                      "--no-measure", *flags({**stage_args(name, "evaluate"), **low})],
         {**stage_args(name, "evaluate"), **low, "model": str(evaluated), "parent": str(parent)}),
        ("distill", ["distill", "--teacher", str(parent), "--student", str(run / "children" / "s15"), "--run-dir", str(run),
                     "--out", str(run / "gkd"), "--no-resume", *flags({**gkd, **low})], {**gkd, **low, "student": str(child)}),
    ]
    ran_args = {s: a for s, _, a in steps if a is not None and s in stages}
    result = {"shape": name, "fields": SHAPES[name], "params": shape.total_params(), "bf16_bytes": shape.model_bytes(None, BF16),
              "worker_memory_gib": worker_gib,  # the kept rows' arguments as they ran, and the new ones'
              "stage_args": {**(prior or {}).get("stage_args", {}), **ran_args}, "stages": []}
    done.append(result)
    # what a stage would find done and skip when measured again (the others have --force / --no-resume flags
    # here, or are cheap and always recompute)
    outputs = {"build_library": run / "library", "score": run / "scores", "realize": child}
    earlier = {row["stage"]: row for row in (prior or {}).get("stages", [])}
    for stage, argv, args in steps:
        if stage not in stages:
            if stage in earlier:
                result["stages"].append(earlier[stage])
            continue
        plan = predicted(ctx, stage, args) if args is not None else None
        available = psutil.virtual_memory().available
        row = {"stage": stage, "plan_bytes": plan, "available_bytes": available}
        if plan is not None and plan > share * available:
            row["skipped"] = f"plan {plan / GIB:.1f} GiB > {share:.0%} of the {available / GIB:.1f} GiB available"
            print(f"{name} {stage}: not run ({row['skipped']})", flush=True)
        else:
            if stage in outputs and outputs[stage].exists():
                shutil.rmtree(outputs[stage])
            row.update(run_measured(argv))
            print(f"{name} {stage}: {row['peak_bytes'] / GIB:.2f} GiB, {row['wall_s']:.1f} s"
                  + (f", plan {plan / GIB:.2f} GiB" if plan else ""), flush=True)
        row["must_hold_bytes"] = must_hold(stage, shape, ctx.space, args or {}, run, parent)
        row["must_hold_bf16_state_bytes"] = must_hold(stage, shape, ctx.space, args or {}, run, parent, BF16_STATE)
        result["stages"].append(row)
        write(done, out)  # after every stage: a run cut short keeps what it measured
    return result


# ----- extrapolation: `puzzle plan` for Llama-3.1-8B on H100s -------------------------------------------

# nvidia-modelopt examples/puzzletron/README.md (read in the isomap/Model-Optimizer copy): its progress log for
# Llama-3.1-8B-Instruct with `torchrun --nproc_per_node 2` on 2x H100 80GB runs 12:06:34 -> 12:52:34.
PUZZLETRON_8B = ("Puzzletron (nvidia-modelopt `examples/puzzletron/README.md`, Llama-3.1-8B-Instruct, 2x H100 80GB): "
                 "46 min from start to realised model by its progress log (12:06:34 -> 12:52:34): convert 0.4 min, "
                 "pruning activations 4.5 min, pruning 0.7 min, replacement library (pruned checkpoints, no block "
                 "training) under 1 s, one-block scores 38.3 min, MIP + realize 1.9 min; distillation is a separate "
                 "NeMo step. Its library is not trained (no BLD) and there is no GKD in the 46 min: the comparable "
                 "figure here is the pipeline without build_library's training and without gkd")


def extrapolate(work: Path) -> list[dict]:
    """`puzzle plan` of a Llama-3.1-8B config.json (no weights) in bf16 on one and on two H100 80GB with the
    stages' default budgets (prepare-data capped at what GKD's steps read)."""
    import yaml
    from test_plan import write_parent as write_llama

    from puzzle import plan as planner

    plans = []
    for gpus, offload in ((1, False), (1, True), (2, False)):  # GKD's student states on the GPU, or on the host
        root = work / f"llama31_8b_{gpus}xh100{'_offload' if offload else ''}"
        root.mkdir(parents=True, exist_ok=True)
        parent, _ = write_llama(root, "8b")
        config = {"run_dir": str(root / "run"), "parent": str(parent), "corpus": str(root / "corpus"),
                  "search_space": "llama_default", "prepare_data": {"max_tokens": 2_000_000},
                  "build_library": {"workers": gpus, "worker_memory_gib": 60},
                  "solve": [{"budget": "h100_80gb", "speedup": 1.5, "name": "s"}], "realize": [{"solution": "s"}],
                  "gkd": {"nproc": gpus, **({"cpu_offload": True} if offload else {})}}
        (root / "pipeline.yaml").write_text(yaml.safe_dump(config))
        result = planner.plan(root / "pipeline.yaml", device="cuda", gpus=gpus, gpu_memory_gib=80e9 / GIB,
                              host_memory_gib=1000, budget="h100_80gb", cpu_gflops=100)
        plans.append({"gpus": gpus, "cpu_offload": offload, "config": config, **result})
    return plans


def write(results: list[dict], out: Path, plans: list[dict] | None = None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"shapes": results, "extrapolation": plans or []}
    out.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(results, plans or []))


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def markdown(results: list[dict], plans: list[dict]) -> str:
    from puzzle.footprint import PROCESS_BASELINE_BYTES

    lines = ["# Memory and time per stage at scale (scripts/bench_scale.py)", "",
             f"Random Llama parents in bf16 safetensors; each stage a fresh `puzzle` process with `--dtype {DTYPE}` "
             "on this CPU: the code path a GPU run takes (parent / teacher held in bf16; BLD variants and the GKD "
             "student trained with fp32 weights and AdamW under bf16 autocast), so the host memory here is what a "
             f"bf16 run holds. seq_len {SEQ_LEN}, small token budgets (per shape in the JSON's `stage_args`). "
             "Peak RSS of the whole process tree (psutil, 50 ms). On the CPU the parent's bf16 safetensors are "
             "memory-mapped, so a weight counts once a stage reads it (an embedding table is read a row per token).",
             "",
             f"- `plan`: puzzle/plan.py's estimator for the same arguments on a CPU machine, including one process "
             f"baseline ({PROCESS_BASELINE_BYTES / GIB:.1f} GiB: the interpreter + torch + transformers); GKD's "
             "student is the realised child (`--student`, priced from its config).",
             "- `must hold`: what the stage must hold, computed by this script from ModelShape (not from plan.py): "
             "the parent layers it uses in bf16 + its activations in bf16 + its own trained state (BLD's variants, "
             "GKD's student) as the issue's item 1 requires it, \"autocast with fp32 optimizer state\": fp32 "
             "weights, gradient and 2 AdamW moments, 16 bytes per trained parameter. `state in bf16` counts "
             "that state at 2 bytes each (8 per parameter), the strictest reading of the goal's \"bf16 bytes\".",
             "- `net`: the peak less this run's measured process baseline (prepare-data's peak: the interpreter, "
             "torch, transformers and the tokenizer), which no stage can shed and the must-hold leaves out. "
             "The goal column (`<= 1.5x`) reads `net / must hold`.",
             "- Wall times: a 2-core machine (AMX bf16 matmuls), shared with other work; indicative only.",
             f"- Produced by {PRODUCED_BY}.", ""]
    missing = [s for s in SHAPES if s != "tiny" and s not in {r["shape"] for r in results}]
    if missing:
        lines += [f"Not measured here: {', '.join(missing)}.", ""]
    for r in results:
        rows = r["stages"]
        base = next((s.get("peak_bytes") for s in rows if s["stage"] == "prepare_data"), None)
        lines += [f"## {r['shape']}: {r['params'] / 1e9:.3f}B parameters, {r['bf16_bytes'] / GIB:.2f} GiB in bf16"
                  + (f", --worker-memory-gib {r['worker_memory_gib']}" if r["worker_memory_gib"] else ""), "",
                  *([SHAPE_NOTES[r["shape"]], ""] if r["shape"] in SHAPE_NOTES else []),
                  "| stage | peak RSS GiB | plan GiB | measured / plan | must hold GiB | net / must hold | <= 1.5x "
                  "| peak / must hold | must hold, state in bf16 GiB | net / that | wall s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in rows:
            peak, plan, need = s.get("peak_bytes"), s["plan_bytes"], s["must_hold_bytes"]
            strict = s.get("must_hold_bf16_state_bytes")
            if peak is None:
                lines.append(f"| {s['stage']} | not run: {s['skipped']} | {_gib(plan)} | - | {_gib(need)} | - | - | - | "
                             f"{_gib(strict)} | - | - |")
                continue
            ratio = f"{peak / plan:.2f}" if plan else "-"
            net = peak - base if base else None

            def over(x, y):
                return "-" if x is None or not y else f"{x / y:.2f}"

            goal = "-" if not need or net is None else ("yes" if net <= 1.5 * need else "no")
            lines.append(f"| {s['stage']} | {_gib(peak)} | {_gib(plan)} | {ratio} | {_gib(need)} | {over(net, need)} | "
                         f"{goal} | {over(peak, need)} | {_gib(strict)} | {over(net, strict)} | {s['wall_s']:.1f} |")
        lines += ["", goals(rows, base), ""]
    if plans:
        lines += extrapolation_markdown(plans)
    return "\n".join(lines)


def goals(rows: list[dict], base: float | None) -> str:
    """The issue's two measured goals over a shape's stages that ran: plan within +-25% of the peak, and the
    peak (net of the process baseline) within 1.5x of what the stage must hold; the strict reading too."""
    ran = [s for s in rows if s.get("peak_bytes") is not None]
    planned = [s for s in ran if s["plan_bytes"]]
    within = [s["stage"] for s in planned if 0.75 <= s["peak_bytes"] / s["plan_bytes"] <= 1.25]
    held = [s for s in ran if s["must_hold_bytes"]]
    base = base or 0
    lean = [s["stage"] for s in held if s["peak_bytes"] - base <= 1.5 * s["must_hold_bytes"]]
    strict = [s["stage"] for s in held if s["peak_bytes"] - base <= 1.5 * s["must_hold_bf16_state_bytes"]]
    outside = [s["stage"] for s in planned if s["stage"] not in within]
    heavy = [s["stage"] for s in held if s["stage"] not in lean]
    heavy_strict = [s["stage"] for s in held if s["stage"] not in strict]
    return (f"Goals: plan within +-25% of the measured peak for {len(within)} of {len(planned)} stages"
            + (f" (not: {', '.join(outside)})" if outside else "")
            + f"; net peak <= 1.5x the must-hold for {len(lean)} of {len(held)}"
            + (f" (not: {', '.join(heavy)})" if heavy else "")
            + f"; with the trained state counted in bf16, {len(strict)} of {len(held)}"
            + (f" (not: {', '.join(heavy_strict)})" if heavy_strict else "") + ".")


def extrapolation_markdown(plans: list[dict]) -> list[str]:
    from puzzle.plan import _duration

    lines = ["## Extrapolation: `puzzle plan` for Llama-3.1-8B on H100 80GB (bf16)", "",
             "Meta's Llama-3.1-8B config.json (as tests/test_plan.py writes it; no weights), the llama_default search "
             "space, the stages' default budgets (build-library with `worker_memory_gib: 60` so its jobs fit a GPU; "
             "GKD with `nproc` = the GPUs), `puzzle plan --device cuda --budget h100_80gb`. Times are the plan's "
             "FLOP estimates at the profile's bf16 peak x its efficiency: lower bounds that leave out loading and "
             "writing weights (~15 GiB per stage that loads the parent), Python overhead and data loading, for "
             "the defaults' small budgets (score 16 blocks, BLD 32768 tokens per variant, GKD 200 steps of 8 x "
             "256 tokens). GPU GiB for GKD assumes a student as large as the parent (a realised child is smaller).", ""]
    for p in plans:
        gpu = p["machine"]["gpu_bytes"]
        offload = ", GKD with `cpu_offload: true` (FSDP2 CPUOffloadPolicy: student weights, gradients and AdamW on the host)" if p.get("cpu_offload") else ""
        lines += [f"### {p['gpus']} x H100 80GB{offload}", "",
                  "| step | runs on | GPUs | host GiB | GPU GiB (per GPU) | fits 80 GB | est. time | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in p["steps"]:
            fits = "-" if s["runs_on"] != "cuda" else ("yes" if s["gpu_bytes"] <= gpu else "**no**")
            lines.append(f"| {s['step']} | {s['runs_on']} {s['dtype']} | {s['workers']} | {_gib(s['host_bytes'])} | "
                         f"{_gib(s['gpu_bytes'])} | {fits} | {_duration(s['seconds'])} | {s['note']} |")
        comparable = sum(s["seconds"] or 0 for s in p["steps"] if s["stage"] not in ("build_library", "distill"))
        lines += ["", f"Whole pipeline, estimated: **{_duration(p['total_seconds'])}** on {p['gpus']} x H100 "
                  f"(steps back to back); without BLD training and GKD: {_duration(comparable)}.", ""]
    lines += [PUZZLETRON_8B + ".", ""]
    return lines


def replan(out: Path, work: Path, space: str) -> None:
    """The plan columns again from the estimators as they are now, for the measured rows of `out`'s JSON (their
    stored arguments), and the extrapolation; nothing is run."""
    results = json.loads(out.with_suffix(".json").read_text())["shapes"]
    for r in results:
        ctx = context(work / r["shape"] / "parent", space)
        parent, ran = work / r["shape"] / "parent", {s["stage"] for s in r["stages"]}
        model = work / r["shape"] / "run" / "children" / "s15" if "realize" in ran else parent
        r["stage_args"]["evaluate"] = {"model": str(model), "parent": str(parent), **r["stage_args"]["evaluate"]}
        for s in r["stages"]:
            if s["plan_bytes"] is not None:
                s["plan_bytes"] = predicted(ctx, s["stage"], r["stage_args"][s["stage"]])
                s["must_hold_bytes"] = must_hold(s["stage"], ctx.shape, ctx.space, r["stage_args"][s["stage"]],
                                                 work / r["shape"] / "run", parent)
                s["must_hold_bf16_state_bytes"] = must_hold(s["stage"], ctx.shape, ctx.space, r["stage_args"][s["stage"]],
                                                            work / r["shape"] / "run", parent, BF16_STATE)
    write(results, out, extrapolate(work))


def reextrapolate(out: Path, work: Path) -> None:
    """Only the extrapolation again (the measured rows and their plan columns kept as stored)."""
    write(json.loads(out.with_suffix(".json").read_text())["shapes"], out, extrapolate(work))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=["smollm2", "1b", "8b_slice"], choices=list(SHAPES))
    ap.add_argument("--stages", nargs="+", default=["prepare_data", "importance", "build_library", "score", "profile",
                                                    "solve", "realize", "evaluate", "distill"])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_scale")
    ap.add_argument("--search-space", default="tiny")
    ap.add_argument("--worker-memory-gib", type=float, default=None, help="every shape's (default: SHAPE_ARGS')")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "scale")
    ap.add_argument("--extrapolation-only", action="store_true",
                    help="recompute only the Llama-3.1-8B extrapolation (no parent needed), keep the measured rows")
    ap.add_argument("--replan", action="store_true",
                    help="recompute only the plan columns of the existing JSON's rows (today's estimators) and the extrapolation")
    ap.add_argument("--available-share", type=float, default=AVAILABLE_SHARE,
                    help="run a stage only when its plan is below this share of the memory available when it starts")
    a = ap.parse_args()
    if a.extrapolation_only:
        return reextrapolate(a.out, a.work)
    if a.replan:
        replan(a.out, a.work, a.search_space)
        return
    results: list[dict] = []
    old, kept = a.out.with_suffix(".json"), []
    if old.exists():  # shapes (and stages) measured by an earlier run and not rerun now are kept
        kept = json.loads(old.read_text())
        kept = kept.get("shapes", []) if isinstance(kept, dict) else []
        results += [r for r in kept if r["shape"] not in a.shapes]
    for name in a.shapes:
        prior = next((r for r in kept if r["shape"] == name), None)
        bench_shape(name, a.work, a.search_space, a.worker_memory_gib, a.stages, a.out, results, prior,
                    a.available_share)
    write(results, a.out, extrapolate(a.work))
    print(f"wrote {a.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
