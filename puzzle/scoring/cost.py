"""score's cost model: `puzzle plan`'s estimate and each Ray worker's request (scoring/ray_jobs.py)."""

import math
from typing import Any

from puzzle.footprint import DTYPE_BYTES, FP32, Context, Estimate, load_peak_bytes, placed, unread_bytes

# Library entries kept in memory after their first load, as a share of the parent's bytes: the parent and
# the kept entries stay within 1.5x the parent (a search space's library is several parents' worth).
KEEP_LIBRARY = 0.5


def score_cost(ctx: Context, s: Any) -> Estimate:
    """score (puzzle/scoring/commands.py, replace1.py; `s`: its arguments, or a Ray worker's `ScoreJob`):
    load_puzzle(parent, dtype) on the host (P_e), then placed on its device. There: the parent P_e; per
    batch the parent's probabilities (b x V fp32), two (chunk_tokens, V) fp32 temporaries, the cached prefix
    and final hidden states (a few b x D in e), one library variant's weights (e); on the host the library
    entries kept after their first load (`store.LibraryReader`, at most `KEEP_LIBRARY` x P_e; none for a
    single batch). Each variant runs from its layer to the end (the prefix is reused). On the CPU less the
    weights it never reads (`unread_bytes`)."""
    shape, T = ctx.shape, ctx.seq_len
    device, dtype = ctx.runtime(s.device, s.dtype)
    e, b = DTYPE_BYTES[dtype], s.batch_size * T
    V, D, L = shape.vocab_size, shape.hidden_size, shape.num_hidden_layers
    largest = max(shape.params(v.config) for v in ctx.space.variants())
    working = (b * V + 2 * s.chunk_tokens * V) * FP32 + (4 * b * D + largest) * e + ctx.layer_activation_bytes(b, e)
    working -= unread_bytes(ctx, device, e, logits=True)
    batches = math.ceil(s.blocks / s.batch_size)
    kept = KEEP_LIBRARY * ctx.model_bytes(e) if batches > 1 else 0  # a single batch uses each entry once
    per_token = shape.model_flops_per_token(None, T / 2)  # the parent reference
    head = shape.fixed_flops_per_token("lm_head")
    parent_blocks = shape.parent_blocks  # an MoE parent's differ by layer
    for v in ctx.space.variants():
        if not v.is_parent:
            rest = sum(shape.flops_per_token(parent_blocks[i], T / 2) for i in range(v.layer + 1, L))
            per_token += shape.flops_per_token(v.config, T / 2) + rest + head
    tokens = s.blocks * T
    rows = sum(1 for _ in ctx.space.variants()) * s.blocks
    est = Estimate("", "score", disk_bytes=rows * 128, flops=tokens * per_token, dtype=dtype)
    placed(est, device, load_peak_bytes(ctx, e), ctx.model_bytes(e) + working)
    est.host_bytes += kept
    return est
