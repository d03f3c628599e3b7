"""convert's cost model (`puzzle plan`)."""

from typing import Any

from puzzle.dtypes import name_of
from puzzle.footprint import DTYPE_BYTES, FP32, PROCESS_BASELINE_BYTES, Context, Estimate, load_peak_bytes


def convert_cost(ctx: Context, s: Any) -> Estimate:
    """convert (a GGUF parent written once as safetensors, puzzle/model/convert.py): transformers' GGUF
    loader dequantises to fp32 (P_fp32), to_puzzle takes the tensors, then the file in `dtype`."""
    e = DTYPE_BYTES.get(name_of(s.dtype), FP32)
    return Estimate("", "convert", host_bytes=PROCESS_BASELINE_BYTES + load_peak_bytes(ctx, FP32),
                    disk_bytes=ctx.model_bytes(e), note="GGUF parent -> safetensors")
