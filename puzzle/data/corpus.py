"""Reading a corpus: documents (one `str` each) from a directory of text files, a .txt, a .jsonl or a .parquet.

A plain text file (.txt, .rst, .md, hence also .rst.txt) is one document; a .jsonl holds one document a
line in its `text` field; a .parquet one document a row in its `text` column. A directory means every
such file under it, in sorted relative-path order so the documents (and so the split) are the same on
every machine. Blank documents are skipped.
"""

import json
from pathlib import Path
from typing import Iterator

from puzzle.errors import PuzzleError

TEXT_SUFFIXES = (".txt", ".rst", ".md")
RECORD_SUFFIXES = (".jsonl", ".parquet")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES
TEXT_FIELD = "text"
_PARQUET_BATCH_ROWS = 1024


def corpus_files(path: str | Path) -> list[Path]:
    """The files a corpus path stands for: itself, or every supported file under a directory (sorted)."""
    path = Path(path)
    if not path.exists():
        raise PuzzleError(f"corpus not found: {path}")
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise PuzzleError(f"{path}: unsupported corpus file type {path.suffix or '(none)'!r}; use {_supported()}")
        return [path]
    files = [
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUPPORTED_SUFFIXES
        # hidden files and folders (.git, editor swap files) are not corpus text
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    if not files:
        raise PuzzleError(f"corpus directory {path} holds no text files ({_supported()})")
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


def iter_file_documents(path: Path) -> Iterator[str]:
    """The documents of one corpus file, blank ones skipped."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        docs = _jsonl_documents(path)
    elif suffix == ".parquet":
        docs = _parquet_documents(path)
    else:
        # utf-8-sig drops a byte-order mark; a stray undecodable byte must not stop a long run
        docs = iter([path.read_text(encoding="utf-8-sig", errors="replace")])
    for text in docs:
        if text.strip():
            yield text


class Corpus:
    """A re-iterable sequence of documents from a corpus path; each `iter()` reads the files afresh."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.files = corpus_files(self.path)

    def __iter__(self) -> Iterator[str]:
        found = False
        for file in self.files:
            for text in iter_file_documents(file):
                found = True
                yield text
        if not found:
            raise PuzzleError(f"corpus {self.path} is empty: no text in its {len(self.files)} file(s)")

    def __repr__(self) -> str:
        return f"Corpus({str(self.path)!r}, files={len(self.files)})"


def iter_documents(path: str | Path) -> Iterator[str]:
    """Every document of the corpus at `path`, in a deterministic order."""
    return iter(Corpus(path))


def _supported() -> str:
    return ", ".join(SUPPORTED_SUFFIXES) + " or a directory of them"


def _jsonl_documents(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise PuzzleError(f"{path}:{lineno}: not valid JSON") from None
            if not isinstance(record, dict) or TEXT_FIELD not in record:
                raise PuzzleError(f"{path}:{lineno}: no {TEXT_FIELD!r} field (each line must be an object with one)")
            text = record[TEXT_FIELD]
            if not isinstance(text, str):
                raise PuzzleError(f"{path}:{lineno}: {TEXT_FIELD!r} is a {type(text).__name__}, not a string")
            yield text


def _parquet_documents(path: Path) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise PuzzleError(f"{path}: not a readable parquet file ({str(err).splitlines()[0]})") from None
    schema = table.schema_arrow
    if TEXT_FIELD not in schema.names:
        raise PuzzleError(f"{path}: no {TEXT_FIELD!r} column (columns: {', '.join(schema.names) or 'none'})")
    kind = schema.field(TEXT_FIELD).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise PuzzleError(f"{path}: column {TEXT_FIELD!r} holds {kind}, not strings")
    for batch in table.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[TEXT_FIELD]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text
