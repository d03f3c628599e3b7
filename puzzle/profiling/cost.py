"""profile's cost model (`puzzle plan`)."""

from typing import Any

from puzzle.footprint import DTYPE_BYTES, Context, Estimate, placed
from puzzle.profiling.hardware import load_profile
from puzzle.profiling.measure import COLD_BYTES


def profile_cost(ctx: Context, s: Any) -> Estimate:
    """profile (puzzle/profiling/commands.py, measure.py): the roofline is arithmetic (no model); `measure`
    (a CPU profile, or a GPU profile on a GPU) times each distinct variant alone in the workload's dtype,
    without gradients: one sublayer's weights cycled through COLD_BYTES of copies, a prefill input
    (B, input_len, D) and the sublayer's op outputs on it, and one layer's KV cache of decode_context
    tokens per sequence (a sliding-window layer caches at most its window: the largest layer's counts)."""
    shape, profile = ctx.shape, load_profile(s.budget)
    kind = profile.device.kind
    measured = s.measure if s.measure is not None else (kind == "cpu" or ctx.machine.device == "cuda")
    if not measured:
        return Estimate("", "profile", note=f"{profile.name}: roofline (no model)", seconds=0.0)
    w, e = profile.workload, DTYPE_BYTES[profile.workload.dtype]
    parts = {shape.parent_attention, *(b.ffn for b in shape.parent_blocks)}  # an MoE parent's FFNs differ by layer
    sublayer = max(shape.activation_bytes_per_token(p, e) for p in parts)
    cached = max(shape.keys(b, w.decode_context) for b in shape.parent_blocks)
    held = (COLD_BYTES + sublayer * w.batch_size * w.input_len
            + shape.kv_cache_bytes_per_token(shape.parent_attention, e) * w.batch_size * int(cached))
    distinct = {(v.kind, v.name): v.config for v in ctx.space.variants()}
    flops = sum(s.repeats * w.batch_size * (shape.prefill_flops(c, w.input_len) + shape.flops_per_token(c, w.decode_context))
                for c in distinct.values())
    est = Estimate("", "profile", flops=flops, dtype=profile.workload.dtype,
                   note=f"{profile.name}: measured, {len(distinct)} variants")
    return placed(est, "cuda" if kind == "gpu" else "cpu", 0, held)
