"""Forced near-equal class pairs: classes (c, c') that share exactly n_per_class - 1 features."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from openqpm.solver import solve
from openqpm.solver.exact import solve_milp
from openqpm.solver.problem import (
    Assignment,
    AssignmentProblem,
    InvalidAssignmentError,
    validate_assignment,
)
from openqpm.solver.search import _forced_pair_subsets, assign_classes, solve_search

# (seed, n_per_class, forced pairs) of the tiny instances: 8 features, 4 classes, select 5
_CASES = [
    (0, 2, [(0, 1)]),
    (1, 3, [(0, 1)]),
    (2, 2, [(0, 1), (2, 3)]),
    (3, 3, [(1, 2), (2, 3)]),
    (4, 2, [(0, 3), (1, 3)]),
    (5, 3, [(0, 2), (1, 3)]),
]


def _tiny_problem(
    seed: int, k: int, pairs: list[tuple[int, int]] | None, n_features: int = 5
) -> AssignmentProblem:
    rng = np.random.default_rng(seed)
    n_all, n_classes = 8, 4
    A = rng.uniform(-1.0, 1.0, (n_classes, n_all))
    # make the classes alike, so that the unconstrained optimum rarely meets the pairs by chance
    A[1:] = 0.5 * A[1:] + 0.5 * A[0]
    R = np.triu(rng.uniform(0.0, 30.0, (n_all, n_all)) * (rng.random((n_all, n_all)) < 0.3), 1)
    R = R + R.T
    b = rng.uniform(-10.0, 10.0, n_all)
    return AssignmentProblem(A, R, b, n_features, k, forced_pairs=pairs)


def _selection_optimum(
    problem: AssignmentProblem, selection: tuple[int, ...]
) -> tuple[float, list[tuple[int, ...]] | None]:
    """The best assignment of one selection under distinctness and the pairs, by enumeration."""
    k, n_classes = problem.n_per_class, problem.n_classes
    subsets = list(itertools.combinations(selection, k))
    values = np.array([[row[list(s)].sum() for s in subsets] for row in problem.A])
    shared = np.array([[len(set(s) & set(t)) for t in subsets] for s in subsets])
    perms = np.array(list(itertools.permutations(range(len(subsets)), n_classes)))
    totals = values[np.arange(n_classes)[None, :], perms].sum(axis=1)
    feasible = np.ones(len(perms), dtype=bool)
    for first, second in problem.forced_pairs:
        feasible &= shared[perms[:, first], perms[:, second]] == k - 1
    if not feasible.any():
        return -np.inf, None
    best = int(np.flatnonzero(feasible)[np.argmax(totals[feasible])])
    chosen = list(selection)
    value = (
        problem.class_scale * float(totals[best])
        - 0.5 * float(problem.R[np.ix_(chosen, chosen)].sum())
        + float(problem.b[chosen].sum())
    )
    return value, [subsets[j] for j in perms[best]]


def _brute_force(problem: AssignmentProblem) -> float:
    return max(
        _selection_optimum(problem, selection)[0]
        for selection in itertools.combinations(range(problem.n_all_features), problem.n_features)
    )


def _shared(features: list[list[int]], first: int, second: int) -> int:
    return len(set(features[first]) & set(features[second]))


@pytest.mark.parametrize(("seed", "k", "pairs"), _CASES)
def test_assign_classes_is_exact_under_the_pairs(
    seed: int, k: int, pairs: list[tuple[int, int]]
) -> None:
    problem = _tiny_problem(seed, k, pairs)
    rng = np.random.default_rng(seed)
    for _ in range(6):
        selection = tuple(sorted(rng.choice(8, size=5, replace=False).tolist()))
        expected, _ = _selection_optimum(problem, selection)
        class_features, value = assign_classes(problem, list(selection))
        for first, second in pairs:
            assert _shared(class_features, first, second) == k - 1
        assert len({tuple(f) for f in class_features}) == problem.n_classes
        assert value == pytest.approx(problem.objective(selection, class_features), abs=1e-9)
        assert value == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_greedy_pair_assignment_is_feasible_and_mostly_optimal() -> None:
    """Budget 0: the greedy construction answers; it must always meet the pairs and distinctness,
    never beat the exact optimum, and reach it on most of these small selections (24 of 36 when
    written; the default budget lets the exact branch and bound answer on problems this small)."""
    n_optimal = n_total = 0
    for seed, k, pairs in _CASES:
        problem = _tiny_problem(seed, k, pairs)
        rng = np.random.default_rng(100 + seed)
        for _ in range(6):
            selection = np.array(sorted(rng.choice(8, size=5, replace=False).tolist()))
            expected, _ = _selection_optimum(problem, tuple(selection.tolist()))
            values = problem.A[:, selection]
            subsets, _, _ = _forced_pair_subsets(values, selection, k, pairs, budget=0)
            features = [list(s) for s in subsets]
            assert len(set(subsets)) == problem.n_classes
            for first, second in pairs:
                assert _shared(features, first, second) == k - 1
            value = problem.objective(selection.tolist(), features)
            assert value <= expected + 1e-9
            n_total += 1
            n_optimal += value >= expected - 1e-9
    assert n_optimal >= 0.6 * n_total, (n_optimal, n_total)


def test_milp_and_search_reach_the_constrained_optimum() -> None:
    n_search_equal = 0
    for seed, k, pairs in _CASES:
        problem = _tiny_problem(seed, k, pairs)
        optimum = _brute_force(problem)
        found = solve_search(problem, time_limit_s=10, seed=0, max_iterations=30)
        validate_assignment(problem, found)
        assert found.objective <= optimum + 1e-7
        n_search_equal += int(found.objective >= optimum - 1e-7)
        # from the first selection (not the search's), so that the MILP has work to do
        exact = solve_milp(problem, time_limit_s=30, seed=0, start=[0, 1, 2, 3, 4])
        validate_assignment(problem, exact)
        assert exact.objective == pytest.approx(optimum, rel=1e-7, abs=1e-7)
        assert exact.gap is not None and exact.gap <= 1e-6
        assert exact.bound is not None and exact.bound >= optimum - 1e-6
        auto = solve(problem, method="auto", time_limit_s=30, max_iterations=10)
        assert auto.objective == pytest.approx(optimum, rel=1e-7, abs=1e-7)
    assert n_search_equal >= len(_CASES) // 2


def test_pairs_change_the_optimum_somewhere() -> None:
    """The constraint binds on at least one tiny instance (else the tests above prove little)."""
    binding = 0
    for seed, k, pairs in _CASES:
        constrained = _brute_force(_tiny_problem(seed, k, pairs))
        plain = _brute_force(_tiny_problem(seed, k, None))
        assert constrained <= plain + 1e-9
        binding += int(constrained < plain - 1e-9)
    assert binding >= 1


def test_validator_rejects_a_violated_pair() -> None:
    problem = _tiny_problem(0, 2, [(0, 1)])
    class_features = [[0, 1], [2, 3], [0, 2], [1, 3]]
    selection = [0, 1, 2, 3, 4]
    assignment = Assignment(selection, class_features, problem.objective(selection, class_features))
    with pytest.raises(InvalidAssignmentError, match=r"forced pair \(0, 1\) shares 0 features"):
        validate_assignment(problem, assignment)
    fixed = [[0, 1], [1, 3], [0, 2], [2, 3]]
    validate_assignment(problem, Assignment(selection, fixed, problem.objective(selection, fixed)))


def test_save_load_keeps_the_pairs(tmp_path: pytest.TempPathFactory) -> None:
    problem = _tiny_problem(2, 2, [(3, 2), (0, 1)])
    assert problem.forced_pairs == ((2, 3), (0, 1))
    path = tmp_path / "problem.npz"  # type: ignore[operator]
    problem.save(path)
    loaded = AssignmentProblem.load(path)
    assert loaded.forced_pairs == problem.forced_pairs
    assert "forced_pairs" in repr(loaded)
    plain = _tiny_problem(2, 2, None)
    plain_path = tmp_path / "plain.npz"  # type: ignore[operator]
    plain.save(plain_path)
    with np.load(plain_path) as data:
        assert "forced_pairs" not in data.files  # old-format files stay as they were
    assert AssignmentProblem.load(plain_path).forced_pairs == ()


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([(1, 1)], r"forced pair \(1, 1\): a class cannot pair with itself"),
        ([(0, 4)], r"forced pair \(0, 4\): class indices must lie in \[0, 4\)"),
        ([(-1, 2)], r"forced pair \(-1, 2\)"),
        ([(0, 1), (1, 0)], r"forced pair \(1, 0\) is given twice"),
        ([(0, 1, 2)], r"forced_pairs must be a sequence of \(c, c'\) pairs"),
        ([(0, 1.5)], r"must be an integer"),
    ],
)
def test_bad_pairs_are_refused(pairs: list[tuple[float, ...]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _tiny_problem(0, 2, pairs)  # type: ignore[arg-type]


def test_too_few_features_for_a_pair_is_refused() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"forced pairs \[\[0, 1\]\] need .* n_features=2"):
        AssignmentProblem(
            rng.random((2, 4)), np.zeros((4, 4)), np.zeros(4), 2, 2, forced_pairs=[(0, 1)]
        )


@pytest.mark.parametrize("method", ["paper", "gurobi", "scip"])
def test_unsupported_methods_refuse_pairs(method: str) -> None:
    problem = _tiny_problem(0, 2, [(0, 1)])
    with pytest.raises(NotImplementedError, match="forced class pairs"):
        solve(problem, method=method, time_limit_s=5)


def test_one_feature_apart_pairs_on_the_tiny_instance() -> None:
    """Report how many class pairs are one feature apart without and with one forced pair."""
    from openqpm.instances import make_instance

    plain = make_instance("tiny")
    distance = ((plain.A[:, None, :] - plain.A[None, :, :]) ** 2).sum(axis=2)
    distance[np.diag_indices_from(distance)] = np.inf
    first, second = sorted(int(i) for i in np.unravel_index(np.argmin(distance), distance.shape))
    forced = AssignmentProblem(
        plain.A, plain.R, plain.b, plain.n_features, plain.n_per_class,
        forced_pairs=[(first, second)],
    )  # fmt: skip
    k = plain.n_per_class

    def near_pairs(assignment: Assignment) -> int:
        features = assignment.class_features
        return sum(
            _shared(features, c, d) == k - 1
            for c, d in itertools.combinations(range(len(features)), 2)
        )

    # the search (the MILP proves both optimal in about 40 s each, too slow for a unit test)
    without = solve(plain, method="search", time_limit_s=30, max_iterations=50)
    with_pair = solve(forced, method="search", time_limit_s=30, max_iterations=50)
    assert _shared(with_pair.class_features, first, second) == k - 1
    print(
        f"\ntiny: forced pair ({first}, {second}); one-feature-apart class pairs: "
        f"{near_pairs(without)} plain (objective {without.objective:.3f}, gap {without.gap}), "
        f"{near_pairs(with_pair)} forced (objective {with_pair.objective:.3f}, gap "
        f"{with_pair.gap}); the pair shared {_shared(without.class_features, first, second)} "
        f"of {k} features without the constraint"
    )
