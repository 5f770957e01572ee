"""Exhaustive optima of tiny QPM problems, independent of every solver (shared by the tests)."""

from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import linear_sum_assignment

from openqpm.solver.problem import AssignmentProblem


def brute_force_optimum(problem: AssignmentProblem, *, distinct: bool = True) -> float:
    """The optimum over every selection.

    For each selection the classes are matched to distinct k-subsets by the Hungarian method
    (exact); with ``distinct=False`` each class simply takes its best subset (sets may repeat).
    """
    best = -np.inf
    for selection in itertools.combinations(range(problem.n_all_features), problem.n_features):
        subsets = list(itertools.combinations(selection, problem.n_per_class))
        values = np.array([[row[list(s)].sum() for s in subsets] for row in problem.A])
        if distinct:
            rows, columns = linear_sum_assignment(values, maximize=True)
            class_value = float(values[rows, columns].sum())
        else:
            class_value = float(values.max(axis=1).sum())
        chosen = list(selection)
        best = max(
            best,
            problem.class_scale * class_value
            - 0.5 * float(problem.R[np.ix_(chosen, chosen)].sum())
            + float(problem.b[chosen].sum()),
        )
    return float(best)
