"""prepare-data's cost model (`puzzle plan`), and the training tokens every later stage's estimate reads."""

from pathlib import Path
from typing import Any

from puzzle.footprint import PROCESS_BASELINE_BYTES, Context, Estimate

TOKEN_BYTES = 4  # prepared blocks are uint32 (puzzle/data/prepare.py DTYPE)
TOKENIZE_PER_S = 2e5  # assumed tokenizer throughput of prepare-data (tokens/s, one core): no FLOPs to count
CHARS_PER_TOKEN = 4.0  # assumed, to size a corpus without tokenising it when prepare_data has no max_tokens


def corpus_tokens(corpus: Path) -> int:
    """A corpus's tokens estimated from its bytes (0 when it does not exist yet)."""
    if not corpus.exists():
        return 0
    files = [corpus] if corpus.is_file() else [p for p in corpus.rglob("*") if p.is_file()]
    return int(sum(p.stat().st_size for p in files) / CHARS_PER_TOKEN)


def train_tokens(s: Any, corpus: Path) -> int:
    """prepare-data's training tokens (`s`: its arguments): max_tokens, else the corpus's, less validation."""
    return int((s.max_tokens or corpus_tokens(corpus)) * (1 - s.val_fraction))


def prepare_data_cost(ctx: Context, s: Any) -> Estimate:
    """prepare-data: tokenises documents one at a time and packs them into uint32 rows of seq_len; holds
    the packed rows (and the token ids of the document being packed) until they are written."""
    tokens = ctx.train_tokens
    return Estimate("", "prepare_data", host_bytes=PROCESS_BASELINE_BYTES + tokens * TOKEN_BYTES,
                    disk_bytes=tokens * TOKEN_BYTES, seconds=tokens / TOKENIZE_PER_S,
                    note=f"{tokens / 1e6:.1f}M tokens at an assumed {TOKENIZE_PER_S:.0e} tokens/s")
