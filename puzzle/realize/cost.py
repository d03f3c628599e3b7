"""realize's cost model (`puzzle plan`)."""

from typing import Any

from puzzle.footprint import DTYPE_BYTES, PROCESS_BASELINE_BYTES, Context, Estimate


def realize_cost(ctx: Context, s: Any) -> Estimate:
    """realize (puzzle/realize/commands.py, assemble.py stream_child), on the host: the child built on the
    meta device and filled one sublayer at a time from the parent's safetensors and the library (the child,
    at most the parent's size, plus one sublayer), in `dtype` (auto: the parent's stored dtype), then
    streamed to safetensors from its own tensors (`save_model`; `atomic_save_bytes` on the host: nothing)."""
    dtype = ctx.stored_dtype() if s.dtype == "auto" else ctx.runtime("cpu", s.dtype)[1]
    child = ctx.model_bytes(DTYPE_BYTES[dtype])
    return Estimate("", "realize", host_bytes=PROCESS_BASELINE_BYTES + child, disk_bytes=child, dtype=dtype,
                    note=f"child <= parent, {dtype}")
