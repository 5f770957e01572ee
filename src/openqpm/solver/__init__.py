"""Solvers for the QPM selection-and-assignment problem.

``solve(problem, method=...)`` dispatches to one of the registered methods:

* ``"search"``: structured local search (:mod:`openqpm.solver.search`), fast, no bound.
* ``"milp"``: the linear MILP on an open-source solver (:mod:`openqpm.solver.exact`), optimum or
  a certified upper bound.
* ``"paper"``: the paper's own iterative formulation on the same solver, for comparison.
* ``"gurobi"``: the linear MILP on Gurobi (optional, needs ``gurobipy`` and a licence).
* ``"scip"``: the linear MILP on SCIP with distinctness as lazy constraints in one tree
  (optional, ``pip install "openqpm[scip]"``): for proving optimality on small problems.
* ``"auto"``: the search for a quarter of the time (at most two minutes), then the MILP
  warm-started with its result; the better solution is returned with the MILP's bound.

Every result passes :func:`validate_assignment` before it is returned.

Forced near-equal class pairs (``AssignmentProblem(..., forced_pairs=...)``) are honoured by
``"search"``, ``"milp"`` and ``"auto"``; ``"paper"``, ``"gurobi"`` and ``"scip"`` refuse such a
problem with NotImplementedError.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from openqpm.solver.problem import (
    Assignment,
    AssignmentProblem,
    InvalidAssignmentError,
    ProgressCallback,
    SolveInterrupted,
    SolverProgress,
    relative_gap,
    validate_assignment,
)

_logger = logging.getLogger(__name__)

__all__ = [
    "Assignment",
    "AssignmentProblem",
    "InvalidAssignmentError",
    "ProgressCallback",
    "SolveInterrupted",
    "SolverProgress",
    "forced_pair_methods",
    "solve",
    "solver_methods",
    "validate_assignment",
]

# method name -> (module, function); imported only when used, so that a missing optional
# backend (or one still being written) never breaks the others
_METHODS: dict[str, tuple[str, str]] = {
    "search": ("openqpm.solver.search", "solve_search"),
    "milp": ("openqpm.solver.exact", "solve_milp"),
    "paper": ("openqpm.solver.paper", "solve_paper_formulation"),
    "gurobi": ("openqpm.solver.gurobi", "solve_gurobi"),
    "scip": ("openqpm.solver.scip", "solve_scip"),
}

# the methods that honour AssignmentProblem.forced_pairs
_FORCED_PAIR_METHODS = ("auto", "search", "milp")

# share of the time limit "auto" gives the search before the MILP takes over: the search reaches
# its plateau in seconds, the bound keeps improving with every second the MILP gets
AUTO_SEARCH_SHARE = 0.25
# ... and at most this long: at CUB and ImageNet scale the search stops improving well within two
# minutes, while a long run's time still lowers the MILP's bound (benchmarks/solver.py prints
# both trajectories).
AUTO_SEARCH_MAX_S = 120.0


def forced_pair_methods() -> list[str]:
    """The methods that honour ``AssignmentProblem.forced_pairs`` (CHiQPM's near-equal pairs)."""
    return list(_FORCED_PAIR_METHODS)


def solver_methods() -> list[str]:
    """Names accepted by :func:`solve`'s ``method``."""
    return ["auto", *_METHODS]


def _solver_function(method: str) -> Callable[..., Assignment]:
    module_name, function_name = _METHODS[method]
    module = importlib.import_module(module_name)
    function: Callable[..., Assignment] = getattr(module, function_name)
    return function


def solve(
    problem: AssignmentProblem,
    method: str = "auto",
    time_limit_s: float = 60,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    *,
    start: Assignment | None = None,
    max_iterations: int | None = None,
) -> Assignment:
    """Solve a QPM problem and return a validated solution.

    Args:
        problem: The problem.
        method: One of :func:`solver_methods`.
        time_limit_s: Wall-clock budget for the whole solve.
        seed: Seed for every random choice (search) and the MILP solver's seed.
        progress: Called with :class:`SolverProgress` reports while solving.
        start: A known solution to start from (warm start).
        max_iterations: For ``"search"`` (and the search phase of ``"auto"``): stop after this
            many perturbation rounds, which makes the result independent of the clock.

    Returns:
        The solution, checked by :func:`validate_assignment`.

    Raises:
        ValueError: If ``method`` is unknown (the message lists the valid ones) or
            ``time_limit_s`` is not positive.
        ImportError: If the chosen backend is not installed (e.g. ``gurobipy``).
        NotImplementedError: If the problem has forced pairs and ``method`` does not support
            them (only ``"search"``, ``"milp"`` and ``"auto"`` do).
        InvalidAssignmentError: If a solver returned an infeasible or misreported solution.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> problem = AssignmentProblem(rng.random((6, 12)), np.zeros((12, 12)), np.zeros(12), 4, 2)
        >>> solve(problem, method="search", time_limit_s=5, max_iterations=5).method
        'search'
    """
    if method not in solver_methods():
        raise ValueError(f"unknown solver method {method!r}; valid: {', '.join(solver_methods())}")
    if not time_limit_s > 0:
        raise ValueError(f"time_limit_s must be positive, got {time_limit_s}")
    if problem.forced_pairs and method not in _FORCED_PAIR_METHODS:
        raise NotImplementedError(
            f"method {method!r} does not support forced class pairs (the problem forces "
            f"{[list(p) for p in problem.forced_pairs]}); use one of "
            f"{', '.join(_FORCED_PAIR_METHODS)}"
        )
    if method == "auto":
        assignment = _solve_auto(
            problem,
            time_limit_s=time_limit_s,
            seed=seed,
            progress=progress,
            start=start,
            max_iterations=max_iterations,
        )
    else:
        options: dict[str, Any] = {
            "time_limit_s": time_limit_s,
            "seed": seed,
            "start": start,
            "progress": progress,
        }
        if method == "search":
            options["max_iterations"] = max_iterations
        assignment = _solver_function(method)(problem, **options)
    validate_assignment(problem, assignment)
    return assignment


def _auto_search_seconds(time_limit_s: float) -> float:
    """The search's time within an ``"auto"`` run of ``time_limit_s`` seconds.

    Example:
        >>> _auto_search_seconds(60.0), _auto_search_seconds(3600.0)
        (15.0, 120.0)
    """
    return min(time_limit_s * AUTO_SEARCH_SHARE, AUTO_SEARCH_MAX_S)


def _solve_auto(
    problem: AssignmentProblem,
    *,
    time_limit_s: float,
    seed: int,
    progress: ProgressCallback | None,
    start: Assignment | None,
    max_iterations: int | None,
) -> Assignment:
    """Search first, then the MILP warm-started from it; the better solution, the MILP's bound."""
    started = time.perf_counter()
    run_search = _solver_function("search")
    found = run_search(
        problem,
        time_limit_s=_auto_search_seconds(time_limit_s),
        seed=seed,
        start=start,
        progress=progress,
        max_iterations=max_iterations,
    )
    validate_assignment(problem, found)
    log = [f"auto: search {found.objective:.6f} in {found.time_s:.2f} s", *found.log]
    remaining_s = time_limit_s - (time.perf_counter() - started)
    try:
        if remaining_s <= 0:
            raise TimeoutError("no time left for the MILP after the search")
        exact = _solver_function("milp")(
            problem, time_limit_s=remaining_s, seed=seed, start=found, progress=progress
        )
        validate_assignment(problem, exact)
    except KeyboardInterrupt:
        # Ctrl-C during the MILP: the search's solution stands, without a certificate
        log.append("auto: interrupted (Ctrl-C) during the MILP; the search's solution, no bound")
        raise SolveInterrupted(replace(found, method="auto", log=log)) from None
    except Exception as error:  # noqa: BLE001 - any MILP failure still leaves the search result
        _logger.warning("auto: MILP unavailable or failed (%s); returning the search result", error)
        log.append(f"auto: MILP unavailable or failed: {type(error).__name__}: {error}")
        return Assignment(
            selected_features=found.selected_features,
            class_features=found.class_features,
            objective=found.objective,
            bound=None,
            gap=None,
            method="auto",
            time_s=time.perf_counter() - started,
            log=log,
        )
    log += [f"auto: MILP {exact.objective:.6f}, bound {exact.bound}", *exact.log]
    best = exact if exact.objective >= found.objective else found
    bound = exact.bound
    if bound is not None and bound < best.objective:
        # a bound below a verified solution can only be solver tolerance; beyond that, drop it
        if best.objective - bound <= 1e-6 * max(1.0, abs(best.objective)):
            bound = best.objective
        else:
            log.append(f"auto: MILP bound {bound} is below a valid solution; bound dropped")
            _logger.warning("auto: MILP bound %s below objective %s", bound, best.objective)
            bound = None
    return Assignment(
        selected_features=best.selected_features,
        class_features=best.class_features,
        objective=best.objective,
        bound=bound,
        gap=relative_gap(best.objective, bound),
        method="auto",
        time_s=time.perf_counter() - started,
        log=log,
    )
