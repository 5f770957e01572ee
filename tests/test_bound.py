"""The cut relaxation's bound (openqpm.solver.bound): valid against brute force, at any duals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from _brute_force import brute_force_optimum
from openqpm.solver.bound import CutRelaxation, cut_relaxation_bound
from openqpm.solver.problem import AssignmentProblem


def _random_problem(
    seed: int, *, n_all: int = 8, n_classes: int = 4, n_features: int = 4, n_per_class: int = 2
) -> AssignmentProblem:
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n_classes, n_all))
    density = rng.uniform(0.2, 0.9)
    R = np.triu(rng.random((n_all, n_all)) * (rng.random((n_all, n_all)) < density), 1)
    R = (R + R.T) * rng.uniform(20.0, 150.0)
    b = rng.normal(size=n_all) * 20.0
    return AssignmentProblem(A, R, b, n_features, n_per_class)


@pytest.mark.parametrize("seed", range(40))
def test_bound_is_never_below_the_brute_force_optimum(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    n_all = int(rng.integers(5, 10))
    n_features = int(rng.integers(2, min(n_all, 6) + 1))
    n_per_class = int(rng.integers(1, n_features))
    problem = _random_problem(
        seed,
        n_all=n_all,
        n_classes=min(int(rng.integers(1, 6)), math.comb(n_features, n_per_class)),
        n_features=n_features,
        n_per_class=n_per_class,
    )
    # distinctness is relaxed: the bound must hold even for the problem without it
    relaxed_optimum = brute_force_optimum(problem, distinct=False)
    result = cut_relaxation_bound(problem, time_limit_s=10, max_cuts_per_round=3)
    assert result.rounds >= 1
    assert result.bound >= relaxed_optimum - 1e-7 * max(1.0, abs(relaxed_optimum))
    # and it is never looser than the trivial bound: every class its k best, no penalty
    trivial = (
        problem.class_scale * np.sort(problem.A, axis=1)[:, -n_per_class:].sum()
        + np.sort(problem.b)[-n_features:].sum()
    )
    assert result.bound <= trivial + 1e-6 * max(1.0, abs(trivial))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bound_holds_at_random_duals(seed: int) -> None:
    problem = _random_problem(50 + seed)
    optimum = brute_force_optimum(problem)
    model = CutRelaxation(problem)
    solved = model.solve(10.0)
    assert solved is not None
    columns, _, duals = solved
    s = columns[model.s_column]
    model.add_pairs(model.violated_pairs(s))
    model.separate_classes(s, columns[model.v_column])
    solved = model.solve(10.0)
    assert solved is not None
    _, _, duals = solved
    assert model.bound(duals) >= optimum - 1e-7
    rng = np.random.default_rng(seed)
    for _ in range(25):
        noisy = duals + rng.normal(scale=30.0, size=duals.size)
        assert model.bound(noisy) >= optimum - 1e-7


def test_bound_is_exact_without_penalties_when_all_features_are_selected() -> None:
    rng = np.random.default_rng(3)
    A = rng.normal(size=(5, 6))
    problem = AssignmentProblem(A, np.zeros((6, 6)), rng.normal(size=6), 6, 3)
    result = cut_relaxation_bound(problem, time_limit_s=10)
    expected = problem.class_scale * np.sort(A, axis=1)[:, -3:].sum() + problem.b.sum()
    assert result.bound == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("seed", range(12))
def test_dropping_slack_rows_keeps_the_bound_valid(seed: int) -> None:
    problem = _random_problem(seed, n_all=9, n_classes=5, n_features=5, n_per_class=2)
    optimum = brute_force_optimum(problem, distinct=False)
    kept = cut_relaxation_bound(problem, time_limit_s=10, drop_slack_after=None)
    assert kept.bound >= optimum - 1e-7
    for kinds in [("clique",), ("clique", "pair", "class")]:
        dropped = cut_relaxation_bound(
            problem, time_limit_s=10, drop_slack_after=1, drop_kinds=kinds
        )
        assert dropped.bound >= optimum - 1e-7
        assert dropped.stopped in ("converged", "stalled")


def test_dropped_rows_come_back_when_violated_again() -> None:
    problem = _random_problem(3, n_all=9, n_classes=5, n_features=4, n_per_class=2)
    model = CutRelaxation(problem)
    solved = model.solve(10.0)
    assert solved is not None
    columns = solved[0]
    s = columns[model.s_column]
    pairs = model.violated_pairs(s)
    assert pairs and model.add_pairs(pairs) == len(pairs)
    assert model.violated_pairs(s) == []  # each pair's row is in
    n_class_rows = sum(row.kind == "class" for row in model.rows)
    # every row "slack" (values strictly inside): all pair and class rows go
    inside = np.array([0.0 if math.isinf(r.lower) else r.lower + 1.0 for r in model.rows])
    inside = np.where(
        [math.isinf(r.lower) for r in model.rows], [r.upper - 1.0 for r in model.rows], inside
    )
    removed = model.drop_slack_rows(inside, after_rounds=1, kinds=("pair", "class"))
    assert removed == len(pairs) + n_class_rows
    assert not any(row.kind in ("pair", "class") for row in model.rows)
    assert model.highs.getNumRow() == len(model.rows)
    # the same violations are found again and re-added, without new y columns
    n_columns = model.highs.getNumCol()
    assert sorted(model.violated_pairs(s)) == sorted(pairs)
    assert model.add_pairs(pairs) == len(pairs) and model.highs.getNumCol() == n_columns
    assert model.add_class_cut(0, problem.n_per_class - 1)


# features priced in and short class lists even on a tiny problem: the cut bound runs first
_PRICED = {
    "search_share": 1e-3,
    "max_search_s": 0.05,
    "full_model_max_columns": 0,
    "initial_features_per_selected": 1.0,
    "initial_depth_per_class": 0.3,
}


@pytest.mark.parametrize("seed", [20, 21])
def test_priced_milp_uses_the_cut_bound_and_stays_valid(seed: int) -> None:
    from openqpm.solver import solve
    from openqpm.solver.exact import MilpOptions, solve_milp
    from openqpm.solver.problem import validate_assignment

    problem = _random_problem(seed, n_all=9, n_classes=5, n_features=4, n_per_class=2)
    optimum = brute_force_optimum(problem)
    result = solve_milp(problem, time_limit_s=20, options=MilpOptions(**_PRICED))
    validate_assignment(problem, result)
    assert any("cut bound round" in line for line in result.log)
    assert result.bound is not None and result.bound >= optimum - 1e-7
    assert result.objective <= optimum + 1e-7
    # the branch and bound after it still proves small problems
    assert result.objective == pytest.approx(optimum, rel=1e-9)
    # "auto" on the same problem: search, then the MILP (full model here), still valid
    auto = solve(problem, method="auto", time_limit_s=10, max_iterations=5)
    assert auto.bound is not None and auto.bound >= optimum - 1e-7


@pytest.mark.parametrize("seed", [0, 3, 5])
def test_rate_rule_stops_the_cut_loop_early_with_a_valid_bound(seed: int) -> None:
    problem = _random_problem(seed, n_all=9, n_classes=5, n_features=4, n_per_class=2)
    optimum = brute_force_optimum(problem)
    full = cut_relaxation_bound(problem, time_limit_s=10)
    assert full.stopped == "converged" and full.rounds > 3
    # any fall is too slow: the loop stops as soon as the rate is measurable (3 rounds)
    early = cut_relaxation_bound(problem, time_limit_s=10, min_rate_per_s=math.inf)
    assert early.stopped == "rate" and early.rounds == 3
    assert full.bound - 1e-9 <= early.bound
    assert early.bound >= optimum - 1e-7


def test_bound_rate_per_s_is_relative_and_needs_a_window() -> None:
    from openqpm.solver.bound import bound_rate_per_s

    assert bound_rate_per_s([1.0, 2.0], [110.0, 100.0]) == math.inf
    assert bound_rate_per_s([0.0, 1.0, 2.0, 6.0], [300.0, 220.0, 210.0, 200.0]) == pytest.approx(
        (220.0 - 200.0) / 200.0 / 5.0
    )


def test_milp_with_a_stop_rate_returns_early_after_the_cut_bound() -> None:
    from openqpm.solver.exact import MilpOptions, solve_milp

    problem = _random_problem(3, n_all=9, n_classes=5, n_features=4, n_per_class=2)
    optimum = brute_force_optimum(problem)
    priced = MilpOptions(**_PRICED, cut_stop_rate=math.inf)
    result = solve_milp(problem, time_limit_s=30, options=priced)
    assert any("stopped: rate" in line for line in result.log)
    assert not any("root round" in line or "branch and bound" in line for line in result.log)
    assert result.time_s < 15  # the rest of the 30 s was left to the caller
    assert result.bound is not None and result.bound >= optimum - 1e-7


def _priced_problem() -> AssignmentProblem:
    rng = np.random.default_rng(7)
    n_classes, n_all = 50, 420  # 21 000 class-feature pairs: features are priced in
    R = np.triu(rng.random((n_all, n_all)) * (rng.random((n_all, n_all)) < 0.1), 1)
    return AssignmentProblem(rng.normal(size=(n_classes, n_all)), R + R.T, np.zeros(n_all), 12, 3)


def test_auto_gives_the_time_the_bound_leaves_to_the_search(monkeypatch) -> None:
    import openqpm.solver as solver_module
    from openqpm.solver import solve
    from openqpm.solver.problem import SolverProgress

    problem = _priced_problem()
    # the search "improves fast": the bound must fall faster than any rate to keep the time
    monkeypatch.setattr(solver_module, "_search_rate", lambda trajectory, duration_s: math.inf)
    events: list[SolverProgress] = []
    result = solve(problem, method="auto", time_limit_s=12, progress=events.append)
    assert any("search again for" in line for line in result.log)
    assert any("stopped: rate" in line for line in result.log)
    assert result.time_s < 12 + 3
    assert result.bound is not None and result.bound >= result.objective
    # one clock for all phases; the best and bound reported never get worse
    times = [event.elapsed_s for event in events]
    assert times == sorted(times) and times[-1] <= result.time_s + 1e-6
    objectives = [event.objective for event in events if event.objective is not None]
    assert objectives == sorted(objectives) and objectives[-1] <= result.objective + 1e-9
    bounds = [event.bound for event in events if event.bound is not None]
    assert bounds == sorted(bounds, reverse=True)
    assert all(
        event.bound >= event.objective - 1e-9
        for event in events
        if event.bound is not None and event.objective is not None
    )
    assert result.bound <= bounds[-1] + 1e-9


def test_ctrl_c_in_autos_second_search_keeps_the_bound(monkeypatch) -> None:
    import openqpm.solver as solver_module
    from openqpm.solver import solve
    from openqpm.solver.problem import SolveInterrupted, validate_assignment

    problem = _priced_problem()
    monkeypatch.setattr(solver_module, "_search_rate", lambda trajectory, duration_s: math.inf)
    real = solver_module._solver_function
    calls: list[str] = []

    def interrupted_second_search(method: str):
        function = real(method)
        calls.append(method)
        if calls.count("search") < 2:
            return function

        def run(problem, **options):
            found = function(problem, **{**options, "time_limit_s": 0.5})
            raise SolveInterrupted(found)

        return run

    monkeypatch.setattr(solver_module, "_solver_function", interrupted_second_search)
    with pytest.raises(SolveInterrupted) as stop:
        solve(problem, method="auto", time_limit_s=12)
    assignment = stop.value.assignment
    validate_assignment(problem, assignment)
    assert assignment.bound is not None and assignment.bound >= assignment.objective
    assert "interrupted" in assignment.log[-1]


def test_milp_with_a_stop_rate_also_returns_when_the_cut_loop_stalls(monkeypatch) -> None:
    import dataclasses

    import openqpm.solver.bound as bound_module
    from openqpm.solver.exact import MilpOptions, solve_milp

    real = bound_module.cut_relaxation_bound

    def stalled(*args, **kwargs):  # the real loop, reported as stalled
        return dataclasses.replace(real(*args, **kwargs), stopped="stalled")

    monkeypatch.setattr(bound_module, "cut_relaxation_bound", stalled)
    problem = _priced_problem()
    result = solve_milp(problem, time_limit_s=60, options=MilpOptions(cut_stop_rate=0.0))
    assert any("stopped: stalled" in line for line in result.log)
    assert not any("root round" in line or "branch and bound" in line for line in result.log)
    assert result.time_s < 50
    assert result.bound is not None and result.bound >= result.objective
    # without a stop rate (plain "milp"), the root phase and branch and bound still follow
    plain = solve_milp(problem, time_limit_s=20, options=MilpOptions())
    assert any("root round" in line for line in plain.log)
