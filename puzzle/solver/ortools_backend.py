"""OR-Tools' linear solver wrapper with SCIP.

SCIP through `pywraplp` takes the same float model as CBC, so both backends solve exactly the same
program. (CP-SAT would need every coefficient scaled to an integer, which changes the problem by the
rounding; we would then have to re-verify and re-solve anyway.)
"""

import math

import numpy as np

from puzzle.solver.model import MipModel, RawResult

GAP_REL = 1e-9


def solve(model: MipModel, time_limit_s: float) -> RawResult:
    from ortools.linear_solver import pywraplp

    solver = pywraplp.Solver.CreateSolver("SCIP")
    if solver is None:  # pragma: no cover - every ortools wheel ships SCIP
        raise RuntimeError("this OR-Tools build has no SCIP")
    inf = solver.infinity()
    x = [solver.BoolVar(f"x{i}") for i in range(model.n_binary)]
    x += [solver.NumVar(0.0, 1.0, f"y{i}") for i in range(model.n_continuous)]
    for row in model.rows:
        lo = row.lo if row.lo > -math.inf else -inf
        hi = row.hi if row.hi < math.inf else inf
        ct = solver.RowConstraint(lo, hi, "")
        for i, c in zip(row.index, row.coef):
            ct.SetCoefficient(x[int(i)], float(c))
    objective = solver.Objective()
    for i, c in enumerate(model.objective):
        if c != 0:
            objective.SetCoefficient(x[i], float(c))
    objective.SetMinimization()

    solver.SetTimeLimit(max(1, int(time_limit_s * 1000)))
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(params.RELATIVE_MIP_GAP, GAP_REL)
    status = solver.Solve(params)

    if status == pywraplp.Solver.INFEASIBLE:
        return RawResult("infeasible", None, None)
    if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        return RawResult("unknown", None, None)
    values = np.array([v.solution_value() for v in x])
    if status == pywraplp.Solver.OPTIMAL:
        return RawResult("optimal", values, float(model.objective @ values))
    return RawResult("feasible", values, objective.BestBound())
