"""A child's speedup measured in an inference engine (llama.cpp or vLLM): predicted vs measured, over libraries
built with several seeds.

For each seed, the whole cycle: a run directory with the quick config's library and scores built with that
seed (`puzzle run` on configs/smollm2_quick.yaml with build_library.seed set and only the stages up to
`profile`; a complete one is reused), profiled on the engine's profile, solved for each target speedup with
--target-engine ENGINE, realized, exported with the parent (GGUF f16 for llama.cpp, nemotron-nas bf16 for vLLM),
then timed in the engine, parent and children interleaved, REPEATS rounds after a warm-up:
  llamacpp  cpu_llamacpp: wall clock around llama-cpp-python's `Llama.eval` (batch 1): the prompt of input_len
            tokens, then output_len single-token decode steps
  vllm      cpu_vllm: wall clock around `LLM.generate` of batch_size prompts of input_len tokens, every model
            loaded once in its own vLLM process (puzzle/serve/drivers.py VllmServer): max_tokens=1 is the
            prefill, max_tokens=output_len the whole generation; a decode step = the difference / (output_len - 1)
Speedup = parent's (prefill + output_len decode steps) time / the child's. The table gives every seed's row
and, per budget, the median over the seeds. The parent and children's median timings go to
benchmarks/engine_ENGINE_measured.json for `puzzle profile --calibrate ... --budget PROFILE`.

    python scripts/bench_engine.py --engine vllm --seeds 0 1        -> benchmarks/engine_vllm.{md,json}
    python scripts/bench_engine.py --engine llamacpp --seeds 0 1    -> benchmarks/engine_llamacpp.{md,json}
    python scripts/bench_engine.py --engine vllm --tiny             a tiny random parent: the script end to end
                                                                    in minutes (its numbers mean nothing)
    python scripts/bench_engine.py --render benchmarks/engine_vllm.json   re-render the markdown only
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from puzzle import dtypes  # noqa: E402
from puzzle.model.checkpoint import load_config  # noqa: E402
from puzzle.profiling.calibrate import Sample, fit_factors, load_measured, predict_seconds  # noqa: E402
from puzzle.profiling.hardware import load_profile  # noqa: E402
from puzzle.profiling.roofline import parent_blocks  # noqa: E402
from puzzle.shape import ModelShape  # noqa: E402

ENGINES = {  # engine -> its profile, the export it serves, the weights' dtype
    "llamacpp": {"profile": "cpu_llamacpp", "format": "gguf", "dtype": "f16", "suffix": ".gguf"},
    "vllm": {"profile": "cpu_vllm", "format": "nemotron-nas", "dtype": "bf16", "suffix": ""},
}
QUICK = ROOT / "configs" / "smollm2_quick.yaml"
REFERENCE_GGUF = ROOT / "assets" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LIBRARY_SECTIONS = ("run_dir", "parent", "corpus", "search_space", "prepare_data", "build_library", "score")


def puzzle(*args: str, infeasible_ok: bool = False) -> str | None:
    """Run a puzzle command; with `infeasible_ok`, an exit 2 whose line says "infeasible" returns that line."""
    cmd = [sys.executable, "-c", "import sys; from puzzle.cli import main; sys.argv[0]='puzzle'; sys.exit(main())", *args]
    print("+ puzzle", " ".join(args), flush=True)
    if not infeasible_ok:
        subprocess.run(cmd, check=True, cwd=ROOT)
        return None
    done = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(done.stderr)
    lines = [ln for ln in done.stderr.splitlines() if "infeasible" in ln]
    if done.returncode == 2 and lines:
        return lines[-1].strip()
    if done.returncode:
        raise subprocess.CalledProcessError(done.returncode, cmd, stderr=done.stderr)
    return None


# --- the library of one seed -------------------------------------------------------------------------------

def tiny_setting(root: Path) -> dict:
    """A 4-layer random Llama (hidden 128, 4 heads of 32: vLLM's CPU attention takes 32 and up) with the
    reference tokenizer, and a few thousand corpus tokens: the pipeline in minutes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from puzzle.model.checkpoint import load_tokenizer

    parent = root / "tiny_parent"
    if not (parent / "config.json").exists():
        tokenizer = load_tokenizer(REFERENCE_GGUF)
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=768, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                             tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        LlamaForCausalLM(config).save_pretrained(parent)
        tokenizer.save_pretrained(parent)
    return {"parent": str(parent), "corpus": str(ROOT / "assets" / "corpus" / "python-docs"), "search_space": "tiny",
            "prepare_data": {"seq_len": 64, "max_tokens": 20000, "val_fraction": 0.25},
            "build_library": {"tokens_per_block": 512, "batch_size": 4, "calibration_tokens": 256, "eval_tokens": 128,
                              "ray": False},
            "score": {"blocks": 2, "batch_size": 2}}


def build_library(run_dir: Path, seed: int, profile: str, tiny: bool) -> None:
    """`puzzle run` up to the library, its scores and the engine's costs, build_library seeded with `seed`
    (resumable: complete stages are skipped)."""
    quick = yaml.safe_load(QUICK.read_text())
    config = {k: quick[k] for k in LIBRARY_SECTIONS if k in quick}
    if tiny:
        config.update(tiny_setting(run_dir.parent))
    config["run_dir"] = str(run_dir)
    config["build_library"] = {**config["build_library"], "seed": seed}
    config["profile"] = [{"budget": profile}]
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    puzzle("run", str(path))


def build_models(run_dir: Path, engine: str, targets: list[float], margin: str = "0") -> tuple[dict[str, Path], dict[str, Path], dict]:
    """(name -> export, name -> source checkpoint) for the parent and one child per reachable target speedup,
    and {target: the solver's one line} for the targets the profile says no child reaches."""
    spec = ENGINES[engine]
    parent = Path(json.loads((run_dir / "parent.json").read_text())["parent"])
    out = run_dir / f"export_{engine}"
    out.mkdir(exist_ok=True)
    models = {"parent": (parent, out / f"parent{spec['suffix']}")}
    # again here, outside the pipeline's ledger: after `--calibrate` the costs follow the new profile (its
    # fingerprint changed), while a complete pipeline would skip its profile stage
    puzzle("profile", "--run-dir", str(run_dir), "--budget", spec["profile"])
    unreachable = {}
    for s in targets:
        name = f"{engine}_{s:g}x"
        child = run_dir / "children" / name
        done = puzzle("solve", "--run-dir", str(run_dir), "--budget", spec["profile"], "--speedup", str(s),
                      "--target-engine", engine, "--name", name, "--margin", margin, infeasible_ok=True)
        if done is not None:  # exit 2 with the solver's explanation: out of the search's reach on this profile
            unreachable[s] = done
            continue
        puzzle("realize", "--run-dir", str(run_dir), "--solution", name, "--out", str(child), "--target-engine", engine)
        models[name] = (child, out / f"{name}{spec['suffix']}")
    for src, dst in models.values():
        extra = ["--engine", engine] if spec["format"] == "nemotron-nas" else []
        # re-exported every time: a child re-solved on a recalibrated profile replaces the last one's export
        puzzle("export", str(src), str(dst), "--format", spec["format"], "--dtype", spec["dtype"], *extra)
    return {n: dst for n, (_, dst) in models.items()}, {n: src for n, (src, _) in models.items()}, unreachable


# --- timing ------------------------------------------------------------------------------------------------

def prompts_of(batch: int, length: int, vocab: int) -> list[list[int]]:
    return [[(17 * i + 31 * b + 11) % (vocab - 200) + 100 for i in range(length)] for b in range(batch)]


def measure_llamacpp(models: dict[str, Path], workload, repeats: int, threads: int, vocab: int) -> dict:
    """name -> {prefill_s: [..], decode_s: [..]} (decode_s: mean seconds of one step), batch 1.

    Wall clock around `Llama.eval` (llama_decode + reading the last row of logits): llama_perf_context
    counted one prompt and one eval call per round under llama-cpp-python 0.3.36's `eval`, so its
    counters do not give per-token figures here."""
    import llama_cpp

    n_in, n_out = workload.input_len, workload.output_len
    llms = {n: llama_cpp.Llama(str(p), n_ctx=n_in + n_out + 8, n_batch=n_in, n_threads=threads,
                               n_threads_batch=threads, verbose=False, seed=0) for n, p in models.items()}
    prompt = prompts_of(1, n_in, vocab)[0]
    out = {n: {"prefill_s": [], "decode_s": []} for n in llms}
    for rep in range(repeats + 1):  # round 0 warms up
        for name, llm in llms.items():
            llm.reset()
            start = time.perf_counter()
            llm.eval(prompt)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            for i in range(n_out):
                llm.eval([(7 * i + 5) % 1000 + 100])
            decode = (time.perf_counter() - start) / n_out
            if rep:
                out[name]["prefill_s"].append(prefill)
                out[name]["decode_s"].append(decode)
            print(json.dumps({"rep": rep, "model": name, "prefill_s": prefill, "decode_s": decode}), flush=True)
    for llm in llms.values():
        llm.close()
    return out


def measure_vllm(models: dict[str, Path], workload, repeats: int, threads: int, vocab: int, logs: Path) -> dict:
    """name -> {prefill_s: [..], decode_s: [..]}: every model loaded once in its own vLLM process (VllmServer),
    timed in turn each round. The engine's worker uses every core (VLLM_CPU_OMP_THREADS_BIND); the models
    wait idle while another runs."""
    import contextlib

    from puzzle.serve.drivers import VllmServer

    n_out = workload.output_len
    prompts = prompts_of(workload.batch_size, workload.input_len, vocab)
    env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    dtype = dtypes.BY_NAME[dtypes.canonical(workload.dtype)].torch  # vLLM's name for it (bfloat16, ...)
    out = {n: {"prefill_s": [], "decode_s": []} for n in models}
    logs.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        servers = {n: stack.enter_context(VllmServer(p, prompts, env=env, log=logs / f"{n}.log", dtype=dtype,
                                                     max_model_len=workload.input_len + n_out + 8))
                   for n, p in models.items()}
        for rep in range(repeats + 1):  # round 0 warms up
            for name, server in servers.items():
                prefill = server.time(1)
                decode = (server.time(n_out) - prefill) / (n_out - 1)
                if rep:
                    out[name]["prefill_s"].append(prefill)
                    out[name]["decode_s"].append(decode)
                print(json.dumps({"rep": rep, "model": name, "prefill_s": prefill, "decode_s": decode}), flush=True)
    return out


def engine_version(engine: str) -> str:
    if engine == "llamacpp":
        import llama_cpp

        return f"llama-cpp-python {llama_cpp.__version__}"
    from puzzle.serve.drivers import vllm_python

    done = subprocess.run([str(vllm_python()), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                          capture_output=True, text=True)
    return f"vllm-cpu {done.stdout.strip()}"


# --- one seed's cycle and the table --------------------------------------------------------------------------

def median(xs: list[float]) -> float:
    return statistics.median(xs)


def cycle(engine: str, run_dir: Path, seed: int, args, hw) -> dict:
    """Solve, export and time one seed's children: its rows and its samples for calibration."""
    w = hw.workload
    models, sources, unreachable = build_models(run_dir, engine, args.targets, args.margin)
    vocab = load_config(sources["parent"]).vocab_size
    threads = hw.device.threads or 2
    if engine == "llamacpp":
        timings = measure_llamacpp(models, w, args.repeats, threads, vocab)
    else:
        timings = measure_vllm(models, w, args.repeats, threads, vocab, run_dir / "vllm_logs")
    shape = ModelShape.from_config(load_config(sources["parent"]))
    blocks = {n: tuple(parent_blocks(load_config(src))) for n, src in sources.items()}
    samples = [Sample(n, blocks[n], phase, median(timings[n][f"{phase}_s"])) for n in models for phase in ("prefill", "decode")]

    def gen_s(prefill: float, decode: float) -> float:  # the roofline's generation time: prefill + output_len steps
        return prefill + w.output_len * decode

    def predicted(name: str) -> float:
        p = {s.phase: predict_seconds(s, shape, hw) for s in samples if s.name == name}
        return gen_s(p["prefill"], p["decode"])

    measured = {n: gen_s(median(t["prefill_s"]), median(t["decode_s"])) for n, t in timings.items()}
    rows = []
    for n in models:
        if n == "parent":
            continue
        t_p, t_c = timings["parent"], timings[n]
        rows.append({
            "seed": seed, "model": n, "budget": float(n.split("_")[-1].rstrip("x")),
            "predicted": predicted("parent") / predicted(n),
            "prompt_tok_s": w.batch_size * w.input_len / median(t_c["prefill_s"]),
            "gen_tok_s": w.batch_size / median(t_c["decode_s"]),
            "prompt_speedup": median(t_p["prefill_s"]) / median(t_c["prefill_s"]),
            "gen_speedup": median(t_p["decode_s"]) / median(t_c["decode_s"]),
            "measured": measured["parent"] / measured[n],
        })
    parent = {"prompt_tok_s": w.batch_size * w.input_len / median(timings["parent"]["prefill_s"]),
              "gen_tok_s": w.batch_size / median(timings["parent"]["decode_s"]),
              "prefill_s": median(timings["parent"]["prefill_s"]), "decode_s": median(timings["parent"]["decode_s"])}
    return {"seed": seed, "run_dir": str(run_dir), "rows": rows, "parent": parent, "timings": timings,
            "unreachable": {f"{b:g}": line for b, line in unreachable.items()},
            "bound": speedup_bound(shape, hw),
            "shape": vars(shape), "samples": [{"name": f"seed{seed}/{s.name}", "blocks": [b.name for b in s.blocks],
                                                "phase": s.phase, "seconds": s.seconds, "group": f"seed{seed}"} for s in samples]}


def speedup_bound(shape: ModelShape, hw) -> float:
    """The predicted speedup of a child with no layers at all (embeddings, final norm, LM head and the
    engine's per-step work left): no child of any search space goes faster on this profile."""
    from puzzle.profiling.roofline import combine_costs, fixed_costs, sublayer_costs

    fixed = fixed_costs(shape, hw)
    rows = [sublayer_costs(shape, kind, getattr(block, kind), hw)
            for block in shape.parent_blocks for kind in ("attention", "ffn")]
    parent = combine_costs(fixed, rows, hw.workload)["generation_s"]
    return parent / combine_costs(fixed, [], hw.workload)["generation_s"]


def summary(result: dict) -> list[dict]:
    """Per budget: the median measured speedup over the seeds, the prediction's error against it."""
    out = []
    for budget in sorted({r["budget"] for c in result["cycles"] for r in c["rows"]}):
        rows = [r for c in result["cycles"] for r in c["rows"] if r["budget"] == budget]
        measured = median([r["measured"] for r in rows])
        predicted = median([r["predicted"] for r in rows])
        out.append({"budget": budget, "measured": [r["measured"] for r in rows], "median_measured": measured,
                    "median_predicted": predicted, "error": (predicted - measured) / measured})
    return out


def render(result: dict, out: Path) -> None:
    """The markdown from the result JSON (also: `--render engine_ENGINE.json` re-renders without timing)."""
    w, f, engine = result["workload"], result["factors"], result["engine"]
    margin = result.get("margin", "0")
    flags = (f" --repeats {result['repeats']}" if result["repeats"] != 3 else "") + (f" --margin {margin}" if margin != "0" else "")
    aim = "" if margin == "0" else (
        f" Each child was solved with `--margin {margin}`: aiming "
        + (f"{result['calibration_error']:.1%} (the profile's calibration_error, the relative RMS of the fit that made it)"
           if margin == "calibrated" else f"{float(margin):.1%}")
        + " above its budget, so *predicted* exceeds the budget by about that much.")
    lines = [
        f"# A child's speedup measured in {result['engine_name']}", "",
        f"`python scripts/bench_engine.py --engine {engine} --seeds {' '.join(map(str, result['seeds']))}{flags}` at commit "
        f"{result['commit']}, {result['version']}, profile `{result['profile']}` (batch {w['batch_size']}, "
        f"{w['input_len']} prompt + {w['output_len']} generated tokens, {result['dtype']} weights, {result['threads']} "
        f"threads), {result['repeats']} interleaved rounds after a warm-up, medians of wall-clock time. Speedup = the "
        "parent's (prefill + output_len decode steps) time / the child's. Each seed is the whole cycle: a library "
        "built with that seed, its scores, the solve for every budget, the export and the timing.", "",
        f"*Predicted*: the solver's roofline on the profile as it was (compute efficiency {f['compute']:.4g}, memory "
        f"efficiency {f['memory']:.4g}, {f['kernel_overhead_s']:.4g} s per op, {f.get('step_overhead_s', 0):.4g} s per "
        "forward pass); the children were solved on it." + aim, "",
        "| seed | budget | predicted | measured | prompt tok/s | gen tok/s | prompt speedup | gen speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cycles"]:
        p = c["parent"]
        lines.append(f"| {c['seed']} | parent | | | {p['prompt_tok_s']:.1f} | {p['gen_tok_s']:.1f} | | |")
        for r in c["rows"]:
            lines.append(f"| {c['seed']} | {r['budget']:g}x | {r['predicted']:.2f}x | {r['measured']:.2f}x | "
                         f"{r['prompt_tok_s']:.1f} | {r['gen_tok_s']:.1f} | {r['prompt_speedup']:.2f}x | {r['gen_speedup']:.2f}x |")
        for b in c.get("unreachable", {}):
            lines.append(f"| {c['seed']} | {float(b):g}x | out of reach | | | | | |")
    lines += ["", "| budget | measured (each seed) | median measured | median predicted | prediction error |", "|---|---|---|---|---|"]
    summ = summary(result)
    for s in summ:
        lines.append(f"| {s['budget']:g}x | {' / '.join(f'{m:.2f}x' for m in s['measured'])} | {s['median_measured']:.2f}x | "
                     f"{s['median_predicted']:.2f}x | {s['error']:+.1%} |")
    at_15 = [s for s in summ if s["budget"] == 1.5]
    worst = max(abs(s["error"]) for s in summ) if summ else float("nan")
    if at_15:
        m = at_15[0]["median_measured"]
        lines += ["", f"Goals: median measured >= 1.5x at the 1.5x budget: **{'yes' if m >= 1.5 else 'no'}** ({m:.2f}x); "
                      f"every budget's prediction within +-15% of the median measured: **{'yes' if worst <= 0.15 else 'no'}** "
                      f"(largest error {worst:.1%})."]
    notes = {line for c in result["cycles"] for line in c.get("unreachable", {}).values()}
    if notes:
        bound = median([c["bound"] for c in result["cycles"]])
        lines += ["", f"*Out of reach*: on this profile no child of the search space reaches that budget; a child "
                      f"with no layers at all would be {bound:.2f}x (the embeddings, the LM head and the engine's "
                      "per-step work stay). The solver's line:", ""] + [f"    {n}" for n in sorted(notes)]
    fit = result["fit_all"]
    lines += ["", f"Calibration: `puzzle profile --calibrate {result['measured_json']} --budget {result['profile']}` fits "
                  "compute and memory efficiency, a per-op and a per-step overhead to every seed's median prefill and "
                  "decode-step times, with one speed factor per seed for the machine's drift between them "
                  f"(in-sample here: compute {fit['compute_efficiency']:.3f}, memory "
                  f"{fit['memory_efficiency']:.3f}, overhead {fit['kernel_overhead_s']:.3g} s/op, "
                  f"{fit.get('step_overhead_s', 0):.3g} s/step, relative RMS error {fit['rel_rms']:.3f}).",
              "", f"Wall time {result['wall_s']:.0f} s."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=sorted(ENGINES), default="llamacpp")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one library (and its whole cycle) per seed")
    ap.add_argument("--run-root", type=Path, default=ROOT / "runs" / "engine", help="run directories: ROOT/seedN")
    ap.add_argument("--targets", type=float, nargs="+", default=[1.3, 1.5, 2.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a tiny random parent: checks the script, times nothing real")
    ap.add_argument("--out", type=Path, help="default: benchmarks/engine_ENGINE (tiny: RUN_ROOT/engine_ENGINE)")
    ap.add_argument("--margin", default="0", help="solve --margin: a fraction, or `calibrated` (the profile's "
                    "calibration_error): each child aims that much above its budget")
    ap.add_argument("--render", type=Path, help="re-render the markdown from an existing result JSON; time nothing")
    args = ap.parse_args()
    if args.render:
        render(json.loads(args.render.read_text()), args.render)
        if args.render.resolve().parent == ROOT / "benchmarks":
            write_index(ROOT / "benchmarks")
        return
    engine, spec = args.engine, ENGINES[args.engine]
    out = args.out or (args.run_root if args.tiny else ROOT / "benchmarks") / f"engine_{engine}"
    t0 = time.time()
    hw = load_profile(spec["profile"])
    cycles = []
    for seed in args.seeds:
        run_dir = args.run_root / (f"tiny_seed{seed}" if args.tiny else f"seed{seed}")
        build_library(run_dir, seed, spec["profile"], args.tiny)
        cycles.append(cycle(engine, run_dir, seed, args, hw))
    measured_json = out.with_name(f"{out.name}_measured.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    measured_json.write_text(json.dumps({"shape": cycles[0]["shape"], "samples": [s for c in cycles for s in c["samples"]]}))
    shape, samples = load_measured(measured_json)  # read back as `puzzle profile --calibrate` reads it
    fit = fit_factors(samples, shape, hw)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {
        "engine": engine, "engine_name": {"llamacpp": "llama.cpp", "vllm": "vLLM"}[engine], "version": engine_version(engine),
        "commit": commit, "profile": spec["profile"], "workload": vars(hw.workload), "dtype": spec["dtype"],
        "threads": hw.device.threads, "repeats": args.repeats, "seeds": args.seeds, "cycles": cycles,
        "margin": args.margin, "calibration_error": hw.device.calibration_error,
        "fit_all": vars(fit), "measured_json": str(measured_json.relative_to(ROOT) if measured_json.is_relative_to(ROOT) else measured_json),
        "factors": {"compute": hw.device.compute_efficiency, "memory": hw.device.memory_efficiency,
                    "kernel_overhead_s": hw.device.kernel_overhead_s, "step_overhead_s": hw.device.step_overhead_s},
        "wall_s": time.time() - t0,
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    render(result, out)
    if not args.tiny and args.out is None:
        write_index(out.parent)


def write_index(bench: Path) -> None:
    """benchmarks/engine.md: every engine's page (engine_vllm.md, engine_llamacpp.md) one after the other."""
    pages = [bench / f"engine_{e}.md" for e in ("vllm", "llamacpp") if (bench / f"engine_{e}.md").exists()]
    head = ["# Children's speedups measured in inference engines", "",
            "Written by `scripts/bench_engine.py` from the pages below (each engine's own: "
            + ", ".join(f"`{p.name}`" for p in pages) + ").", ""]
    body = ["#" + p.read_text() for p in pages]  # each page's title one level down
    (bench / "engine.md").write_text("\n".join(head) + "\n".join(body))


if __name__ == "__main__":
    main()
