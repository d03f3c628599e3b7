"""Memory measurements shared by the tests of the streaming writers."""

import tracemalloc
from collections.abc import Callable


def traced_peak(fn: Callable[[], object]) -> int:
    """The peak bytes Python allocated while `fn()` ran (tracemalloc: Python objects and numpy buffers, not
    torch's own tensor storage)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
