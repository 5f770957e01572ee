"""The ablation switches of build_problem: no R, no b, the paper's centre bias, AUROC for A.

Paper: table 4 (without Z_R / Z_B), appendix D and table 11 (centre bias at lambda = 10**1.5),
appendix J (AUROC instead of the Pearson correlation as the class-feature similarity A).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import roc_auc_score

from _brute_force import brute_force_optimum
from openqpm import constants
from openqpm._io import to_jsonable
from openqpm.constants import (
    BIAS_NAMES,
    CENTER_PAPER_STRENGTH,
    CLASS_MEASURES,
    DEFAULT_BIAS_STRENGTH,
    FeatureStatistics,
    MapStatistics,
    build_problem,
    class_feature_auroc,
    class_feature_similarity,
    compute_bias,
)
from openqpm.solver import solve
from openqpm.solver.problem import Assignment, AssignmentProblem


def _optimal_selections(problem: AssignmentProblem) -> tuple[float, set[tuple[int, ...]]]:
    """The optimum over every selection and all selections that reach it (ties within 1e-9)."""
    values: dict[tuple[int, ...], float] = {}
    for selection in itertools.combinations(range(problem.n_all_features), problem.n_features):
        subsets = list(itertools.combinations(selection, problem.n_per_class))
        class_values = np.array([[row[list(s)].sum() for s in subsets] for row in problem.A])
        rows, columns = linear_sum_assignment(class_values, maximize=True)
        chosen = list(selection)
        values[selection] = (
            problem.class_scale * float(class_values[rows, columns].sum())
            - 0.5 * float(problem.R[np.ix_(chosen, chosen)].sum())
            + float(problem.b[chosen].sum())
        )
    best = max(values.values())
    return best, {s for s, value in values.items() if value >= best - 1e-9}


def _solve_exactly(problem: AssignmentProblem, seed: int = 0) -> Assignment:
    """The search (a fixed number of rounds), then the MILP from it, which proves the optimum."""
    found = solve(problem, method="search", time_limit_s=60, seed=seed, max_iterations=10)
    result = solve(problem, method="milp", time_limit_s=120, seed=seed, start=found)
    assert result.bound is not None and result.bound == pytest.approx(result.objective, abs=1e-6)
    return result


def _random_data(
    seed: int, n_all: int = 9, n_classes: int = 5, per_class: int = 6
) -> tuple[np.ndarray, np.ndarray]:
    """Features with a random class signal of random strength per (class, feature)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_classes * per_class) % n_classes
    signal = rng.random((n_classes, n_all)) * rng.random(n_all)  # (n_c, n_f)
    return rng.random((labels.size, n_all)) + signal[labels], labels


def _stats(features: np.ndarray, labels: np.ndarray, n_classes: int) -> FeatureStatistics:
    stats = FeatureStatistics(features.shape[1], n_classes)
    stats.update(features, labels)
    return stats


def _map_stats(seed: int, n_all: int, n_samples: int = 40) -> MapStatistics:
    """Random map summaries on 5x5 maps, peaks anywhere from the border to the centre."""
    rng = np.random.default_rng(seed)
    maps = MapStatistics(n_all)
    maps.update(
        rng.random((n_samples, n_all)) + 0.1,
        rng.uniform(0.05, 0.9, (n_samples, n_all)),
        rng.integers(0, 25, (n_samples, n_all)),
        map_height=5,
        map_width=5,
    )
    return maps


# ----------------------------------------------------------------------------------------------
# without R (table 4, "no Z_R")


@pytest.mark.parametrize("seed", range(4))
def test_without_similarity_the_solution_maximises_a_and_b_alone(seed: int) -> None:
    features, labels = _random_data(seed)
    stats = _stats(features, labels, 5)
    user_bias = np.random.default_rng([seed, 1]).normal(size=9)
    sizes: dict[str, Any] = {
        "n_features": 5,
        "n_per_class": 2,
        "bias": user_bias,
        "bias_strength": 3.0,
    }
    with_r, with_r_report = build_problem(stats, **sizes)
    problem, report = build_problem(stats, use_similarity=False, **sizes)

    # the switch removes R and nothing else
    assert np.array_equal(problem.R, np.zeros((9, 9)))
    assert with_r.n_penalised_pairs > 0 and with_r_report.use_similarity
    np.testing.assert_array_equal(problem.A, with_r.A)
    np.testing.assert_array_equal(problem.b, with_r.b)
    assert np.abs(problem.b).max() == pytest.approx(3.0)
    assert report.eps is None and problem.eps is None and report.n_penalised_pairs == 0
    assert report.use_similarity is False and problem.metadata["use_similarity"] is False
    assert "threshold_s" not in report.timings_s
    # the start selection: the features most similar to some class
    usefulness = problem.A.max(axis=0)
    assert sorted(report.start_features) == report.start_features
    assert set(report.start_features) == set(np.argsort(-usefulness, kind="stable")[:5].tolist())

    a_and_b_only = AssignmentProblem(problem.A, np.zeros((9, 9)), problem.b, 5, 2)
    best, optimal = _optimal_selections(a_and_b_only)
    assert best == pytest.approx(brute_force_optimum(a_and_b_only), abs=1e-9)
    result = _solve_exactly(problem, seed)
    assert result.objective == pytest.approx(best, abs=1e-6)
    assert tuple(result.selected_features) in optimal


def _planted_duplicates() -> FeatureStatistics:
    """8 classes, 9 features; features 7 and 8 are affine copies of 0 and 1 (redundancy 1)."""
    rng = np.random.default_rng(0)
    labels = np.arange(48) % 8
    base = rng.random((48, 7)) + rng.random((8, 7))[labels]
    features = np.hstack([base, 3.0 * base[:, :2] + 1.0])
    return _stats(features, labels, 8)


def test_the_similarity_term_changes_the_optimum_on_a_planted_instance() -> None:
    stats = _planted_duplicates()
    sizes: dict[str, Any] = {"n_features": 5, "n_per_class": 2, "bias": "none"}
    with_r, report = build_problem(stats, **sizes)
    without_r, _ = build_problem(stats, use_similarity=False, **sizes)
    assert report.n_penalised_pairs > 0
    assert with_r.R[0, 7] == pytest.approx(1.0) and with_r.R[1, 8] == pytest.approx(1.0)

    best_with_r, optimal_with_r = _optimal_selections(with_r)
    best_without_r, optimal_without_r = _optimal_selections(without_r)
    assert optimal_with_r.isdisjoint(optimal_without_r)
    # the A-only optimum pays a penalty under R that outweighs its better class fit
    for selection in optimal_without_r:
        chosen = list(selection)
        assert 0.5 * with_r.R[np.ix_(chosen, chosen)].sum() > best_without_r - best_with_r > 0

    solved_with_r = _solve_exactly(with_r)
    solved_without_r = _solve_exactly(without_r)
    assert solved_with_r.objective == pytest.approx(best_with_r, abs=1e-6)
    assert solved_without_r.objective == pytest.approx(best_without_r, abs=1e-6)
    assert solved_with_r.selected_features != solved_without_r.selected_features


# ----------------------------------------------------------------------------------------------
# without b (table 4, "no Z_B")


def test_without_bias_b_is_zero_and_the_objective_is_the_class_term() -> None:
    features, labels = _random_data(7)
    stats = _stats(features, labels, 5)
    # "none" needs no map statistics and ignores bias_strength
    problem, report = build_problem(
        stats, n_features=5, n_per_class=2, bias="none", bias_strength=5.0, use_similarity=False
    )
    assert problem.b.tolist() == [0.0] * 9
    assert not np.signbit(problem.b).any()
    assert report.bias == "none" and report.bias_strength == 0.0
    assert problem.metadata["bias"] == "none" and problem.metadata["bias_strength"] == 0.0
    np.testing.assert_array_equal(compute_bias(None, "none", n_features=9, strength=5.0), 0.0)

    rng = np.random.default_rng(8)
    for _ in range(5):
        selection = sorted(rng.choice(9, size=5, replace=False).tolist())
        classes = [sorted(rng.choice(selection, size=2, replace=False).tolist()) for _ in range(5)]
        terms = problem.objective_terms(selection, classes)
        a_only = problem.class_scale * sum(problem.A[c, d] for c in range(5) for d in classes[c])
        assert terms["bias"] == 0.0 and terms["redundancy"] == 0.0
        assert terms["objective"] == pytest.approx(a_only, rel=1e-12)

    a_only_problem = AssignmentProblem(problem.A, np.zeros((9, 9)), np.zeros(9), 5, 2)
    result = _solve_exactly(problem)
    assert result.objective == pytest.approx(brute_force_optimum(a_only_problem), abs=1e-6)


# ----------------------------------------------------------------------------------------------
# the centre bias at the paper's lambda (appendix D, table 11)


def test_center_paper_is_the_center_bias_at_ten_to_the_three_halves() -> None:
    assert CENTER_PAPER_STRENGTH == 10**1.5 and "center_paper" in BIAS_NAMES
    maps = _map_stats(9, 12)
    paper = compute_bias(maps, "center_paper", n_features=12, strength=0.01)  # strength ignored
    center_at_paper_strength = compute_bias(maps, "center", n_features=12, strength=10**1.5)
    default_center = compute_bias(maps, "center", n_features=12)
    np.testing.assert_array_equal(paper, center_at_paper_strength)
    assert np.abs(paper).max() == pytest.approx(10**1.5)
    assert not np.allclose(paper, default_center)
    # the same clipped, centred vector: 10**1.5 / 10**-0.5 = 100 times the default
    assert DEFAULT_BIAS_STRENGTH * 100 == pytest.approx(CENTER_PAPER_STRENGTH)
    np.testing.assert_allclose(paper, 100.0 * default_center, rtol=1e-12, atol=1e-12)

    features, labels = _random_data(10, n_all=12)
    problem, report = build_problem(
        _stats(features, labels, 5),
        maps,
        n_features=5,
        n_per_class=2,
        bias="center_paper",
        bias_strength=0.2,
    )
    np.testing.assert_array_equal(problem.b, paper)
    assert report.bias == "center_paper" and report.bias_strength == CENTER_PAPER_STRENGTH
    assert problem.metadata["bias_strength"] == CENTER_PAPER_STRENGTH
    with pytest.raises(ValueError, match="unknown bias 'centre'; valid: .*center_paper"):
        build_problem(_stats(features, labels, 5), maps, bias="centre")


# ----------------------------------------------------------------------------------------------
# AUROC as the class-feature similarity (appendix J)


def _tied_data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """40 samples, 6 features rounded to one decimal (many ties), feature 2 constant; 4 classes
    are used of 5 (class 4 has no samples)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, 40)
    features = np.round(rng.normal(size=(40, 6)) + 0.7 * np.eye(4, 6)[labels], 1)
    features[:, 2] = 1.5
    return features, labels


@pytest.mark.parametrize("seed", range(3))
def test_auroc_matches_scikit_learn_with_ties(seed: int) -> None:
    features, labels = _tied_data(seed)
    similarity, constant = class_feature_auroc(features, labels, 5)
    assert constant.tolist() == [2]
    expected = np.zeros((5, 6))
    for c, d in itertools.product(range(4), range(6)):
        if d != 2:  # roc_auc_score of a constant score is 0.5 too, but keep it explicit
            expected[c, d] = 2.0 * roc_auc_score(labels == c, features[:, d]) - 1.0
    np.testing.assert_allclose(similarity, expected, rtol=0, atol=1e-14)
    assert np.all(similarity[:, 2] == 0.0) and np.all(similarity[4] == 0.0)
    # ranks only: a strictly increasing transform changes nothing, float32 input is fine
    np.testing.assert_array_equal(class_feature_auroc(np.exp(features), labels, 5)[0], similarity)
    float32 = class_feature_auroc(features.astype(np.float32), labels, 5)[0]
    np.testing.assert_allclose(float32, similarity, atol=1e-14)


def test_auroc_by_hand_and_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # class 1 = samples 2 and 3: feature 0 separates perfectly, feature 1 in reverse, feature 2
    # ties one positive with one negative (3 of 4 pairs won + one half = 3.5 / 4)
    pooled = np.array([[0.1, 4.0, 1.0], [0.2, 3.0, 2.0], [0.3, 2.0, 2.0], [0.4, 1.0, 3.0]])
    labels = np.array([0, 0, 1, 1])
    similarity, _ = class_feature_auroc(pooled, labels, 2)
    np.testing.assert_array_equal(similarity[1], [1.0, -1.0, 2 * 3.5 / 4 - 1])
    np.testing.assert_array_equal(similarity[0], -similarity[1])
    # one class holding every sample has no negatives: 0, not NaN
    assert class_feature_auroc(pooled, np.zeros(4, dtype=int), 1)[0].tolist() == [[0.0] * 3]

    features, labels = _tied_data(11)
    whole = class_feature_auroc(features, labels, 5)
    monkeypatch.setattr(constants, "_RANK_BLOCK_VALUES", 80)  # two columns per block of 40
    blocked = class_feature_auroc(features, labels, 5)
    np.testing.assert_array_equal(blocked[0], whole[0])
    np.testing.assert_array_equal(blocked[1], whole[1])


def test_build_problem_with_auroc() -> None:
    assert CLASS_MEASURES == ("pearson", "auroc")
    features, labels = _tied_data(12)
    stats = _stats(features, labels, 5)
    problem, report = build_problem(
        stats,
        n_features=4,
        n_per_class=2,
        bias="none",
        class_measure="auroc",
        pooled=features,
        labels=labels,
    )
    auroc, _ = class_feature_auroc(features, labels, 5)
    np.testing.assert_allclose(problem.A, auroc / np.abs(auroc).max(), rtol=0, atol=1e-15)
    assert np.abs(problem.A).max() == 1.0 and np.all(problem.A[:, 2] == 0.0)
    assert report.class_measure == "auroc" and problem.metadata["class_measure"] == "auroc"
    assert report.dead_features == [2]
    # the default is the Pearson correlation of section 3.2
    pearson, pearson_report = build_problem(stats, n_features=4, n_per_class=2, bias="none")
    correlation, _ = class_feature_similarity(stats)
    np.testing.assert_allclose(pearson.A, correlation / np.abs(correlation).max(), atol=1e-15)
    assert pearson_report.class_measure == "pearson"
    assert not np.allclose(pearson.A, problem.A)

    common: dict[str, Any] = {
        "n_features": 4,
        "n_per_class": 2,
        "bias": "none",
        "class_measure": "auroc",
    }
    with pytest.raises(ValueError, match=r"needs the pooled training features: pass pooled="):
        build_problem(stats, labels=labels, **common)
    with pytest.raises(ValueError, match=r"needs labels="):
        build_problem(stats, pooled=features, **common)
    with pytest.raises(ValueError, match=r"pooled must have shape \(N, 6\)"):
        build_problem(stats, pooled=features[:, :5], labels=labels, **common)
    with pytest.raises(ValueError, match="one per row of pooled"):
        build_problem(stats, pooled=features, labels=labels[:-1], **common)
    with pytest.raises(ValueError, match="unknown class_measure 'roc'; valid: pearson, auroc"):
        build_problem(stats, n_features=4, n_per_class=2, bias="none", class_measure="roc")
    nan_features = features.copy()
    nan_features[3, 4] = np.nan
    with pytest.raises(ValueError, match=r"pooled has a non-finite value nan at \[3, 4\]"):
        class_feature_auroc(nan_features, labels, 5)


# ----------------------------------------------------------------------------------------------
# the record


def test_report_and_saved_problem_record_the_switches(tmp_path: Path) -> None:
    features, labels = _tied_data(13)
    stats = _stats(features, labels, 5)
    problem, report = build_problem(
        stats,
        _map_stats(14, 6),
        n_features=4,
        n_per_class=2,
        bias="center_paper",
        use_similarity=False,
        class_measure="auroc",
        pooled=features,
        labels=labels,
    )
    record = json.loads(json.dumps(to_jsonable(report)))
    assert record == json.loads(json.dumps(report.to_dict()))
    assert record["use_similarity"] is False and record["eps"] is None
    assert record["class_measure"] == "auroc" and record["bias"] == "center_paper"
    assert record["bias_strength"] == CENTER_PAPER_STRENGTH and record["n_penalised_pairs"] == 0
    problem.save(tmp_path / "problem.npz")
    loaded = AssignmentProblem.load(tmp_path / "problem.npz")
    assert loaded.eps is None
    for key, value in {
        "use_similarity": False,
        "class_measure": "auroc",
        "bias": "center_paper",
        "bias_strength": CENTER_PAPER_STRENGTH,
    }.items():
        assert loaded.metadata[key] == value
    _, default_report = build_problem(stats, n_features=4, n_per_class=2, bias="none")
    assert default_report.use_similarity is True and default_report.class_measure == "pearson"
    assert isinstance(default_report.eps, float)
