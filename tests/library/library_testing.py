"""Helpers for the block library tests: a tiny parent on disk and a run directory with prepared data."""

import json
import sys
from pathlib import Path

import numpy as np
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared conftest helpers
from conftest import make_llama, make_tokenizer  # noqa: E402

SEQ_LEN = 32
VOCAB = 320


def write_blocks(run_dir: Path, n_train: int = 64, n_val: int = 8, seq_len: int = SEQ_LEN, seed: int = 0) -> Path:
    """Prepared data as `puzzle prepare-data` lays it out (train/val .bin + meta.json), random token ids."""
    out = Path(run_dir) / "data"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        rng.integers(3, VOCAB, size=(n, seq_len), dtype=np.uint32).tofile(out / f"{split}.bin")
    meta = {"seq_len": seq_len, "dtype": "uint32", "n_train_blocks": n_train, "n_val_blocks": n_val}
    (out / "meta.json").write_text(json.dumps(meta))
    return Path(run_dir)


def save_parent(out: Path, layers: int = 2) -> Path:
    make_llama(num_hidden_layers=layers).save_pretrained(out, safe_serialization=True)
    make_tokenizer().save_pretrained(out)
    return out
