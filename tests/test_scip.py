"""The optional SCIP backend: lazy distinctness in one tree proves brute-force optima."""

from __future__ import annotations

import builtins
from typing import Any

import numpy as np
import pytest

from _brute_force import brute_force_optimum
from openqpm.solver import solve
from openqpm.solver.modeling import shared_sets
from openqpm.solver.problem import AssignmentProblem, SolverProgress, validate_assignment
from openqpm.solver.scip import solve_scip


def _problem(seed: int) -> AssignmentProblem:
    # classes that all like the same features: their free optimum repeats a set, so the optimum
    # needs the lazy distinctness cuts
    rng = np.random.default_rng(seed)
    n_all, n_classes = 8, 5
    A = np.tile(rng.random(n_all), (n_classes, 1)) + 0.1 * rng.random((n_classes, n_all))
    R = np.triu(rng.random((n_all, n_all)) * (rng.random((n_all, n_all)) < 0.4), 1) * 40.0
    return AssignmentProblem(A, R + R.T, rng.normal(size=n_all) * 10.0, 4, 2)


def test_shared_sets_groups_the_classes_of_each_repeated_set() -> None:
    sets = [(0, 1), (2, 3), (0, 1), (1, 2), (0, 1), (2, 3)]
    assert sorted(shared_sets(enumerate(sets))) == [([0, 2, 4], (0, 1)), ([1, 5], (2, 3))]
    assert shared_sets(enumerate([(0, 1), (1, 2)])) == []


def test_missing_pyscipopt_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def refuse_pyscipopt(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "pyscipopt":
            raise ImportError("No module named 'pyscipopt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse_pyscipopt)
    with pytest.raises(ImportError, match=r"openqpm\[scip\]"):
        solve_scip(_problem(0), time_limit_s=5)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scip_proves_the_brute_force_optimum(seed: int) -> None:
    pytest.importorskip("pyscipopt")
    problem = _problem(seed)
    optimum = brute_force_optimum(problem)
    free = brute_force_optimum(problem, distinct=False)
    assert free > optimum + 1e-6  # distinctness binds: the cuts are needed
    # a poor start (the first features), so that SCIP has to find the optimum itself
    events: list[SolverProgress] = []
    result = solve_scip(
        problem, time_limit_s=120, seed=seed, start=[0, 1, 2, 3], progress=events.append
    )
    validate_assignment(problem, result)
    assert result.objective == pytest.approx(optimum, rel=1e-9)
    assert result.bound == pytest.approx(optimum, rel=1e-9)
    assert result.gap == pytest.approx(0.0, abs=1e-9)
    assert "lazy distinctness cuts" in result.log[-1]
    assert int(result.log[-1].split(" lazy")[0].rsplit(" ", 1)[1]) > 0


@pytest.mark.timeout(300)
def test_scip_through_solve_and_with_a_bad_start() -> None:
    pytest.importorskip("pyscipopt")
    problem = _problem(3)
    result = solve(problem, method="scip", time_limit_s=60)
    assert result.method == "scip" and result.gap == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="n_features=4 ids, got 2"):
        solve_scip(problem, time_limit_s=5, start=[0, 1])
