"""Atomic, safe file I/O shared by every stage: JSON/YAML/parquet/safetensors, never pickle.

Everything goes to a temp file in the destination directory and is then `os.replace`d, so a crash
leaves either the old file or the new one, never half of one. A kill -9 mid-write can leave the temp file
(`.NAME.XXXXXXXX.tmp`, or an atomic directory's `.NAME.tmp-XXXXXXXX/`); `clean_stale_temps` removes such
leftovers when a stage starts.

Tables (`write_table`) get a checksum sidecar `NAME.parquet.sha256` (JSON: {"sha256", "bytes", "rebuild"}),
checked by `read_table`: a flipped or truncated byte, or a missing sidecar (every table we write has one, so
a table without it was changed or replaced behind our back), ends in one line naming the file and the
command that rebuilds it, never in a silently changed value or a pyarrow traceback.

Safetensors files (`write_safetensors`, `atomic_save_safetensors`) are streamed: the header is computed from
the tensors' dtypes and shapes, then each tensor's bytes go from its own storage to the file, so writing a
model or an optimizer's state holds no second copy of it (one tensor at a time when it must be made
contiguous or brought from a GPU).
"""

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

import pandas as pd
import yaml

from puzzle.errors import PuzzleError


# mkstemp(prefix=".NAME.", suffix=".tmp") names: a dot, the target's name, a dot, 8 random characters, .tmp
_TEMP_FILE = r"\.{name}\.[A-Za-z0-9_]{{8}}\.tmp"
# puzzle.model.checkpoint's temporary directories: `atomic_dir`'s `.NAME.tmp-XXXXXXXX` (a directory being
# written) and `commit_dir`'s `.NAME.old-XXXXXXXX` (the version being replaced, set aside for a moment)
_TEMP_DIR = r"\.{name}\.(?:tmp|old)-[0-9a-f]{{8}}"
_PROCESS_START = time.time()  # temporaries older than this process are no writer's of ours


def _temp_file(path: Path) -> tuple[int, str]:
    # mkstemp opens with O_CREAT | O_EXCL (and O_NOFOLLOW where there is one): always a new file, never one
    # planted in its place (a symlink included)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def _newest_mtime(path: Path) -> float:
    """When anything under `path` last changed: a directory a live writer is still filling stays new."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_mtime
    return max([path.lstat().st_mtime] + [p.lstat().st_mtime for p in path.rglob("*")])


def clean_stale_temps(directory: str | Path, recursive: bool = False, name: str | None = None) -> list[Path]:
    """Remove leftovers of interrupted atomic writes in `directory` (and below it, with `recursive`): files
    named like our temp files and directories named like `checkpoint.atomic_dir`'s (or `commit_dir`'s
    set-aside old version), last modified before this process started (so a live writer's temporary is left
    alone). `name`: only the temporaries of that one target (`.NAME.…`), for a directory that is not ours
    alone. Returns the removed paths."""
    directory = Path(directory)
    target = ".+" if name is None else re.escape(name)
    file_pattern, dir_pattern = re.compile(_TEMP_FILE.format(name=target)), re.compile(_TEMP_DIR.format(name=target))
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for path in sorted(directory.iterdir()):
        if path.is_symlink():
            continue  # never followed, never removed: not something we create
        if path.is_dir() and dir_pattern.fullmatch(path.name):  # a temporary directory: whole or not at all
            if _newest_mtime(path) < _PROCESS_START:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        elif path.is_dir():
            if recursive:
                removed += clean_stale_temps(path, recursive=True, name=name)
        elif file_pattern.fullmatch(path.name) and _newest_mtime(path) < _PROCESS_START:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: a temp file beside it, flushed, fsynced and `os.replace`d over
    `path` when the block ends; removed, leaving `path` as it was, when the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise naming(err, path) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def naming(err: OSError, path: str | Path) -> OSError:
    """`err` naming the file it was writing: a write that fails (ENOSPC from `write` or `fsync`) says only
    what failed, not where; the CLI prints the path with what to do."""
    if err.filename is not None:
        return err
    return type(err)(err.errno, err.strerror or str(err), str(path))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# safetensors' dtype names in the declaration order of its `Dtype` enum, which "MUST be in increasing
# alignment order" (huggingface/safetensors safetensors/src/tensor.rs `enum Dtype`). The same file's
# `prepare` lays the tensors out sorted by that order descending, then by name, and writes the header as
# {"__metadata__": ..., name: {"dtype", "shape", "data_offsets"}, ...} in that order, padded with spaces to a
# multiple of 8 bytes.
_SAFETENSORS_DTYPES = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
                       "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64",
                       "F64", "I64", "U64")
_SAFETENSORS_RANK = {name: i for i, name in enumerate(_SAFETENSORS_DTYPES)}
# torch's name for each (safetensors.torch `_TYPES`); a dtype this torch lacks is left out
_TORCH_TO_SAFETENSORS = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "float8_e5m2": "F8_E5M2", "float8_e4m3fn": "F8_E4M3",
    "float8_e8m0fnu": "F8_E8M0", "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "int16": "I16", "uint16": "U16", "float16": "F16", "bfloat16": "BF16", "int32": "I32", "uint32": "U32",
    "float32": "F32", "complex64": "C64", "float64": "F64", "int64": "I64", "uint64": "U64",
}


@functools.cache
def _safetensors_dtypes() -> dict:
    import torch

    return {getattr(torch, k): v for k, v in _TORCH_TO_SAFETENSORS.items() if hasattr(torch, k)}


def _safetensors_dtype(name: str, dtype: Any) -> str:
    try:
        return _safetensors_dtypes()[dtype]
    except KeyError:
        raise TypeError(f"{name}: {dtype} cannot be stored in safetensors") from None


def _stored_dtype(tensor: Any, dtype: Any) -> Any:
    """The dtype `tensor` is written in: `dtype` for a floating tensor when one is given, else its own."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def safetensors_header(tensors: Mapping[str, Any], metadata: dict[str, str] | None = None,
                       dtype: Any = None) -> tuple[bytes, list[str]]:
    """(the header: 8-byte little-endian length + JSON padded with spaces to 8 bytes, the names in the order
    their bytes follow it), from dtypes and shapes alone (floating tensors in `dtype` when given): the bytes
    safetensors' `serialize` writes (tensor.rs `prepare`), with `metadata` sorted (safetensors writes it from
    a Rust HashMap, whose order changes from map to map) so identical inputs give identical files."""
    if metadata is not None and not all(isinstance(x, str) for kv in metadata.items() for x in kv):
        raise TypeError(f"safetensors metadata maps strings to strings, not {metadata!r}")
    stored = {name: _stored_dtype(t, dtype) for name, t in tensors.items()}
    names = {name: _safetensors_dtype(name, d) for name, d in stored.items()}
    order = sorted(tensors, key=lambda name: (-_SAFETENSORS_RANK[names[name]], name))
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in order:
        n = tensors[name].numel() * stored[name].itemsize
        header[name] = {"dtype": names[name], "shape": list(tensors[name].shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


def _write_tensor(f: BinaryIO, tensor: Any, dtype: Any) -> int:
    """A tensor's bytes from its own storage: a contiguous CPU tensor already in `dtype` through a uint8 view
    (no copy); any other converted, made contiguous and brought to the CPU first (a copy of this one
    tensor). Returns the bytes written."""
    import torch

    t = tensor.detach()
    if t.device.type != "cpu" or not t.is_contiguous() or t.dtype != dtype:
        t = t.to(dtype).contiguous().cpu()
    if t.numel():
        f.write(t.reshape(-1).view(torch.uint8).numpy())
    return t.numel() * t.element_size()


def write_safetensors(f: BinaryIO, tensors: Mapping[str, Any], metadata: dict[str, str] | None = None,
                      dtype: Any = None) -> int:
    """Stream `tensors` (name -> torch tensor, any device or layout) to the binary file `f` in the
    safetensors format, the header first and then each tensor's bytes straight from its storage; returns
    the bytes written. `dtype`: store floating tensors in it, each converted just before it is written.
    Tensors sharing storage are each written whole (safetensors' own `save` refuses them). The bytes are
    those `safetensors.torch.save` writes, metadata sorted (`safetensors_header`)."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; writing them on a big-endian host is not supported")
    header, order = safetensors_header(tensors, metadata, dtype)
    f.write(header)
    return len(header) + sum(_write_tensor(f, tensors[n], _stored_dtype(tensors[n], dtype)) for n in order)


def safetensors_bytes(tensors: Mapping[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's bytes in memory (for a small file that is hashed before it is written),
    identical for identical inputs: `write_safetensors` into a buffer."""
    buf = io.BytesIO()
    write_safetensors(buf, tensors, metadata)
    return buf.getvalue()


def atomic_save_safetensors(path: str | Path, tensors: Mapping[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` as a safetensors file at `path` atomically, streamed (`write_safetensors`): no
    serialised copy of the tensors is held."""
    with atomic_open(path) as f:
        write_safetensors(f, tensors, metadata)
    return Path(path)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise PuzzleError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise PuzzleError(f"{path}: not valid JSON ({err})") from None


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise PuzzleError(f"file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else "syntax error"
        raise PuzzleError(f"{path}: not valid YAML ({first})") from None


_CHECKSUM_SUFFIX = ".sha256"  # not .json: stages list their JSON outputs with glob("*.json")
_REBUILD_DEFAULT = "the stage that wrote it"


def table_checksum_path(parquet: str | Path) -> Path:
    parquet = Path(parquet)
    return parquet.with_name(parquet.name + _CHECKSUM_SUFFIX)


def write_table(df: pd.DataFrame, path_without_suffix: str | Path, rebuild: str | None = None) -> Path:
    """Write `df` as .parquet (read back by the pipeline, with its checksum sidecar) and .csv (for people);
    returns the parquet path. `rebuild`: the command that rewrites it (e.g. "puzzle score --run-dir R"),
    named when a read finds the table damaged."""
    base = Path(path_without_suffix)
    base.parent.mkdir(parents=True, exist_ok=True)
    parquet = base.with_suffix(".parquet")
    fd, tmp = _temp_file(parquet)
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        # the sidecar first: a crash between the two leaves a mismatch (rebuilt on rerun), never a stale match
        atomic_write_json(table_checksum_path(parquet), {
            "sha256": sha256_file(tmp), "bytes": os.path.getsize(tmp), "rebuild": rebuild or _REBUILD_DEFAULT,
        })
        os.replace(tmp, parquet)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_text(base.with_suffix(".csv"), df.to_csv(index=False))
    return parquet


def table_problem(parquet: str | Path) -> str | None:
    """Why the parquet table at `parquet` cannot be trusted (missing, without its checksum sidecar, or not
    matching the checksum recorded there), or None when it is whole."""
    parquet = Path(parquet)
    if not parquet.is_file():
        return "not found"
    sidecar = table_checksum_path(parquet)
    if not sidecar.exists():
        return f"its checksum file {sidecar.name} is missing, so it cannot be verified"
    try:
        record = json.loads(sidecar.read_text())
        expected = record["sha256"]
    except (ValueError, KeyError, TypeError):
        return f"its checksum file {sidecar.name} is unreadable"
    if parquet.stat().st_size != record.get("bytes") or sha256_file(parquet) != expected:
        return "damaged: its bytes do not match the checksum recorded when it was written"
    return None


def _rebuild_hint(parquet: Path, rebuild: str | None) -> str:
    """The command recorded in the sidecar, else the caller's `rebuild`, else a generic one."""
    try:
        recorded = json.loads(table_checksum_path(parquet).read_text()).get("rebuild")
    except (OSError, ValueError, AttributeError):
        recorded = None
    return str(recorded or rebuild or _REBUILD_DEFAULT)


def read_table(path: str | Path, rebuild: str | None = None) -> pd.DataFrame:
    """A table written by `write_table`, its checksum verified; any damage (a missing sidecar included) is a
    one-line `PuzzleError` naming the command that rebuilds it: the one recorded in the sidecar, else
    `rebuild`."""
    path = Path(path)
    if path.suffix not in (".parquet", ".csv"):
        path = path.with_suffix(".parquet")
    if not path.exists():
        raise PuzzleError(f"table not found: {path}")
    if path.suffix == ".csv":
        return pd.read_csv(path)
    problem = table_problem(path)
    if problem is None:
        try:
            return pd.read_parquet(path)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSError
            problem = f"not a readable parquet file ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    raise PuzzleError(f"{path}: {problem}; rerun {_rebuild_hint(path, rebuild)} to rebuild it")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class JsonlLog:
    """Append-only JSON-lines log (one dict a line) that a plot can read; flushed per record."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        line = json.dumps(record, default=_json_default) + "\n"
        # O_NOFOLLOW: a symlink planted in the log's place is refused (ELOOP), never appended through
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "a+b") as f:
            # A crash can leave a torn last line: end it first so this record stays whole.
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode())

    def read(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return iter(())
        with open(self.path) as f:
            # A crash can leave a torn last line; it is skipped, never fatal.
            lines = [line for line in f if line.strip()]
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return iter(out)
