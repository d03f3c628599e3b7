"""Atomic, safe file I/O shared by every stage: JSON/YAML/parquet/safetensors, never pickle.

Everything goes to a temp file in the destination directory and is then `os.replace`d, so a crash
leaves either the old file or the new one, never half of one.
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import yaml

from puzzle.errors import PuzzleError


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def atomic_save_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(contiguous, metadata=metadata))


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


def write_table(df: pd.DataFrame, path_without_suffix: str | Path) -> Path:
    """Write `df` as .parquet (read back by the pipeline) and .csv (for people); returns the parquet path."""
    base = Path(path_without_suffix)
    base.parent.mkdir(parents=True, exist_ok=True)
    parquet = base.with_suffix(".parquet")
    fd, tmp = tempfile.mkstemp(prefix=f".{parquet.name}.", suffix=".tmp", dir=parquet.parent)
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, parquet)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_text(base.with_suffix(".csv"), df.to_csv(index=False))
    return parquet


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if path.suffix not in (".parquet", ".csv"):
        path = path.with_suffix(".parquet")
    if not path.exists():
        raise PuzzleError(f"table not found: {path}")
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


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
