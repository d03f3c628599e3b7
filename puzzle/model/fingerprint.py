"""A model's identity by its content, not its path: `fingerprint(path)`, cheap at any size. Torch-free.

A run's artefacts (parent.json, the importance scores, the library's trained variants and manifest, the
scores table, a realised child, a GKD run, an evaluation, `puzzle run`'s ledger) record the fingerprint of
the parent they were made from; a rerun compares it with the parent on disk now and redoes what was made
from other bytes (a fine-tuned parent re-exported to the same path is another parent).

The rule, for a file:
- at most FULL_HASH_BYTES: sha256 of every byte;
- larger: its size, then
  * a `.safetensors` file: its whole header (every tensor's name, dtype, shape and offsets) and, from every
    tensor's data, WINDOW bytes at its start, middle and end (at most MAX_WINDOWS windows per file, spread
    over the tensors when there are more): a full fine-tune or a merged LoRA changes every element of the
    matrices it touches, so it changes these bytes;
  * any other file (a GGUF, whose header holds the metadata, the tokenizer and the tensor table): its
    first HEAD_BYTES, then MAX_WINDOWS windows of WINDOW bytes evenly spaced over the rest, the last
    bytes included.
  A 70B parent costs tens of MiB of reads, not 140 GB. What the sample can miss: an edit confined to bytes
  no window covers (a few values in the middle of a tensor), which no export or fine-tune produces.
A directory (a Hugging Face model directory, a child): each of its top-level regular files whose name does
not start with a dot, with its name, by the rule above; its subdirectories are other things (a child's
`gkd/` is the next model). A single `.safetensors` parent also covers the `config.json` beside it (its
config is read from there).

A corpus (terabytes of small text files, which prepare-data reads whole when it runs) is known by its
listing instead (`listing_fingerprint`): every file below it with its size and modification time, so a
`puzzle run` with nothing to do reads none of it.

Fingerprints are memoised in-process by (path, size, mtime, ctime, inode): a stage that asks for the same
parent ten times reads it once. The result is a sha256 hex string.
"""

import hashlib
import json
import struct
from pathlib import Path

FULL_HASH_BYTES = 16 << 20  # smaller files are hashed whole
HEAD_BYTES = 16 << 20  # a non-safetensors file's header region (a GGUF's metadata and tensor table)
WINDOW = 4096  # bytes per sampled window
MAX_WINDOWS = 1024  # windows per file (at most 4 MiB of samples)
_MAX_HEADER = 100 << 20  # safetensors' own limit on a header's JSON
_MEMO: dict[tuple, str] = {}


def fingerprint(path: str | Path) -> str:
    """The content fingerprint of a model file or directory (see the module's rule); "absent" for a path
    that does not exist (what an artefact records before its input is made)."""
    path = Path(path)
    if not path.exists():
        return "absent"
    h = hashlib.sha256()
    for name, file in _members(path):
        h.update(f"{name}\0{file_fingerprint(file)}\n".encode())
    return h.hexdigest()


def _members(path: Path) -> list[tuple[str, Path]]:
    """(name, file) pairs a fingerprint covers, in name order."""
    if path.is_file():
        members = [(path.name, path)]
        config = path.parent / "config.json"
        if path.suffix == ".safetensors" and config.is_file():
            members.append((config.name, config))
        return members
    return sorted((p.name, p) for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


def listing_fingerprint(path: str | Path) -> str:
    """sha256 hex of every file at or below `path` (hidden ones aside) with its size and modification time;
    "absent" for a path that does not exist."""
    path = Path(path)
    if not path.exists():
        return "absent"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        rel = p.relative_to(path).as_posix() if p != path else p.name
        if any(part.startswith(".") for part in Path(rel).parts):
            continue
        st = p.stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """sha256 hex of one file by the module's rule (whole when small; size, header and samples when large)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key not in _MEMO:
        _MEMO[key] = _compute(path, st.st_size)
    return _MEMO[key]


def _compute(path: Path, size: int) -> str:
    h = hashlib.sha256(f"size={size}\n".encode())
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            while block := f.read(1 << 20):
                h.update(block)
            return h.hexdigest()
        spans = _safetensors_spans(f, size) if path.suffix == ".safetensors" else None
        if spans is None:  # not safetensors, or a header that does not parse: the generic rule
            spans = [(0, HEAD_BYTES)] + _even(HEAD_BYTES, size)
        for start, length in spans:
            f.seek(start)
            h.update(f.read(length))
    return h.hexdigest()


def _even(start: int, end: int) -> list[tuple[int, int]]:
    """MAX_WINDOWS windows evenly spaced over [start, end), the last ending at `end`."""
    room = end - start - WINDOW
    if room <= 0:
        return [(start, max(end - start, 0))]
    n = MAX_WINDOWS
    return [(start + room * i // (n - 1), WINDOW) for i in range(n)]


def _safetensors_spans(f, size: int) -> list[tuple[int, int]] | None:
    """The header, then each tensor's start, middle and end windows; None when the header does not parse."""
    try:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(_MAX_HEADER, size - 8):
            return None
        header = json.loads(f.read(n))
        base = 8 + n
        tensors = sorted((int(v["data_offsets"][0]), int(v["data_offsets"][1]))
                         for k, v in header.items() if k != "__metadata__")
    except (struct.error, ValueError, KeyError, TypeError, IndexError):
        return None
    windows: list[tuple[int, int]] = []
    for begin, end in tensors:
        length = end - begin
        for at in sorted({0, max(length // 2 - WINDOW // 2, 0), max(length - WINDOW, 0)}):
            windows.append((base + begin + at, min(WINDOW, length)))
    if len(windows) > MAX_WINDOWS:  # spread over the tensors, deterministically
        step = len(windows) / MAX_WINDOWS
        windows = [windows[int(i * step)] for i in range(MAX_WINDOWS)] + [windows[-1]]
    return [(0, base)] + windows


def forget() -> None:
    """Drop the in-process memo (tests that rewrite a file within one clock tick)."""
    _MEMO.clear()
