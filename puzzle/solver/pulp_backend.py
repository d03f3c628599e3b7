"""PuLP with its bundled CBC: the default backend."""

import math
import os
import re
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from puzzle.solver.model import MipModel, RawResult

GAP_REL = 1e-9
# CBC prints this when it stops early: "Partial search - best objective 1.148 (best possible 1.145), ..."
_PARTIAL = re.compile(r"best possible ([-+0-9.eE]+)")
_LOWER_BOUND = re.compile(r"^Lower bound:\s+([-+0-9.eE]+)", re.MULTILINE)


def parse_cbc_bound(log: str) -> float | None:
    """The best proven bound in a CBC log, or None when it printed none."""
    found = _PARTIAL.findall(log)
    if found:
        return float(found[-1])
    found = _LOWER_BOUND.findall(log)  # printed with ~4 significant digits only
    return float(found[-1]) if found else None


def solve(model: MipModel, time_limit_s: float) -> RawResult:
    import pulp

    prob = pulp.LpProblem("puzzle", pulp.LpMinimize)
    # PuLP >= 3.3 attaches variables to the problem (`add_variable`); older ones build them alone.
    add = getattr(prob, "add_variable", None) or (lambda name, lo, hi, cat: pulp.LpVariable(name, lo, hi, cat))
    x = [add(f"x{i}", 0, 1, pulp.LpBinary) for i in range(model.n_binary)]
    x += [add(f"y{i}", 0, 1, pulp.LpContinuous) for i in range(model.n_continuous)]
    prob += pulp.LpAffineExpression([(x[i], float(c)) for i, c in enumerate(model.objective) if c != 0])
    for row in model.rows:
        expr = pulp.LpAffineExpression([(x[i], float(c)) for i, c in zip(row.index, row.coef)])
        if row.lo == row.hi:
            prob += expr == row.lo
            continue
        if row.hi < math.inf:
            prob += expr <= row.hi
        if row.lo > -math.inf:
            prob += expr >= row.lo

    limit = max(time_limit_s, 0.01)
    fd, log_path = tempfile.mkstemp(prefix="puzzle-cbc-", suffix=".log")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            # PuLP 3.x deprecates its bundled CBC for 4.0; pyproject pins pulp < 4, which bundles it.
            warnings.simplefilter("ignore", DeprecationWarning)
            solver = pulp.PULP_CBC_CMD(
                msg=False,
                timeLimit=limit,
                gapRel=GAP_REL,
                logPath=log_path,
                # CBC prunes nodes that cannot improve the incumbent by its cutoff increment (1e-5 by
                # default, absolute): near-ties in KL are smaller than that, so it would stop short.
                options=["increment 1e-10"],
            )
            start = time.perf_counter()
            prob.solve(solver)
            elapsed = time.perf_counter() - start
        log = Path(log_path).read_text(errors="replace")
    finally:
        Path(log_path).unlink(missing_ok=True)

    # status says "proven infeasible"; sol_status tells an optimum from a time-limited incumbent (for
    # both, status reads "Optimal").
    if prob.status == pulp.LpStatusInfeasible or prob.sol_status == pulp.LpSolutionInfeasible:
        # CBC 2.10 can say "pre-processing says infeasible" when the time limit cuts its preprocessing
        # short; a claim made at the time limit proves nothing.
        if "Stopped on time" in log or elapsed >= limit:
            return RawResult("unknown", None, None)
        return RawResult("infeasible", None, None)
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return RawResult("unknown", None, None)
    values = np.array([v.varValue or 0.0 for v in x])
    objective = float(model.objective @ values)
    if prob.sol_status == pulp.LpSolutionOptimal:
        return RawResult("optimal", values, objective)
    return RawResult("feasible", values, parse_cbc_bound(log))
