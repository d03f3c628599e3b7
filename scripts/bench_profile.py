"""Benchmark of the cost model: writes benchmarks/profile.json and benchmarks/profile.md.

(a) CPU: measured vs roofline-predicted latency of every distinct variant of the llama_default space
    on the reference parent (SmolLM2-135M; only its config is read, weights are random: latency does
    not depend on them), cpu_local's workload, one torch thread. The roofline's CPU figures are
    calibrated in the same run from generic micro-benchmarks, none of which is a model variant:
      peak FLOP/s       best of fp32 square matmuls (256, 512, 1024)
      bandwidth         a 256 MB tensor copy (bytes read + written per second)
      memory efficiency a skinny (batch x 2048) @ (2048 x 2048) fp32 matmul cycling through 128 MB of
                        weights, as achieved bytes/s over the copy bandwidth (CPU GEMMs with few rows
                        stream weights far below copy speed)
      kernel overhead   a 1-element add (per eager op)
    Variants are measured in 3 interleaved rounds (median kept) because the machine is shared. The
    shipped cpu_local.yaml figures are scored too. A whole random-weight parent is also timed
    (prefill and one decode step with a real DynamicCache) against the sum of its measured parts.
(b) H100: predicted throughput ratio of Llama-3.1-8B vs Llama-3.1-Minitron-4B-Depth / -Width from their
    public configs, 8B at batch 32 and the 4B models at batch 64, h100_80gb's lengths and dtype, vs
    the published ~2.7x / ~1.8x (NVIDIA technical blog, TensorRT-LLM, one H100 80GB).

Usage: .venv/bin/python scripts/bench_profile.py [--rounds 3] [--repeats 15]
"""

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from puzzle.io import atomic_write_json, atomic_write_text  # noqa: E402
from puzzle.model.checkpoint import load_config, puzzle_config_from  # noqa: E402
from puzzle.profiling.hardware import load_profile  # noqa: E402
from puzzle.profiling.measure import device_name, measure_fixed, measure_sublayer, time_call  # noqa: E402
from puzzle.profiling.roofline import (  # noqa: E402
    FIXED_PARTS,
    ModelShape,
    fixed_costs,
    parent_blocks,
    predict_model_costs,
    sublayer_costs,
)
from puzzle.search_space import load_search_space  # noqa: E402

PARENT = REPO / "assets" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = REPO / "benchmarks"
CPU = torch.device("cpu")

# Public configs (Hugging Face config.json of meta-llama/Llama-3.1-8B and nvidia/Llama-3.1-Minitron-4B-*-Base).
LLAMA_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, head_dim=128, vocab_size=128256, tie_word_embeddings=False)
MINITRON_DEPTH = {**LLAMA_8B, "num_hidden_layers": 16}
MINITRON_WIDTH = {**LLAMA_8B, "hidden_size": 3072, "intermediate_size": 9216}
PUBLISHED = {"depth": 2.7, "width": 1.8}
PAIRS_BATCH = {"llama_8b": 32, "minitron_4b": 64}
# TensorRT-LLM perf-overview style (input, output) pairs for the sensitivity table.
LENGTHS = [(128, 128), (128, 2048), (2048, 128), (1024, 1024), (2048, 2048), (5000, 500)]


def calibrate(batch: int) -> dict[str, float]:
    """Generic CPU micro-benchmarks -> roofline figures (see the module docstring)."""
    flops = []
    for n in (256, 512, 1024):
        a, b = torch.randn(n, n), torch.randn(n, n)
        flops.append(2 * n**3 / time_call(lambda: a @ b, CPU))
    x = torch.randn(64 * 2**20)  # 256 MB of fp32
    y = torch.empty_like(x)
    copy_bw = 2 * x.numel() * 4 / time_call(lambda: y.copy_(x), CPU, repeats=7)
    weights = [torch.randn(2048, 2048) for _ in range(8)]  # 8 x 16 MB, cycled: streamed from DRAM
    h = torch.randn(batch, 2048)

    def skinny():
        for w in weights:
            torch.nn.functional.linear(h, w)

    gemv_bw = sum(w.numel() * 4 for w in weights) / time_call(skinny, CPU, repeats=7)
    one = torch.ones(1)
    overhead = time_call(lambda: one + one, CPU, min_sample_s=5e-3)
    return {
        "peak_flops": max(flops),
        "matmul_flops": flops,
        "memory_bandwidth": copy_bw,
        "skinny_matmul_bandwidth": gemv_bw,
        "memory_efficiency": min(1.0, gemv_bw / copy_bw),
        "kernel_overhead_s": overhead,
    }


def measure_round(config, variants, workload, repeats) -> dict[str, dict[str, float]]:
    out = {}
    for kind, cfg in variants:
        out[f"{kind}:{cfg.name}"] = measure_sublayer(config, kind, cfg, workload, CPU, repeats=repeats)
    for part in FIXED_PARTS:
        out[f"fixed:{part}"] = measure_fixed(config, part, workload, CPU, repeats=repeats)
    return out


def variant_kind(kind: str, name: str) -> str:
    if kind == "fixed":
        return "fixed"
    if name.endswith("noop"):
        return f"{kind}_noop"
    if name.endswith("linear"):
        return f"{kind}_linear"
    return "attention_gqa" if kind == "attention" else "ffn_swiglu"


def whole_parent(pconfig, workload, repeats) -> dict[str, float]:
    """A random-weight all-parent PuzzleForCausalLM: prefill (logits of the last position) and one decode
    step at decode_context with transformers' DynamicCache (cropped back after every step)."""
    from transformers.cache_utils import DynamicCache

    from puzzle.model import PuzzleForCausalLM

    model = PuzzleForCausalLM(pconfig).eval()
    B, T = workload.batch_size, workload.input_len
    ids = torch.randint(0, pconfig.vocab_size, (B, T))
    prefill = time_call(lambda: model(ids, use_cache=True, logits_to_keep=1), CPU, warmup=1, repeats=5)
    past = workload.decode_context - 1
    with torch.inference_mode():
        cache = DynamicCache()
        model(torch.randint(0, pconfig.vocab_size, (B, past)), past_key_values=cache, use_cache=True, logits_to_keep=1)
    step_ids = torch.randint(0, pconfig.vocab_size, (B, 1))

    def step():
        model(step_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.crop(-1)  # back to `past` tokens

    decode = time_call(step, CPU, warmup=2, repeats=repeats)
    return {"prefill_s": prefill, "decode_s": decode}


def part_a(rounds: int, repeats: int) -> dict:
    torch.set_num_threads(1)
    config = load_config(PARENT)
    pconfig = puzzle_config_from(config)
    shipped = load_profile("cpu_local")
    workload = shipped.workload
    space = load_search_space("llama_default", config)
    variants = list(dict.fromkeys((v.kind, v.config) for v in space.variants()))
    shape = ModelShape.from_config(config)

    t0 = time.perf_counter()
    cal = calibrate(workload.batch_size)
    device = replace(
        shipped.device,
        peak_flops={"fp32": cal["peak_flops"]},
        memory_bandwidth=cal["memory_bandwidth"],
        compute_efficiency=1.0,
        memory_efficiency=cal["memory_efficiency"],
        kernel_overhead_s=cal["kernel_overhead_s"],
    )
    calibrated = replace(shipped, device=device)
    rounds_out = [measure_round(pconfig, variants, workload, repeats) for _ in range(rounds)]
    measured = {
        key: {ph: statistics.median(r[key][ph] for r in rounds_out) for ph in ("prefill_s", "decode_s")}
        for key in rounds_out[0]
    }
    whole = whole_parent(pconfig, workload, repeats)
    seconds = time.perf_counter() - t0

    def predictions(profile):
        out = {f"{k}:{c.name}": sublayer_costs(shape, k, c, profile) for k, c in variants}
        out.update({f"fixed:{p}": v for p, v in fixed_costs(shape, profile).items()})
        return out

    pred = {"calibrated": predictions(calibrated), "shipped": predictions(shipped)}
    rows = []
    for key, meas in measured.items():
        kind, name = key.split(":")
        for phase in ("prefill_s", "decode_s"):
            row = {"kind": kind, "variant": name, "group": variant_kind(kind, name), "phase": phase[:-2],
                   "measured_s": meas[phase]}
            for which, p in pred.items():
                row[f"{which}_s"] = p[key][phase]
                row[f"{which}_error"] = None if meas[phase] == 0 else p[key][phase] / meas[phase] - 1
            rows.append(row)

    def summary(which, select=lambda r: True):
        chosen = [r for r in rows if r[f"{which}_error"] is not None and select(r)]
        errors = [abs(r[f"{which}_error"]) for r in chosen]
        # time-weighted: sum |predicted - measured| / sum measured (what a whole-model sum would feel)
        weighted = sum(abs(r[f"{which}_s"] - r["measured_s"]) for r in chosen) / sum(r["measured_s"] for r in chosen)
        return {"median_abs_error": statistics.median(errors), "max_abs_error": max(errors),
                "weighted_abs_error": weighted, "n": len(errors)}

    groups = sorted({r["group"] for r in rows if not r["group"].endswith("noop")})
    blocks = parent_blocks(config)
    parent_meas = {ph: measured["fixed:embeddings"][ph] + measured["fixed:final_norm"][ph] + measured["fixed:lm_head"][ph]
                   + len(blocks) * (measured[f"attention:{blocks[0].attention.name}"][ph] + measured[f"ffn:{blocks[0].ffn.name}"][ph])
                   for ph in ("prefill_s", "decode_s")}
    parent_pred = {which: predict_model_costs(config, blocks, prof)
                   for which, prof in (("calibrated", calibrated), ("shipped", shipped))}
    return {
        "parent": str(PARENT.relative_to(REPO)),
        "workload": vars(workload) | {"decode_context": workload.decode_context},
        "threads": 1,
        "rounds": rounds,
        "repeats": repeats,
        "cpu": device_name(CPU),
        "seconds": seconds,
        "calibration": cal,
        "rows": rows,
        "summary": {which: summary(which) for which in pred},
        "by_group": {which: {g: summary(which, lambda r, g=g: r["group"] == g) for g in groups} for which in pred},
        "whole_parent": {
            "real_model": whole,
            "sum_of_measured_parts": parent_meas,
            **{f"{which}_roofline": {ph: parent_pred[which][ph] for ph in ("prefill_s", "decode_s")} for which in pred},
        },
    }


def part_b() -> dict:
    from transformers import LlamaConfig

    h100 = load_profile("h100_80gb")
    models = {"llama_8b": LLAMA_8B, "minitron_4b_depth": MINITRON_DEPTH, "minitron_4b_width": MINITRON_WIDTH}
    configs = {name: LlamaConfig(**cfg) for name, cfg in models.items()}

    def costs(name, input_len, output_len, dtype):
        batch = PAIRS_BATCH["llama_8b" if name == "llama_8b" else "minitron_4b"]
        hw = h100.with_workload(batch_size=batch, input_len=input_len, output_len=output_len, dtype=dtype)
        return predict_model_costs(configs[name], parent_blocks(configs[name]), hw)

    def ratios(input_len, output_len, dtype):
        base = costs("llama_8b", input_len, output_len, dtype)
        out = {"llama_8b": base}
        for which in ("depth", "width"):
            c = costs(f"minitron_4b_{which}", input_len, output_len, dtype)
            out[which] = {**c, "ratio": c["throughput_tokens_s"] / base["throughput_tokens_s"]}
        return out

    w = h100.workload
    main = ratios(w.input_len, w.output_len, w.dtype)
    sweep = []
    for i, o in LENGTHS:
        r = ratios(i, o, w.dtype)
        sweep.append({"input_len": i, "output_len": o, "depth": r["depth"]["ratio"], "width": r["width"]["ratio"]})
    fp8 = ratios(w.input_len, w.output_len, "fp8")
    # where the time goes at the profile's lengths: prefill share of the generation, and the KV cache's
    # share of the bytes one decode step reads (weights + the cache at the mean decode context)
    for name in ("llama_8b", "depth", "width"):
        c = main[name]
        kv_read = c["kv_cache_bytes"] * w.decode_context / w.max_context
        c["prefill_share"] = c["prefill_s"] / c["generation_s"]
        c["kv_read_share"] = kv_read / (kv_read + c["param_bytes"])
    return {
        "profile": h100.name,
        "input_len": w.input_len,
        "output_len": w.output_len,
        "dtype": w.dtype,
        "batch": PAIRS_BATCH,
        "configs": models,
        "published": PUBLISHED,
        "main": main,
        "fp8": {k: fp8[k]["ratio"] for k in ("depth", "width")},
        "sweep": sweep,
        "sweep_mean": {k: statistics.mean(s[k] for s in sweep) for k in ("depth", "width")},
        "errors": {k: main[k]["ratio"] / PUBLISHED[k] - 1 for k in ("depth", "width")},
    }


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def ms(x: float) -> str:
    return f"{1e3 * x:.3f}"


def markdown(a: dict, b: dict) -> str:
    cal, w = a["calibration"], a["workload"]
    lines = [
        "# Cost model: measured vs roofline (CPU) and published Minitron speed-ups (H100)",
        "",
        "Regenerate with `.venv/bin/python scripts/bench_profile.py` (writes this file and `profile.json`).",
        "",
        "## (a) CPU latency per variant on the reference parent",
        "",
        f"Parent: `{a['parent']}` (SmolLM2-135M config; random weights). Space: llama_default, each distinct "
        f"variant once. Workload (cpu_local): batch {w['batch_size']}, input {w['input_len']}, output "
        f"{w['output_len']}, {w['dtype']}; decode steps attend to {w['decode_context']} keys. CPU: {a['cpu']}, "
        f"{a['threads']} torch thread; median of {a['rounds']} interleaved rounds of median-of-{a['repeats']} "
        f"timings; weights and KV cache cycled through >=128 MB of copies so they stream from memory as in "
        f"a real model. Whole section took {a['seconds']:.0f} s.",
        "",
        "Calibration in the same run (generic micro-benchmarks, no model variant among them):",
        "",
        f"- peak: {cal['peak_flops'] / 1e9:.1f} GFLOP/s (best fp32 square matmul of 256/512/1024: "
        + ", ".join(f"{f / 1e9:.1f}" for f in cal["matmul_flops"]) + ")",
        f"- bandwidth: {cal['memory_bandwidth'] / 1e9:.1f} GB/s (256 MB copy, read + write)",
        f"- memory efficiency: {cal['memory_efficiency']:.2f} (a batch-{w['batch_size']} x 2048 @ 2048x2048 matmul over 128 MB "
        f"of weights streams {cal['skinny_matmul_bandwidth'] / 1e9:.1f} GB/s)",
        f"- per-op overhead: {cal['kernel_overhead_s'] * 1e6:.2f} us (a 1-element add)",
        "",
        "| variant | phase | measured ms | roofline ms (calibrated) | error | roofline ms (shipped cpu_local) | error |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in a["rows"]:
        lines.append(
            f"| {r['kind']}:{r['variant']} | {r['phase']} | {ms(r['measured_s'])} | {ms(r['calibrated_s'])} | "
            f"{pct(r['calibrated_error'])} | {ms(r['shipped_s'])} | {pct(r['shipped_error'])} |"
        )
    s = a["summary"]
    lines += [
        "",
        f"**Median absolute error (all non-no-op rows, n={s['calibrated']['n']}): calibrated "
        f"{100 * s['calibrated']['median_abs_error']:.1f}% (max {100 * s['calibrated']['max_abs_error']:.0f}%), "
        f"shipped cpu_local {100 * s['shipped']['median_abs_error']:.1f}% "
        f"(max {100 * s['shipped']['max_abs_error']:.0f}%).** Goal: <= 20%. Time-weighted (sum of |error| over sum of "
        f"measured time): {100 * s['calibrated']['weighted_abs_error']:.1f}% calibrated, "
        f"{100 * s['shipped']['weighted_abs_error']:.1f}% shipped. No-ops are 0 in both by construction.",
        "",
        "| variant kind | n | median abs error (calibrated) | max | median abs error (shipped) | max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for g, c in a["by_group"]["calibrated"].items():
        sh = a["by_group"]["shipped"][g]
        lines.append(f"| {g} | {c['n']} | {100 * c['median_abs_error']:.1f}% | {100 * c['max_abs_error']:.0f}% | "
                     f"{100 * sh['median_abs_error']:.1f}% | {100 * sh['max_abs_error']:.0f}% |")
    lines += [
        "",
        "Where the CPU roofline is off: one bandwidth figure (the calibrated skinny-matmul one) is used for every "
        "byte, so the tiny fixed parts (an embedding gather, the final norm: tens of microseconds, cache-resident) "
        "are over-predicted many times over, while they are a negligible share of the model. GQA attention is "
        "under-predicted: CPU flash attention runs well below matmul peak, and the eager RoPE (14 ops) makes "
        "several passes over q and k where the model counts one. The LM head's (vocab x hidden) GEMV streams "
        "slower than the calibration GEMV.",
    ]
    wp = a["whole_parent"]
    lines += [
        "",
        "Whole parent (30 layers + embeddings + final norm + LM head), ms:",
        "",
        "| | prefill | decode step |",
        "|---|---:|---:|",
        f"| real PuzzleForCausalLM (random weights, DynamicCache) | {ms(wp['real_model']['prefill_s'])} | {ms(wp['real_model']['decode_s'])} |",
        f"| sum of measured parts | {ms(wp['sum_of_measured_parts']['prefill_s'])} | {ms(wp['sum_of_measured_parts']['decode_s'])} |",
        f"| roofline, calibrated | {ms(wp['calibrated_roofline']['prefill_s'])} | {ms(wp['calibrated_roofline']['decode_s'])} |",
        f"| roofline, shipped cpu_local | {ms(wp['shipped_roofline']['prefill_s'])} | {ms(wp['shipped_roofline']['decode_s'])} |",
        "",
        "The real model's decode step also pays DynamicCache's concatenation (it copies the whole cache every step), "
        "which the preallocated cache of the per-variant measurement does not.",
        "",
    ]
    m, e = b["main"], b["errors"]
    lines += [
        "## (b) Llama-3.1-8B vs Llama-3.1-Minitron-4B on one H100 (roofline, public configs only)",
        "",
        f"Profile `{b['profile']}` (989.4 TFLOP/s bf16 dense x 0.7, 3.35 TB/s x 0.8), input {b['input_len']}, "
        f"output {b['output_len']}, {b['dtype']}; Llama-3.1-8B at batch {b['batch']['llama_8b']}, the 4B models at "
        f"batch {b['batch']['minitron_4b']} (the published setting). Throughput = batch x output / (prefill + output x decode step).",
        "",
        "| model | params | weights + KV GB | prefill s | decode step ms | tokens/s | ratio | published | error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| Llama-3.1-8B | {m['llama_8b']['params'] / 1e9:.2f} B | {m['llama_8b']['memory_bytes'] / 1e9:.1f} | "
        f"{m['llama_8b']['prefill_s']:.3f} | {1e3 * m['llama_8b']['decode_s']:.2f} | {m['llama_8b']['throughput_tokens_s']:.0f} | 1.00 | 1.0 | |",
    ]
    for which in ("depth", "width"):
        c = m[which]
        lines.append(
            f"| Minitron-4B-{which.capitalize()} | {c['params'] / 1e9:.2f} B | {c['memory_bytes'] / 1e9:.1f} | {c['prefill_s']:.3f} | "
            f"{1e3 * c['decode_s']:.2f} | {c['throughput_tokens_s']:.0f} | **{c['ratio']:.2f}x** | ~{b['published'][which]}x | {pct(e[which])} |"
        )
    lines += [
        "",
        f"In fp8 the ratios are {b['fp8']['depth']:.2f}x / {b['fp8']['width']:.2f}x: every op's bytes halve and its "
        "peak doubles, so all times halve together and ratios do not move.",
        "",
        "Sensitivity to the input/output lengths (the published figure averages several such pairs):",
        "",
        "| input | output | Depth ratio | Width ratio |",
        "|---:|---:|---:|---:|",
    ]
    for s_ in b["sweep"]:
        lines.append(f"| {s_['input_len']} | {s_['output_len']} | {s_['depth']:.2f}x | {s_['width']:.2f}x |")
    lines.append(f"| mean | | {b['sweep_mean']['depth']:.2f}x | {b['sweep_mean']['width']:.2f}x |")
    base, dep, wid = m["llama_8b"], m["depth"], m["width"]
    lines += [
        "",
        "### What the model gets, and why it differs",
        "",
        f"At {b['input_len']}/{b['output_len']} the roofline gives **{dep['ratio']:.2f}x for Depth ({pct(e['depth'])} vs ~2.7x) "
        f"and {wid['ratio']:.2f}x for Width ({pct(e['width'])} vs ~1.8x)**, both inside the +-20% goal; the mean over "
        f"the length sweep is {b['sweep_mean']['depth']:.2f}x / {b['sweep_mean']['width']:.2f}x. Decode dominates "
        f"(prefill is {100 * base['prefill_share']:.0f}% / {100 * dep['prefill_share']:.0f}% / {100 * wid['prefill_share']:.0f}% "
        "of the generation time of 8B / Depth / Width) and decode is memory-bound at these batches, so the ratio is "
        "about 2 (the doubled batch) x the ratio of bytes read per step:",
        "",
        f"- The KV cache is {100 * base['kv_read_share']:.0f}% of the 8B's decode bytes at batch {b['batch']['llama_8b']} and "
        f"{100 * wid['kv_read_share']:.0f}% of Width's at batch {b['batch']['minitron_4b']}. Width keeps all 32 layers with 8 KV "
        "heads of 128, so its cache per token equals the 8B's and doubling the batch doubles it: its decode step "
        f"({1e3 * wid['decode_s']:.2f} ms) is as slow as the 8B's ({1e3 * base['decode_s']:.2f} ms) and the whole gain is the "
        f"batch. Depth halves weights and cache per token, so its step is shorter ({1e3 * dep['decode_s']:.2f} ms) at twice the batch.",
        f"- The roofline over-predicts Width more than Depth, in the order of their KV-cache share of the bytes a "
        f"decode step reads ({100 * base['kv_read_share']:.0f}% 8B, {100 * dep['kv_read_share']:.0f}% Depth, "
        f"{100 * wid['kv_read_share']:.0f}% Width). The likely cause is that the model reads the KV cache at the same "
        "80% of bandwidth as the weights, and real decode-attention kernels (paged KV, many small per-head reads) "
        "stream it less efficiently. The larger the KV share of a step, the more the roofline flatters it. This is "
        "a hypothesis the roofline cannot test. Per-kernel launch costs (kernel_overhead_s is 0 on the GPU profiles) "
        "do not explain the gap. They scale with the layer count, so adding them would raise Depth's ratio and leave "
        "Width's at the batch ratio.",
        "- The published numbers come from TensorRT-LLM with in-flight batching (prefill and decode of different "
        "requests mixed), its own attention kernels and FP8 (as the blog reports it), averaged over several "
        "input/output pairs. The roofline models one static batch: prefill first, then output_len decode steps at "
        "the mean context. The ratio moves with the lengths (see the sweep above). FP8 itself does not move the "
        "ratios in this model, because every time halves uniformly. Real FP8 GEMMs are not uniformly 2x faster, "
        "and the KV cache often stays in 16 bits.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if not PARENT.exists():
        sys.exit(f"reference parent missing: {PARENT} (scripts/fetch_reference_assets.sh)")
    b = part_b()
    a = part_a(args.rounds, args.repeats)
    payload = {"machine": platform.platform(), "torch": torch.__version__, "cpu": a, "h100_pairs": b}
    atomic_write_json(OUT / "profile.json", payload)
    atomic_write_text(OUT / "profile.md", markdown(a, b))
    print(json.dumps({"cpu_median_abs_error": a["summary"], "ratios": {k: b["main"][k]["ratio"] for k in ("depth", "width")}}, indent=1))


if __name__ == "__main__":
    main()
