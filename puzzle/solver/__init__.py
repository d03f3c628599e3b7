"""The MIP search: one attention and one FFN variant per layer under a hardware budget.

`problem.py` turns the scores and costs tables into a `SolverProblem`; `mip.py` solves it with PuLP
(CBC) or OR-Tools (SCIP); `pareto.py` sweeps speedup targets; `commands.py` is `puzzle solve`.
"""

from puzzle.solver.mip import BACKENDS, Solution, explain_infeasible, find_solution, layers_differing, solve
from puzzle.solver.problem import (
    Constraints,
    FixedCosts,
    LayerOptions,
    Option,
    Prediction,
    SolverProblem,
    Workload,
    problem_from_tables,
)

__all__ = [
    "BACKENDS",
    "Constraints",
    "FixedCosts",
    "LayerOptions",
    "Option",
    "Prediction",
    "Solution",
    "SolverProblem",
    "Workload",
    "explain_infeasible",
    "find_solution",
    "layers_differing",
    "problem_from_tables",
    "solve",
]
