"""A child's speedup measured in llama.cpp: predicted (cpu_llamacpp roofline) vs measured, and calibration.

On a run directory that already holds a library and scores (e.g. a quick run): profile on cpu_llamacpp,
solve for each predicted speedup with --target-engine llamacpp, realize, export parent and children to
GGUF, then time them in llama.cpp (llama-cpp-python), parent and children interleaved, REPEATS rounds:
prompt eval of INPUT_LEN tokens and OUTPUT_LEN single-token decode steps, timed by the wall clock
around Llama.eval (llama_decode). Finally `puzzle profile --calibrate` fits the profile to these timings,
in-sample on all models and leave-one-out per child (fit without that child, predict it).

    python scripts/bench_engine.py --run-dir runs/engine      -> benchmarks/engine.{md,json}
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from puzzle.model.checkpoint import load_config  # noqa: E402
from puzzle.profiling.calibrate import Sample, fit_factors, predict_seconds, with_factors  # noqa: E402
from puzzle.profiling.hardware import load_profile  # noqa: E402
from puzzle.profiling.roofline import parent_blocks  # noqa: E402
from puzzle.shape import ModelShape  # noqa: E402

PROFILE = "cpu_llamacpp"


def puzzle(*args: str) -> None:
    cmd = [sys.executable, "-c", "import sys; from puzzle.cli import main; sys.argv[0]='puzzle'; sys.exit(main())", *args]
    print("+ puzzle", " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def build(run_dir: Path, targets: list[float], dtype: str) -> tuple[dict[str, Path], dict[str, Path]]:
    """(name -> GGUF, name -> source checkpoint) for the parent and one child per target speedup."""
    parent = Path(json.loads((run_dir / "parent.json").read_text())["parent"])
    puzzle("profile", "--run-dir", str(run_dir), "--budget", PROFILE)
    out = run_dir / "gguf"
    out.mkdir(exist_ok=True)
    models = {"parent": (parent, out / f"parent.{dtype}.gguf")}
    for s in targets:
        name = f"engine_{s:g}x"
        child = run_dir / "children" / name
        puzzle("solve", "--run-dir", str(run_dir), "--budget", PROFILE, "--speedup", str(s),
               "--target-engine", "llamacpp", "--name", name)
        puzzle("realize", "--run-dir", str(run_dir), "--solution", name, "--out", str(child),
               "--target-engine", "llamacpp")
        models[name] = (child, out / f"{name}.{dtype}.gguf")
    for src, gguf in models.values():
        if not gguf.exists():
            puzzle("export", str(src), str(gguf), "--format", "gguf", "--dtype", dtype)
    return {name: gguf for name, (_, gguf) in models.items()}, {name: src for name, (src, _) in models.items()}


def measure(ggufs: dict[str, Path], input_len: int, output_len: int, repeats: int, threads: int) -> dict:
    """name -> {prefill_s: [..], decode_s: [..]} (decode_s: mean seconds of one step).

    Wall clock around `Llama.eval` (llama_decode + reading the last row of logits): llama_perf_context
    counted one prompt and one eval call per round under llama-cpp-python 0.3.36's `eval`, so its
    counters do not give per-token figures here.
    """
    import llama_cpp

    llms = {n: llama_cpp.Llama(str(p), n_ctx=input_len + output_len + 8, n_batch=input_len, n_threads=threads,
                               n_threads_batch=threads, verbose=False, seed=0) for n, p in ggufs.items()}
    prompt = [(17 * i + 11) % 1000 + 100 for i in range(input_len)]
    out = {n: {"prefill_s": [], "decode_s": []} for n in llms}
    for rep in range(repeats + 1):  # round 0 warms up
        for name, llm in llms.items():
            llm.reset()
            start = time.perf_counter()
            llm.eval(prompt)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            for i in range(output_len):
                llm.eval([(7 * i + 5) % 1000 + 100])
            decode = (time.perf_counter() - start) / output_len
            if rep:
                out[name]["prefill_s"].append(prefill)
                out[name]["decode_s"].append(decode)
            print(json.dumps({"rep": rep, "model": name, "prompt_tok_s": input_len / prefill, "gen_tok_s": 1 / decode}), flush=True)
    return out


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])



def render(result: dict, out: Path) -> None:
    """benchmarks/engine.md from the result JSON (also: `--render engine.json` re-renders without timing)."""
    w, f, fit = result["workload"], result["factors"], result["fit_all"]
    rows = result["rows"]
    err = [abs(r["predicted"] - r["measured"]) / r["measured"] for r in rows]
    at_15 = [r for r in rows if r["model"] == "engine_1.5x"]
    lines = [
        "# A child's speedup measured in llama.cpp", "",
        f"`python scripts/bench_engine.py` at commit {result['commit']}, llama-cpp-python {result['llama_cpp_python']}, profile "
        f"`{result['profile']}` (batch {w['batch_size']}, {w['input_len']} prompt + {w['output_len']} generated tokens, "
        f"{result['dtype']} GGUF, {result['threads']} threads), {result['repeats']} interleaved rounds after a warm-up, medians of wall-clock "
        "time around llama-cpp-python's `Llama.eval` (llama_decode). Speedup = parent's (prefill + output_len decode steps) time / the child's.", "",
        f"*Predicted* is the solver's roofline on the profile as shipped (compute efficiency {f['compute']:.4g}, memory "
        f"efficiency {f['memory']:.4g}, {f['kernel_overhead_s']:.4g} s per op: `hardware_profiles/{result['profile']}.yaml`, "
        "calibrated from an earlier run of this script); the children were solved on it.", "",
        f"Parent: {result['parent']['prompt_tok_s']:.1f} prompt tok/s, {result['parent']['gen_tok_s']:.1f} generation tok/s.", "",
        "| budget | predicted | calibrated, leave-one-out | calibrated, in-sample | prompt tok/s | gen tok/s | prompt speedup | gen speedup | measured speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['predicted']:.2f}x | {r['predicted_calibrated_loo']:.2f}x | {r['predicted_calibrated_all']:.2f}x "
                     f"| {r['prompt_tok_s']:.1f} | {r['gen_tok_s']:.1f} | {r['prompt_speedup']:.2f}x | {r['gen_speedup']:.2f}x | {r['measured']:.2f}x |")
    lines += [""]
    if at_15:
        m = at_15[0]["measured"]
        lines.append(f"Goals: measured >= 1.5x at the 1.5x budget: **{'yes' if m >= 1.5 else 'no'}** ({m:.2f}x); predicted within "
                     f"+-15% of measured at every budget: **{'yes' if max(err) <= 0.15 else 'no'}** (largest error {max(err):.1%}).")
    lines += ["", "Calibration: `puzzle profile --calibrate benchmarks/engine_measured.json --budget cpu_llamacpp` fits "
              "compute and memory efficiency and a per-op overhead by least squares on relative errors of the "
              "median prefill and per-step decode times. *Leave-one-out*: fitted on the parent and the other "
              "children, then predicting this child (out of sample). *In-sample*: fitted on all models, "
              "these included (not a validation).",
              f"In-sample fit: compute {fit['compute_efficiency']:.3f}, memory {fit['memory_efficiency']:.3f}, "
              f"overhead {fit['kernel_overhead_s']:.3g} s/op, relative RMS error {fit['rel_rms']:.3f}.",
              "", f"Wall time {result['wall_s']:.0f} s. llama.cpp system info: `{result['system_info'].strip()}`"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs/engine")
    ap.add_argument("--targets", type=float, nargs="+", default=[1.3, 1.5, 2.0])
    ap.add_argument("--dtype", default="f16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/engine")
    ap.add_argument("--render", type=Path, help="re-render the markdown from an existing result JSON; time nothing")
    args = ap.parse_args()
    if args.render:
        return render(json.loads(args.render.read_text()), args.out)
    t0 = time.time()
    hw = load_profile(PROFILE)
    w = hw.workload
    ggufs, sources = build(args.run_dir, args.targets, args.dtype)
    timings = measure(ggufs, w.input_len, w.output_len, args.repeats, hw.device.threads or 2)

    shape = ModelShape.from_config(load_config(sources["parent"]))
    blocks = {n: tuple(parent_blocks(load_config(src))) for n, src in sources.items()}
    samples = [Sample(n, blocks[n], phase, median(timings[n][f"{phase}_s"])) for n in ggufs for phase in ("prefill", "decode")]

    def gen_s(prefill: float, decode: float) -> float:  # the roofline's generation time: prefill + output_len steps
        return prefill + w.output_len * decode

    def predicted(profile, name: str) -> float:
        p = {s.phase: predict_seconds(s, shape, profile) for s in samples if s.name == name}
        return gen_s(p["prefill"], p["decode"])

    measured = {n: gen_s(median(t["prefill_s"]), median(t["decode_s"])) for n, t in timings.items()}
    fit_all = fit_factors(samples, shape, hw)
    cal_all = with_factors(hw, fit_all.compute_efficiency, fit_all.memory_efficiency, fit_all.kernel_overhead_s)
    rows = []
    for n in ggufs:
        if n == "parent":
            continue
        held_out = [s for s in samples if s.name != n]
        f = fit_factors(held_out, shape, hw)
        cal_loo = with_factors(hw, f.compute_efficiency, f.memory_efficiency, f.kernel_overhead_s)
        t_p, t_c = timings["parent"], timings[n]
        rows.append({
            "model": n,
            "predicted": predicted(hw, "parent") / predicted(hw, n),
            "predicted_calibrated_loo": predicted(cal_loo, "parent") / predicted(cal_loo, n),
            "predicted_calibrated_all": predicted(cal_all, "parent") / predicted(cal_all, n),
            "prompt_tok_s": w.input_len / median(t_c["prefill_s"]),
            "gen_tok_s": 1 / median(t_c["decode_s"]),
            "prompt_speedup": median(t_p["prefill_s"]) / median(t_c["prefill_s"]),
            "gen_speedup": median(t_p["decode_s"]) / median(t_c["decode_s"]),
            "measured": measured["parent"] / measured[n],
        })
    import llama_cpp

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {
        "commit": commit, "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(),
        "profile": PROFILE, "workload": vars(w), "dtype": args.dtype, "repeats": args.repeats,
        "parent": {"prompt_tok_s": w.input_len / median(timings["parent"]["prefill_s"]),
                   "gen_tok_s": 1 / median(timings["parent"]["decode_s"])},
        "rows": rows, "timings": timings,
        "fit_all": vars(fit_all), "wall_s": time.time() - t0, "threads": hw.device.threads,
        "factors": {"compute": hw.device.compute_efficiency, "memory": hw.device.memory_efficiency,
                    "kernel_overhead_s": hw.device.kernel_overhead_s},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    measured_json = args.out.with_name("engine_measured.json")
    measured_json.write_text(json.dumps({"shape": vars(shape), "samples": [
        {"name": s.name, "blocks": [b.name for b in s.blocks], "phase": s.phase, "seconds": s.seconds} for s in samples]}))
    render(result, args.out)


if __name__ == "__main__":
    main()
