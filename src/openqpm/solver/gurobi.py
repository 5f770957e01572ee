"""The linear MILP on Gurobi (optional backend: ``pip install "openqpm[gurobi]"``).

Same formulation as :mod:`openqpm.solver.exact` (binary s and x, ``x <= s``, exactly k per class,
McCormick rows for the penalised pairs), solved whole by Gurobi. Distinctness is enforced with
lazy constraints from a callback: whenever Gurobi finds an integer solution in which a group G of
classes shares the set T, the cut ``sum_{c in G} sum_{d in T} x[c,d] <= (k - 1)|G| + 1`` is added
(:func:`openqpm.solver.modeling.distinct_group_cut`; valid because every class has exactly k).

The pip package ships a size-limited licence (about 2000 variables and 2000 constraints), enough
for toy problems only; anything larger needs a full licence, as the paper's authors had.
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
    checked_selection,
)

_logger = logging.getLogger(__name__)

__all__ = ["solve_gurobi"]

_INSTALL_HINT = (
    "the gurobi solver needs the gurobipy package and a Gurobi licence: "
    'pip install "openqpm[gurobi]" (its bundled licence only fits toy problems)'
)


def solve_gurobi(
    problem: AssignmentProblem,
    *,
    time_limit_s: float,
    seed: int = 0,
    start: Assignment | Sequence[int] | np.ndarray | None = None,
    progress: ProgressCallback | None = None,
    threads: int = 0,
) -> Assignment:
    """Solve the linear MILP with Gurobi, distinctness as lazy constraints.

    Args:
        problem: The problem.
        time_limit_s: Gurobi's time limit.
        seed: Gurobi's ``Seed`` parameter.
        start: A solution or selection for Gurobi's MIP start (its per-class features are
            recomputed optimally for the selection).
        progress: Called with a :class:`SolverProgress` at every new incumbent.
        threads: Gurobi's ``Threads`` (0 = Gurobi decides).

    Returns:
        The best solution, ``method="gurobi"``, with Gurobi's bound and gap.

    Raises:
        ImportError: If gurobipy is missing (the message says how to install it).
        ValueError: If ``time_limit_s`` is not positive.
        RuntimeError: If Gurobi ends without a solution (e.g. a licence size limit).
    """
    gp = import_backend("gurobipy", _INSTALL_HINT)
    from openqpm.solver.search import assign_classes

    if not time_limit_s > 0:
        raise ValueError(f"time_limit_s must be positive, got {time_limit_s}")
    started = time.perf_counter()
    GRB = gp.GRB
    n_c, n_f = problem.n_classes, problem.n_all_features
    k = problem.n_per_class

    env = gp.Env(empty=True)
    env.setParam("OutputFlag", 0)
    env.start()
    model = gp.Model("openqpm", env=env)
    model.Params.TimeLimit = float(time_limit_s)
    model.Params.Seed = int(seed)
    model.Params.Threads = int(threads)
    model.Params.LazyConstraints = 1
    model.Params.MIPGap = 1e-9
    model.ModelSense = GRB.MAXIMIZE
    milp = build_linear_milp(
        problem,
        add_var=lambda binary, cost: (
            model.addVar(vtype=GRB.BINARY, obj=cost)
            if binary
            else model.addVar(lb=0.0, ub=1.0, obj=cost)
        ),
        add_constraint=model.addConstr,
        quicksum=gp.quicksum,
    )
    s, x = milp.s, milp.x

    if start is not None:
        selection = checked_selection(problem, start).tolist()
        class_features, _ = assign_classes(problem, selection)
        for variable, value in start_values(problem, milp, selection, class_features):
            variable.Start = value

    flat_x = [variable for row in x for variable in row]
    log: list[str] = []
    n_lazy = [0]

    def callback(callback_model: Any, where: int) -> None:
        if where != GRB.Callback.MIPSOL:
            return
        values = np.asarray(callback_model.cbGetSolution(flat_x)).reshape(n_c, n_f) > 0.5
        groups = shared_sets((c, tuple(np.flatnonzero(values[c]).tolist())) for c in range(n_c))
        for classes, feature_set in groups:
            callback_model.cbLazy(distinct_group_cut(x, classes, feature_set, k, gp.quicksum))
            n_lazy[0] += 1
        report_incumbent(
            progress,
            started=started,
            objective=float(callback_model.cbGet(GRB.Callback.MIPSOL_OBJBST)),
            bound=float(callback_model.cbGet(GRB.Callback.MIPSOL_OBJBND)),
            message="gurobi: integer solution",
        )

    model.optimize(callback)
    if model.SolCount == 0:
        raise RuntimeError(
            f"Gurobi ended without a solution (status {model.Status}); a size-limited licence "
            f"cannot hold n_f={n_f}, n_c={n_c}"
        )
    selection = [d for d in range(n_f) if s[d].X > 0.5]
    dual = float(model.ObjBound)
    log.append(
        f"gurobi status {model.Status}, objective {model.ObjVal:.6f}, bound {dual:.6f}, "
        f"{n_lazy[0]} lazy distinctness cuts"
    )
    model.dispose()
    env.dispose()
    # the assignment is recomputed exactly for Gurobi's selection: same value when optimal
    return finish_assignment(problem, selection, dual, method="gurobi", started=started, log=log)
