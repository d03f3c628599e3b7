"""evaluate's cost model (`puzzle plan`)."""

from pathlib import Path
from typing import Any

from puzzle.footprint import DTYPE_BYTES, FP32, Context, Estimate, load_peak_bytes, placed, unread_bytes
from puzzle.metrics import CHUNK_TOKENS, KL_CHUNK_TEMPORARIES


def evaluate_cost(ctx: Context, s: Any) -> Estimate:
    """evaluate (puzzle/evaluate/commands.py, quality.py): load_model(dtype) of the model (<= P_e) and of
    the parent (P_e), each placed on the device after loading (the parent against itself: loaded once);
    per batch one layer's activations (e) and the loss of `quality_metrics` (`metrics.kd_terms`, one chunk of
    n = min(b, CHUNK_TOKENS) tokens at a time): KL_CHUNK_TEMPORARIES (n, V) fp32 tensors, and in a low dtype
    e the two heads' (n, V) logits before their upcast. Measured on an H200 (scripts/gpu_check.sh, bf16,
    b = 1024, V = 49152): 1.66 GiB for the parent against itself, where the former 4 x (b, V) fp32 priced 1.02."""
    shape, T = ctx.shape, ctx.seq_len
    device, dtype = ctx.runtime(s.device, s.dtype)
    e, b = DTYPE_BYTES[dtype], s.batch_size * T
    same = s.model is not None and s.parent is not None and Path(s.model).resolve() == Path(s.parent).resolve()
    models = 1 if same else 2
    working = models * (ctx.model_bytes(e) - unread_bytes(ctx, device, e, logits=True))
    n = min(b, CHUNK_TOKENS)
    working += KL_CHUNK_TEMPORARIES * n * ctx.logits_bytes_per_token + ctx.layer_activation_bytes(b, e)
    if e != FP32:
        working += 2 * n * shape.vocab_size * e
    flops = s.val_blocks * T * 2 * shape.model_flops_per_token(None, T / 2)
    est = Estimate("", "evaluate", flops=flops, dtype=dtype, note="model <= parent, next to the parent")
    return placed(est, device, load_peak_bytes(ctx, e), working)
