"""A backend-neutral mixed-integer program: what `mip.py` builds and the backends translate.

Variables 0..n_binary-1 are binary, the rest continuous in [0, 1]. Every row reads
`lo <= sum(coef[j] * x[index[j]]) <= hi`. The objective is minimised.
"""

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Row:
    index: np.ndarray  # (k,) variable ids
    coef: np.ndarray  # (k,) float coefficients
    lo: float = -math.inf
    hi: float = math.inf


@dataclass(frozen=True)
class MipModel:
    n_binary: int
    n_continuous: int
    objective: np.ndarray  # (n_binary + n_continuous,)
    rows: tuple[Row, ...]


@dataclass(frozen=True)
class RawResult:
    """What a backend found. `status`: "optimal", "feasible" (stopped at the time limit with an
    incumbent), "infeasible" (proven), or "unknown" (stopped with no incumbent)."""

    status: str
    values: np.ndarray | None  # (n_binary + n_continuous,) when a solution exists
    bound: float | None  # best proven lower bound on the objective, when the backend gives one
