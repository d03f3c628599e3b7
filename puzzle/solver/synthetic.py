"""Synthetic scores and costs tables shaped like a real run's, for benchmarks, tests and demos.

Costs come from a plain roofline (bf16 weights, one device's peak FLOP/s and memory bandwidth);
quality from a per-layer importance times a per-variant damage, with noise. Nothing here is a
measurement; it only gives the solver problems of realistic size and structure.
"""

import math

import numpy as np
import pandas as pd

from puzzle.model.blocks import AttentionConfig, FFNConfig
from puzzle.shape import FIXED_PARTS, ModelShape
from puzzle.solver.problem import FixedCosts, Workload

BYTES = 2  # bf16
PEAK_FLOPS = 989e12  # H100 SXM dense bf16
BANDWIDTH = 3.35e12  # H100 SXM HBM3, bytes / s


def _shape(layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int) -> ModelShape:
    return ModelShape(hidden, heads, kv_heads, hidden // heads, ffn, layers, vocab, tie_word_embeddings=False)


SHAPES = {  # layer counts of SmolLM2-135M, Llama-3-70B and Llama-3-405B (LM heads counted untied)
    30: _shape(30, 576, 9, 3, 1536, 49152),
    80: _shape(80, 8192, 64, 8, 28672, 128256),
    126: _shape(126, 16384, 128, 8, 53248, 128256),
}


def _attention_variants(shape: ModelShape, n: int) -> list[AttentionConfig]:
    parent = shape.num_attention_heads // shape.num_key_value_heads
    groups = [g for g in range(parent, shape.num_attention_heads + 1) if shape.num_attention_heads % g == 0]
    special = [AttentionConfig(replace_with_linear=True), AttentionConfig(no_op=True)]
    return [AttentionConfig(n_heads_in_group=g) for g in groups[: max(n - 2, 1)]] + special[: n - 1]


def _ffn_variants(shape: ModelShape, n: int) -> list[FFNConfig]:
    sizes = [shape.intermediate_size]
    k = n - 2
    for i in range(1, k):
        sizes.append(max(64, round(shape.intermediate_size * (1 - i / k) / 64) * 64))
    return [FFNConfig(intermediate_size=s) for s in sizes] + [FFNConfig(replace_with_linear=True), FFNConfig(no_op=True)]


def _damage(shape: ModelShape, config: AttentionConfig | FFNConfig) -> float:
    """Made-up quality loss of a variant (0 for the parent's)."""
    if config.no_op:
        return 0.5 if isinstance(config, AttentionConfig) else 0.8
    if config.replace_with_linear:
        return 0.35 if isinstance(config, AttentionConfig) else 0.6
    if isinstance(config, AttentionConfig):
        return 0.03 * math.log2(shape.num_key_value_heads / shape.kv_heads(config))
    return 0.4 * (1 - config.intermediate_size / shape.intermediate_size) ** 1.5


def synthetic_tables(
    num_layers: int = 30,
    attention_variants: int = 4,
    ffn_variants: int = 8,
    seed: int = 0,
    workload: Workload = Workload(batch_size=64, input_len=1024, output_len=256),
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(scores, costs, costs JSON) in the run-directory contracts of docs/contracts.md."""
    shape = SHAPES.get(num_layers) or _shape(num_layers, 1024, 16, 4, 4096, 32000)
    rng = np.random.default_rng(seed)
    b, s_in, s_out = workload.batch_size, workload.input_len, workload.output_len
    ctx = s_in + s_out
    # Layers near both ends matter more (as replace-1-block scores usually show).
    depth = np.linspace(0, 1, num_layers)
    importance = (0.5 + 2.0 * (depth < 0.1) + 1.0 * (depth > 0.9)) * rng.lognormal(0, 0.5, num_layers)

    scores, costs = [], []
    for layer in range(num_layers):
        for kind, configs in (("attention", _attention_variants(shape, attention_variants)), ("ffn", _ffn_variants(shape, ffn_variants))):
            for config in configs:
                # Plain roofline: weights (norms included) and the mean causal prompt (s_in / 2 keys).
                params = shape.params(config)
                attn_flops = b * s_in * shape.attention_flops(config, s_in / 2)
                is_parent = config in (shape.parent_attention, shape.parent_ffn)
                kl = 0.0 if is_parent else float(importance[layer] * _damage(shape, config) * rng.lognormal(0, 0.3))
                kv_bytes = shape.kv_cache_bytes_per_token(config, BYTES) * ctx * b
                prefill = max((2 * params * b * s_in + attn_flops) / PEAK_FLOPS, params * BYTES / BANDWIDTH)
                decode_flops = 2 * params * b + b * shape.attention_flops(config, ctx)
                decode = max(decode_flops / PEAK_FLOPS, (params * BYTES + kv_bytes * (s_in + s_out / 2) / ctx) / BANDWIDTH)
                scores.append(
                    dict(
                        layer=layer, kind=kind, variant=config.name, kl=kl, lm_loss=2.5 + 1.2 * kl,
                        top1_agreement=math.exp(-3 * kl), cosine=1 - 0.1 * kl,
                    )
                )
                costs.append(
                    dict(
                        layer=layer, kind=kind, variant=config.name, params=params, param_bytes=params * BYTES,
                        kv_cache_bytes=kv_bytes, prefill_s=prefill, decode_s=decode, source="roofline",
                        is_parent=is_parent,
                    )
                )
    head = shape.fixed_matmul_params("lm_head")  # applied to every prompt token here
    fixed_params = sum(shape.fixed_params(part) for part in FIXED_PARTS)
    fixed = FixedCosts(
        params=fixed_params,
        param_bytes=fixed_params * BYTES,
        prefill_s=shape.fixed_flops_per_token("lm_head") * b * s_in / PEAK_FLOPS,
        decode_s=max(shape.fixed_flops_per_token("lm_head") * b / PEAK_FLOPS, head * BYTES / BANDWIDTH),
    )
    meta = {
        "profile": "synthetic_h100",
        "hidden_size": shape.hidden_size,
        "workload": dict(workload.__dict__),
        "fixed": dict(fixed.__dict__),
        "constraints": {},
    }
    return pd.DataFrame(scores), pd.DataFrame(costs), meta
