"""What a run directory remembers about itself: its parent and search space (`run_dir/parent.json`).

Stages after the first can then be called with only `--run-dir`; an explicit argument always wins
and is recorded for the stages after it.
"""

from pathlib import Path
from typing import Any

from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_json, read_json

RUN_INFO = "parent.json"


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_INFO
    return read_json(path) if path.exists() else {}


def resolve_run_info(run_dir: str | Path, parent: str | Path | None = None, search_space: str | None = None) -> dict[str, Any]:
    """{"parent": path, "search_space": name}: explicit values win and are recorded; missing ones are read."""
    info = read_run_info(run_dir)
    changed = False
    if parent is not None and info.get("parent") != str(parent):
        info["parent"], changed = str(parent), True
    if search_space is not None and info.get("search_space") != search_space:
        info["search_space"], changed = search_space, True
    if "parent" not in info:
        raise PuzzleError(f"{run_dir}: no parent recorded; pass --parent PATH (the parent model) once")
    if not Path(info["parent"]).exists():
        raise PuzzleError(f"parent model not found: {info['parent']}")
    if changed:
        atomic_write_json(Path(run_dir) / RUN_INFO, info)
    return info
