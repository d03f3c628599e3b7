"""evaluate's cost model (`puzzle plan`)."""

from pathlib import Path
from typing import Any

from puzzle.footprint import DTYPE_BYTES, Context, Estimate, load_peak_bytes, placed, unread_bytes


def evaluate_cost(ctx: Context, s: Any) -> Estimate:
    """evaluate (puzzle/evaluate/commands.py, quality.py): load_model(dtype) of the model (<= P_e) and of
    the parent (P_e), each placed on the device after loading (the parent against itself: loaded once);
    per batch both models' logits and their log-softmax temporaries (fp32, b x V each) and one layer's
    activations (e)."""
    shape, T = ctx.shape, ctx.seq_len
    device, dtype = ctx.runtime(s.device, s.dtype)
    e, b = DTYPE_BYTES[dtype], s.batch_size * T
    same = s.model is not None and s.parent is not None and Path(s.model).resolve() == Path(s.parent).resolve()
    models = 1 if same else 2
    working = models * (ctx.model_bytes(e) - unread_bytes(ctx, device, e, logits=True))
    working += 4 * b * ctx.logits_bytes_per_token + ctx.layer_activation_bytes(b, e)
    flops = s.val_blocks * T * 2 * shape.model_flops_per_token(None, T / 2)
    est = Estimate("", "evaluate", flops=flops, dtype=dtype, note="model <= parent, next to the parent")
    return placed(est, device, load_peak_bytes(ctx, e), working)
