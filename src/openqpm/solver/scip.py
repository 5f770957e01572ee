"""The linear MILP on SCIP, distinctness as true lazy constraints (``pip install "openqpm[scip]"``).

Same formulation as :mod:`openqpm.solver.exact` (binary s and x, ``x <= s``, exactly k per class,
``y >= s_d + s_e - 1`` for the penalised pairs), solved whole in ONE branch-and-bound tree.
Distinctness is a SCIP constraint handler: whenever SCIP would accept an integral point in which a
group G of classes shares the set T, it adds the group cut ``sum_{c in G} sum_{d in T} x[c,d] <=
(k - 1)|G| + 1`` (at most one class of G has all of T; the others have at most k - 1 of its
features, because every class has exactly k) and the node is re-solved. HiGHS has no lazy
constraints, so :func:`openqpm.solver.exact.solve_milp` must restart its tree every time it meets
a new collision; that is what keeps it from closing small problems whose best free assignment
repeats sets. This backend has no pricing, no cut loop of its own and every x column: it is for
proving optimality on small problems (hundreds of features, tens of classes), not for CUB scale.

SCIP is Apache-2.0 and its Python wheel bundles the solver; no licence is needed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from openqpm.solver.modeling import (
    build_linear_milp,
    distinct_group_cut,
    finish_assignment,
    import_backend,
    report_incumbent,
    shared_sets,
    start_values,
)
from openqpm.solver.problem import (
    Assignment,
    AssignmentProblem,
    ProgressCallback,
)

_logger = logging.getLogger(__name__)

__all__ = ["solve_scip"]

_INSTALL_HINT = 'the scip solver needs the pyscipopt package: pip install "openqpm[scip]"'


def solve_scip(
    problem: AssignmentProblem,
    *,
    time_limit_s: float,
    seed: int = 0,
    start: Assignment | Sequence[int] | np.ndarray | None = None,
    progress: ProgressCallback | None = None,
) -> Assignment:
    """Solve the linear MILP with SCIP, distinctness as lazy constraints in one tree.

    Args:
        problem: The problem.
        time_limit_s: Wall-clock budget (the search for a start, if any, included).
        seed: SCIP's random seed shift and the search's seed.
        start: A solution or selection to start from; without one a short structured search
            provides it.
        progress: Called with a :class:`SolverProgress` at every new incumbent.

    Returns:
        The best solution, ``method="scip"``, with SCIP's proven bound and the gap (0 when
        optimality is proven).

    Raises:
        ImportError: If pyscipopt is missing (the message says how to install it).
        ValueError: If ``time_limit_s`` is not positive or ``start`` is not a valid selection.
    """
    scip = import_backend("pyscipopt", _INSTALL_HINT)
    from openqpm.solver.exact import MilpOptions
    from openqpm.solver.search import start_solution

    if not time_limit_s > 0:
        raise ValueError(f"time_limit_s must be positive, got {time_limit_s}")
    started = time.perf_counter()
    # the same start as solve_milp's
    defaults = MilpOptions()
    search_s = min(defaults.search_share * time_limit_s, defaults.max_search_s)
    selection, class_features, start_value, source = start_solution(
        problem, start, search_s=search_s, seed=seed
    )
    log = [f"start from {source}: objective {start_value:.6f}"]

    n_f, k = problem.n_all_features, problem.n_per_class
    model = scip.Model("openqpm")
    model.hideOutput(True)
    model.setParam("randomization/randomseedshift", int(seed))
    milp = build_linear_milp(
        problem,
        add_var=lambda binary, cost: (
            model.addVar(vtype="B", obj=cost) if binary else model.addVar(lb=0.0, ub=1.0, obj=cost)
        ),
        add_constraint=model.addCons,
        quicksum=scip.quicksum,
    )
    model.setMaximize()
    s, x = milp.s, milp.x

    n_cuts = _include_distinctness(scip, model, x, n_features=n_f, k=k)
    _include_incumbent_reports(scip, model, progress, started)

    solution = model.createSol()
    for variable, value in start_values(problem, milp, selection, class_features):
        model.setSolVal(solution, variable, value)
    model.addSol(solution, free=True)

    model.setParam("limits/time", max(1.0, time_limit_s - (time.perf_counter() - started)))
    model.optimize()
    status = str(model.getStatus())
    if model.getNSols() > 0:
        best = model.getBestSol()
        found_selection = [d for d in range(n_f) if model.getSolVal(best, s[d]) > 0.5]
        if len(found_selection) == problem.n_features:
            selection = found_selection
    dual = float(model.getDualbound())
    log.append(
        f"scip status {status}, bound {dual:.6f}, {n_cuts[0]} lazy distinctness cuts, "
        f"{model.getNNodes()} nodes"
    )
    _logger.info("scip: %s", log[-1])
    return finish_assignment(problem, selection, dual, method="scip", started=started, log=log)


def _include_distinctness(scip: Any, model: Any, x: Any, *, n_features: int, k: int) -> list[int]:
    """A constraint handler that rejects solutions with two classes on one set and cuts them off
    with :func:`distinct_group_cut`; returns the one-element list counting the cuts added."""
    n_cuts = [0]

    def collisions(solution: Any) -> list[tuple[list[int], tuple[int, ...]]]:
        return shared_sets(
            (c, tuple(d for d in range(n_features) if model.getSolVal(solution, row[d]) > 0.5))
            for c, row in enumerate(x)
        )

    class Distinct(scip.Conshdlr):
        def conscheck(
            self,
            constraints: Any,
            solution: Any,
            checkintegrality: bool,
            checklprows: bool,
            printreason: bool,
            completely: bool,
        ) -> dict[str, Any]:
            feasible = not collisions(solution)
            return {
                "result": scip.SCIP_RESULT.FEASIBLE if feasible else scip.SCIP_RESULT.INFEASIBLE
            }

        def enforce(self) -> dict[str, Any]:
            groups = collisions(None)  # None: the current LP or pseudo solution
            if not groups:
                return {"result": scip.SCIP_RESULT.FEASIBLE}
            for classes, feature_set in groups:
                model.addCons(distinct_group_cut(x, classes, feature_set, k, scip.quicksum))
                n_cuts[0] += 1
            return {"result": scip.SCIP_RESULT.CONSADDED}

        def consenfolp(
            self, constraints: Any, nusefulconss: int, solinfeasible: bool
        ) -> dict[str, Any]:
            return self.enforce()

        def consenfops(
            self, constraints: Any, nusefulconss: int, solinfeasible: bool, objinfeasible: bool
        ) -> dict[str, Any]:
            return self.enforce()

        def conslock(self, constraint: Any, locktype: Any, nlockspos: int, nlocksneg: int) -> None:
            # the handler may reject a point whichever way an x moves
            for row in x:
                for variable in row:
                    model.addVarLocks(variable, nlockspos + nlocksneg, nlockspos + nlocksneg)

    model.includeConshdlr(
        Distinct(),
        "openqpm_distinct",
        "no two classes with the same feature set",
        chckpriority=-10,
        enfopriority=-10,
        needscons=False,
    )
    return n_cuts


def _include_incumbent_reports(
    scip: Any, model: Any, progress: ProgressCallback | None, started: float
) -> None:
    """An event handler that reports every new incumbent to ``progress``."""

    class Incumbents(scip.Eventhdlr):
        def eventinit(self) -> None:
            model.catchEvent(scip.SCIP_EVENTTYPE.BESTSOLFOUND, self)

        def eventexec(self, event: Any) -> None:
            report_incumbent(
                progress,
                started=started,
                objective=float(model.getSolObjVal(model.getBestSol())),
                bound=float(model.getDualbound()),
                message="scip: new incumbent",
            )

    model.includeEventhdlr(Incumbents(), "openqpm_incumbents", "reports new incumbents")
