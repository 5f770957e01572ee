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
  warm-started with its result; on large problems the MILP's bound stops once it shrinks the
  gap more slowly than the search did, and the search gets the time left. The best solution
  is returned with the MILP's bound.

Every result passes :func:`validate_assignment` before it is returned.

Forced near-equal class pairs (``AssignmentProblem(..., forced_pairs=...)``) are honoured by
``"search"``, ``"milp"`` and ``"auto"``; ``"paper"``, ``"gurobi"`` and ``"scip"`` refuse such a
problem with NotImplementedError.
"""

from __future__ import annotations

import importlib
import logging
import math
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
# the search runs again after the MILP only if at least this much time is left
_AUTO_MIN_SEARCH_AGAIN_S = 1.0


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


class _AutoReport:
    """Forwards the phases' progress on auto's own clock with the best objective and bound so
    far, and keeps the current phase's trajectory of objectives (for :func:`_search_rate`)."""

    def __init__(self, progress: ProgressCallback | None) -> None:
        self.progress = progress
        self.started = time.perf_counter()
        self.offset = 0.0
        self.best = -math.inf
        self.bound = math.inf
        self.trajectory: list[tuple[float, float]] = []

    def phase(self) -> None:
        """A new phase starts now: its events' times count from here."""
        self.offset = time.perf_counter() - self.started
        self.trajectory = []

    def __call__(self, event: SolverProgress) -> None:
        if event.objective is not None:
            self.best = max(self.best, event.objective)
            self.trajectory.append((event.elapsed_s, event.objective))
        if event.bound is not None:
            self.bound = min(self.bound, event.bound)
        if self.progress is None:
            return
        best = None if math.isinf(self.best) else self.best
        bound = None if math.isinf(self.bound) or best is None else max(self.bound, best)
        self.progress(
            SolverProgress(
                elapsed_s=self.offset + event.elapsed_s,
                objective=best,
                bound=bound,
                gap=relative_gap(best, bound) if best is not None else None,
                message=event.message,
            )
        )


def _search_rate(trajectory: list[tuple[float, float]], duration_s: float) -> float:
    """The search's relative improvement per second over the second half of its run.

    ``trajectory`` holds ``(elapsed_s, objective)`` at each report; the objective at a time is
    the best reported up to then.

    Example:
        >>> _search_rate([(0.0, 90.0), (4.0, 99.0), (9.0, 100.0)], 10.0)  # 99 -> 100 in 5 s
        0.002
    """
    if not trajectory or duration_s <= 0:
        return 0.0
    half = duration_s / 2
    at_half = max((value for time_s, value in trajectory if time_s <= half), default=None)
    final = max(value for _, value in trajectory)
    if at_half is None:
        return math.inf  # nothing found in the first half: the search was still starting
    return max(0.0, final - at_half) / max(1.0, abs(final)) / half


def _solve_auto(
    problem: AssignmentProblem,
    *,
    time_limit_s: float,
    seed: int,
    progress: ProgressCallback | None,
    start: Assignment | None,
    max_iterations: int | None,
) -> Assignment:
    """Search, then the bound while it shrinks the gap faster than the search did, then the
    search again for what is left; the best solution with the MILP's bound.

    On large problems (features priced in) the cut relaxation stops once its bound falls more
    slowly (relative, per second) than the search improved in the second half of its run: the
    rest of the time is better spent on the search. Small problems keep the MILP's whole
    path (root cuts and branch and bound), which is what proves them.
    """
    from openqpm.solver.exact import MilpOptions

    report = _AutoReport(progress)
    search_s = _auto_search_seconds(time_limit_s)
    found = _solver_function("search")(
        problem,
        time_limit_s=search_s,
        seed=seed,
        start=start,
        progress=report,
        max_iterations=max_iterations,
    )
    validate_assignment(problem, found)
    rate = _search_rate(report.trajectory, found.time_s)
    summary = f"auto: search {found.objective:.6f} in {found.time_s:.2f} s (rate {rate:.3g}/s)"
    log = [summary, *found.log]
    remaining_s = time_limit_s - (time.perf_counter() - report.started)
    report.phase()
    try:
        if remaining_s <= 0:
            raise TimeoutError("no time left for the MILP after the search")
        exact = _solver_function("milp")(
            problem,
            time_limit_s=remaining_s,
            seed=seed,
            start=found,
            progress=report,
            options=MilpOptions(cut_stop_rate=rate),
        )
        validate_assignment(problem, exact)
    except KeyboardInterrupt:
        # Ctrl-C during the MILP: the search's solution stands, without a certificate
        log.append("auto: interrupted (Ctrl-C) during the MILP; the search's solution, no bound")
        raise SolveInterrupted(replace(found, method="auto", log=log)) from None
    except Exception as error:  # noqa: BLE001 - any MILP failure still leaves the search result
        _logger.warning("auto: MILP unavailable or failed (%s); returning the search result", error)
        log.append(f"auto: MILP unavailable or failed: {type(error).__name__}: {error}")
        return replace(
            found,
            bound=None,
            gap=None,
            method="auto",
            log=log,
            time_s=time.perf_counter() - report.started,
        )
    log += [f"auto: MILP {exact.objective:.6f}, bound {exact.bound}", *exact.log]
    best = exact if exact.objective >= found.objective else found
    try:
        best = _search_again(problem, best, exact.bound, report, time_limit_s, seed, log)
    except SolveInterrupted as stop:
        # Ctrl-C during the second search: its best so far, with the MILP's certificate
        if stop.assignment.objective > best.objective:
            best = stop.assignment
        log.append("auto: interrupted (Ctrl-C) during the second search")
        elapsed = time.perf_counter() - report.started
        raise SolveInterrupted(_auto_result(best, exact.bound, log, elapsed)) from None
    return _auto_result(best, exact.bound, log, time.perf_counter() - report.started)


def _search_again(
    problem: AssignmentProblem,
    best: Assignment,
    bound: float | None,
    report: _AutoReport,
    time_limit_s: float,
    seed: int,
    log: list[str],
) -> Assignment:
    """The search from ``best`` for the time the MILP left (it returns early when its bound
    falls too slowly, and when branch and bound ends); ``best`` when no time or no gap is
    left."""
    remaining_s = time_limit_s - (time.perf_counter() - report.started)
    gap = relative_gap(best.objective, bound)
    if remaining_s < _AUTO_MIN_SEARCH_AGAIN_S or gap is None or gap <= 1e-9:
        return best
    report.phase()
    again = _solver_function("search")(
        problem, time_limit_s=remaining_s, seed=seed + 1, start=best, progress=report
    )
    validate_assignment(problem, again)
    log.append(
        f"auto: search again for the {remaining_s:.1f} s the MILP left: "
        f"{best.objective:.6f} -> {max(best.objective, again.objective):.6f}"
    )
    return again if again.objective > best.objective else best


def _auto_result(
    best: Assignment, bound: float | None, log: list[str], time_s: float
) -> Assignment:
    """The auto result: ``best``'s solution with the MILP's ``bound`` (checked against it)."""
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
        time_s=time_s,
        log=log,
    )
