"""What a run directory remembers about itself: its parent and search space (`run_dir/parent.json`).

Stages after the first can then be called with only `--run-dir`. A run belongs to one parent: naming a
different one is an error (its library, scores and costs would silently mix two models); the search
space may change (a new space only adds the variants it lacks).
"""

from pathlib import Path
from typing import Any

from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_json, read_json

RUN_INFO = "parent.json"
DEFAULT_SPACE = "llama_default"


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_INFO
    info = read_json(path) if path.exists() else {}
    if not isinstance(info, dict):
        raise PuzzleError(f"{path}: expected a JSON object")
    return info


def resolve_run_info(run_dir: str | Path, parent: str | Path | None = None, search_space: str | None = None) -> dict[str, Any]:
    """{"parent": absolute path, "search_space": name}: given values are recorded, missing ones read back."""
    path = Path(run_dir) / RUN_INFO
    recorded = read_run_info(run_dir)
    if parent is None:
        if "parent" not in recorded:
            raise PuzzleError(f"no parent model for {run_dir}: pass --parent PATH once")
        parent = recorded["parent"]
    parent = Path(parent).resolve()
    if "parent" in recorded and Path(recorded["parent"]).resolve() != parent:
        raise PuzzleError(f"{run_dir} belongs to parent {recorded['parent']}, not {parent}; use another --run-dir")
    if not parent.exists():
        raise PuzzleError(f"parent model not found: {parent}")
    info = {**recorded, "parent": str(parent),
            "search_space": search_space or recorded.get("search_space") or DEFAULT_SPACE}
    if info != recorded:
        atomic_write_json(path, info)
    return info


def run_parent(run_dir: str | Path, parent: str | Path | None = None, search_space: str | None = None) -> tuple[Path, str]:
    """(parent path, search space name) of a run; see `resolve_run_info`."""
    info = resolve_run_info(run_dir, parent, search_space)
    return Path(info["parent"]), info["search_space"]
