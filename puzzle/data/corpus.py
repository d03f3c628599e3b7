"""Reading a corpus: documents (one `str` each) from a directory of text files, a .txt, a .jsonl or a .parquet.

A plain text file (.txt, .rst, .md, hence also .rst.txt) is one document; a .jsonl holds one document a
line in its `text` field; a .parquet one document a row in its `text` column. A directory means every
such file under it, in sorted relative-path order so the documents (and so the split) are the same on
every machine. Blank documents are skipped.

Bounded pieces: a document longer than `MAX_DOCUMENT_CHARS` characters (a 180 MB single-line file) becomes
several documents of at most that many, each cut where a run of whitespace starts (so the next piece begins
with the whitespace, as a whitespace-splitting tokenizer would have split there), or at the limit itself
when the window holds no whitespace. A text file is read in blocks, never whole, and every string a reader
hands on (to prepare-data's tokenizer among others) is at most that long. Documents up to the limit are
exactly what they were.

Encodings (text and .jsonl files), decided from the file's first `_SAMPLE_BYTES`: a UTF-16 or UTF-8
byte-order mark is obeyed; valid UTF-8 is UTF-8; a file whose non-ASCII bytes are all invalid UTF-8 and
that decodes as cp1252 (a superset of Latin-1's printable range) into printable characters is Latin-1 text,
read as cp1252; otherwise UTF-8 where up to `MAX_UNDECODABLE` of the bytes may be undecodable (each becomes
U+FFFD: one stray byte must not stop a long run), or cp1252 when printable. Anything else (NUL bytes
outside UTF-16, random bytes) is skipped, never turned into training tokens: `Corpus.skipped` says which
files and why, `Corpus.summary()` in one line.
"""

import codecs
import json
from collections import Counter
from pathlib import Path
from typing import Iterator

from puzzle.errors import PuzzleError

TEXT_SUFFIXES = (".txt", ".rst", ".md")
RECORD_SUFFIXES = (".jsonl", ".parquet")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES
TEXT_FIELD = "text"
_PARQUET_BATCH_ROWS = 1024
_SAMPLE_BYTES = 1 << 20  # what the encoding is decided from
# The longest document handed on. A fast tokenizer holds ~300 bytes per token of one call (ids, offsets, token
# strings; a 180 MB line asked for 1.3 GB at once and aborted at 7.4 GB), so a piece of this many characters
# costs at most ~80 MB even at one token per character. Larger than any file of the reference corpus (the
# Python 3.11 docs, 212 KB at most), so its documents stay whole.
MAX_DOCUMENT_CHARS = 1 << 18
_READ_CHARS = 1 << 18  # a text file is read in blocks of this many characters
_SPACES = " \n\t\r\f\v"  # the cut points looked for (with C speed, by str.rfind)
MAX_UNDECODABLE = 0.01  # share of a UTF-8 file's bytes that may be undecodable
_MIN_PRINTABLE = 0.99  # share of printable characters (or whitespace) for cp1252 text
_BOMS = ((codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"), (codecs.BOM_UTF8, "utf-8-sig"))


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


def detect_encoding(sample: bytes) -> tuple[str | None, str]:
    """(codec, why) for a file whose first bytes are `sample`; codec None means: skip it, because `why`."""
    for bom, codec in _BOMS:
        if sample.startswith(bom):
            return codec, f"{codec} byte-order mark"
    if b"\x00" in sample:
        return None, "binary (NUL bytes)"
    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    text = decoder.decode(sample, final=False)  # a character cut at the sample's end is not an error
    pending = len(decoder.getstate()[0])
    bad = len(sample) - pending - len(text.encode("utf-8"))
    if bad == 0:
        return "utf-8", "utf-8"
    # Latin-1 text: no valid multi-byte UTF-8 sequence at all (UTF-8 text with a stray byte has them, and
    # would turn into mojibake as cp1252), and printable as cp1252
    multibyte = sum(b >= 0x80 for b in sample) - bad - pending
    if multibyte == 0 and _printable_cp1252(sample):
        return "cp1252", "not utf-8, printable as cp1252 (latin-1)"
    if bad <= MAX_UNDECODABLE * len(sample):
        return "utf-8", "utf-8"
    if _printable_cp1252(sample):
        return "cp1252", "not utf-8, printable as cp1252 (latin-1)"
    return None, f"undecodable ({bad} of the first {len(sample)} bytes are not utf-8, and it is not latin-1 text)"


def _printable_cp1252(sample: bytes) -> bool:
    try:
        text = sample.decode("cp1252")
    except UnicodeDecodeError:  # bytes cp1252 leaves undefined (0x81, 0x8d, 0x8f, 0x90, 0x9d)
        return False
    return bool(text) and sum(c.isprintable() or c in "\t\n\r\f" for c in text) >= _MIN_PRINTABLE * len(text)


def _file_encoding(path: Path) -> tuple[str | None, str]:
    with open(path, "rb") as f:
        return detect_encoding(f.read(_SAMPLE_BYTES))


def iter_file_documents(path: Path, encoding: str | None = None) -> Iterator[str]:
    """The documents of one corpus file, blank ones skipped. `encoding`: the codec of a text or .jsonl
    file (default: detected; an unreadable file is a PuzzleError here, skipped by `Corpus`)."""
    suffix = path.suffix.lower()
    if suffix != ".parquet" and encoding is None:
        encoding, why = _file_encoding(path)
        if encoding is None:
            raise PuzzleError(f"{path}: not text: {why}")
    if suffix == ".jsonl":
        docs = (piece for text in _jsonl_documents(path, encoding) for piece in pieces(text))
    elif suffix == ".parquet":
        docs = (piece for text in _parquet_documents(path) for piece in pieces(text))
    else:
        docs = _text_pieces(path, encoding)
    for text in docs:
        if text.strip():
            yield text


def pieces(text: str, limit: int | None = None) -> Iterator[str]:
    """`text` in consecutive pieces of at most `limit` (default MAX_DOCUMENT_CHARS) characters (itself when it
    is no longer), each cut where a run of whitespace starts (`_cut`); joined, they are `text`."""
    limit = limit or MAX_DOCUMENT_CHARS
    start = 0
    while len(text) - start > limit:
        end = _cut(text, start, limit)
        yield text[start:end]
        start = end
    yield text[start:] if start else text


def _cut(text: str, start: int, limit: int) -> int:
    """Where the piece starting at `start` ends (needs len(text) > start + limit): at the start of the last run
    of whitespace that begins within (start, start + limit]; at start + limit when there is none."""
    end = start + limit
    space = max(text.rfind(c, start + 1, end + 1) for c in _SPACES)
    if space < 0:
        return end
    run_start = start + len(text[start:space].rstrip())  # back to the first character of the run
    return run_start if run_start > start else space


def _text_pieces(path: Path, encoding: str) -> Iterator[str]:
    """A text file's one document as `pieces` gives it, read `_READ_CHARS` at a time: the same cuts (each is
    decided only once `limit` + 1 characters past the piece's start are in the buffer), never the whole file
    in memory. Newlines are translated as `Path.read_text` does."""
    buffer, limit = "", MAX_DOCUMENT_CHARS
    with open(path, encoding=encoding, errors="replace") as f:
        while block := f.read(_READ_CHARS):
            buffer += block
            start = 0
            while len(buffer) - start > limit:
                end = _cut(buffer, start, limit)
                yield buffer[start:end]
                start = end
            buffer = buffer[start:]
    yield buffer


class Corpus:
    """A re-iterable sequence of documents from a corpus path; each `iter()` reads the files afresh.

    `encodings` maps each readable text/.jsonl file to its codec; `skipped` maps each unreadable file to
    why it is skipped (both decided once, here)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.files = corpus_files(self.path)
        self.encodings: dict[Path, str] = {}
        self.skipped: dict[Path, str] = {}
        for file in self.files:
            if file.suffix.lower() == ".parquet":
                continue
            encoding, why = _file_encoding(file)
            if encoding is None:
                self.skipped[file] = why
            else:
                self.encodings[file] = encoding

    def __iter__(self) -> Iterator[str]:
        found = False
        for file in self.files:
            if file in self.skipped:
                continue
            for text in iter_file_documents(file, self.encodings.get(file)):
                found = True
                yield text
        if not found:
            raise PuzzleError(f"corpus {self.path} is empty: no text in its {len(self.files)} file(s)"
                              + (f" ({self.summary()})" if self.skipped else ""))

    def summary(self) -> str:
        """One line: how many files were skipped and why (the first few named), and non-UTF-8 decodings."""
        parts = []
        if self.skipped:
            reasons = Counter(why.split(" (")[0] for why in self.skipped.values())
            names = [p.name for p in list(self.skipped)[:3]] + (["..."] if len(self.skipped) > 3 else [])
            parts.append(f"skipped {len(self.skipped)} of {len(self.files)} files as not text "
                         f"({', '.join(f'{why}: {n}' for why, n in sorted(reasons.items()))}): {', '.join(names)}")
        other = {c: n for c, n in sorted(Counter(self.encodings.values()).items()) if c not in ("utf-8", "utf-8-sig")}
        if other:
            parts.append("decoded as " + ", ".join(f"{c}: {n} file(s)" for c, n in other.items()))
        return "; ".join(parts) if parts else f"all {len(self.files)} files read as utf-8"

    def report(self) -> dict[str, object]:
        """What prepare-data records in its metadata about the files it read."""
        return {
            "files": len(self.files),
            "skipped": {str(p): why for p, why in self.skipped.items()},
            "encodings": dict(sorted(Counter(self.encodings.values()).items())),
        }

    def __repr__(self) -> str:
        return f"Corpus({str(self.path)!r}, files={len(self.files)})"


def iter_documents(path: str | Path) -> Iterator[str]:
    """Every document of the corpus at `path`, in a deterministic order."""
    return iter(Corpus(path))


def _supported() -> str:
    return ", ".join(SUPPORTED_SUFFIXES) + " or a directory of them"


def _jsonl_documents(path: Path, encoding: str) -> Iterator[str]:
    with open(path, encoding=encoding, errors="replace") as f:
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
