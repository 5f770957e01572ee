"""Split-conformal prediction sets: calibration quantile, THR/APS/hierarchical scores, coverage."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from openqpm.conformal import (
    SCORES,
    Calibration,
    aps_scores,
    aps_sets,
    calibrate,
    calibrate_hierarchical,
    conformal_metrics,
    coverage_and_size,
    depth_scores,
    depth_sets,
    hierarchical_level,
    hierarchical_scores,
    hierarchical_sets,
    hierarchy_depths,
    hierarchy_levels,
    level_accuracies,
    level_for_threshold,
    set_coherence,
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


def test_depth_scores_and_sets_hand_built() -> None:
    f = np.stack([F_HAND, F_HAND, F_HAND])
    assert depth_scores(f, W_HAND, [1, 0, 3]).tolist() == [0.0, 1.0, 2.0]
    # 3 calibration items with scores 0, 1, 2 and alpha = 0.25: ceil(4 * 0.75) = 3rd = 2.
    threshold = calibrate(depth_scores(f, W_HAND, [1, 0, 3]), 0.25)
    assert threshold == 2.0 and level_for_threshold(threshold, 2) == 0
    assert [s.tolist() for s in depth_sets(f[:1], W_HAND, 0.0)] == [[1]]
    assert [s.tolist() for s in depth_sets(f[:1], W_HAND, 1.0)] == [[0, 1]]
    assert [s.tolist() for s in depth_sets(f[:1], W_HAND, 1.5)] == [[0, 1]]
    assert [s.tolist() for s in depth_sets(f[:1], W_HAND, math.inf)] == [[0, 1, 2, 3]]


def test_depth_calibration_picks_deepest_level_with_coverage() -> None:
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
def test_depth_coverage_on_exchangeable_data(alpha: float) -> None:
    n = 1000
    activations, weights, labels = _simulated_qpm(n, seed=5)
    coverages, sizes = _mean_coverage_over_splits(
        n,
        lambda idx, y: depth_scores(activations[idx], weights, y),
        lambda idx, t: depth_sets(activations[idx], weights, t),
        labels,
        alpha,
    )
    _check_guarantee(coverages, alpha, n_cal=500, n_test=500)
    assert 1.0 < sizes.mean() < 8.0  # the chosen level is neither the leaf nor always the root


# --- the CHiQPM score --------------------------------------------------------------------------

# Three images for W_HAND; the logits are f @ W.T, ``own sorted`` lists each class's own
# features, strongest first, as (feature: activation).
#
# Image A, f = [5, 1, 3, 0, 0.5]: logits [6, 8, 4, 0.5] -> prediction 1, path (0, 2).
#   class 0 (0:5, 1:1) depth 1; class 1 (0:5, 2:3) depth 2; class 2 (2:3, 1:1) depth 0;
#   class 3 (4:0.5, 3:0) depth 0.
# Image B, f = [1, 4, 2, 0, 0]: logits [5, 3, 6, 0] -> prediction 2, path (1, 2).
#   class 0 (1:4, 0:1) depth 1; class 1 (2:2, 0:1) depth 0; class 2 (1:4, 2:2) depth 2;
#   class 3 (3:0, 4:0) (tie: lower index first) depth 0.
# Image C, f = [0, 0, 1, 6, 2]: logits [0, 1, 1, 8] -> prediction 3, path (3, 4).
#   class 0 (0:0, 1:0), class 1 (2:1, 0:0), class 2 (2:1, 1:0) depth 0; class 3 (3:6, 4:2) depth 2.
#
# Score = -(own activation at the first differing position, 0 at depth 2)
#         - (path activations at positions L .. depth - 1); 0 outside level L (L >= 1).
# L = 0:  A: c0 -1-5 = -6, c1 -(5+3) = -8, c2 -3, c3 -0.5
#         B: c0 -1-4 = -5, c1 -2, c2 -(4+2) = -6, c3 -0
#         C: c0 -0, c1 -1, c2 -1, c3 -(6+2) = -8
# L = 1:  A: c0 -1, c1 -3, c2 0 (outside), c3 0 (outside)
#         B: c0 -1, c1 0 (outside), c2 -2, c3 0 (outside)
#         C: c0, c1, c2 0 (outside), c3 -2
# L = 2:  only depth-2 classes are inside, and they score 0 - 0: every score is 0.
F_THREE = np.array(
    [[5.0, 1.0, 3.0, 0.0, 0.5], [1.0, 4.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 6.0, 2.0]]
)
Z_THREE = F_THREE @ W_HAND.T
# True classes: A -> 0 (depth 1), B -> 2 (depth 2, predicted), C -> 2 (depth 0, missed).
Y_THREE = np.array([0, 2, 2])


def test_hierarchical_scores_hand_built() -> None:
    expected = {
        0: [[-6, -8, -3, -0.5], [-5, -2, -6, 0], [0, -1, -1, -8]],
        1: [[-1, -3, 0, 0], [-1, 0, -2, 0], [0, 0, 0, -2]],
        2: [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    }
    for level, scores in expected.items():
        assert hierarchical_scores(Z_THREE, F_THREE, W_HAND, level).tolist() == scores
    assert hierarchical_scores(Z_THREE, F_THREE, W_HAND, 1, Y_THREE).tolist() == [-1, -2, 0]
    assert hierarchy_depths(F_THREE, W_HAND).tolist() == [[1, 2, 0, 0], [1, 0, 2, 0], [0, 0, 0, 2]]


@pytest.mark.parametrize(
    ("alpha", "level", "threshold", "sets"),
    [
        # acc[0] = 2/3 (A, B share the first feature), acc[1] = 1/3 (B only).
        # alpha = 0.5: acc[0] >= 0.5, acc[1] < 0.5 -> L = 1. True scores at L = 1: -1, -2, 0;
        # rank ceil(4 * 0.5) = 2 -> q = -1. A: {0 (-1), 1 (-3)}; B: {0 (-1), 2 (-2)}; C: {3}.
        (0.5, 1, -1.0, [[0, 1], [0, 2], [3]]),
        # alpha = 0.4: rank ceil(4 * 0.6) = 3 > 2 images at level 1 -> L = 0 (the authors' rule
        # keeps L = 1 there, where q = 0 puts every class in every set: see the test below).
        # True scores at L = 0: -6, -6, -1 -> q = -1. A: {0 (-6), 1 (-8), 2 (-3)};
        # B: {0 (-5), 1 (-2), 2 (-6)}; C: {1 (-1), 2 (-1), 3 (-8)}.
        (0.4, 0, -1.0, [[0, 1, 2], [0, 1, 2], [1, 2, 3]]),
        # alpha = 0.7: acc[0] and acc[1] >= 0.3, no level fails -> L = k - 1 = 1 (the authors'
        # latest version). True scores at L = 1: -1, -2, 0; rank ceil(4 * 0.3) = 2 -> q = -1.
        # A: {0 (-1), 1 (-3)}; B: {0 (-1), 2 (-2)}; C: {3 (-2)}.
        (0.7, 1, -1.0, [[0, 1], [0, 2], [3]]),
        # alpha = 0.2: acc[0] < 0.8 -> L = 0; rank ceil(4 * 0.8) = 4 > 3 -> q = inf.
        (0.2, 0, math.inf, [[0, 1, 2, 3]] * 3),
    ],
)
def test_hierarchical_calibration_hand_built(
    alpha: float, level: int, threshold: float, sets: list[list[int]]
) -> None:
    assert calibrate_hierarchical(Z_THREE, F_THREE, Y_THREE, W_HAND, alpha) == (threshold, level)
    got = hierarchical_sets(Z_THREE, F_THREE, W_HAND, level, threshold)
    assert [s.tolist() for s in got] == sets
    calibration = Calibration.fit(Z_THREE, F_THREE, Y_THREE, W_HAND)
    assert calibration.threshold("hierarchical", alpha) == (threshold, level)
    got = calibration.prediction_sets("hierarchical", Z_THREE, F_THREE, alpha)
    assert [s.tolist() for s in got] == sets


def test_authors_level_rule_can_put_every_class_in_every_set() -> None:
    # alpha = 0.4 on the three hand-built images: acc[0] = 2/3 >= 0.6 keeps L = 1, where the
    # conformal rank 3 lands on C's true class outside the level (score 0): q = 0, all classes.
    assert calibrate_hierarchical(Z_THREE, F_THREE, Y_THREE, W_HAND, 0.4, rule="authors") == (
        0.0,
        1,
    )
    calibration = Calibration.fit(Z_THREE, F_THREE, Y_THREE, W_HAND, level_rule="authors")
    got = calibration.prediction_sets("hierarchical", Z_THREE, F_THREE, 0.4)
    assert [s.tolist() for s in got] == [[0, 1, 2, 3]] * 3
    restored = Calibration.from_json_dict(json.loads(json.dumps(calibration.to_json_dict())))
    assert restored.level_rule == "authors"


def test_hierarchical_level_from_accuracies() -> None:
    # 20 images: 19 share the first feature, 18 the first two, 17 all three (k = 3).
    depths = np.array([0] + [1] + [2] + [3] * 17)
    assert level_accuracies(depths, 3).tolist() == pytest.approx([0.95, 0.90, 0.85])
    # the authors' rule: acc[j] >= 1 - alpha
    authors = {"rule": "authors"}
    assert hierarchical_level(depths, 3, 0.1, **authors) == 2  # 0.95, 0.90 pass, 0.85 fails
    assert hierarchical_level(depths, 3, 0.08, **authors) == 1
    assert hierarchical_level(depths, 3, 0.01, **authors) == 0  # even the first level fails
    assert hierarchical_level(depths, 3, 0.2, **authors) == 2  # no level fails: k - 1
    # the default: at least ceil(21 (1 - alpha)) of the 20 images, calibrate's rank
    assert hierarchical_level(depths, 3, 0.1) == 1  # needs 19: 19 pass, 18 fails
    assert hierarchical_level(depths, 3, 0.08) == 0  # needs 20
    assert hierarchical_level(depths, 3, 0.2) == 2  # needs 17: no level fails
    with pytest.raises(ValueError, match="rule"):
        hierarchical_level(depths, 3, 0.1, rule="other")
    with pytest.raises(ValueError, match="lie in"):
        hierarchical_level([4], 3, 0.1)


def test_hierarchical_scores_sort_only_own_features_with_negative_activations() -> None:
    # f = [-2, -5, -3, -4, -6]: logits [-7, -5, -8, -10] -> prediction 1, own path (0:-2, 2:-3).
    # Class 0's own order is (0:-2, 1:-5): depth 1. Masking other features to -1 and sorting all
    # K (the authors' code) would put non-assigned features first and find no shared path.
    f = np.array([[-2.0, -5.0, -3.0, -4.0, -6.0]])
    z = f @ W_HAND.T
    assert hierarchy_depths(f, W_HAND).tolist() == [[1, 2, 0, 0]]
    # L = 0: class 1 -(-2 - 3) = 5; class 0 -(-5) - (-2) = 7; class 2 (2:-3, 1:-5) -(-3) = 3;
    # class 3 (3:-4, 4:-6) -(-4) = 4. Negative activations give positive scores.
    assert hierarchical_scores(z, f, W_HAND, 0).tolist() == [[7, 5, 3, 4]]
    # L = 1: class 0 -(-5) = 5, class 1 -(-3) = 3; classes 2, 3 outside score 0, below them.
    assert hierarchical_scores(z, f, W_HAND, 1).tolist() == [[5, 3, 0, 0]]


@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_hierarchical_coverage_on_exchangeable_data(alpha: float) -> None:
    n = 1000
    activations, weights, labels = _simulated_qpm(n, seed=5)
    logits = activations @ weights.T
    coverages, sizes, levels = [], [], []
    for seed in range(N_SPLITS):
        cal, test = split_calibration(n, fraction=0.5, seed=seed)
        calibration = Calibration.fit(logits[cal], activations[cal], labels[cal], weights)
        sets = calibration.prediction_sets("hierarchical", logits[test], activations[test], alpha)
        coverage, size = coverage_and_size(sets, labels[test])
        coverages.append(coverage)
        sizes.append(size)
        levels.append(calibration.threshold("hierarchical", alpha)[1])
    _check_guarantee(np.array(coverages), alpha, n_cal=500, n_test=500)
    # Level 1 (acc[0] about 0.97) is chosen: the sets are parts of it, neither one class nor all.
    assert np.mean(np.array(levels) == 1) > 0.9
    assert 1.5 < np.mean(sizes) < 6.0


def test_calibration_matches_module_functions() -> None:
    activations, weights, labels = _simulated_qpm(300, seed=11)
    logits = 1.5 * activations @ weights.T
    calibration = Calibration.fit(logits, activations, labels, weights)
    probabilities = softmax(logits)
    assert calibration.n_calibration == 300 and calibration.k == 3
    for alpha in (0.05, 0.1, 0.3):
        assert calibration.threshold("thr", alpha) == (
            calibrate(thr_scores(probabilities, labels), alpha),
            None,
        )
        assert calibration.threshold("aps", alpha) == (
            calibrate(aps_scores(probabilities, labels), alpha),
            None,
        )
        threshold, level = calibrate_hierarchical(logits, activations, labels, weights, alpha)
        assert calibration.threshold("hierarchical", alpha) == (threshold, level)
    # Each level's stored true-class scores are the all-class scores at the true class.
    for level in range(4):
        every = hierarchical_scores(logits, activations, weights, level)
        true = every[np.arange(300), labels]
        assert np.array_equal(calibration.level_true_scores[:, level], true)
        # membership in a set <=> the true score is at most the threshold; by default a class
        # outside the level is never in (its score ranks last), with the authors' rule it is
        # in whenever its 0 is at most the threshold
        median = float(np.median(true))
        inside = calibration.true_depths >= level
        sets = hierarchical_sets(logits, activations, weights, level, median)
        assert [labels[i] in s for i, s in enumerate(sets)] == list((true <= median) & inside)
        sets = hierarchical_sets(logits, activations, weights, level, median, rule="authors")
        assert [labels[i] in s for i, s in enumerate(sets)] == list(true <= median)


def test_calibration_json_round_trip(tmp_path: Path) -> None:
    activations, weights, labels = _simulated_qpm(400, seed=3)
    logits = activations @ weights.T
    for aps_seed in (None, 17):
        fitted = Calibration.fit(
            logits[:200], activations[:200], labels[:200], weights, aps_seed=aps_seed
        )
        text = json.dumps(fitted.to_json_dict(), allow_nan=False)
        restored = Calibration.from_json_dict(json.loads(text))
        fitted.save(tmp_path / "calibration.json")
        loaded = Calibration.load(tmp_path / "calibration.json")
        for other in (restored, loaded):
            assert other.aps_seed == aps_seed
            for field in ("weights", "thr_true_scores", "aps_true_scores", "true_depths"):
                assert np.array_equal(getattr(other, field), getattr(fitted, field))
            assert np.array_equal(other.level_true_scores, fitted.level_true_scores)
            for score_name in SCORES:
                for alpha in (0.003, 0.05, 0.1, 0.25):  # 0.003: too few items, threshold inf
                    assert other.threshold(score_name, alpha) == fitted.threshold(score_name, alpha)
                    new = (logits[200:], activations[200:])
                    a = fitted.prediction_sets(score_name, *new, alpha)
                    b = other.prediction_sets(score_name, *new, alpha)
                    assert [s.tolist() for s in a] == [s.tolist() for s in b]
    assert math.isinf(fitted.threshold("thr", 0.003)[0])


def test_calibration_is_read_only_and_rejects_bad_input() -> None:
    calibration = Calibration.fit(Z_THREE, F_THREE, Y_THREE, W_HAND)
    with pytest.raises(ValueError):
        calibration.thr_true_scores[0] = 1.0
    with pytest.raises(ValueError, match="unknown score"):
        calibration.threshold("raps", 0.1)
    with pytest.raises(ValueError, match="activations"):
        calibration.prediction_sets("hierarchical", Z_THREE, None, 0.1)
    assert len(calibration.prediction_sets("thr", Z_THREE, None, 0.5)) == 3
    with pytest.raises(ValueError, match="logits"):
        Calibration.fit(Z_THREE[:, :3], F_THREE, Y_THREE, W_HAND)
    with pytest.raises(ValueError, match="not an openqpm"):
        Calibration.from_json_dict({"format": "something else"})
    document = calibration.to_json_dict()
    document["level_true_scores"] = document["level_true_scores"][:2]
    with pytest.raises(ValueError):
        Calibration.from_json_dict(document)


# --- metrics -----------------------------------------------------------------------------------


def test_set_coherence_hand_computed() -> None:
    # cos(a0, a1) = 1 / sqrt(2), cos(a0, a2) = 0, cos(a1, a2) = 1 / sqrt(2).
    attributes = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    sets = [np.array([0, 1]), np.array([0, 1, 2]), np.array([2]), np.array([], dtype=np.int64)]
    # Pooled ordered pairs (the authors' definition): {0, 1} gives 2 pairs of 1/sqrt(2);
    # {0, 1, 2} 6 pairs summing to 4/sqrt(2); singletons and empty sets none: 6/sqrt(2) / 8.
    expected = 6 / math.sqrt(2) / 8
    assert set_coherence(sets, attributes) == pytest.approx(expected)
    # The mean over images of per-set means would be (1/sqrt(2) + (2/sqrt(2)) / 3) / 2.
    assert set_coherence(sets, attributes) != pytest.approx((1 + 2 / 3) / 2 / math.sqrt(2))
    assert set_coherence(sets, 100 * attributes) == pytest.approx(expected)  # cosine: scale-free
    assert set_coherence(sets, None) is None
    assert set_coherence([np.array([1]), np.array([0])], attributes) is None
    with pytest.raises(ValueError, match="non-zero"):
        set_coherence(sets, np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))


def test_conformal_metrics_shape() -> None:
    activations, weights, labels = _simulated_qpm(240, seed=8)
    logits = activations @ weights.T
    calibration = Calibration.fit(logits[:40], activations[:40], labels[:40], weights)
    attributes = np.random.default_rng(0).random((8, 5))
    alphas = (0.01, 0.05, 0.1, 0.12)  # 0.01 needs more than 40 items: threshold inf -> None
    for class_attributes in (None, attributes):
        metrics = conformal_metrics(
            calibration,
            logits[40:],
            activations[40:],
            labels[40:],
            alphas=alphas,
            class_attributes=class_attributes,
        )
        assert json.loads(json.dumps(metrics, allow_nan=False)) == metrics
        assert set(metrics) == {"n_calibration", "alphas", "results"}
        assert metrics["n_calibration"] == 40 and metrics["alphas"] == list(alphas)
        results = metrics["results"]
        assert [(r["score"], r["alpha"]) for r in results] == [
            (score, alpha) for score in SCORES for alpha in alphas
        ]
        keys = {"score", "alpha", "coverage", "mean_set_size", "empty_share", "set_coherence"}
        for r in results:
            assert set(r) == keys | {"threshold", "level"}
            assert 0.0 <= r["coverage"] <= 1.0 and 0.0 <= r["mean_set_size"] <= 8.0
            assert (r["level"] is None) == (r["score"] != "hierarchical")
            if r["alpha"] == 0.01:
                assert r["threshold"] is None and r["coverage"] == 1.0
                assert r["mean_set_size"] == 8.0
            else:
                assert isinstance(r["threshold"], float)
            assert (r["set_coherence"] is None) == (class_attributes is None)
        # the numbers are those of the sets themselves
        sets = calibration.prediction_sets("aps", logits[40:], activations[40:], 0.1)
        coverage, size = coverage_and_size(sets, labels[40:])
        entry = results[len(alphas) + 2]
        assert (entry["score"], entry["coverage"], entry["mean_set_size"]) == (
            "aps",
            coverage,
            size,
        )
        assert entry["empty_share"] == np.mean([len(s) == 0 for s in sets])
    assert conformal_metrics(calibration, logits, activations, labels)["alphas"] == [
        0.05,
        0.075,
        0.10,
        0.12,
    ]


# --- a worked example and TorchCP ---------------------------------------------------------------

# A hand-worked example of split conformal prediction as in Angelopoulos & Bates, "A Gentle
# Introduction to Conformal Prediction" (2021), sections 1 (score 1 - p_y) and 2.1 (APS,
# non-randomised): the threshold is the ceil((n + 1)(1 - alpha))-th smallest calibration score.
P_CAL = np.array(
    [
        # probabilities       label   THR = 1 - p_y   APS = mass ranked at or above y
        [0.70, 0.20, 0.10],  # 0      0.30            0.70
        [0.60, 0.30, 0.10],  # 1      0.70            0.90
        [0.50, 0.40, 0.10],  # 0      0.50            0.50
        [0.20, 0.70, 0.10],  # 1      0.30            0.70
        [0.10, 0.30, 0.60],  # 2      0.40            0.60
        [0.40, 0.50, 0.10],  # 0      0.60            0.90
        [0.80, 0.15, 0.05],  # 2      0.95            1.00
        [0.25, 0.35, 0.40],  # 1      0.65            0.75
        [0.90, 0.06, 0.04],  # 0      0.10            0.90
    ]
)
Y_CAL = np.array([0, 1, 0, 1, 2, 0, 2, 1, 0])
P_TEST = np.array(
    [
        [0.50, 0.30, 0.20],  # 1 - p: 0.50 0.70 0.80 -> THR {0, 1}; cumulative 0.5 0.8 1.0 -> {0, 1}
        [0.15, 0.80, 0.05],  # 1 - p: 0.85 0.20 0.95 -> {1}; ranked 1 (0.80), 0 (0.95) -> {1}
        [0.35, 0.33, 0.32],  # 1 - p: 0.65 0.67 0.68 -> {0, 1, 2}; 0.35, 0.68, 1.0 -> {0, 1}
        [0.92, 0.05, 0.03],  # 1 - p: 0.08 ... -> {0}; the top class alone 0.92 > 0.9 -> {} (empty)
    ]
)


def test_thr_and_aps_textbook_example() -> None:
    assert thr_scores(P_CAL, Y_CAL) == pytest.approx(
        [0.3, 0.7, 0.5, 0.3, 0.4, 0.6, 0.95, 0.65, 0.1]
    )
    assert aps_scores(P_CAL, Y_CAL) == pytest.approx([0.7, 0.9, 0.5, 0.7, 0.6, 0.9, 1.0, 0.75, 0.9])
    # n = 9, alpha = 0.2: ceil(10 * 0.8) = 8th smallest.
    # THR sorted: 0.1 0.3 0.3 0.4 0.5 0.6 0.65 [0.7] 0.95; APS: 0.5 0.6 0.7 0.7 0.75 0.9 0.9 [0.9] 1
    q_thr = calibrate(thr_scores(P_CAL, Y_CAL), 0.2)
    q_aps = calibrate(aps_scores(P_CAL, Y_CAL), 0.2)
    assert q_thr == pytest.approx(0.7) and q_aps == pytest.approx(0.9)
    assert [s.tolist() for s in thr_sets(P_TEST, q_thr)] == [[0, 1], [1], [0, 1, 2], [0]]
    assert [s.tolist() for s in aps_sets(P_TEST, q_aps)] == [[0, 1], [1], [0, 1], []]
    # alpha = 0.1: ceil(10 * 0.9) = 9th smallest, the maximum; alpha = 0.05: 10th > 9 -> inf.
    assert calibrate(thr_scores(P_CAL, Y_CAL), 0.1) == pytest.approx(0.95)
    assert calibrate(aps_scores(P_CAL, Y_CAL), 0.05) == math.inf


def test_thr_and_aps_match_torchcp() -> None:
    """Thresholds and sets equal TorchCP's split predictor (LAC = THR, non-randomised APS).

    TorchCP is not a dependency (it pulls in transformers, torch_geometric and torchsort, built
    from source): this runs only where it is installed.
    """
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchcp")
    from torchcp.classification.predictor import SplitPredictor
    from torchcp.classification.score import APS, LAC

    rng = np.random.default_rng(0)
    logits = 2.0 * rng.standard_normal((2500, 10))
    cumulative = softmax(logits).cumsum(axis=1)
    labels = np.minimum((rng.random((2500, 1)) > cumulative).sum(axis=1), 9)
    cal, test = np.arange(2000), np.arange(2000, 2500)
    ours = {
        "thr": (thr_scores, thr_sets, LAC(score_type="softmax")),
        "aps": (aps_scores, aps_sets, APS(score_type="softmax", randomized=False)),
    }
    for score, sets, theirs in ours.values():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # their 'temperature' notice
            predictor = SplitPredictor(score_function=theirs, device=torch.device("cpu"))
        predictor.calculate_threshold(
            torch.as_tensor(logits[cal]), torch.as_tensor(labels[cal]), alpha=0.1
        )
        their_sets = predictor.predict_with_logits(torch.as_tensor(logits[test]))
        q = calibrate(score(softmax(logits[cal]), labels[cal]), 0.1)
        assert q == pytest.approx(float(predictor.q_hat), abs=1e-12)
        mask = np.zeros((500, 10), dtype=bool)
        for i, members in enumerate(sets(softmax(logits[test]), q)):
            mask[i, members] = True
        assert np.array_equal(mask, their_sets.cpu().numpy().astype(bool))


def test_format_conformal_table_lists_every_alpha_and_score() -> None:
    from openqpm.conformal import format_conformal_table

    rows = [
        {
            "score": score,
            "alpha": alpha,
            "coverage": 1 - alpha / 2,
            "mean_set_size": 2.0 + alpha,
            "set_coherence": 0.5 if score != "thr" else None,
            "threshold": 0.1,
            "level": None,
        }
        for score in SCORES
        for alpha in (0.05, 0.1)
    ]
    text = format_conformal_table({"n_calibration": 7, "alphas": [0.05, 0.1], "results": rows})
    lines = text.splitlines()
    assert "7 held-out training images" in lines[0]
    assert lines[1].split()[:4] == ["alpha", "target", "hierarchical", "cover"]
    assert lines[2].split()[:5] == ["0.05", "95.0%", "97.5%", "2.05", "50.0%"]
    assert lines[3].split()[-3:] == ["95.0%", "2.10", "-"]


def test_classes_outside_the_level_rank_after_inside_ones_with_zero_activations() -> None:
    # 10 calibration images (k = 2): 9 true classes inside level 1, of which 5 also at level 2;
    # at level 1 seven inside scores are negative and two are exactly 0 (activations 0 after a
    # ReLU), the outside one is 0 as well. alpha = 0.2: both rules pick L = 1 (9 >= rank 9,
    # 5 < 9; the authors' 9 >= 8, 5 < 8).
    depths = np.array([2, 2, 2, 2, 2, 1, 1, 1, 1, 0])
    level_one = np.array([-0.9, -0.8, -0.7, -0.6, -0.5, -0.4, -0.3, 0.0, 0.0, 0.0])
    levels = np.zeros((10, 3))
    levels[:, 1] = level_one
    common = {
        "weights": W_HAND,
        "thr_true_scores": np.full(10, 0.5),
        "aps_true_scores": np.full(10, 0.5),
        "true_depths": depths,
        "level_true_scores": levels,
    }
    default = Calibration(**common)
    authors = Calibration(**common, level_rule="authors")
    # the 9th smallest: 0 among the inside scores; the outside one ranks last (inf) or ties (0)
    assert default.threshold("hierarchical", 0.2) == (0.0, 1)
    assert authors.threshold("hierarchical", 0.2) == (0.0, 1)
    # image A of the hand-built three: level-1 scores [-1, -3, outside, outside]
    z, f = Z_THREE[:1], F_THREE[:1]
    assert default.prediction_sets("hierarchical", z, f, 0.2)[0].tolist() == [0, 1]
    assert authors.prediction_sets("hierarchical", z, f, 0.2)[0].tolist() == [0, 1, 2, 3]
