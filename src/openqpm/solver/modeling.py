"""The linear MILP written once for the solver backends that take it whole (Gurobi, SCIP).

:func:`build_linear_milp` states the model through three callables, so each backend supplies only
its own way of making a variable and a constraint. :func:`start_values` gives the values of a
known solution for a warm start. The formulation is the one of :mod:`openqpm.solver.exact`, with
every class-feature column and every penalised pair, and without distinctness (each backend adds it
lazily in its own callback).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from openqpm.solver.problem import AssignmentProblem

__all__ = ["LinearMilp", "build_linear_milp", "start_values"]


@dataclass(frozen=True)
class LinearMilp:
    """The variables of the model, as the backend made them.

    Args:
        s: (n_f,) selection variables.
        x: (n_c, n_f) class-feature variables.
        y: one variable per penalised pair, in the order of ``problem.penalised_pairs()``.
    """

    s: list[Any]
    x: list[list[Any]]
    y: list[Any]


def build_linear_milp(
    problem: AssignmentProblem,
    *,
    add_var: Callable[[bool, float], Any],
    add_constraint: Callable[[Any], Any],
    quicksum: Callable[[Any], Any],
) -> LinearMilp:
    """State the linear MILP (to maximise) through a backend's callables.

    Args:
        problem: The problem.
        add_var: ``add_var(binary, objective_coefficient)``: a binary variable, or a continuous
            one in [0, 1].
        add_constraint: Adds a constraint given as the backend's expression (``a <= b`` etc.).
        quicksum: The backend's sum of expressions.
    """
    n_c, n_f, k = problem.n_classes, problem.n_all_features, problem.n_per_class
    first, second, weight = problem.penalised_pairs()
    s = [add_var(True, float(problem.b[d])) for d in range(n_f)]
    x = [
        [add_var(True, problem.class_scale * float(problem.A[c, d])) for d in range(n_f)]
        for c in range(n_c)
    ]
    y = [add_var(False, -float(w)) for w in weight]
    add_constraint(quicksum(s) == problem.n_features)
    for c in range(n_c):
        add_constraint(quicksum(x[c]) == k)
        for d in range(n_f):
            add_constraint(x[c][d] <= s[d])
    for pair_y, d, e in zip(y, first, second):
        add_constraint(pair_y >= s[int(d)] + s[int(e)] - 1)
    return LinearMilp(s=s, x=x, y=y)


def start_values(
    problem: AssignmentProblem,
    milp: LinearMilp,
    selection: Sequence[int],
    class_features: Sequence[Sequence[int]],
) -> list[tuple[Any, float]]:
    """``(variable, value)`` for every variable of ``milp`` at a known solution."""
    chosen = {int(d) for d in selection}
    values = [(milp.s[d], float(d in chosen)) for d in range(problem.n_all_features)]
    for c, row in enumerate(milp.x):
        mine = {int(d) for d in class_features[c]}
        values.extend((variable, float(d in mine)) for d, variable in enumerate(row))
    first, second, _ = problem.penalised_pairs()
    values.extend(
        (pair_y, float(int(d) in chosen and int(e) in chosen))
        for pair_y, d, e in zip(milp.y, first, second)
    )
    return values
