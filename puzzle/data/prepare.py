"""`puzzle prepare-data`: tokenise a corpus, pack it into fixed-length blocks, split it, cache it.

Each document is tokenised without special tokens and followed by a separator (the tokenizer's eos,
else its bos); whole documents go to train or validation by a seeded permutation (never single
blocks, so no document straddles the split); each split is one token stream cut into (n, seq_len)
blocks, ragged tail dropped. The held-out documents' text is kept too (all of them, also past a
--max-tokens cap): evaluation draws its multiple-choice items from them. The result lives in
`runs/R/data/` (see `puzzle.data.blocks`).

Bounded work: the corpus reader hands on documents of at most `corpus.MAX_DOCUMENT_CHARS` characters (a
longer one is cut into pieces at whitespace, each a document), so no tokenizer call sees more than a chunk
of them, whatever one line of the corpus holds; tokenising stops once --max-tokens are kept. Counting,
fingerprinting and writing the held-out text read the corpus once more each, one document at a time.

Resuming: `meta.json` carries a fingerprint of the corpus text, the tokenizer and the settings, and is
written last (bins go to temp names first). A rerun with the same fingerprint does nothing; a changed
one rebuilds; a crash leaves no meta.json for the new settings.
"""

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from puzzle.data.blocks import META_NAME, SPLITS, bin_path, data_dir, held_out_path
from puzzle.data.corpus import Corpus
from puzzle.errors import PuzzleError
from puzzle.io import atomic_open, atomic_write_json, read_json, sha256_file
from puzzle.run_dir import writes_run_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DTYPE = np.dtype(np.uint32)  # any vocabulary fits; the reader takes the dtype from meta.json
# Documents are tokenised in chunks (the fast tokenizer batches them across threads); small enough
# that a --max-tokens run tokenises little beyond its cap.
_CHUNK_DOCS = 32
_CHUNK_CHARS = 1 << 18


@writes_run_dir("prepare_data")
def prepare_data(
    corpus: Path,
    parent: Path,
    run_dir: Path = Path("runs/default"),
    seq_len: int = 256,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_tokens: int | None = None,
) -> Path:
    """Tokenise a corpus into packed train/validation blocks in the run directory.

    Args:
        corpus: a directory of text files (.txt, .rst, .md, .jsonl, .parquet), or one such file;
            .jsonl and .parquet hold one document per line/row in a `text` field
        parent: the parent model (HF directory, .safetensors or .gguf) whose tokenizer to use
        run_dir: the run directory; the blocks go to RUN_DIR/data
        seq_len: tokens per block
        val_fraction: share of documents held out for validation (at least one)
        seed: seed of the document-level train/validation split
        max_tokens: cap on the total number of tokens kept (quick runs); default: the whole corpus
    """
    from puzzle.model.checkpoint import load_tokenizer

    documents = Corpus(corpus)  # a bad corpus path fails before the slow tokenizer load
    if documents.skipped or any(c not in ("utf-8", "utf-8-sig") for c in documents.encodings.values()):
        print(f"corpus {corpus}: {documents.summary()}", flush=True)
    tokenizer = load_tokenizer(parent)
    return prepare_blocks(
        documents,
        tokenizer,
        data_dir(run_dir),
        seq_len=seq_len,
        val_fraction=val_fraction,
        seed=seed,
        max_tokens=max_tokens,
        source=str(Path(corpus).resolve()),
        corpus_files=documents.report(),
    )


def prepare_blocks(
    documents: Iterable[str],
    tokenizer: Any,
    out_dir: Path,
    seq_len: int = 256,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_tokens: int | None = None,
    *,
    source: str | None = None,
    corpus_files: dict[str, Any] | None = None,
) -> Path:
    """Tokenise, pack, split and cache `documents` with `tokenizer` into `out_dir`; returns `out_dir`.

    `documents` is read twice (once to count and fingerprint, once to tokenise): pass a list or a
    re-iterable such as `Corpus`; a one-shot iterator is materialised first. `corpus_files`: what reading
    the files found (`Corpus.report()`: files skipped and why, encodings), recorded in the metadata.
    """
    _check_settings(seq_len, val_fraction, max_tokens)
    if iter(documents) is documents:
        documents = list(documents)
    out_dir = Path(out_dir)
    separator = separator_id(tokenizer)
    n_docs, corpus_hash = _scan(documents)
    settings = {
        "seq_len": seq_len,
        "val_fraction": val_fraction,
        "seed": seed,
        "max_tokens": max_tokens,
        "dtype": DTYPE.name,
        "separator_id": separator,
        "format_version": FORMAT_VERSION,
    }
    fingerprint = _sha256_json({"corpus": corpus_hash, "tokenizer": tokenizer_fingerprint(tokenizer), **settings})
    if is_prepared(out_dir, fingerprint):
        log.info(json.dumps({"event": "prepare_data_cached", "out_dir": str(out_dir)}))
        return out_dir
    if n_docs == 0:
        raise PuzzleError("corpus is empty: no document has any text")
    if n_docs == 1:
        raise PuzzleError(
            "corpus has only 1 document, so no document is left for validation; "
            "give more documents (a directory of files, or a .jsonl with one per line) or split the file"
        )

    is_val = split_documents(n_docs, val_fraction, seed)
    caps = _token_caps(max_tokens, val_fraction, seq_len)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_dir)
    tmp = {split: out_dir / f".{split}.bin.{os.getpid()}.tmp" for split in SPLITS}
    try:
        tokens, used_docs = _tokenise_into(documents, tokenizer, tmp, is_val, caps, separator, n_docs)
        n_blocks = {split: tokens[split] // seq_len for split in SPLITS}
        _check_blocks(n_blocks, tokens, seq_len)
        for split in SPLITS:
            os.truncate(tmp[split], n_blocks[split] * seq_len * DTYPE.itemsize)  # drop the ragged tail
        # The old meta goes first: between the bin swaps and the new meta there is no valid-looking pair.
        (out_dir / META_NAME).unlink(missing_ok=True)
        for split in SPLITS:
            os.replace(tmp[split], bin_path(out_dir, split))
        held_out = _write_held_out(documents, is_val, held_out_path(out_dir))
        meta = {
            **settings,
            "fingerprint": fingerprint,
            "val_documents_sha256": held_out,
            "corpus": source,
            **({"corpus_files": corpus_files} if corpus_files is not None else {}),
            "n_documents": n_docs,
            "n_train_documents": used_docs["train"],
            "n_val_documents": used_docs["val"],
            "n_train_blocks": n_blocks["train"],
            "n_val_blocks": n_blocks["val"],
            "train_tokens": n_blocks["train"] * seq_len,
            "val_tokens": n_blocks["val"] * seq_len,
            "tokens": (n_blocks["train"] + n_blocks["val"]) * seq_len,
            "tokenizer": type(tokenizer).__name__,
            "vocab_size": len(tokenizer),
        }
        atomic_write_json(out_dir / META_NAME, meta)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    log.info(json.dumps({"event": "prepare_data_done", "out_dir": str(out_dir), **meta}))
    return out_dir


def separator_id(tokenizer: Any) -> int:
    """The token that ends each document: eos, else bos."""
    for name in ("eos_token_id", "bos_token_id"):
        token = getattr(tokenizer, name, None)
        if isinstance(token, int):
            return token
    raise PuzzleError(f"tokenizer {type(tokenizer).__name__} has neither an eos nor a bos token to separate documents")


def split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """A bool mask over documents, True = validation: round(n * val_fraction) of them, at least 1, at most n-1."""
    n_val = min(n_docs - 1, max(1, round(n_docs * val_fraction)))
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n_docs)[:n_val]] = True
    return is_val


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides the token ids: the fast tokenizer's full JSON, else its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = backend.to_str()
    else:
        spec = type(tokenizer).__name__ + json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(spec.encode()).hexdigest()


def is_prepared(out_dir: Path, fingerprint: str) -> bool:
    """Whether `out_dir` holds complete data built with this exact fingerprint."""
    meta_path = Path(out_dir) / META_NAME
    if not meta_path.exists():
        return False
    try:
        meta = read_json(meta_path)
    except PuzzleError:
        return False
    if not isinstance(meta, dict) or meta.get("fingerprint") != fingerprint:
        return False
    row_bytes = meta["seq_len"] * np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        path = bin_path(Path(out_dir), split)
        if not path.exists() or path.stat().st_size != meta[f"n_{split}_blocks"] * row_bytes:
            return False
    held_out = held_out_path(Path(out_dir))
    return held_out.exists() and sha256_file(held_out) == meta.get("val_documents_sha256")


def _check_settings(seq_len: int, val_fraction: float, max_tokens: int | None) -> None:
    if seq_len < 2:
        raise PuzzleError(f"--seq-len must be at least 2, got {seq_len}")
    if not 0.0 < val_fraction < 1.0:
        raise PuzzleError(f"--val-fraction must lie strictly between 0 and 1, got {val_fraction}")
    if max_tokens is not None and max_tokens < 2 * seq_len:
        raise PuzzleError(
            f"--max-tokens {max_tokens} leaves no room for one train and one validation block of "
            f"--seq-len {seq_len}; use at least {2 * seq_len}"
        )


def _token_caps(max_tokens: int | None, val_fraction: float, seq_len: int) -> dict[str, float]:
    if max_tokens is None:
        return {"train": math.inf, "val": math.inf}
    val = max(seq_len, math.ceil(max_tokens * val_fraction))
    return {"train": max_tokens - val, "val": val}


def _scan(documents: Iterable[str]) -> tuple[int, str]:
    """Count the documents and hash their text (so the cache follows content, not paths or mtimes)."""
    digest = hashlib.sha256()
    n = 0
    for text in tqdm(documents, desc="reading corpus", unit="doc", leave=False):
        data = text.encode("utf-8", errors="surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
        n += 1
    return n, digest.hexdigest()


def _chunks(documents: Iterable[str]) -> Iterator[list[tuple[int, str]]]:
    chunk: list[tuple[int, str]] = []
    chars = 0
    for index, text in enumerate(documents):
        chunk.append((index, text))
        chars += len(text)
        if len(chunk) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _tokenise_into(
    documents: Iterable[str],
    tokenizer: Any,
    paths: dict[str, Path],
    is_val: np.ndarray,
    caps: dict[str, float],
    separator: int,
    n_docs: int,
) -> tuple[dict[str, int], dict[str, int]]:
    """Stream each split's tokens (document + separator, ...) into its file; returns tokens and documents per split."""
    tokens = dict.fromkeys(SPLITS, 0)
    used_docs = dict.fromkeys(SPLITS, 0)
    files = {split: open(path, "wb") for split, path in paths.items()}
    bar = tqdm(total=n_docs, desc="tokenising", unit="doc")
    try:
        for chunk in _chunks(documents):
            wanted = [(i, text) for i, text in chunk if tokens[_split_of(is_val, i)] < caps[_split_of(is_val, i)]]
            if wanted:
                ids = tokenizer(
                    [text for _, text in wanted], add_special_tokens=False, return_attention_mask=False, verbose=False
                )["input_ids"]
                for (i, _), doc_ids in zip(wanted, ids):
                    split = _split_of(is_val, i)
                    room = caps[split] - tokens[split]
                    if room <= 0:
                        continue
                    row = np.asarray([*doc_ids, separator], dtype=DTYPE)[: int(min(room, len(doc_ids) + 1))]
                    files[split].write(row.tobytes())
                    tokens[split] += len(row)
                    used_docs[split] += 1
            bar.update(len(chunk))
            bar.set_postfix(train_tokens=tokens["train"], val_tokens=tokens["val"], refresh=False)
            if all(tokens[split] >= caps[split] for split in SPLITS):
                break
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
        bar.close()
    return tokens, used_docs


def _write_held_out(documents: Iterable[str], is_val: np.ndarray, path: Path) -> str:
    """Every validation document's text, one {"text": ...} a line (atomically, streamed: one document in
    memory at a time); returns the file's sha256."""
    with atomic_open(path) as f:
        for i, text in enumerate(documents):
            if is_val[i]:
                f.write((json.dumps({"text": text}) + "\n").encode())
    return sha256_file(path)


def _split_of(is_val: np.ndarray, index: int) -> str:
    return "val" if is_val[index] else "train"


def _check_blocks(n_blocks: dict[str, int], tokens: dict[str, int], seq_len: int) -> None:
    for split in SPLITS:
        if n_blocks[split] == 0:
            name = "train" if split == "train" else "validation"
            raise PuzzleError(
                f"the {name} split has {tokens[split]} tokens, fewer than one block of --seq-len {seq_len}; "
                f"use a shorter --seq-len, {'a larger --val-fraction, ' if split == 'val' else ''}or more text"
            )


def _remove_stale_temps(out_dir: Path) -> None:
    """Temp bins a crashed run left behind (this module's names only)."""
    for split in SPLITS:
        for path in out_dir.glob(f".{split}.bin.*.tmp"):
            path.unlink(missing_ok=True)


def _sha256_json(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
