"""Benchmark of the roofline's MoE cost: writes benchmarks/moe_cost.json and benchmarks/moe_cost.md.

One MoE FFN sublayer (modeling_puzzle.py `MoEFFN` with its RMSNorm and residual, built and timed as
`puzzle profile` measures a sublayer: puzzle/profiling/measure.py, random weights, cold copies cycled, one
torch thread, the thread's CPU time as the clock) at several decode batch sizes and one prefill, against the
roofline's figure for it (roofline.py `moe_ops`: the experts a step touches, U = sum_j 1 - (1 - p_j)^n with
uniform p_j = k/E, and the per-expert dispatch ops priced at the profile's kernel_overhead_s), on
  - the shipped cpu_local profile as it is, and
  - cpu_local with its figures re-measured once at the start of the run by scripts/bench_profile.py
    `calibrate` (matmul peak, copy bandwidth, one-row skinny-matmul efficiency, 1-element add per eager op).
Two shapes: Qwen3-30B-A3B's own MoE layer (D 2048, 128 experts of 768, top-8; its widths from
tests/data/configs/qwen3-30b-a3b/config.json) and a small one (D 512, 16 experts of 256, top-2) where eager
dispatch dominates. Each measured time is split into the experts' SwiGLUs alone (timed on the same routed
rows) and the rest (norm, router, per-expert dispatch, residual), beside the roofline's same split.

Usage: nice -n 19 .venv/bin/python scripts/bench_moe_cost.py [--repeats 7] [--quick]
"""

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from transformers import Qwen3MoeConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

from bench_profile import calibrate  # noqa: E402
from puzzle.io import atomic_write_json, atomic_write_text  # noqa: E402
from puzzle.model import PuzzleConfig, build_ffn  # noqa: E402
from puzzle.model.checkpoint import puzzle_config_from  # noqa: E402
from puzzle.profiling.hardware import HardwareProfile, load_profile  # noqa: E402
from puzzle.profiling.measure import COLD_BYTES, device_name, time_calls, torch_threads  # noqa: E402
from puzzle.profiling.roofline import (  # noqa: E402
    EXPERT_DISPATCH_KERNELS,
    NORM_KERNELS,
    ROUTER_KERNELS,
    ModelShape,
    expected_experts,
    op_time,
    sublayer_ops,
)

OUT = REPO / "benchmarks"
CPU = torch.device("cpu")
QWEN = json.loads((REPO / "tests/data/configs/qwen3-30b-a3b/config.json").read_text())
SHAPES = {
    "qwen3-30b-a3b layer": dict(hidden_size=QWEN["hidden_size"], num_experts=QWEN["num_experts"],
                                num_experts_per_tok=QWEN["num_experts_per_tok"],
                                moe_intermediate_size=QWEN["moe_intermediate_size"]),
    "small": dict(hidden_size=512, num_experts=16, num_experts_per_tok=2, moe_intermediate_size=256),
}
BATCHES = (1, 4, 16, 64, 256)
PREFILL = (1, 128)  # batch, tokens
EXPERT_OPS = ("experts_gate_up", "experts_silu_mul", "experts_down")


def moe_config(dims: dict) -> PuzzleConfig:
    """A one-layer Qwen3-MoE parent of these widths as puzzle builds it (renormalised top-k, as Qwen3-30B-A3B)."""
    hf = Qwen3MoeConfig(num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                        intermediate_size=4 * dims["hidden_size"], vocab_size=256, norm_topk_prob=True, **dims)
    return puzzle_config_from(hf)


def copies(config, ffn, cold_bytes: float = COLD_BYTES) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(norm, MoE module) copies with their own random weights, at least `cold_bytes` in all (as measure.py
    cycles copies so weights stream from memory, not from a cache of the previous call)."""
    out, held = [], 0.0
    while not out or held < cold_bytes:
        module = build_ffn(config, ffn).eval()
        out.append((LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps), module))
        held += sum(p.numel() * p.element_size() for p in module.parameters())
    return out


def routed_rows(norm, module, h: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """The chosen experts of one copy on h and the rows each receives (what its SwiGLU computes)."""
    flat = norm(h).reshape(-1, h.shape[-1])
    _, chosen = module.route(flat)
    return [(j, flat[torch.where(chosen == j)[0]].clone()) for j in torch.unique(chosen).tolist()]


def measure(parts, B: int, T: int, repeats: int) -> dict:
    """Measured seconds of the whole sublayer and of its experts' SwiGLUs alone, and the distinct experts chosen."""
    torch.manual_seed(B * T)
    h = torch.randn(B, T, parts[0][0].weight.shape[0])
    with torch.inference_mode():
        rows = [routed_rows(norm, module, h) for norm, module in parts]
    whole = [(lambda n=n, m=m: h + m(n(h))) for n, m in parts]
    experts = [(lambda m=m, r=r: [m.experts[j](x) for j, x in r]) for (_, m), r in zip(parts, rows)]
    phase = "prefill" if T > 1 else "decode"
    return {"measured_s": time_calls(whole, CPU, phase, repeats=repeats),
            "measured_experts_s": time_calls(experts, CPU, phase, repeats=repeats),
            "observed_experts": sum(len(r) for r in rows) / len(rows), "copies": len(parts)}


def predict(shape: ModelShape, ffn, profile: HardwareProfile, B: int, T: int) -> dict:
    """The roofline's seconds for the sublayer, its experts' SwiGLU ops alone, and its dispatch ops' share."""
    w = replace(profile.workload, batch_size=B, input_len=max(T, 1))
    phase = "prefill" if T > 1 else "decode"
    ops = sublayer_ops(shape, "ffn", ffn, w, phase)
    t = {op.name: op_time(op, profile.device, w.dtype) for op in ops}
    return {"roofline_s": sum(t.values()), "roofline_experts_s": sum(t[k] for k in EXPERT_OPS),
            "roofline_dispatch_s": t["expert_dispatch"]}


def calibrated(profile: HardwareProfile, figures: dict) -> HardwareProfile:
    d = replace(profile.device, peak_flops={"fp32": figures["peak_flops"]}, memory_bandwidth=figures["memory_bandwidth"],
                memory_efficiency=figures["memory_efficiency"], compute_efficiency=1.0,
                kernel_overhead_s=figures["kernel_overhead_s"])
    return replace(profile, name="cpu_local (re-measured)", device=d)


def run(repeats: int, quick: bool) -> dict:
    shipped = load_profile("cpu_local")
    batches = BATCHES[:3] if quick else BATCHES
    rows = []
    with torch_threads(shipped.device.threads):
        calibration = calibrate(1)  # decode's skinny matmuls: one row streams the weights as a few rows do
        remeasured = calibrated(shipped, calibration)
        for name, dims in SHAPES.items():
            config = moe_config(dims)
            ffn = config.blocks[0].ffn
            shape = ModelShape.from_config(config)
            moe = ffn.moe
            torch.manual_seed(0)
            parts = copies(config, ffn)
            for B, T in [(b, 1) for b in batches] + [PREFILL]:
                t0 = time.time()
                m = measure(parts, B, T, repeats)
                row = {"shape": name, "variant": ffn.name, "phase": "prefill" if T > 1 else "decode", "batch": B,
                       "tokens": B * T, "expected_experts": expected_experts(moe.num_experts, moe.top_k, B * T), **m}
                for label, profile in (("shipped", shipped), ("remeasured", remeasured)):
                    p = predict(shape, ffn, profile, B, T)
                    row[label] = {**p, "ratio": m["measured_s"] / p["roofline_s"],
                                  "experts_ratio": m["measured_experts_s"] / p["roofline_experts_s"]}
                rows.append(row)
                print(f"{name} B={B} T={T}: measured {m['measured_s'] * 1e3:.2f} ms, roofline "
                      f"{row['shipped']['roofline_s'] * 1e3:.2f} ms (x{row['shipped']['ratio']:.2f}), re-measured "
                      f"{row['remeasured']['roofline_s'] * 1e3:.2f} ms (x{row['remeasured']['ratio']:.2f}) "
                      f"[{time.time() - t0:.0f} s]", flush=True)
            del parts
    return {"cpu": device_name(CPU), "python": platform.python_version(), "torch": torch.__version__,
            "threads": shipped.device.threads, "repeats": repeats, "shipped_profile": shipped.to_dict(),
            "calibration": calibration, "rows": rows}


def plan_lines() -> dict[str, list[str]]:
    """`puzzle plan PARENT` on the published MoE configs (tests/data/configs): size, active parameters, and
    whether bf16 weights + the h100_80gb workload's KV cache fit one H100 / eight."""
    from puzzle.plan import parent_report

    return {path.parent.name: parent_report(path.parent, "h100_80gb")[0]
            for path in sorted((REPO / "tests/data/configs").glob("*/config.json"))}


def rest_kernels(row: dict) -> float:
    """Eager ops outside the experts' SwiGLUs the roofline counts: norm, router, dispatch per expert, residual."""
    return NORM_KERNELS + ROUTER_KERNELS + EXPERT_DISPATCH_KERNELS * row["expected_experts"] + 1


def ms(x: float) -> str:
    return f"{x * 1e3:.2f}"


def markdown(result: dict) -> str:
    lines = ["# MoE cost model: `puzzle plan` on MoE parents, and the roofline vs one measured MoE layer", "",
             "Written by `scripts/bench_moe_cost.py`; numbers in `moe_cost.json`.", "",
             "## puzzle plan", "",
             "`puzzle plan tests/data/configs/<model>` (the published config.json files, sources in that folder's "
             "README): total and active parameters, and whether bf16 weights + the KV cache of h100_80gb's workload "
             "(batch 64, 1024 + 1024 tokens) fit one H100 or eight (weights split evenly, the KV cache over at most "
             "K GPUs; 67 GiB usable per GPU: the profile's memory_gib). gpt-oss-120b's checkpoint stores its experts "
             "in MXFP4 (which is how it fits one H100); these are bf16 figures, as the task asks.", ""]
    for name, plan in result["plan"].items():
        lines += [f"`{name}`:", "```", *plan, "```", ""]
    lines += ["## Roofline vs measured MoE layer (CPU)", "",
             f"CPU: {result['cpu']}, {result['threads']} torch thread, torch {result['torch']}, median of "
             f"{result['repeats']} samples, thread CPU time (the machine is shared by other jobs).", "",
             "The sublayer is `h + MoEFFN(RMSNorm(h))` (modeling_puzzle.py), random weights, copies cycled so its "
             "weights stream from memory, as `puzzle profile` measures a sublayer. The roofline is roofline.py "
             "`moe_ops` with uniform routing: U = E (1 - (1 - k/E)^n) experts read, n*k rows through the "
             "experts' SwiGLUs, and 7 dispatch ops + 5 SwiGLU ops per chosen expert at the profile's "
             "kernel_overhead_s. `shipped`: hardware_profiles/cpu_local.yaml as it is; `re-measured`: its "
             "peak, bandwidth, skinny-matmul efficiency and per-op overhead measured in this run "
             "(bench_profile.py `calibrate`). Ratio = measured / roofline (goal: 0.8-1.2). "
             "`experts` = the experts' SwiGLUs alone, timed on the same routed rows.", "",
             "| shape | phase | batch | tokens | U expected | U observed | measured ms | experts ms | "
             "roofline ms (shipped) | ratio | roofline ms (re-measured) | ratio | experts ratio (re-measured) | "
             "dispatch share of roofline |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        s, c = r["shipped"], r["remeasured"]
        lines.append(f"| {r['shape']} ({r['variant']}) | {r['phase']} | {r['batch']} | {r['tokens']} | "
                     f"{r['expected_experts']:.1f} | {r['observed_experts']:.1f} | {ms(r['measured_s'])} | "
                     f"{ms(r['measured_experts_s'])} | {ms(s['roofline_s'])} | {s['ratio']:.2f} | "
                     f"{ms(c['roofline_s'])} | {c['ratio']:.2f} | {c['experts_ratio']:.2f} | "
                     f"{100 * c['roofline_dispatch_s'] / c['roofline_s']:.0f}% |")
    rows = result["rows"]
    big = [r for r in rows if r["shape"] != "small"]
    ok = [r for r in rows if 0.8 <= r["shipped"]["ratio"] <= 1.2]
    share = [r["measured_experts_s"] / r["measured_s"] for r in big]
    rest_big = [(r["measured_s"] - r["measured_experts_s"]) / rest_kernels(r) * 1e6 for r in big]
    rest_small = [(r["measured_s"] - r["measured_experts_s"]) / rest_kernels(r) * 1e6 for r in rows if r["shape"] == "small"
                  and r["phase"] == "decode"]
    # the largest decode batch of the large layer: its experts' FLOPs and weight bytes at the shipped roofs
    last = max((r for r in big if r["phase"] == "decode"), key=lambda r: r["batch"])
    dims, dev = SHAPES[last["shape"]], result["shipped_profile"]["device"]
    D, I, k = dims["hidden_size"], dims["moe_intermediate_size"], dims["num_experts_per_tok"]
    flops = 2 * last["tokens"] * k * 3 * D * I
    weights = last["expected_experts"] * 3 * D * I * 4  # fp32
    rate, stream = dev["peak_flops"]["fp32"] * dev["compute_efficiency"], dev["memory_bandwidth"] * dev["memory_efficiency"]
    worst = max(r["shipped"]["ratio"] for r in big)
    first = min((r for r in big if r["phase"] == "decode"), key=lambda r: r["batch"])
    first_stream = first["expected_experts"] * 3 * D * I * 4 / first["measured_experts_s"]
    lines += ["", "### Where the time goes", "",
              f"Within +-20% (shipped cpu_local): {len(ok)} of {len(rows)} rows: "
              + ", ".join(f"{r['shape']} {r['phase']} batch {r['batch']} ({r['shipped']['ratio']:.2f})" for r in ok) + ".",
              "",
              f"- Qwen3-30B-A3B's layer: the experts' SwiGLUs alone are {100 * min(share):.0f}-{100 * max(share):.0f}% "
              "of the measured time, so per-expert dispatch is not what the roofline misses there. The decode of "
              "1-16 tokens is weight streaming (each chosen expert's 18.9 MB read by a GEMM of 1-2 rows), which the "
              "shipped profile's skinny-GEMM bandwidth prices well. From 64 tokens on, each expert gets 4-16 rows "
              "(2048 x 768 GEMMs): neither memory- nor compute-bound on this CPU, they run near the sum of both "
              f"roofs, not their max (batch {last['batch']}: {flops / 1e9:.1f} GFLOP at {rate / 1e9:.0f} GFLOP/s = "
              f"{flops / rate * 1e3:.0f} ms plus {weights / 1e9:.2f} GB at {stream / 1e9:.0f} GB/s = "
              f"{weights / stream * 1e3:.0f} ms against {ms(last['measured_experts_s'])} ms measured), and the "
              f"roofline's max() is up to {worst:.1f}x short. Prefill (1024 rows over 128 experts, 8 each) is "
              "the same case.",
              f"- The rest (norm, router, gathers, index_add_, residual) costs {min(rest_small):.0f}-{max(rest_small):.0f} "
              f"us per eager op in the small layer's decode ({min(rest_big):.0f}-{max(rest_big):.0f} us in the large "
              "one, where the gathers and index_add_ move real rows), against the 1.2 us of a 1-element add the "
              "profile prices per op: where / index / index_add_ allocate and are heavier. In the small layer "
              "(512 x 256 experts) the experts' tiny GEMMs are launch-bound as well, so the whole layer is 2-3x "
              "the roofline. Pricing dispatch at the shipped kernel_overhead_s is therefore a lower bound on CPU; "
              "on a GPU serving engine the experts run as one grouped GEMM (vLLM's fused_moe) and this dispatch "
              "does not exist, which is what the GPU profiles (kernel_overhead_s 0) assume.",
              f"- The re-measured profile does worse than the shipped one: its one-row calibration GEMM (2048 x 2048 "
              f"weights) streams at {result['calibration']['skinny_matmul_bandwidth'] / 1e9:.1f} GB/s, the experts' "
              f"2048 x 768 matrices at {first_stream / 1e9:.1f} GB/s (batch 1: {first['expected_experts']:.0f} experts' "
              f"weights over the measured experts' time), close to the shipped profile's 12 GB/s.",
              "- Routing: the expected distinct experts U (uniform) matches what the random router chose within "
              "a few percent (U observed), so the weight bytes the roofline reads are right; the misses are in "
              "the time per byte and per FLOP of mid-size GEMMs.", ""]
    v = result["calibration"]
    lines += ["", f"Re-measured figures (one-row skinny matmul): peak {v['peak_flops'] / 1e9:.0f} GFLOP/s, copy "
              f"{v['memory_bandwidth'] / 1e9:.1f} GB/s, memory efficiency {v['memory_efficiency']:.2f}, "
              f"{v['kernel_overhead_s'] * 1e6:.2f} us/op; shipped cpu_local: peak 110 GFLOP/s, copy 40 GB/s, "
              "memory efficiency 0.3, 1.2 us/op.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="three decode batch sizes only")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite moe_cost.md (and its plan lines) from moe_cost.json")
    args = parser.parse_args()
    if args.markdown_only:
        result = json.loads((OUT / "moe_cost.json").read_text())
    else:
        result = run(args.repeats, args.quick)
    result["plan"] = plan_lines()
    OUT.mkdir(exist_ok=True)
    atomic_write_json(OUT / "moe_cost.json", result)
    atomic_write_text(OUT / "moe_cost.md", markdown(result))
    print(f"wrote {OUT / 'moe_cost.md'}")


if __name__ == "__main__":
    main()
