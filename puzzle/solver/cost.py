"""solve's cost model (`puzzle plan`)."""

from typing import Any

from puzzle.footprint import PROCESS_BASELINE_BYTES, Context, Estimate

MIP_SECONDS = 1.0  # assumed per solution: profile + solve + a 10-point sweep took 2 s on the reference parent


def solve_cost(ctx: Context, s: Any) -> Estimate:
    """solve: a MIP over (layers x variants) binaries, small: about MIP_SECONDS per solution (a sweep
    solves one per point), at most time_limit_s each."""
    count = s.num_solutions
    if s.sweep:
        lo, hi, step = (float(x) for x in str(s.sweep).split(":"))
        count = int(round((hi - lo) / step)) + 1
    return Estimate("", "solve", host_bytes=PROCESS_BASELINE_BYTES, seconds=count * MIP_SECONDS,
                    note=f"{count} MIP(s), ~{MIP_SECONDS:.0f} s each assumed (<= {s.time_limit_s:.0f} s)")
