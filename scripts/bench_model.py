"""Forward throughput of the heterogeneous model vs transformers' LlamaForCausalLM on the real parent.

Both models hold the same weights (the all-parent child); each repeat times one forward pass of each,
interleaved, so machine noise hits both alike. Writes benchmarks/model.json and benchmarks/model.md.

    .venv/bin/python scripts/bench_model.py [--batch 8 --seq 256 --repeats 7]
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from puzzle.io import atomic_write_json, atomic_write_text
from puzzle.model.checkpoint import load_model, to_puzzle

REPO = Path(__file__).resolve().parents[1]
GGUF = REPO / "assets" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def time_forward(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(x, use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    llama = load_model(GGUF)
    child = to_puzzle(llama)
    torch.manual_seed(0)
    x = torch.randint(0, llama.config.vocab_size, (args.batch, args.seq))
    with torch.inference_mode():
        max_diff = (child(x[:1]).logits - llama(x[:1]).logits).abs().max().item()
    for _ in range(args.warmup):
        time_forward(llama, x), time_forward(child, x)
    t_hf, t_puzzle = [], []
    for _ in range(args.repeats):
        t_hf.append(time_forward(llama, x))
        t_puzzle.append(time_forward(child, x))
    tokens = args.batch * args.seq
    hf_tps = tokens / statistics.median(t_hf)
    pz_tps = tokens / statistics.median(t_puzzle)
    result = {
        "parent": str(GGUF.relative_to(REPO)),
        "batch": args.batch,
        "seq_len": args.seq,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "transformers_s": t_hf,
        "puzzle_s": t_puzzle,
        "transformers_tokens_per_s": hf_tps,
        "puzzle_tokens_per_s": pz_tps,
        "ratio": pz_tps / hf_tps,
        "max_abs_logit_diff": max_diff,
    }
    out = REPO / "benchmarks"
    atomic_write_json(out / "model.json", result)
    md = f"""# Heterogeneous model vs transformers' Llama: forward throughput

Command: `.venv/bin/python scripts/bench_model.py --batch {args.batch} --seq {args.seq} --repeats {args.repeats}`

Parent: SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32), the all-parent child holds identical weights
(max |logit difference| on one row: {max_diff:.2e}). Forward pass, no KV cache, {args.batch}x{args.seq} tokens,
{torch.get_num_threads()} CPU threads, torch {torch.__version__}; {args.repeats} interleaved repeats after {args.warmup} warm-ups, medians.

| model | median s / forward | tokens/s |
|---|---|---|
| transformers LlamaForCausalLM | {statistics.median(t_hf):.3f} | {hf_tps:,.0f} |
| puzzle PuzzleForCausalLM | {statistics.median(t_puzzle):.3f} | {pz_tps:,.0f} |

**Ratio (puzzle / transformers): {pz_tps / hf_tps:.3f}x** (goal >= 0.95x).
"""
    atomic_write_text(out / "model.md", md)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_s")}, indent=2))


if __name__ == "__main__":
    main()
