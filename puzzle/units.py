"""Quantities: counts written the way people write them (80M, 1.2B, 250k, 80e6), bytes in GiB, and the
host's memory. Torch-free (the planner and the CLI use it)."""

import math
import os
import re

from puzzle.errors import PuzzleError

_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*$")
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
GIB = 2**30  # bytes; every "GiB" the tools print or take (--worker-memory-gib, memory_gib, ...)


def parse_count(value: float | int | str | None) -> float | None:
    """80e6, "80e6", "80M", "1.5B", "250k" -> a number; None stays None."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    m = _COUNT.match(str(value))
    if not m:
        raise PuzzleError(f"not a count: {value!r} (write e.g. 80M, 1.2B, 250k or 80000000)")
    count = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if not math.isfinite(count):  # "1e999" reads as inf
        raise PuzzleError(f"not a finite count: {value!r}")
    return count


def host_memory_bytes() -> int:
    """This machine's physical memory (sysconf: pages x page size)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
