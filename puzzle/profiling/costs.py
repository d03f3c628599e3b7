"""Where `puzzle profile` files a profile's costs, and reading them back. Free of torch, so `puzzle solve`
starts in a moment."""

from pathlib import Path
from typing import Any

import pandas as pd

from puzzle.errors import PuzzleError
from puzzle.io import read_json, read_table
from puzzle.run_dir import RunDir

from .hardware import profile_name


def costs_path(run_dir: Path, name: str) -> Path:
    """R/costs/<profile> without suffix (.parquet, .csv and .json sit beside each other)."""
    return RunDir(run_dir).costs(name)


def load_costs(run_dir: Path, budget: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The costs table and its JSON for a profile (a shipped name or a YAML path); a clear error when
    `puzzle profile` has not run for it."""
    base = costs_path(run_dir, profile_name(budget))
    if not base.with_suffix(".json").exists() or not base.with_suffix(".parquet").exists():
        have = sorted(p.stem for p in base.parent.glob("*.parquet")) if base.parent.is_dir() else []
        hint = f" (profiled: {', '.join(have)})" if have else ""
        raise PuzzleError(f"no costs for profile {str(budget)!r} in {base.parent}{hint}; "
                          f"run `puzzle profile --budget {budget}` first")
    meta = read_json(base.with_suffix(".json"))
    if not isinstance(meta, dict) or "workload" not in meta:
        raise PuzzleError(f"{base.with_suffix('.json')}: expected a mapping with 'workload' and 'fixed'")
    return read_table(base.with_suffix(".parquet"), rebuild=f"puzzle profile --run-dir {run_dir} --budget {budget}"), meta
