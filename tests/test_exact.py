"""The exact MILP solver and the paper's formulation: optimality, valid bounds, distinctness."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest

from _brute_force import brute_force_optimum
from openqpm.instances import generate_instance
from openqpm.solver.exact import (
    MilpOptions,
    _anticipated_duplicates,
    _Relaxation,
    _separate_cliques,
    distinct_set_cut_holds,
    solve_milp,
)
from openqpm.solver.paper import PaperFormulationTimeout, solve_paper_formulation
from openqpm.solver.problem import AssignmentProblem, SolverProgress, validate_assignment

# no search phase: the tests give the MILP nothing but the problem (or a start)
_NO_SEARCH = MilpOptions(search_share=1e-3, max_search_s=0.05)
# the column-generation path (pricing, class depths with tails) even on tiny problems
_PRICED = MilpOptions(
    search_share=1e-3,
    max_search_s=0.05,
    full_model_max_columns=0,
    initial_features_per_selected=1.0,
    initial_depth_per_class=0.3,
    features_added_per_round=2,
)


def _random_problem(
    seed: int,
    *,
    n_all: int = 7,
    n_classes: int = 4,
    n_features: int = 4,
    n_per_class: int = 2,
    identical_classes: bool = False,
) -> AssignmentProblem:
    rng = np.random.default_rng(seed)
    if identical_classes:
        # every class prefers the same features: the unconstrained optimum duplicates them all
        A = np.tile(rng.random(n_all), (n_classes, 1)) + 0.01 * rng.random((n_classes, n_all))
    else:
        A = rng.normal(size=(n_classes, n_all))
    # penalties and bias of the size of one assignment (the class term is scaled by ~100)
    R = np.triu(rng.random((n_all, n_all)) * (rng.random((n_all, n_all)) < 0.5), 1) * 60.0
    R = R + R.T
    b = rng.normal(size=n_all) * 20.0
    return AssignmentProblem(A, R, b, n_features, n_per_class)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_milp_proves_the_brute_force_optimum(seed: int) -> None:
    problem = _random_problem(seed)
    optimum = brute_force_optimum(problem)
    result = solve_milp(problem, time_limit_s=30, options=_NO_SEARCH)
    validate_assignment(problem, result)
    assert result.objective == pytest.approx(optimum, rel=1e-9, abs=1e-9)
    assert result.bound == pytest.approx(result.objective, rel=1e-9, abs=1e-9)
    assert result.gap == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("seed", [3, 4])
def test_pricing_and_class_depth_keep_the_bound_valid(seed: int) -> None:
    # the column-generation model starts with one selection's worth of features and short
    # class lists: every bound it reports must still be at least the optimum
    problem = _random_problem(seed, n_all=9, n_classes=5, n_features=4, n_per_class=2)
    optimum = brute_force_optimum(problem)
    bounds: list[float] = []

    def record(report: SolverProgress) -> None:
        if report.bound is not None:
            bounds.append(report.bound)

    result = solve_milp(problem, time_limit_s=30, options=_PRICED, progress=record)
    validate_assignment(problem, result)
    assert bounds, "the solver reported no bound"
    assert min(bounds) >= optimum - 1e-7
    assert result.objective == pytest.approx(optimum, rel=1e-9)
    assert result.bound is not None and result.bound >= optimum - 1e-7


@pytest.mark.parametrize("time_limit_s", [0.01, 0.3, 2.0])
def test_bound_is_valid_when_time_runs_out(time_limit_s: float) -> None:
    problem = _random_problem(9, n_all=10, n_classes=6, n_features=5, n_per_class=2)
    optimum = brute_force_optimum(problem)
    result = solve_milp(problem, time_limit_s=time_limit_s, options=_PRICED)
    validate_assignment(problem, result)
    assert result.objective <= optimum + 1e-7
    if time_limit_s >= 2.0:
        assert result.bound is not None
    # a stopped solver may have no bound yet, never a wrong one
    assert result.bound is None or result.bound >= optimum - 1e-7


@pytest.mark.parametrize("seed", [10, 11])
def test_lagrangian_bound_holds_at_any_duals(seed: int) -> None:
    # weak duality: whatever the row duals (even random ones), the bound of the model with
    # features left out and short class lists is at least the optimum
    problem = _random_problem(seed, n_all=8, n_classes=4, n_features=4, n_per_class=2)
    optimum = brute_force_optimum(problem)
    model = _Relaxation(problem, depth=np.full(problem.n_classes, 3), seed=0, threads=1)
    model.add_features([0, 1, 2, 3, 4])
    model.add_clique_cut([0, 1], 1) if problem.R[0, 1] > 0 else None
    rng = np.random.default_rng(seed)
    solved = model.solve_lp(10.0)
    assert solved is not None
    assert solved.bound >= optimum - 1e-7
    for _ in range(20):
        duals = solved.row_duals + rng.normal(scale=50.0, size=solved.row_duals.size)
        bound, _ = model.lagrangian_bound(duals)
        assert bound >= optimum - 1e-7


def test_distinctness_cuts_separate_classes_with_identical_preferences() -> None:
    problem = _random_problem(6, n_all=6, n_classes=5, n_features=4, identical_classes=True)
    # without distinctness every class would take the same two features
    top_sets = {tuple(np.argsort(-row)[:2]) for row in problem.A}
    assert len(top_sets) == 1
    optimum = brute_force_optimum(problem)
    result = solve_milp(problem, time_limit_s=30, options=_NO_SEARCH)
    validate_assignment(problem, result)
    assert len({tuple(features) for features in result.class_features}) == problem.n_classes
    assert result.objective == pytest.approx(optimum, rel=1e-9)
    assert result.gap == pytest.approx(0.0, abs=1e-9)


def test_group_cut_is_exactly_at_most_one_class_per_set() -> None:
    # every assignment of 3 classes to 2-subsets of 4 features: the cut holds iff at most one
    # class of the group uses the set
    features, k, group, feature_set = range(4), 2, [0, 1, 2], [0, 1]
    subsets = list(itertools.combinations(features, k))
    for choice in itertools.product(subsets, repeat=3):
        x = np.zeros((3, 4))
        for c, subset in enumerate(choice):
            x[c, list(subset)] = 1
        users = sum(set(subset) == set(feature_set) for subset in choice)
        assert distinct_set_cut_holds(x, group, feature_set) == (users <= 1)


def test_pairwise_cut_is_wrong_when_classes_may_have_more_than_k() -> None:
    # in the paper's relaxation a class may hold T plus one more feature: the two classes are
    # distinct, yet sum_{d in T} (x_c + x_c') = 2k violates "<= 2k - 1"
    k, feature_set = 2, [0, 1]
    x = np.array([[1, 1, 0], [1, 1, 1]])  # class 0 = T, class 1 = T + {2}
    assert tuple(np.flatnonzero(x[0])) != tuple(np.flatnonzero(x[1]))
    assert x[:, feature_set].sum() > 2 * k - 1
    # with exactly k per class (our formulation) sharing T means being equal
    assert not distinct_set_cut_holds(np.array([[1, 1, 0], [1, 1, 0]]), [0, 1], feature_set)


def test_anticipated_duplicates_name_shared_best_sets() -> None:
    problem = _random_problem(7, n_all=6, n_classes=4, n_features=4, identical_classes=True)
    groups = _anticipated_duplicates(problem, [0, 1, 2, 3], n_sets_per_class=1)
    assert len(groups) == 1
    group, feature_set = groups[0]
    assert group == [0, 1, 2, 3] and len(feature_set) == 2


def test_milp_starts_from_a_given_selection_and_reports_progress() -> None:
    problem = _random_problem(8)
    reports: list[SolverProgress] = []
    result = solve_milp(problem, time_limit_s=30, start=[0, 1, 2, 3], progress=reports.append)
    assert reports and "start" in reports[0].message
    assert all(r.bound is None or r.bound >= r.objective - 1e-9 for r in reports if r.objective)
    assert result.gap == pytest.approx(0.0, abs=1e-9)


def test_milp_rejects_a_non_positive_time_limit() -> None:
    with pytest.raises(ValueError, match="time_limit_s"):
        solve_milp(_random_problem(0), time_limit_s=0)


def test_paper_formulation_returns_a_valid_assignment() -> None:
    problem = generate_instance(16, 6, 5, 2, seed=2, bias="none")
    result = solve_paper_formulation(problem, time_limit_s=30)
    validate_assignment(problem, result)
    assert result.method == "paper" and result.bound is None
    exact = solve_milp(problem, time_limit_s=30, options=_NO_SEARCH)
    # the paper's restricted search can only be as good as the proven optimum
    assert result.objective <= exact.objective + 1e-7


def test_paper_formulation_times_out_with_a_clear_error() -> None:
    problem = generate_instance(60, 20, 10, 3, seed=0, bias="none")
    with pytest.raises(PaperFormulationTimeout, match="paper formulation"):
        solve_paper_formulation(problem, time_limit_s=0.01)


def test_clique_cuts_are_valid_and_cut_off_spread_selections() -> None:
    rng = np.random.default_rng(12)
    n_all = 30
    penalised = np.triu(rng.random((n_all, n_all)) < 0.5, 1)
    penalised = penalised | penalised.T
    features = np.arange(n_all)
    spread = np.full(n_all, 0.4)  # the LP's favourite: many features at 0.4, no pair paid
    cuts = _separate_cliques(spread, features, {}, penalised, max_cuts=50)
    assert cuts
    for clique, t, violation in cuts:
        members = np.array(clique)
        assert np.all(penalised[np.ix_(members, members)] | np.eye(len(members), dtype=bool))
        assert violation == pytest.approx(t * 0.4 * len(members) - t * (t + 1) / 2)
        assert violation > 0
        # valid: every 0/1 selection of the clique pays at least the right-hand side
        for m in range(len(members) + 1):
            assert m * (m - 1) / 2 >= t * m - t * (t + 1) / 2


def test_lazy_pairs_enter_when_violated_and_complete_to_the_eager_model() -> None:
    problem = _random_problem(13, n_all=9, n_classes=4, n_features=4, n_per_class=2)
    depth = np.full(problem.n_classes, problem.n_all_features)
    eager = _Relaxation(problem, depth=depth, seed=0, threads=1)
    lazy = _Relaxation(problem, depth=depth, seed=0, threads=1, lazy_pairs=True)
    features = list(range(problem.n_all_features))
    eager.add_features(features)
    lazy.add_features(features)
    assert not lazy.pair_column and eager.pair_column
    # at s: features 0-3 at 0.6 (their pairs sum to 1.2 > 1), the rest at 0.2 (sums <= 0.8)
    s_values = np.array([0.6] * 4 + [0.2] * (problem.n_all_features - 4))
    expected = {(d, e) for d in range(4) for e in range(d + 1, 4) if problem.R[d, e] > 0}
    assert expected, "the case needs a penalised pair among the first four features"
    assert {(min(p), max(p)) for p in lazy.violated_pairs(s_values)} == expected
    lazy.add_pairs(lazy.violated_pairs(s_values))
    assert lazy.violated_pairs(s_values) == []  # present pairs are never reported again
    lazy.complete_pairs()
    assert set(lazy.pair_column) == set(eager.pair_column)
    # the relaxation of the lazy model is never below the eager one (it is a relaxation of it
    # until completed) and equal once completed
    lazy_lp, eager_lp = lazy.solve_lp(10.0), eager.solve_lp(10.0)
    assert lazy_lp is not None and eager_lp is not None
    assert lazy_lp.value == pytest.approx(eager_lp.value, rel=1e-9, abs=1e-9)


def test_root_lp_re_solves_after_the_run_time_passes_the_limit() -> None:
    # HiGHS measures an LP's time limit against the run time its object accumulated over all
    # runs: without accounting for it, a model re-solved for longer than one round's limit
    # stops at once ("time limit reached") and the root phase ends early
    problem = _random_problem(14, n_all=12, n_classes=6, n_features=5, n_per_class=2)
    model = _Relaxation(problem, depth=np.full(problem.n_classes, 12), seed=0, threads=1)
    model.add_features(range(problem.n_all_features))
    limit_s = 0.05
    for _ in range(20_000):
        assert model.solve_lp(10.0) is not None
        if model.highs.getRunTime() > 3 * limit_s:
            break
    assert model.highs.getRunTime() > 3 * limit_s
    model.highs.clearSolver()  # the next solve must iterate (a solved LP never checks the time)
    assert model.solve_lp(limit_s) is not None


@pytest.mark.parametrize("method", ["milp", "paper"])
@pytest.mark.parametrize(
    ("start", "message"),
    [
        ([0, 1, 2], "n_features=5 ids, got 3"),
        ([0, 1, 2, 3, 3], "feature 3 is selected twice"),
        ([0, 1, 2, 3, 16], r"must lie in \[0, 16\)"),
        ([0.0, 1.0, 2.0, 3.0, 4.0], "integer feature ids"),
    ],
)
def test_a_bad_start_is_rejected_before_solving(method: str, start: list, message: str) -> None:
    problem = generate_instance(16, 6, 5, 2, seed=0, bias="none")
    solver = solve_milp if method == "milp" else solve_paper_formulation
    with pytest.raises(ValueError, match=message):
        solver(problem, time_limit_s=30, start=start)


def test_highs_solvers_write_nothing_to_standard_output() -> None:
    # highspy >= 1.16 prints a banner from its constructor; a fresh process shows whether it leaks
    # (through a pipe, where C stdio buffers it until the process ends)
    script = (
        "import numpy as np\n"
        "from openqpm.solver.exact import solve_milp\n"
        "from openqpm.solver.paper import solve_paper_formulation\n"
        "from openqpm.solver.problem import AssignmentProblem\n"
        "rng = np.random.default_rng(0)\n"
        "problem = AssignmentProblem(rng.random((4, 7)), np.zeros((7, 7)), np.zeros(7), 4, 2)\n"
        "solve_milp(problem, time_limit_s=20)\n"
        "solve_paper_formulation(problem, time_limit_s=20)\n"
    )
    finished = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout == ""
