"""The structured search: exact assignment per selection, swap gains, optimality, determinism."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from _brute_force import brute_force_optimum
from openqpm.solver import solve, solver_methods
from openqpm.solver.problem import (
    Assignment,
    AssignmentProblem,
    SolverProgress,
    validate_assignment,
)
from openqpm.solver.search import (
    _best_single_swaps,
    _CandidateLists,
    _distinct_subsets,
    _duals_certify,
    _hungarian_max,
    _Searcher,
    _SubsetEnumerator,
    assign_classes,
    solve_search,
)


def _random_problem(
    rng: np.random.Generator,
    *,
    n_all: int,
    n_classes: int,
    n_features: int,
    n_per_class: int,
    kind: str = "normal",
) -> AssignmentProblem:
    """Random constants; "family" makes classes near copies (many collisions), "ties" integers."""
    if kind == "family":
        A = np.tile(rng.normal(size=n_all), (n_classes, 1)) + 0.05 * rng.normal(
            size=(n_classes, n_all)
        )
    elif kind == "ties":
        A = rng.integers(0, 3, size=(n_classes, n_all)).astype(float)
    else:
        A = rng.normal(size=(n_classes, n_all))
    # penalties comparable to the scaled class term so that they matter
    R = np.triu(rng.random((n_all, n_all)) * (rng.random((n_all, n_all)) < 0.4), 1)
    R = (R + R.T) * 100.0
    b = rng.normal(size=n_all) * 30.0
    return AssignmentProblem(A, R, b, n_features, n_per_class)


def test_subset_enumerator_yields_every_subset_in_non_increasing_order() -> None:
    rng = np.random.default_rng(3)
    values = np.round(rng.normal(size=7), 1)  # rounded: ties included
    ids = np.arange(10, 17)
    enumerator = _SubsetEnumerator(values, ids, 3)
    enumerator.extend_to(1000)
    assert enumerator.exhausted
    assert len(enumerator.subsets) == math.comb(7, 3) == len(set(enumerator.subsets))
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(enumerator.values))
    for subset, value in zip(enumerator.subsets, enumerator.values, strict=True):
        assert value == pytest.approx(values[np.asarray(subset) - 10].sum())


def test_hungarian_matches_scipy_and_returns_optimal_duals() -> None:
    rng = np.random.default_rng(4)
    for n_rows, n_columns in [(1, 1), (3, 3), (4, 9), (6, 7)]:
        weights = np.round(rng.normal(size=(n_rows, n_columns)), 1)
        column_of_row, row_duals, column_duals = _hungarian_max(weights)
        rows, columns = linear_sum_assignment(-weights)
        assert len(set(column_of_row.tolist())) == n_rows
        matched = weights[np.arange(n_rows), column_of_row].sum()
        assert matched == pytest.approx(weights[rows, columns].sum())
        assert np.all(row_duals[:, None] + column_duals[None, :] >= weights - 1e-9)
        assert np.all(column_duals >= -1e-9)
        assert row_duals.sum() + column_duals.sum() == pytest.approx(matched)
        assert _duals_certify(weights, column_of_row, row_duals, column_duals, 1e-9)
        assert not _duals_certify(weights, column_of_row, row_duals - 0.1, column_duals, 1e-9)


@pytest.mark.parametrize("kind", ["normal", "family", "ties", "identical"])
def test_distinct_assignment_is_optimal_for_a_fixed_selection(kind: str) -> None:
    rng = np.random.default_rng({"normal": 1, "family": 2, "ties": 3, "identical": 4}[kind])
    for _ in range(25):
        n_selected = int(rng.integers(3, 8))
        k = int(rng.integers(1, n_selected))
        subsets = list(itertools.combinations(range(n_selected), k))
        n_classes = int(rng.integers(2, min(len(subsets), 12) + 1))
        if kind == "family":
            values = np.tile(rng.normal(size=n_selected), (n_classes, 1))
            values += 0.01 * rng.normal(size=(n_classes, n_selected))
        elif kind == "ties":
            values = rng.integers(0, 3, size=(n_classes, n_selected)).astype(float)
        elif kind == "identical":
            values = np.tile(rng.normal(size=n_selected), (n_classes, 1))
        else:
            values = rng.normal(size=(n_classes, n_selected))
        selected = np.sort(rng.choice(40, size=n_selected, replace=False))
        found, loss, _ = _distinct_subsets(values, selected, k)
        assert len(set(found)) == n_classes and all(len(s) == k for s in found)
        column = {int(d): j for j, d in enumerate(selected)}
        total = sum(values[c, [column[d] for d in s]].sum() for c, s in enumerate(found))
        every = np.array([[values[c, list(s)].sum() for s in subsets] for c in range(n_classes)])
        rows, columns = linear_sum_assignment(-every)
        assert total == pytest.approx(every[rows, columns].sum(), abs=1e-9)
        best_each = np.sort(values, axis=1)[:, ::-1][:, :k].sum()
        assert loss == pytest.approx(best_each - total, abs=1e-9)


def test_best_single_swaps_are_ranked_and_bound_every_other_swap() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        n_selected = int(rng.integers(2, 8))
        k = int(rng.integers(1, n_selected))
        rows = -np.sort(-rng.integers(0, 4, size=(3, n_selected)).astype(float), axis=1)
        n_singles = int(rng.integers(1, 6))
        swaps, excluded = _best_single_swaps(rows, k, n_singles)
        n_others = n_selected - k
        assert swaps.shape == (3, min(n_singles, k * n_others))
        for row, values in enumerate(rows):
            best = values[:k].sum()
            change = [
                values[list(s)].sum() - best
                for s in itertools.combinations(range(n_selected), k)
                if s != tuple(range(k))
            ]
            taken = [
                values[k + inn] - values[out]
                for out, inn in (divmod(int(flat), n_others) for flat in swaps[row])
            ]
            assert taken == sorted(taken, reverse=True)
            # the taken swaps are the best single swaps; every other subset is bounded
            singles = sorted(
                (values[k + j] - values[i] for i in range(k) for j in range(n_others)),
                reverse=True,
            )
            assert taken == singles[: len(taken)]
            remaining = sorted(change, reverse=True)
            for value in taken:
                remaining.remove(value)
            assert all(value <= excluded[row] + 1e-12 for value in remaining)


def test_candidate_list_thresholds_bound_every_unlisted_subset() -> None:
    rng = np.random.default_rng(6)
    for _ in range(30):
        n_classes, n_selected = 4, int(rng.integers(3, 8))
        k = int(rng.integers(1, n_selected))
        values = rng.integers(0, 3, size=(n_classes, n_selected)).astype(float)
        selected = rng.choice(40, size=n_selected, replace=False)
        order = np.argsort(-values, axis=1, kind="stable")
        top_sets = [tuple(sorted(int(d) for d in selected[row[:k]])) for row in order]
        lists = _CandidateLists(values, selected, k, order, top_sets)
        lists.start([0, 1, 2], 2)
        lists.grow(1)
        lists.grow(2)
        lists.grow(2)
        assert lists.candidates(3) == [top_sets[3]] and not lists.has_list(3)
        for class_index in range(3):
            listed = lists.lists[class_index]
            assert listed[0] == top_sets[class_index] and len(set(listed)) == len(listed)
            for subset in itertools.combinations(sorted(int(d) for d in selected), k):
                if subset not in listed:
                    value = lists.subset_value(class_index, subset)
                    assert value <= lists.thresholds[class_index] + 1e-12


def test_assign_classes_moves_the_class_that_loses_least() -> None:
    A = np.array([[1.0, 0.9, 0.0], [1.0, 0.8, 0.0]])
    problem = AssignmentProblem(A, np.zeros((3, 3)), np.zeros(3), 2, 1)
    class_features, objective = assign_classes(problem, [1, 0])
    assert class_features == [[1], [0]]
    assert objective == pytest.approx(500 * 1.9)
    with pytest.raises(ValueError, match="n_features=2 ids, got 3"):
        assign_classes(problem, [0, 1, 2])
    with pytest.raises(ValueError, match="feature 1 is selected twice"):
        assign_classes(problem, [1, 1])
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        assign_classes(problem, [0, 3])


def test_swap_gains_equal_recomputed_relaxed_values() -> None:
    rng = np.random.default_rng(5)
    for trial in range(12):
        n_all = int(rng.integers(5, 12))
        n_features = int(rng.integers(2, n_all))
        n_per_class = int(rng.integers(1, n_features + 1))
        n_classes = int(min(rng.integers(1, 8), math.comb(n_features, n_per_class)))
        kind = ["normal", "ties", "family"][trial % 3]
        problem = _random_problem(
            rng,
            n_all=n_all,
            n_classes=n_classes,
            n_features=n_features,
            n_per_class=n_per_class,
            kind=kind,
        )
        searcher = _Searcher(problem, rng=rng, deadline=float("inf"))
        selected = np.sort(rng.choice(n_all, size=n_features, replace=False))
        gains = searcher.swap_gains(selected)
        base = searcher.evaluate(selected).relaxed
        for position, feature in itertools.product(range(n_features), range(n_all)):
            if feature in selected:
                assert gains[position, feature] == -np.inf
                continue
            swapped = selected.copy()
            swapped[position] = feature
            expected = searcher.evaluate(swapped).relaxed - base
            assert gains[position, feature] == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize("kind", ["normal", "family", "ties"])
def test_search_finds_the_brute_force_optimum_on_tiny_problems(kind: str) -> None:
    rng = np.random.default_rng({"normal": 10, "family": 11, "ties": 12}[kind])
    for seed in range(6):
        problem = _random_problem(rng, n_all=7, n_classes=4, n_features=4, n_per_class=2, kind=kind)
        optimum = brute_force_optimum(problem)
        found = solve_search(problem, time_limit_s=30, seed=seed, max_iterations=15)
        validate_assignment(problem, found)
        assert found.objective == pytest.approx(optimum, abs=1e-7)
        assert found.bound is None and found.gap is None and found.method == "search"


def test_search_is_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(20)
    problem = _random_problem(
        rng, n_all=40, n_classes=15, n_features=10, n_per_class=3, kind="family"
    )
    first, again = (
        solve_search(problem, time_limit_s=120, seed=7, max_iterations=12) for _ in range(2)
    )
    assert first.selected_features == again.selected_features
    assert first.class_features == again.class_features
    assert first.objective == again.objective
    assert first.log[:-2] == again.log[:-2]  # the last lines carry timings


def test_search_respects_a_start_and_reports_progress() -> None:
    rng = np.random.default_rng(21)
    problem = _random_problem(rng, n_all=30, n_classes=10, n_features=8, n_per_class=3)
    selection = list(range(8))
    class_features, objective = assign_classes(problem, selection)
    start = Assignment(selection, class_features, objective)
    events: list[SolverProgress] = []
    found = solve_search(
        problem, time_limit_s=30, start=start, max_iterations=5, progress=events.append
    )
    assert found.objective >= objective - 1e-9
    assert events and all(e.objective is not None and e.bound is None for e in events)
    assert [e.objective for e in events] == sorted(e.objective for e in events)
    assert events[-1].objective == pytest.approx(found.objective)
    from_list = solve_search(problem, time_limit_s=30, start=selection, max_iterations=0)
    assert from_list.objective >= objective - 1e-9
    with pytest.raises(ValueError, match="n_features=8 ids, got 3"):
        solve_search(problem, time_limit_s=1, start=[0, 1, 2])
    with pytest.raises(ValueError, match="time_limit_s must be positive"):
        solve_search(problem, time_limit_s=0)


def test_pair_moves_leave_a_local_optimum_of_single_swaps() -> None:
    # {0, 1} is worth 2; every single swap into {2, 3} pays a penalty (worth 1.5), the pair swap
    # to {2, 3} is worth 3: only a move of two swaps together finds it
    R = np.zeros((4, 4))
    for d, e in [(0, 2), (0, 3), (1, 2), (1, 3)]:
        R[d, e] = R[e, d] = 1.0
    b = np.array([1.0, 1.0, 1.5, 1.5])
    problem = AssignmentProblem(np.zeros((2, 4)), R, b, 2, 1)
    searcher = _Searcher(problem, rng=np.random.default_rng(0), deadline=math.inf)
    start = searcher.evaluate(np.array([0, 1]))
    assert searcher.descend(start).objective == pytest.approx(2.0)
    moved = searcher.pair_descent(start)
    assert moved.selected.tolist() == [2, 3]
    assert moved.objective == pytest.approx(3.0)
    found = solve_search(problem, time_limit_s=30, start=[0, 1], max_iterations=0)
    assert found.selected_features == [2, 3] and found.objective == pytest.approx(3.0)


def test_search_stops_at_the_time_limit() -> None:
    rng = np.random.default_rng(22)
    problem = _random_problem(rng, n_all=200, n_classes=40, n_features=20, n_per_class=4)
    found = solve_search(problem, time_limit_s=0.5)
    validate_assignment(problem, found)
    assert found.time_s < 3.0


def test_solve_dispatches_and_rejects_unknown_methods() -> None:
    rng = np.random.default_rng(23)
    problem = _random_problem(rng, n_all=20, n_classes=6, n_features=6, n_per_class=2)
    assert solver_methods()[:2] == ["auto", "search"]
    assert {"milp", "paper", "gurobi"} <= set(solver_methods())
    with pytest.raises(ValueError, match="unknown solver method 'fast'; valid: auto, search"):
        solve(problem, method="fast")
    found = solve(problem, method="search", time_limit_s=10, max_iterations=3)
    validate_assignment(problem, found)
    # "auto" always returns a valid solution: with a MILP backend it carries its bound
    automatic = solve(problem, method="auto", time_limit_s=4, max_iterations=3)
    validate_assignment(problem, automatic)
    assert automatic.method == "auto"
    assert automatic.bound is None or automatic.bound >= automatic.objective - 1e-6


def test_auto_gives_the_search_a_quarter_of_the_time_but_at_most_two_minutes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import openqpm.solver as solver_package

    rng = np.random.default_rng(24)
    problem = _random_problem(rng, n_all=20, n_classes=6, n_features=6, n_per_class=2)
    search_limits: list[float] = []
    real_function = solver_package._solver_function

    def recording(method: str) -> Any:
        function = real_function(method)

        def shortened(problem: AssignmentProblem, **options: Any) -> Assignment:
            # record what auto gives the search; run every stage briefly whatever the limit
            if method == "search":
                search_limits.append(options["time_limit_s"])
            options["time_limit_s"] = min(
                options["time_limit_s"], 0.2 if method == "search" else 5.0
            )
            return function(problem, **options)

        return shortened

    monkeypatch.setattr(solver_package, "_solver_function", recording)
    for time_limit_s in (8.0, 3600.0):
        automatic = solve(problem, method="auto", time_limit_s=time_limit_s, max_iterations=3)
        validate_assignment(problem, automatic)
    assert search_limits == [2.0, 120.0]


def test_ctrl_c_during_the_search_keeps_the_best_solution(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C inside the search loop becomes SolveInterrupted carrying a valid best solution."""
    from openqpm.instances import make_instance
    from openqpm.solver import SolveInterrupted, solve
    from openqpm.solver import search as search_module
    from openqpm.solver.problem import validate_assignment

    problem = make_instance("tiny", seed=0)
    original = search_module._Searcher.greedy
    calls = {"n": 0}

    def greedy_then_ctrl_c(self: object, *args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:  # the second round of the loop (the first call is the start)
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(search_module._Searcher, "greedy", greedy_then_ctrl_c)
    for method in ("search", "auto"):
        calls["n"] = 0
        with pytest.raises(SolveInterrupted) as caught:
            solve(problem, method=method, time_limit_s=60, seed=0)
        assignment = caught.value.assignment
        validate_assignment(problem, assignment)
        assert any("interrupted" in line for line in assignment.log), method
        assert assignment.time_s < 30, method
