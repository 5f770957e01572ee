"""The optional Gurobi backend: a clear error without gurobipy, the optimum with it."""

from __future__ import annotations

import builtins
from typing import Any

import numpy as np
import pytest

from _brute_force import brute_force_optimum
from openqpm.solver.gurobi import solve_gurobi
from openqpm.solver.problem import AssignmentProblem, validate_assignment


def _problem(seed: int) -> AssignmentProblem:
    rng = np.random.default_rng(seed)
    n_all, n_classes = 7, 4
    A = np.tile(rng.random(n_all), (n_classes, 1)) + 0.1 * rng.random((n_classes, n_all))
    R = np.triu(rng.random((n_all, n_all)) * (rng.random((n_all, n_all)) < 0.5), 1) * 60.0
    return AssignmentProblem(A, R + R.T, rng.normal(size=n_all) * 20.0, 4, 2)


def test_missing_gurobipy_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def refuse_gurobipy(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "gurobipy":
            raise ImportError("No module named 'gurobipy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse_gurobipy)
    with pytest.raises(ImportError, match=r"openqpm\[gurobi\]"):
        solve_gurobi(_problem(0), time_limit_s=5)


@pytest.mark.gurobi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [0, 1])
def test_gurobi_finds_the_brute_force_optimum(seed: int) -> None:
    pytest.importorskip("gurobipy")
    problem = _problem(seed)  # 7 + 28 + pairs variables: inside the size-limited licence
    result = solve_gurobi(problem, time_limit_s=60, seed=seed)
    validate_assignment(problem, result)
    assert len({tuple(f) for f in result.class_features}) == problem.n_classes
    assert result.objective == pytest.approx(brute_force_optimum(problem), rel=1e-9)
    assert result.gap == pytest.approx(0.0, abs=1e-6)


@pytest.mark.gurobi
@pytest.mark.timeout(120)
def test_gurobi_accepts_a_start() -> None:
    pytest.importorskip("gurobipy")
    problem = _problem(2)
    result = solve_gurobi(problem, time_limit_s=60, start=[0, 1, 2, 3])
    validate_assignment(problem, result)
    assert (
        result.objective >= problem.objective([0, 1, 2, 3], [[0, 1], [0, 2], [0, 3], [1, 2]]) - 1e-9
    )
