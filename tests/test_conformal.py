"""Split-conformal prediction sets: calibration quantile, THR/APS/hierarchical scores, coverage."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from openqpm.conformal import (
    aps_scores,
    aps_sets,
    calibrate,
    coverage_and_size,
    hierarchical_scores,
    hierarchical_sets,
    hierarchy_depths,
    hierarchy_levels,
    level_for_threshold,
    softmax,
    split_calibration,
    thr_scores,
    thr_sets,
)

N_SPLITS = 200

# Hand-built QPM: K = 5 features, k = 2 per class.
# class 0: {0, 1}; class 1: {0, 2}; class 2: {1, 2}; class 3: {3, 4}.
W_HAND = np.array(
    [
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 0, 1, 1],
    ]
)
# Sorted features: class 0 (0, 1), class 1 (0, 2), class 2 (2, 1), class 3 (4, 3).
# Logits f @ W.T = [6, 8, 4, 0.5]: the prediction is class 1.
F_HAND = np.array([5.0, 1.0, 3.0, 0.0, 0.5])


def _simulated_probabilities(n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Peaked random probabilities, labels drawn from them: exchangeable, calibrated."""
    rng = np.random.default_rng(seed)
    probabilities = softmax(2.5 * rng.standard_normal((n, n_classes)))
    cumulative = probabilities.cumsum(axis=1)
    labels = (rng.random((n, 1)) > cumulative).sum(axis=1)
    return probabilities, np.minimum(labels, n_classes - 1)


def _mean_coverage_over_splits(
    n: int,
    score: Callable[[np.ndarray, np.ndarray], np.ndarray],
    sets: Callable[[np.ndarray, float], list[np.ndarray]],
    labels: np.ndarray,
    alpha: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Coverage of each of N_SPLITS random half splits; items are addressed by index."""
    coverages, sizes = [], []
    for seed in range(N_SPLITS):
        cal, test = split_calibration(n, fraction=0.5, seed=seed)
        threshold = calibrate(score(cal, labels[cal]), alpha)
        coverage, size = coverage_and_size(sets(test, threshold), labels[test])
        coverages.append(coverage)
        sizes.append(size)
    return np.array(coverages), np.array(sizes)


def _check_guarantee(coverages: np.ndarray, alpha: float, n_cal: int, n_test: int) -> None:
    # Per split the coverage varies through the test items and through the threshold
    # (Beta-distributed given the calibration set): variance ~ alpha(1-alpha)(1/n_test + 1/n_cal).
    sd_split = math.sqrt(alpha * (1 - alpha) * (1 / n_test + 1 / n_cal))
    tolerance = 3 * sd_split / math.sqrt(N_SPLITS)
    assert coverages.mean() >= 1 - alpha - tolerance
    assert np.mean(coverages < 1 - alpha - 4 * sd_split) <= 0.02


# --- split_calibration -------------------------------------------------------------------------


def test_split_calibration_is_seeded_disjoint_and_complete() -> None:
    cal, rest = split_calibration(101, fraction=0.3, seed=7)
    assert cal.size == 30 and rest.size == 71
    assert np.array_equal(np.sort(np.concatenate([cal, rest])), np.arange(101))
    again, _ = split_calibration(101, fraction=0.3, seed=7)
    other, _ = split_calibration(101, fraction=0.3, seed=8)
    assert np.array_equal(cal, again)
    assert not np.array_equal(cal, other)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.001])
def test_split_calibration_rejects_empty_parts(fraction: float) -> None:
    with pytest.raises(ValueError):
        split_calibration(10, fraction=fraction, seed=0)


# --- calibrate ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [
        (0.2, 0.9),  # ceil(11 * 0.8) = ceil(8.8) = 9th smallest
        (0.1, 1.0),  # ceil(11 * 0.9) = ceil(9.9) = 10th smallest
        (0.5, 0.6),  # ceil(11 * 0.5) = ceil(5.5) = 6th smallest
        (0.05, math.inf),  # ceil(11 * 0.95) = 11 > n = 10
    ],
)
def test_calibrate_hand_computed_quantiles(alpha: float, expected: float) -> None:
    scores = np.random.default_rng(0).permutation(np.arange(1, 11) / 10)
    assert calibrate(scores, alpha) == pytest.approx(expected)


def test_calibrate_exact_integer_rank_is_not_rounded_up() -> None:
    # (19 + 1) * 0.95 = 19 exactly: the 19th smallest (the maximum), not +inf.
    assert calibrate(np.arange(19.0), 0.05) == 18.0
    assert calibrate(np.arange(18.0), 0.05) == math.inf


def test_calibrate_inf_gives_every_class() -> None:
    probabilities, _ = _simulated_probabilities(5, 4, seed=0)
    assert all(s.size == 4 for s in thr_sets(probabilities, math.inf))
    assert all(s.size == 4 for s in aps_sets(probabilities, math.inf))


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1])
def test_calibrate_rejects_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError):
        calibrate([0.1, 0.2], alpha)


# --- THR / APS ---------------------------------------------------------------------------------


def test_thr_and_aps_hand_computed() -> None:
    p = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    assert np.allclose(thr_scores(p, [1, 0]), [0.7, 0.9])
    # Ranks: item 0 is 0, 1, 2; item 1 is 2, then 0 before 1 (tie: lower index first).
    assert np.allclose(aps_scores(p, [1, 0]), [0.8, 0.9])
    assert np.allclose(aps_scores(p, [2, 1]), [1.0, 1.0])
    assert [s.tolist() for s in aps_sets(p, 0.85)] == [[0, 1], [2]]
    assert [s.tolist() for s in thr_sets(p, 0.7)] == [[0, 1], [2]]


def test_set_membership_matches_score_threshold() -> None:
    probabilities, labels = _simulated_probabilities(300, 6, seed=1)
    for seed in (None, 3):
        scores = aps_scores(probabilities, labels, seed=seed)
        sets = aps_sets(probabilities, 0.7, seed=seed)
        assert [labels[i] in s for i, s in enumerate(sets)] == list(scores <= 0.7)
    sets = thr_sets(probabilities, 0.6)
    assert [labels[i] in s for i, s in enumerate(sets)] == list(
        thr_scores(probabilities, labels) <= 0.6
    )


def test_randomised_aps_lies_below_deterministic() -> None:
    probabilities, labels = _simulated_probabilities(200, 5, seed=2)
    deterministic = aps_scores(probabilities, labels)
    randomised = aps_scores(probabilities, labels, seed=0)
    p_y = probabilities[np.arange(200), labels]
    assert np.all(randomised <= deterministic + 1e-12)
    assert np.all(randomised >= deterministic - p_y - 1e-12)


def test_scores_reject_logits() -> None:
    with pytest.raises(ValueError, match="softmax"):
        thr_scores(np.array([[2.0, -1.0]]), [0])


@pytest.mark.parametrize("alpha", [0.05, 0.1])
@pytest.mark.parametrize("method", ["thr", "aps"])
def test_marginal_coverage_on_exchangeable_data(method: str, alpha: float) -> None:
    n, n_classes = 1000, 10
    probabilities, labels = _simulated_probabilities(n, n_classes, seed=42)
    if method == "thr":
        score, set_fn = thr_scores, thr_sets
    else:
        score, set_fn = aps_scores, aps_sets
    coverages, sizes = _mean_coverage_over_splits(
        n,
        lambda idx, y: score(probabilities[idx], y),
        lambda idx, t: set_fn(probabilities[idx], t),
        labels,
        alpha,
    )
    _check_guarantee(coverages, alpha, n_cal=500, n_test=500)
    # Continuous scores without ties: coverage is also at most 1 - alpha + 1 / (n_cal + 1).
    tolerance = 3 * math.sqrt(alpha * (1 - alpha) * 2 / 500) / math.sqrt(N_SPLITS)
    assert coverages.mean() <= 1 - alpha + 1 / 501 + tolerance
    assert 1.0 < sizes.mean() < n_classes


# --- hierarchy ---------------------------------------------------------------------------------


def test_hierarchy_levels_hand_built() -> None:
    levels = hierarchy_levels(F_HAND, W_HAND)
    assert [level.tolist() for level in levels] == [[0, 1, 2, 3], [0, 1], [1]]


def test_hierarchy_levels_with_given_prediction_uses_order() -> None:
    # Class 2's sorted features are (2, 1); class 0's (0, 1) share feature 1 only in second
    # place, which does not count: level 1 is class 2 alone.
    levels = hierarchy_levels(F_HAND, W_HAND, prediction=2)
    assert [level.tolist() for level in levels] == [[0, 1, 2, 3], [2], [2]]
    # Swap the two strongest activations: class 1's order becomes (2, 0), class 2's (2, 1).
    swapped = np.array([3.0, 1.0, 5.0, 0.0, 0.5])
    levels = hierarchy_levels(swapped, W_HAND)  # logits [4, 8, 6, 0.5]: class 1
    assert [level.tolist() for level in levels] == [[0, 1, 2, 3], [1, 2], [1]]


def test_hierarchy_rejects_uneven_weights() -> None:
    bad = W_HAND.copy()
    bad[3, 0] = 1
    with pytest.raises(ValueError, match="same k"):
        hierarchy_levels(F_HAND, bad)


def test_hierarchical_scores_and_sets_hand_built() -> None:
    f = np.stack([F_HAND, F_HAND, F_HAND])
    assert hierarchical_scores(f, W_HAND, [1, 0, 3]).tolist() == [0.0, 1.0, 2.0]
    # 3 calibration items with scores 0, 1, 2 and alpha = 0.25: ceil(4 * 0.75) = 3rd = 2.
    threshold = calibrate(hierarchical_scores(f, W_HAND, [1, 0, 3]), 0.25)
    assert threshold == 2.0 and level_for_threshold(threshold, 2) == 0
    assert [s.tolist() for s in hierarchical_sets(f[:1], W_HAND, 0.0)] == [[1]]
    assert [s.tolist() for s in hierarchical_sets(f[:1], W_HAND, 1.0)] == [[0, 1]]
    assert [s.tolist() for s in hierarchical_sets(f[:1], W_HAND, 1.5)] == [[0, 1]]
    assert [s.tolist() for s in hierarchical_sets(f[:1], W_HAND, math.inf)] == [[0, 1, 2, 3]]


def test_hierarchical_calibration_picks_deepest_level_with_coverage() -> None:
    # 10 items: 6 predicted right (score 0), 3 at depth 1 (score 1), 1 at depth 0 (score 2).
    scores = np.array([0.0] * 6 + [1.0] * 3 + [2.0])
    # alpha = 0.3: ceil(11 * 0.7) = 8th smallest = 1 -> level 1 (coverage 9/10 >= 0.7; level 2
    # has 6/10 < 8/10 needed).
    assert level_for_threshold(calibrate(scores, 0.3), 2) == 1
    # alpha = 0.45: ceil(11 * 0.55) = 7th smallest = 1 -> still level 1; alpha = 0.5: 6th = 0.
    assert level_for_threshold(calibrate(scores, 0.45), 2) == 1
    assert level_for_threshold(calibrate(scores, 0.5), 2) == 2


def _simulated_qpm(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random QPM with 8 classes, K = 6, k = 3; noisy activations boosted on the label's.

    The classes share many features, so the hierarchy has populated middle levels; the
    calibrated level varies between splits (level 1 or 2 at alpha = 0.1).
    """
    rng = np.random.default_rng(seed)
    rows: set[tuple[int, ...]] = set()
    while len(rows) < 8:
        rows.add(tuple(sorted(rng.choice(6, size=3, replace=False).tolist())))
    weights = np.zeros((8, 6), dtype=np.int64)
    for c, row in enumerate(sorted(rows)):
        weights[c, list(row)] = 1
    labels = rng.integers(0, 8, size=n)
    activations = rng.standard_normal((n, 6)) + 2.0 * weights[labels]
    return activations, weights, labels


def test_hierarchy_depths_prediction_has_full_depth() -> None:
    activations, weights, _ = _simulated_qpm(50, seed=0)
    depth = hierarchy_depths(activations, weights)
    prediction = np.argmax(activations @ weights.T, axis=1)
    assert np.all(depth[np.arange(50), prediction] == 3)
    assert np.all((depth == 3).sum(axis=1) == 1)  # distinct rows: level k is the prediction


@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_hierarchical_coverage_on_exchangeable_data(alpha: float) -> None:
    n = 1000
    activations, weights, labels = _simulated_qpm(n, seed=5)
    coverages, sizes = _mean_coverage_over_splits(
        n,
        lambda idx, y: hierarchical_scores(activations[idx], weights, y),
        lambda idx, t: hierarchical_sets(activations[idx], weights, t),
        labels,
        alpha,
    )
    _check_guarantee(coverages, alpha, n_cal=500, n_test=500)
    assert 1.0 < sizes.mean() < 8.0  # the chosen level is neither the leaf nor always the root
