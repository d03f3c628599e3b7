"""Synthetic scores and costs tables shaped like a real run's, for benchmarks, tests and demos.

Costs come from a plain roofline (bf16 weights, one device's peak FLOP/s and memory bandwidth);
quality from a per-layer importance times a per-variant damage, with noise. Nothing here is a
measurement; it only gives the solver problems of realistic size and structure.
"""

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from puzzle.solver.problem import FixedCosts, Workload

BYTES = 2  # bf16
PEAK_FLOPS = 989e12  # H100 SXM dense bf16
BANDWIDTH = 3.35e12  # H100 SXM HBM3, bytes / s


@dataclass(frozen=True)
class Shape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int


SHAPES = {  # layer counts of SmolLM2-135M, Llama-3-70B and Llama-3-405B
    30: Shape(30, 576, 9, 3, 1536, 49152),
    80: Shape(80, 8192, 64, 8, 28672, 128256),
    126: Shape(126, 16384, 128, 8, 53248, 128256),
}


def _attention_variants(shape: Shape, n: int) -> list[str]:
    parent = shape.num_heads // shape.num_kv_heads
    groups = [g for g in range(parent, shape.num_heads + 1) if shape.num_heads % g == 0]
    return [f"attn_g{g}" for g in groups[: max(n - 2, 1)]] + ["attn_linear", "attn_noop"][: n - 1]


def _ffn_variants(shape: Shape, n: int) -> list[str]:
    sizes = [shape.intermediate_size]
    k = n - 2
    for i in range(1, k):
        sizes.append(max(64, round(shape.intermediate_size * (1 - i / k) / 64) * 64))
    return [f"ffn_{s}" for s in sizes] + ["ffn_linear", "ffn_noop"]


def synthetic_tables(
    num_layers: int = 30,
    attention_variants: int = 4,
    ffn_variants: int = 8,
    seed: int = 0,
    workload: Workload = Workload(batch_size=64, input_len=1024, output_len=256),
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(scores, costs, costs JSON) in the run-directory contracts of docs/contracts.md."""
    shape = SHAPES.get(num_layers) or Shape(num_layers, 1024, 16, 4, 4096, 32000)
    rng = np.random.default_rng(seed)
    h, d = shape.hidden_size, shape.hidden_size // shape.num_heads
    b, s_in, s_out = workload.batch_size, workload.input_len, workload.output_len
    ctx = s_in + s_out
    # Layers near both ends matter more (as replace-1-block scores usually show).
    depth = np.linspace(0, 1, num_layers)
    importance = (0.5 + 2.0 * (depth < 0.1) + 1.0 * (depth > 0.9)) * rng.lognormal(0, 0.5, num_layers)

    scores, costs = [], []
    for layer in range(num_layers):
        for kind, names in (("attention", _attention_variants(shape, attention_variants)), ("ffn", _ffn_variants(shape, ffn_variants))):
            for name in names:
                params, kv_heads, attn_flops, damage = 0, 0, 0.0, 0.0
                if name.startswith("attn_g"):
                    kv_heads = shape.num_heads // int(name[6:])
                    params = 2 * h * shape.num_heads * d + 2 * h * kv_heads * d + h
                    attn_flops = 2 * b * shape.num_heads * d * s_in * s_in  # causal QK^T and AV
                    damage = 0.03 * math.log2(shape.num_kv_heads / kv_heads)  # 0 for the parent
                elif name.startswith("ffn_") and name[4:].isdigit():
                    size = int(name[4:])
                    params = 3 * h * size + h
                    damage = 0.4 * (1 - size / shape.intermediate_size) ** 1.5
                elif name.endswith("_linear"):
                    params = h * h + h
                    damage = 0.35 if kind == "attention" else 0.6
                else:  # no-op
                    damage = 0.5 if kind == "attention" else 0.8
                is_parent = name in (f"attn_g{shape.num_heads // shape.num_kv_heads}", f"ffn_{shape.intermediate_size}")
                kl = 0.0 if is_parent else float(importance[layer] * damage * rng.lognormal(0, 0.3))
                kv_bytes = 2 * kv_heads * d * ctx * b * BYTES
                prefill = max((2 * params * b * s_in + attn_flops) / PEAK_FLOPS, params * BYTES / BANDWIDTH)
                decode_flops = 2 * params * b + 4 * b * shape.num_heads * d * ctx * (kv_heads > 0)
                decode = max(decode_flops / PEAK_FLOPS, (params * BYTES + kv_bytes * (s_in + s_out / 2) / ctx) / BANDWIDTH)
                scores.append(
                    dict(
                        layer=layer, kind=kind, variant=name, kl=kl, lm_loss=2.5 + 1.2 * kl,
                        top1_agreement=math.exp(-3 * kl), cosine=1 - 0.1 * kl,
                    )
                )
                costs.append(
                    dict(
                        layer=layer, kind=kind, variant=name, params=params, param_bytes=params * BYTES,
                        kv_cache_bytes=kv_bytes, prefill_s=prefill, decode_s=decode, source="roofline",
                        is_parent=is_parent,
                    )
                )
    embed = shape.vocab_size * h
    fixed_params = 2 * embed + h
    fixed = FixedCosts(
        params=fixed_params,
        param_bytes=fixed_params * BYTES,
        prefill_s=2 * embed * b * s_in / PEAK_FLOPS,
        decode_s=max(2 * embed * b / PEAK_FLOPS, embed * BYTES / BANDWIDTH),
    )
    meta = {
        "profile": "synthetic_h100",
        "hidden_size": h,
        "workload": dict(workload.__dict__),
        "fixed": dict(fixed.__dict__),
        "constraints": {},
    }
    return pd.DataFrame(scores), pd.DataFrame(costs), meta
