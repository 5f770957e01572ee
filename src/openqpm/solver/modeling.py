"""The linear MILP written once for the solver backends that take it whole (Gurobi, SCIP).

:func:`build_linear_milp` states the model through three callables, so each backend supplies only
its own way of making a variable and a constraint. :func:`start_values` gives the values of a
known solution for a warm start, :func:`shared_sets` and :func:`distinct_group_cut` the lazy
distinctness cuts, :func:`finish_assignment` the returned solution, :func:`import_backend` and
:func:`report_incumbent` the backend's module and its progress reports. The formulation is the one
of :mod:`openqpm.solver.exact`, with every class-feature column and every penalised pair, and
without distinctness (each backend adds it lazily in its own callback).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from openqpm.solver.problem import (
    Assignment,
    AssignmentProblem,
    ProgressCallback,
    SolverProgress,
    relative_gap,
)

__all__ = [
    "LinearMilp",
    "build_linear_milp",
    "distinct_group_cut",
    "finish_assignment",
    "import_backend",
    "report_incumbent",
    "shared_sets",
    "start_values",
]


def import_backend(package: str, install_hint: str) -> Any:
    """Import an optional top-level solver package, or fail with how to install it.

    Imported as the ``import`` statement does (through ``__import__``), so that whatever
    intercepts imports sees this one too.

    Raises:
        ImportError: the package is missing; the message is ``install_hint``.
    """
    try:
        return __import__(package)
    except ImportError as error:
        raise ImportError(install_hint) from error


def report_incumbent(
    progress: ProgressCallback | None,
    *,
    started: float,
    objective: float,
    bound: float,
    message: str,
) -> None:
    """Tell ``progress`` (when given) of a new incumbent and bound, ``started`` a perf_counter."""
    if progress is not None:
        elapsed_s = time.perf_counter() - started
        progress(
            SolverProgress(elapsed_s, objective, bound, relative_gap(objective, bound), message)
        )


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

    Raises:
        NotImplementedError: If the problem has forced class pairs (not stated here).
    """
    if problem.forced_pairs:
        raise NotImplementedError(
            f"the Gurobi/SCIP model does not state forced class pairs (the problem forces "
            f"{[list(p) for p in problem.forced_pairs]}); use method 'milp', 'search' or 'auto'"
        )
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


def shared_sets(
    class_sets: Iterable[tuple[int, tuple[int, ...]]],
) -> list[tuple[list[int], tuple[int, ...]]]:
    """Groups of classes that share a set: ``(classes, set)`` for every set named twice or more.

    Args:
        class_sets: ``(class, sorted feature set)`` pairs; a class may come with several sets.
    """
    owners: dict[tuple[int, ...], list[int]] = {}
    for c, feature_set in class_sets:
        owners.setdefault(feature_set, []).append(c)
    return [(classes, feature_set) for feature_set, classes in owners.items() if len(classes) > 1]


def distinct_group_cut(
    x: Sequence[Sequence[Any]],
    classes: Sequence[int],
    feature_set: Sequence[int],
    n_per_class: int,
    quicksum: Callable[[Any], Any],
) -> Any:
    """``sum_{c in G} sum_{d in T} x[c,d] <= (k - 1)|G| + 1``: at most one class of G has all of T.

    Valid because every class has exactly k features: a class whose set is not T holds at most
    k - 1 of T's features.
    """
    total = quicksum(x[c][d] for c in classes for d in feature_set)
    return total <= (n_per_class - 1) * len(classes) + 1


def finish_assignment(
    problem: AssignmentProblem,
    selection: Sequence[int],
    dual_bound: float,
    *,
    method: str,
    started: float,
    log: list[str],
) -> Assignment:
    """The returned solution: the optimal distinct assignment of a backend's selection.

    The objective is recomputed exactly (never read off the solver); the bound is the solver's
    dual bound, at least the objective, and equal to it within 1e-9 (relative) when it is reached.
    """
    from openqpm.solver.search import assign_classes

    class_features, objective = assign_classes(problem, selection)
    bound = max(float(dual_bound), objective)
    if bound - objective <= 1e-9 * max(1.0, abs(objective)):
        bound = objective
    return Assignment(
        selected_features=[int(d) for d in selection],
        class_features=class_features,
        objective=objective,
        bound=bound,
        gap=relative_gap(objective, bound),
        method=method,
        time_s=time.perf_counter() - started,
        log=log,
    )
