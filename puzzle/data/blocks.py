"""Reading prepared data back: the packed token blocks of `runs/R/data/` as memmaps, and batches of them.

Layout (written by `puzzle.data.prepare`): `train.bin` and `val.bin` are raw arrays of token ids, shape
(n_blocks, seq_len), dtype from `meta.json`; `val_documents.jsonl` holds the held-out documents' text,
one {"text": ...} a line (what evaluation builds its multiple-choice items from); `meta.json` is written
last, so it exists only when the others are complete, and records the held-out file's sha256.
"""

import json

from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch

from puzzle.errors import PuzzleError
from puzzle.io import read_json, sha256_file
from puzzle.run_dir import RunDir

SPLITS = ("train", "val")
META_NAME = "meta.json"
HELD_OUT_NAME = "val_documents.jsonl"


def data_dir(run_dir: str | Path) -> Path:
    return RunDir(run_dir).data


def bin_path(out_dir: Path, split: str) -> Path:
    return out_dir / f"{split}.bin"


def held_out_path(out_dir: Path) -> Path:
    return out_dir / HELD_OUT_NAME


def load_meta(run_dir: str | Path) -> dict[str, Any]:
    """The `meta.json` of a run directory's prepared data (seq_len, dtype, block counts, fingerprint, ...)."""
    path = data_dir(run_dir) / META_NAME
    if not path.exists():
        raise PuzzleError(
            f"{run_dir} has no prepared data; run `puzzle prepare-data CORPUS PARENT --run-dir {run_dir}` first"
        )
    return read_json(path)


def load_held_out_documents(run_dir: str | Path) -> list[str]:
    """The validation split's documents as prepare-data recorded them (never re-read from the corpus, which
    may have changed since), checked against the sha256 in meta.json."""
    meta = load_meta(run_dir)
    path = held_out_path(data_dir(run_dir))
    want = meta.get("val_documents_sha256")
    if want is None or not path.exists() or sha256_file(path) != want:
        raise PuzzleError(
            f"{path} is missing or does not match its meta.json; rerun `puzzle prepare-data` for {run_dir}"
        )
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def load_blocks(run_dir: str | Path, split: Literal["train", "val"]) -> np.ndarray:
    """The packed blocks of one split as a read-only memmap, shape (n_blocks, seq_len)."""
    if split not in SPLITS:
        raise PuzzleError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    meta = load_meta(run_dir)
    path = bin_path(data_dir(run_dir), split)
    dtype = np.dtype(meta["dtype"])
    shape = (int(meta[f"n_{split}_blocks"]), int(meta["seq_len"]))
    if not path.exists() or path.stat().st_size != shape[0] * shape[1] * dtype.itemsize:
        raise PuzzleError(
            f"{path} is missing or does not match its meta.json; rerun `puzzle prepare-data` for {run_dir}"
        )
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


def check_token_ids(blocks: np.ndarray, vocab_size: int) -> None:
    """Where data meets a model: every token id must index its embedding (else an IndexError mid-forward).
    `blocks` as `load_blocks` returns them (a memmap naming its file) or any array of ids."""
    if len(blocks) == 0:
        return
    top = int(np.max(blocks))
    if top >= vocab_size:
        where = getattr(blocks, "filename", None) or "the prepared data"
        raise PuzzleError(f"{where}: token id {top} is outside the model's vocabulary of {vocab_size} tokens "
                          "(prepared with another tokenizer?); rerun `puzzle prepare-data` with this parent")


def iterate_batches(
    blocks: np.ndarray, batch_size: int, *, shuffle: bool, seed: int, limit: int | None = None
) -> Iterator[torch.LongTensor]:
    """Batches of blocks as int64 tensors of shape (B, seq_len); the last batch may be smaller.

    `shuffle` draws a permutation from `seed` (same seed, same order); `limit` caps the number of
    blocks (not batches), so the data seen does not change with the batch size.
    """
    if batch_size < 1:
        raise PuzzleError(f"batch size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise PuzzleError(f"limit must be at least 1 block, got {limit}")
    if len(blocks) == 0:
        raise PuzzleError("no blocks to iterate over; rerun `puzzle prepare-data` with more text")
    order = shuffled(len(blocks), seed) if shuffle else np.arange(len(blocks))
    if limit is not None:
        order = order[:limit]
    return _batches(blocks, order, batch_size)


def _batches(blocks: np.ndarray, order: np.ndarray, batch_size: int) -> Iterator[torch.LongTensor]:
    for start in range(0, len(order), batch_size):
        yield rows(blocks, order[start : start + batch_size])


def shuffled(n: int, seed: Any) -> np.ndarray:
    """A permutation of range(n) drawn from `seed` (an int or a sequence of ints: numpy's SeedSequence);
    every shuffle of blocks (this module's, puzzle.training's batch streams) draws it here."""
    return np.random.default_rng(seed).permutation(n)


def rows(blocks: np.ndarray, index: Any) -> torch.LongTensor:
    """blocks[index] (an index array or list) as an int64 tensor (B, seq_len). Fancy indexing copies out of
    the read-only memmap, so the tensor owns writable memory."""
    return torch.from_numpy(np.asarray(blocks[index], dtype=np.int64))
