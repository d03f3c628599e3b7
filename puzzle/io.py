"""Atomic, safe file I/O shared by every stage: JSON/YAML/parquet/safetensors, never pickle.

Everything goes to a temp file in the destination directory and is then `os.replace`d, so a crash
leaves either the old file or the new one, never half of one. A kill -9 mid-write can leave the temp file
(`.NAME.XXXXXXXX.tmp`); `clean_stale_temps` removes such leftovers when a stage starts.

Tables (`write_table`) get a checksum sidecar `NAME.parquet.sha256` (JSON: {"sha256", "bytes", "rebuild"}),
checked by `read_table`: a flipped or truncated byte ends in one line naming the file and the command that
rebuilds it, never in a silently changed value or a pyarrow traceback.
"""

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import yaml

from puzzle.errors import PuzzleError


# mkstemp(prefix=".NAME.", suffix=".tmp") names: a dot, the target's name, a dot, 8 random characters, .tmp
_TEMP_NAME = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")
_PROCESS_START = time.time()  # temp files older than this process are no writer's of ours


def _temp_file(path: Path) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def clean_stale_temps(directory: str | Path, recursive: bool = False) -> list[Path]:
    """Remove leftovers of interrupted atomic writes in `directory` (and below it, with `recursive`): files
    named like our temp files and last modified before this process started (so a live writer's temp file
    is left alone). Returns the removed paths."""
    directory = Path(directory)
    removed = []
    found = (directory.rglob("*") if recursive else directory.iterdir()) if directory.is_dir() else []
    for path in sorted(found):
        if _TEMP_NAME.fullmatch(path.name) and path.is_file() and path.stat().st_mtime < _PROCESS_START:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's bytes, identical for identical inputs: safetensors writes its metadata from a
    Rust HashMap, in an order that changes from map to map; the header is rewritten with it sorted."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))} if "__metadata__" in header else {}
    ordered.update(header)  # the tensors, in safetensors' own (deterministic) order
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the header is padded to 8 bytes, as safetensors does
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def atomic_save_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


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
    """Why the parquet table at `parquet` cannot be trusted (missing, or not matching its recorded checksum),
    or None when it is whole. A table written before checksums were recorded has no sidecar and passes."""
    parquet = Path(parquet)
    if not parquet.is_file():
        return "not found"
    sidecar = table_checksum_path(parquet)
    if not sidecar.exists():
        return None
    try:
        record = json.loads(sidecar.read_text())
        expected = record["sha256"]
    except (ValueError, KeyError, TypeError):
        return f"its checksum file {sidecar.name} is unreadable"
    if parquet.stat().st_size != record.get("bytes") or sha256_file(parquet) != expected:
        return "damaged: its bytes do not match the checksum recorded when it was written"
    return None


def _rebuild_hint(parquet: Path) -> str:
    try:
        return str(json.loads(table_checksum_path(parquet).read_text()).get("rebuild") or _REBUILD_DEFAULT)
    except (OSError, ValueError, AttributeError):
        return _REBUILD_DEFAULT


def read_table(path: str | Path) -> pd.DataFrame:
    """A table written by `write_table`, its checksum verified; any damage is one-line `PuzzleError`."""
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
    raise PuzzleError(f"{path}: {problem}; rerun {_rebuild_hint(path)} to rebuild it")


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
        with open(self.path, "a+b") as f:
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
