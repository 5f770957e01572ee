"""Split-conformal prediction sets for QPM classifiers: THR, APS and the CHiQPM hierarchy.

Split conformal prediction in four steps:

1. :func:`split_calibration` sets aside a seeded part of the *training* items for calibration.
2. A non-conformity score (higher = less conforming) is computed for each calibration item with
   its true label: :func:`thr_scores`, :func:`aps_scores` or :func:`hierarchical_scores`.
3. :func:`calibrate` turns those scores and a miscoverage level ``alpha`` into a threshold.
4. The matching set function (:func:`thr_sets`, :func:`aps_sets`, :func:`hierarchical_sets`)
   returns, for each test item, every class whose score would be at most the threshold.

For exchangeable calibration and test items the sets contain the true class with probability at
least ``1 - alpha`` (marginally, averaged over calibration sets and test items).
:func:`coverage_and_size` measures the empirical coverage and the mean set size.
:class:`Calibration` keeps what the three methods need from the calibration images, so that
thresholds and sets for any ``alpha`` can be produced later (and saved as JSON);
:func:`conformal_metrics` evaluates it on test images, with :func:`set_coherence`.

The hierarchy (CHiQPM, Norrenbrock et al., NeurIPS 2025): a QPM assigns each class exactly ``k``
of ``K`` features (a binary weight matrix ``W`` of shape ``(n_classes, K)``). For one image with
feature activations ``f``, each class's own ``k`` features are sorted by activation, strongest
first (ties: lower feature index first). The *depth* of a class is the length of the longest
common prefix of its sorted feature list with the predicted class's sorted list. Level ``j``
(``0 <= j <= k``) holds the classes of depth at least ``j``: level 0 is every class, level 1 the
classes whose strongest feature is the predicted class's strongest feature, ..., level ``k`` the
classes with the predicted class's ``k`` features in the same order (only the prediction itself
when the rows of ``W`` differ). Levels are nested.

The CHiQPM score (:func:`hierarchical_scores`) first picks a level ``L`` on the calibration
images (:func:`hierarchical_level`: the leading levels that hold the true class for at least a
``1 - alpha`` fraction of them) and then ranks the classes by the activations along the
predicted path below ``L``; :func:`calibrate` on it gives the threshold. The simpler integer
score ``k - depth`` (:func:`depth_scores`, :func:`depth_sets`) is kept as a helper.

This module uses numpy only (no torch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from openqpm._io import atomic_write_text

__all__ = [
    "DEFAULT_ALPHAS",
    "LEVEL_RULES",
    "SCORES",
    "Calibration",
    "aps_scores",
    "aps_sets",
    "calibrate",
    "calibrate_hierarchical",
    "conformal_metrics",
    "coverage_and_size",
    "depth_scores",
    "depth_sets",
    "format_conformal_table",
    "hierarchical_level",
    "hierarchical_scores",
    "hierarchical_sets",
    "hierarchy_depths",
    "hierarchy_levels",
    "level_accuracies",
    "level_for_threshold",
    "set_coherence",
    "softmax",
    "split_calibration",
    "thr_scores",
    "thr_sets",
]

SCORES: tuple[str, ...] = ("hierarchical", "aps", "thr")
"""The score names of :class:`Calibration` and :func:`conformal_metrics`, in report order."""

DEFAULT_ALPHAS: tuple[float, ...] = (0.05, 0.075, 0.10, 0.12)
"""The miscoverage levels :func:`conformal_metrics` evaluates by default."""

_SUM_TOLERANCE = 1e-4
# how the hierarchical score's level is chosen (see hierarchical_level)
LEVEL_RULES = ("conformal", "authors")
_RANK_TOLERANCE = 1e-9  # as in calibrate: keeps e.g. 0.9 * 100 at 90, not 90.00000000000001
_JSON_FORMAT = "openqpm.conformal.Calibration"
_JSON_VERSION = 1


def split_calibration(
    n_items: int, *, fraction: float, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Split ``range(n_items)`` into seeded calibration and remaining indices.

    The items must be TRAINING items (or another held-out set that is not the test set): the
    caller must never pass test images, or the reported test coverage is no longer an honest
    estimate. Calibration items should also not have been used to fit the model if the
    guarantee is to hold exactly (the model's scores on its own training data are optimistic).

    Args:
        n_items: Number of items to split.
        fraction: Fraction of items for calibration, in (0, 1); rounded to the nearest count.
        seed: Seed of the permutation.

    Returns:
        ``(calibration_indices, rest_indices)``, each sorted ascending, disjoint, together
        ``range(n_items)``.

    Raises:
        ValueError: If ``fraction`` is not in (0, 1) or either part would be empty.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n_calibration = round(fraction * n_items)
    if n_calibration < 1 or n_calibration >= n_items:
        raise ValueError(
            f"fraction={fraction} of n_items={n_items} leaves an empty calibration or rest part"
        )
    order = np.random.default_rng(seed).permutation(n_items).astype(np.int64)
    return np.sort(order[:n_calibration]), np.sort(order[n_calibration:])


def softmax(logits: ArrayLike) -> NDArray[np.float64]:
    """Row-wise softmax of ``(N, n_classes)`` logits (numerically stable)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=np.float64)


def _probabilities(probabilities: ArrayLike) -> NDArray[np.float64]:
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probabilities must have shape (N, n_classes), got {p.shape}")
    if p.size and (p.min() < 0 or np.abs(p.sum(axis=1) - 1.0).max() > _SUM_TOLERANCE):
        raise ValueError("rows must be probabilities (>= 0, sum 1); pass logits through softmax")
    return p


def _labels(labels: ArrayLike, n_items: int, n_classes: int) -> NDArray[np.int64]:
    y = np.asarray(labels).astype(np.int64)
    if y.shape != (n_items,):
        raise ValueError(f"labels must have shape ({n_items},), got {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes})")
    return y


def _mask_to_sets(mask: NDArray[np.bool_]) -> list[NDArray[np.int64]]:
    return [np.flatnonzero(row).astype(np.int64) for row in mask]


def thr_scores(probabilities: ArrayLike, labels: ArrayLike) -> NDArray[np.float64]:
    """THR (least ambiguous set) score: ``1 - p_y``.

    Args:
        probabilities: ``(N, n_classes)`` softmax probabilities (use :func:`softmax` on logits).
        labels: ``(N,)`` true class indices.

    Returns:
        ``(N,)`` scores in [0, 1].
    """
    p = _probabilities(probabilities)
    y = _labels(labels, p.shape[0], p.shape[1])
    return np.asarray(1.0 - p[np.arange(p.shape[0]), y], dtype=np.float64)


def thr_sets(probabilities: ArrayLike, threshold: float) -> list[NDArray[np.int64]]:
    """THR sets: the classes ``c`` with ``1 - p_c <= threshold`` (possibly empty).

    Args:
        probabilities: ``(N, n_classes)`` softmax probabilities.
        threshold: Output of :func:`calibrate` on :func:`thr_scores`.

    Returns:
        One ascending array of class indices per item.
    """
    p = _probabilities(probabilities)
    return _mask_to_sets(1.0 - p <= threshold)


def _aps_all_scores(p: NDArray[np.float64], seed: int | None) -> NDArray[np.float64]:
    """APS score of every class of every item, shape ``(N, n_classes)``."""
    n_items = p.shape[0]
    # Rank classes by probability, descending; ties broken by lower class index first.
    order = np.argsort(-p, axis=1, kind="stable")
    sorted_p = np.take_along_axis(p, order, axis=1)
    cumulative = np.cumsum(sorted_p, axis=1)
    if seed is not None:
        u = np.random.default_rng(seed).random((n_items, 1))
        cumulative = cumulative - (1.0 - u) * sorted_p
    scores = np.empty_like(p)
    np.put_along_axis(scores, order, cumulative, axis=1)
    return scores


def aps_scores(
    probabilities: ArrayLike, labels: ArrayLike, *, seed: int | None = None
) -> NDArray[np.float64]:
    """APS (adaptive prediction sets) score.

    Deterministic (``seed=None``): the total probability of the classes ranked at or above the
    true class (rank by probability, descending; ties by lower class index first). Randomised
    (``seed`` given): the total probability of the classes ranked strictly above it plus
    ``u * p_y`` with ``u ~ Uniform(0, 1)`` drawn once per item from ``seed``; its sets are
    smaller on average and its coverage is closer to exactly ``1 - alpha``.

    Args:
        probabilities: ``(N, n_classes)`` softmax probabilities.
        labels: ``(N,)`` true class indices.
        seed: ``None`` for the deterministic score, else the seed of the per-item ``u``.

    Returns:
        ``(N,)`` scores in [0, 1].
    """
    p = _probabilities(probabilities)
    y = _labels(labels, p.shape[0], p.shape[1])
    return np.asarray(_aps_all_scores(p, seed)[np.arange(p.shape[0]), y], dtype=np.float64)


def aps_sets(
    probabilities: ArrayLike, threshold: float, *, seed: int | None = None
) -> list[NDArray[np.int64]]:
    """APS sets: the classes whose APS score would be at most ``threshold``.

    The deterministic set is the top-ranked classes whose cumulative probability stays at or
    below the threshold (it can be empty when the top class alone exceeds it). Pass the same kind
    of score as calibrated: ``seed=None`` for both, or a seed for both (use a different seed for
    the test items than for the calibration items).

    Args:
        probabilities: ``(N, n_classes)`` softmax probabilities.
        threshold: Output of :func:`calibrate` on :func:`aps_scores`.
        seed: ``None`` for deterministic sets, else the seed of the per-item ``u``.

    Returns:
        One ascending array of class indices per item.
    """
    p = _probabilities(probabilities)
    return _mask_to_sets(_aps_all_scores(p, seed) <= threshold)


def calibrate(scores: ArrayLike, alpha: float) -> float:
    """Split-conformal threshold: the ``ceil((n + 1)(1 - alpha))``-th smallest score.

    This is the ``ceil((n + 1)(1 - alpha)) / n`` empirical quantile with "higher" interpolation.
    When ``(n + 1)(1 - alpha) > n`` (too few calibration items for this ``alpha``) no finite
    threshold gives the guarantee and ``+inf`` is returned: every set is then all classes.
    A tolerance of ``1e-9`` inside the ceiling keeps e.g. ``20 * 0.95`` at 19.

    Args:
        scores: ``(n,)`` calibration non-conformity scores.
        alpha: Miscoverage level in (0, 1).

    Returns:
        The threshold (a score value, or ``inf``).

    Raises:
        ValueError: If ``alpha`` is not in (0, 1) or ``scores`` is empty or not 1-D.
    """
    s = np.asarray(scores, dtype=np.float64)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {s.shape}")
    n = s.size
    rank = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)
    if rank > n:
        return math.inf
    return float(np.partition(s, rank - 1)[rank - 1])


def coverage_and_size(sets: list[NDArray[np.int64]], labels: ArrayLike) -> tuple[float, float]:
    """Empirical coverage and mean size of prediction sets.

    Args:
        sets: One array of class indices per item.
        labels: ``(N,)`` true class indices.

    Returns:
        ``(coverage, mean_size)``: the fraction of items whose set holds the true class and the
        mean number of classes per set.

    Raises:
        ValueError: If the lengths differ or there are no items.
    """
    y = np.asarray(labels).astype(np.int64)
    if y.ndim != 1 or len(sets) != y.size or y.size == 0:
        raise ValueError(f"need one set per label and at least one item; got {len(sets)} sets")
    covered = [bool(np.any(np.asarray(s) == label)) for s, label in zip(sets, y)]
    return float(np.mean(covered)), float(np.mean([np.asarray(s).size for s in sets]))


def _class_features(weights: ArrayLike) -> NDArray[np.int64]:
    """Feature indices of each class, ``(n_classes, k)``, ascending; validates ``W``."""
    w = np.asarray(weights)
    if w.ndim != 2 or w.shape[0] == 0:
        raise ValueError(f"weights must have shape (n_classes, K), got {w.shape}")
    if not np.isin(w, (0, 1)).all():
        raise ValueError("weights must be binary (0/1)")
    counts = (w != 0).sum(axis=1)
    if counts.min() != counts.max() or counts[0] == 0:
        raise ValueError(f"every class needs the same k >= 1 features, got counts {counts}")
    k = int(counts[0])
    # nonzero returns row-major order: column indices ascending within each row.
    return np.nonzero(w)[1].reshape(w.shape[0], k).astype(np.int64)


def _activations(activations: ArrayLike, n_features: int) -> NDArray[np.float64]:
    f = np.asarray(activations, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != n_features:
        raise ValueError(f"activations must have shape (N, {n_features}), got {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("activations must be finite")
    return f


def _logits(logits: ArrayLike, n_items: int | None, n_classes: int) -> NDArray[np.float64]:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != n_classes or (n_items is not None and z.shape[0] != n_items):
        expected = "N" if n_items is None else str(n_items)
        raise ValueError(f"logits must have shape ({expected}, {n_classes}), got {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError("logits must be finite")
    return z


def _ranked_paths(
    f: NDArray[np.float64], features: NDArray[np.int64], predictions: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Depth ``(N, n_classes)`` and sorted own activations ``(N, n_classes, k)`` of every class.

    Each class's own ``k`` features are sorted by activation, strongest first; a stable sort of
    the ascending feature indices breaks ties by lower feature index. Only the class's own
    features take part, whatever their sign.
    """
    values = f[:, features]  # (N, n_classes, k)
    order = np.argsort(-values, axis=2, kind="stable")
    ranked = np.take_along_axis(np.broadcast_to(features, values.shape), order, axis=2)
    ranked_values = np.take_along_axis(values, order, axis=2)
    same = ranked == ranked[np.arange(f.shape[0]), predictions][:, None, :]
    depth = np.cumprod(same, axis=2).sum(axis=2).astype(np.int64)
    return depth, np.asarray(ranked_values, dtype=np.float64)


def hierarchy_depths(
    activations: ArrayLike, weights: ArrayLike, predictions: ArrayLike | None = None
) -> NDArray[np.int64]:
    """Depth of every class in every image's hierarchy, shape ``(N, n_classes)``, in [0, k].

    The depth of class ``c`` is the length of the longest common prefix of ``c``'s features and
    the predicted class's features, both sorted by activation (strongest first; ties: lower
    feature index first). The predicted class has depth ``k``.

    Args:
        activations: ``(N, K)`` feature activations (the features the QPM layer reads).
        weights: ``(n_classes, K)`` binary class-feature matrix, ``k`` ones per row.
        predictions: ``(N,)`` predicted classes; default ``argmax(activations @ W.T)`` (first
            index on ties). Pass the model's own predictions when its logits are scaled or
            biased differently.

    Returns:
        Integer depths.
    """
    features = _class_features(weights)
    f = np.asarray(activations, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != np.asarray(weights).shape[1]:
        raise ValueError(f"activations must have shape (N, K), got {f.shape}")
    if predictions is None:
        pred = np.argmax(f @ np.asarray(weights, dtype=np.float64).T, axis=1).astype(np.int64)
    else:
        pred = _labels(predictions, f.shape[0], features.shape[0])
    return _ranked_paths(f, features, pred)[0]


def hierarchy_levels(
    activations: ArrayLike, weights: ArrayLike, prediction: int | None = None
) -> list[NDArray[np.int64]]:
    """The ``k + 1`` nested levels of one image's hierarchy.

    Level ``j`` holds the classes whose ``j`` strongest features are, in order, the predicted
    class's ``j`` strongest (see :func:`hierarchy_depths`): level 0 is every class, level ``k``
    the classes sharing the prediction's full ordered feature list.

    Args:
        activations: ``(K,)`` feature activations of one image.
        weights: ``(n_classes, K)`` binary class-feature matrix, ``k`` ones per row.
        prediction: The predicted class; default ``argmax(activations @ W.T)``.

    Returns:
        ``levels[j]``: ascending class indices of level ``j``, for ``j = 0..k``.
    """
    f = np.asarray(activations, dtype=np.float64)
    if f.ndim != 1:
        raise ValueError(f"activations must have shape (K,), got {f.shape}")
    predictions = None if prediction is None else [prediction]
    depth = hierarchy_depths(f[None, :], weights, predictions)[0]
    k = _class_features(weights).shape[1]
    return [np.flatnonzero(depth >= j).astype(np.int64) for j in range(k + 1)]


# --- the simpler integer score ``k - depth`` ---------------------------------------------------


def depth_scores(
    activations: ArrayLike,
    weights: ArrayLike,
    labels: ArrayLike,
    predictions: ArrayLike | None = None,
) -> NDArray[np.float64]:
    """Integer hierarchy score ``k - depth`` of the true class (not CHiQPM's score).

    Calibrating it picks the deepest level whose calibration coverage reaches the conformal
    quantile; every class of that level is in the set. :func:`hierarchical_scores` is the
    CHiQPM score, which also ranks the classes inside a level.

    Args:
        activations: ``(N, K)`` feature activations.
        weights: ``(n_classes, K)`` binary class-feature matrix, ``k`` ones per row.
        labels: ``(N,)`` true class indices.
        predictions: ``(N,)`` predicted classes; default as in :func:`hierarchy_depths`.

    Returns:
        ``(N,)`` integer-valued scores in [0, k] (as floats, for :func:`calibrate`).
    """
    depth = hierarchy_depths(activations, weights, predictions)
    y = _labels(labels, depth.shape[0], depth.shape[1])
    k = _class_features(weights).shape[1]
    return np.asarray(k - depth[np.arange(depth.shape[0]), y], dtype=np.float64)


def level_for_threshold(threshold: float, k: int) -> int:
    """The hierarchy level whose classes are those with :func:`depth_scores` ``<= threshold``.

    ``k - floor(threshold)``, clipped to [0, k]: a threshold of 0 keeps level ``k``, ``inf``
    (and anything ``>= k``) level 0, every class.
    """
    if math.isinf(threshold) and threshold > 0:
        return 0
    return int(min(k, max(0, k - math.floor(threshold))))


def depth_sets(
    activations: ArrayLike,
    weights: ArrayLike,
    threshold: float,
    predictions: ArrayLike | None = None,
) -> list[NDArray[np.int64]]:
    """Sets of the integer score: for each image, its level :func:`level_for_threshold`.

    Args:
        activations: ``(N, K)`` feature activations.
        weights: ``(n_classes, K)`` binary class-feature matrix, ``k`` ones per row.
        threshold: Output of :func:`calibrate` on :func:`depth_scores`.
        predictions: ``(N,)`` predicted classes; default as in :func:`hierarchy_depths`.

    Returns:
        One ascending array of class indices per image (never empty: it holds the prediction).
    """
    depth = hierarchy_depths(activations, weights, predictions)
    level = level_for_threshold(threshold, _class_features(weights).shape[1])
    return _mask_to_sets(depth >= level)


# --- the CHiQPM score -------------------------------------------------------------------------


def _true_depths(true_depths: ArrayLike, k: int) -> NDArray[np.int64]:
    d = np.asarray(true_depths)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"true_depths must be a non-empty 1-D array, got shape {d.shape}")
    if not np.issubdtype(d.dtype, np.integer) and not np.array_equal(d, np.round(d)):
        raise ValueError("true_depths must be integers")
    d = d.astype(np.int64)
    if d.min() < 0 or d.max() > k:
        raise ValueError(f"true_depths must lie in [0, k={k}]")
    return d


def level_accuracies(true_depths: ArrayLike, k: int) -> NDArray[np.float64]:
    """Fraction of calibration images whose true class lies in level ``j + 1``, ``j = 0..k-1``.

    ``acc[j]`` is the fraction whose true class shares the prediction's ``j + 1`` strongest
    features in order (its depth is at least ``j + 1``); it never increases with ``j``.

    Args:
        true_depths: ``(N,)`` depth of each calibration image's true class.
        k: Features per class.

    Returns:
        ``(k,)`` fractions.
    """
    d = _true_depths(true_depths, k)
    return np.array([np.mean(d >= j + 1) for j in range(k)], dtype=np.float64)


def hierarchical_level(
    true_depths: ArrayLike, k: int, alpha: float, *, rule: str = "conformal"
) -> int:
    """CHiQPM's level ``L``: the number of leading levels that hold enough true classes.

    ``L`` is the first ``j`` at which fewer than ``m`` calibration images have their true class
    among the classes sharing the prediction's first ``j + 1`` features, so level ``L`` (the
    classes sharing the first ``L``) is the deepest level that still holds ``m`` of them; ``L = 0``
    when even the first level fails. ``m`` depends on ``rule``:

    * ``"conformal"`` (default): ``m = ceil((n + 1)(1 - alpha))``, the rank :func:`calibrate`
      takes. The calibrated threshold is then an in-level score, so the sets stay inside the
      level. With the authors' rule the level can hold fewer true classes than that rank; the
      threshold then lands on the 0 that every class outside the level scores, and every set
      is every class (on the demo data this happened for one seed in three at alpha 0.075).
    * ``"authors"``: ``m = (1 - alpha) n``, the calibration accuracy of the authors' code.

    When no level fails ``L = k - 1``, as in the latest version of the authors' score (an
    earlier one returned ``k``; at ``L = k`` every class would score 0 and every set would hold
    every class): the score then ranks the prediction's level-``k - 1`` neighbours by their last
    feature. A tolerance of ``1e-9`` (in counts) keeps e.g. 90 of 100 images at ``1 - 0.1``.

    Args:
        true_depths: ``(N,)`` depth of each calibration image's true class.
        k: Features per class.
        alpha: Miscoverage level in (0, 1).

    Returns:
        The level, in ``[0, k - 1]``.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    d = _true_depths(true_depths, k)
    counts = np.array([np.count_nonzero(d >= j + 1) for j in range(k)])
    needed: float
    if rule == "conformal":
        needed = math.ceil((d.size + 1) * (1.0 - alpha) - _RANK_TOLERANCE)
    elif rule == "authors":
        needed = (1.0 - alpha) * d.size - _RANK_TOLERANCE
    else:
        raise ValueError(f"rule must be 'conformal' or 'authors', got {rule!r}")
    failing = np.flatnonzero(counts < needed)
    return int(failing[0]) if failing.size else k - 1


def _level_scores(
    depth: NDArray[np.int64], values: NDArray[np.float64], level: int
) -> NDArray[np.float64]:
    """CHiQPM score at ``level`` from depths ``(...)`` and sorted own activations ``(..., k)``.

    Inside the level: minus the class's own activation at its first differing position (0 when
    it shares all ``k``) minus the activations of the shared path at positions
    ``level .. depth - 1``. Outside the level (``level >= 1`` only): 0. The path sum is a loop
    over positions, so the score of a class does not depend on how many others are computed.
    """
    k = values.shape[-1]
    score = np.zeros(depth.shape, dtype=np.float64)
    for position in range(level, k):
        score -= np.where(position < depth, values[..., position], 0.0)
    first_differing = np.minimum(depth, k - 1)[..., None]
    divergence = np.take_along_axis(values, first_differing, axis=-1)[..., 0]
    score -= np.where(depth < k, divergence, 0.0)
    if level >= 1:
        score = np.where(depth >= level, score, 0.0)
    return np.asarray(score + 0.0, dtype=np.float64)  # + 0.0 turns -0.0 into 0.0


def _ranked_scores(
    scores: NDArray[np.float64], depth: NDArray[np.int64], level: int, rule: str
) -> NDArray[np.float64]:
    """The scores calibration and sets compare: with the default rule a class outside the level
    ranks after every class inside it (``inf``), with the authors' rule it keeps its 0.

    The authors' 0 ties with an inside class whose activations along the path are 0 (common
    after a ReLU), so a threshold of 0 (which their level rule allows) let every class in; with
    ``inf`` the sets stay inside the level unless the threshold itself is infinite.
    """
    if rule == "authors" or level == 0:
        return scores
    return np.where(depth >= level, scores, np.inf)


def _hierarchy_inputs(
    logits: ArrayLike, activations: ArrayLike, weights: ArrayLike
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Validated inputs -> ``_ranked_paths`` with the prediction ``argmax(logits)``."""
    features = _class_features(weights)
    n_features = np.asarray(weights).shape[1]
    f = _activations(activations, n_features)
    z = _logits(logits, f.shape[0], features.shape[0])
    return _ranked_paths(f, features, np.argmax(z, axis=1).astype(np.int64))


def _check_level(level: int, k: int) -> int:
    if isinstance(level, bool) or int(level) != level or not 0 <= level <= k:
        raise ValueError(f"level must be an integer in [0, k={k}], got {level}")
    return int(level)


def hierarchical_scores(
    logits: ArrayLike,
    activations: ArrayLike,
    weights: ArrayLike,
    level: int,
    labels: ArrayLike | None = None,
) -> NDArray[np.float64]:
    """CHiQPM non-conformity score at hierarchy level ``level``.

    For each image the predicted class is ``argmax(logits)`` and every class's own ``k``
    features are sorted by activation (see :func:`hierarchy_depths`). A class outside level
    ``level`` (``level >= 1`` and it does not share the prediction's first ``level`` features)
    scores 0. A class inside scores ``-(value at divergence) - sum(path activations at sorted
    positions level .. depth - 1)``: the value at divergence is the class's own activation at
    its first differing position (0 when it shares all ``k``), and the path activations are
    those of the shared features. So more activation along the path below the level is more
    conforming. With non-negative activations the classes inside the level score at most 0 and
    those outside exactly 0: whenever a threshold is ``>= 0`` every class outside the level
    enters the set (as in the authors' code). With negative activations (QPMs without ReLU)
    classes inside can score above 0.

    Unlike the authors' code, which sorts ``f * W.T - (1 - W.T)`` over all ``K`` features and
    keeps the top ``k`` (so a feature of another class, at -1, outranks an own feature below
    -1), each class's own features are sorted among themselves only.

    Args:
        logits: ``(N, n_classes)`` logits (the prediction is their argmax, first on ties).
        activations: ``(N, K)`` feature activations (the input of the QPM layer).
        weights: ``(n_classes, K)`` binary class-feature matrix, ``k`` ones per row.
        level: The level, in ``[0, k]`` (:func:`hierarchical_level` on calibration images).
        labels: ``(N,)`` true classes, or None for the score of every class.

    Returns:
        ``(N,)`` true-class scores, or ``(N, n_classes)`` scores of every class.
    """
    depth, values = _hierarchy_inputs(logits, activations, weights)
    level = _check_level(level, values.shape[2])
    if labels is None:
        return _level_scores(depth, values, level)
    y = _labels(labels, depth.shape[0], depth.shape[1])
    rows = np.arange(depth.shape[0])
    return _level_scores(depth[rows, y], values[rows, y], level)


def hierarchical_sets(
    logits: ArrayLike,
    activations: ArrayLike,
    weights: ArrayLike,
    level: int,
    threshold: float,
    *,
    rule: str = "conformal",
) -> list[NDArray[np.int64]]:
    """CHiQPM sets: the classes whose :func:`hierarchical_scores` at ``level`` is ``<= threshold``
    (with the default ``rule``, classes outside the level only when the threshold is infinite).

    Args:
        logits: ``(N, n_classes)`` logits.
        activations: ``(N, K)`` feature activations.
        weights: ``(n_classes, K)`` binary class-feature matrix, ``k`` ones per row.
        level: The level the threshold was calibrated at.
        threshold: From :func:`calibrate_hierarchical` (or :meth:`Calibration.threshold`).
        rule: The level rule the threshold was calibrated with (see :func:`hierarchical_level`).

    Returns:
        One ascending array of class indices per image (empty when the threshold is below
        every score).
    """
    depth, values = _hierarchy_inputs(logits, activations, weights)
    scores = _ranked_scores(_level_scores(depth, values, level), depth, level, rule)
    return _mask_to_sets(scores <= threshold)


def calibrate_hierarchical(
    logits: ArrayLike,
    activations: ArrayLike,
    labels: ArrayLike,
    weights: ArrayLike,
    alpha: float,
    *,
    rule: str = "conformal",
) -> tuple[float, int]:
    """CHiQPM calibration: the level :func:`hierarchical_level`, then the threshold at it.

    The level is chosen on the same calibration images that give the threshold (as the authors
    do), so the guarantee is the split-conformal one given the level: coverage at least
    ``1 - alpha`` for a level fixed in advance; the data-dependent choice among the ``k`` levels
    is not accounted for.

    Args:
        logits: ``(N, n_classes)`` calibration logits.
        activations: ``(N, K)`` calibration feature activations.
        labels: ``(N,)`` true classes.
        weights: ``(n_classes, K)`` binary class-feature matrix.
        alpha: Miscoverage level in (0, 1).

    Returns:
        ``(threshold, level)`` for :func:`hierarchical_sets`.
    """
    depth, values = _hierarchy_inputs(logits, activations, weights)
    y = _labels(labels, depth.shape[0], depth.shape[1])
    rows = np.arange(depth.shape[0])
    level = hierarchical_level(depth[rows, y], values.shape[2], alpha, rule=rule)
    scores = _level_scores(depth[rows, y], values[rows, y], level)
    return calibrate(_ranked_scores(scores, depth[rows, y], level, rule), alpha), level


# --- a calibration kept for any alpha ----------------------------------------------------------


def _frozen(array: NDArray[Any]) -> NDArray[Any]:
    array = np.array(array)  # a copy the caller cannot change
    array.setflags(write=False)
    return array


def _check_score_name(score_name: str) -> None:
    if score_name not in SCORES:
        raise ValueError(f"unknown score {score_name!r}; choose one of {', '.join(SCORES)}")


@dataclasses.dataclass(frozen=True, eq=False)
class Calibration:
    """What THR, APS and CHiQPM need from the calibration images, for any ``alpha`` later.

    Build it with :meth:`fit`. It keeps the true-class scores, not the images: the THR score
    ``1 - p_y``, the APS score (:func:`aps_scores`, deterministic unless ``aps_seed`` is given),
    and for the hierarchy the depth of each true class (for :func:`hierarchical_level`) and its
    :func:`hierarchical_scores` at every level ``0..k``, plus ``W`` to score new images.
    Arrays are read-only copies.

    Attributes:
        weights: ``(n_classes, K)`` binary class-feature matrix (int64).
        thr_true_scores: ``(N,)`` THR scores of the true classes.
        aps_true_scores: ``(N,)`` APS scores of the true classes.
        true_depths: ``(N,)`` depth of each true class in its image's hierarchy.
        level_true_scores: ``(N, k + 1)`` CHiQPM true-class scores; column ``L`` at level ``L``.
        aps_seed: ``None`` for deterministic APS, else the seed of the calibration ``u``.
        level_rule: how :func:`hierarchical_level` picks the level (``"conformal"`` or the
            authors' ``"authors"``).
    """

    weights: NDArray[np.int64]
    thr_true_scores: NDArray[np.float64]
    aps_true_scores: NDArray[np.float64]
    true_depths: NDArray[np.int64]
    level_true_scores: NDArray[np.float64]
    aps_seed: int | None = None
    level_rule: str = "conformal"

    def __post_init__(self) -> None:
        if self.level_rule not in LEVEL_RULES:
            raise ValueError(f"level_rule must be one of {LEVEL_RULES}, got {self.level_rule!r}")
        k = _class_features(self.weights).shape[1]
        w = np.asarray(self.weights).astype(np.int64)
        thr = np.asarray(self.thr_true_scores, dtype=np.float64)
        aps = np.asarray(self.aps_true_scores, dtype=np.float64)
        depths = _true_depths(self.true_depths, k)
        levels = np.asarray(self.level_true_scores, dtype=np.float64)
        n = depths.size
        if thr.shape != (n,) or aps.shape != (n,) or levels.shape != (n, k + 1):
            raise ValueError(
                f"expected ({n},) THR and APS scores and ({n}, {k + 1}) level scores, got "
                f"{thr.shape}, {aps.shape} and {levels.shape}"
            )
        if not (np.isfinite(thr).all() and np.isfinite(aps).all() and np.isfinite(levels).all()):
            raise ValueError("calibration scores must be finite")
        if self.aps_seed is not None and (
            isinstance(self.aps_seed, bool) or not isinstance(self.aps_seed, (int, np.integer))
        ):
            raise ValueError(f"aps_seed must be an integer or None, got {self.aps_seed!r}")
        seed = None if self.aps_seed is None else int(self.aps_seed)
        for name, value in (
            ("weights", w),
            ("thr_true_scores", thr),
            ("aps_true_scores", aps),
            ("true_depths", depths),
            ("level_true_scores", levels),
        ):
            object.__setattr__(self, name, _frozen(value))
        object.__setattr__(self, "aps_seed", seed)

    @classmethod
    def fit(
        cls,
        logits: ArrayLike,
        activations: ArrayLike,
        labels: ArrayLike,
        weights: ArrayLike,
        *,
        aps_seed: int | None = None,
        level_rule: str = "conformal",
    ) -> Calibration:
        """Calibrate on ``N`` calibration images (never test images).

        Args:
            logits: ``(N, n_classes)`` logits of the model.
            activations: ``(N, K)`` activations of the features the QPM layer reads.
            labels: ``(N,)`` true classes.
            weights: ``(n_classes, K)`` binary class-feature matrix, ``k`` ones per row.
            aps_seed: ``None`` (the default, as in :func:`aps_scores`) for deterministic APS
                scores, else the seed of their per-image ``u``.
            level_rule: ``"conformal"`` or ``"authors"`` (see :func:`hierarchical_level`).

        Returns:
            The calibration.
        """
        depth, values = _hierarchy_inputs(logits, activations, weights)
        n_items, n_classes, k = values.shape
        if n_items == 0:
            raise ValueError("need at least one calibration image")
        y = _labels(labels, n_items, n_classes)
        probabilities = softmax(_logits(logits, n_items, n_classes))
        rows = np.arange(n_items)
        true_depth, true_values = depth[rows, y], values[rows, y]
        levels = np.stack([_level_scores(true_depth, true_values, L) for L in range(k + 1)], 1)
        return cls(
            weights=np.asarray(weights).astype(np.int64),
            thr_true_scores=thr_scores(probabilities, y),
            aps_true_scores=aps_scores(probabilities, y, seed=aps_seed),
            true_depths=true_depth,
            level_true_scores=levels,
            aps_seed=aps_seed,
            level_rule=level_rule,
        )

    @property
    def n_calibration(self) -> int:
        """Number of calibration images."""
        return int(self.true_depths.size)

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return int(self.weights.shape[0])

    @property
    def k(self) -> int:
        """Features per class."""
        return int(self.level_true_scores.shape[1] - 1)

    def level_accuracies(self) -> NDArray[np.float64]:
        """:func:`level_accuracies` of the calibration images: ``(k,)`` fractions."""
        return level_accuracies(self.true_depths, self.k)

    def threshold(self, score_name: str, alpha: float) -> tuple[float, int | None]:
        """The split-conformal threshold of ``score_name`` at ``alpha``.

        Args:
            score_name: One of :data:`SCORES`.
            alpha: Miscoverage level in (0, 1).

        Returns:
            ``(threshold, level)``: the threshold (``inf`` when there are too few calibration
            images for ``alpha``) and, for "hierarchical", the level of
            :func:`hierarchical_level` (None for the others).
        """
        _check_score_name(score_name)
        if score_name == "thr":
            return calibrate(self.thr_true_scores, alpha), None
        if score_name == "aps":
            return calibrate(self.aps_true_scores, alpha), None
        level = hierarchical_level(self.true_depths, self.k, alpha, rule=self.level_rule)
        scores = _ranked_scores(
            self.level_true_scores[:, level], self.true_depths, level, self.level_rule
        )
        return calibrate(scores, alpha), level

    def _test_aps_seed(self, aps_seed: int | None) -> int | None:
        if self.aps_seed is None:
            return None
        return self.aps_seed + 1 if aps_seed is None else aps_seed

    def _check_inputs(
        self, logits: ArrayLike, activations: ArrayLike | None
    ) -> tuple[NDArray[np.float64], NDArray[np.float64] | None]:
        z = _logits(logits, None, self.n_classes)
        if activations is None:
            return z, None
        f = _activations(activations, int(self.weights.shape[1]))
        if f.shape[0] != z.shape[0]:
            raise ValueError(f"{z.shape[0]} rows of logits but {f.shape[0]} of activations")
        return z, f

    def prediction_sets(
        self,
        score_name: str,
        logits: ArrayLike,
        activations: ArrayLike | None,
        alpha: float,
        *,
        aps_seed: int | None = None,
    ) -> list[NDArray[np.int64]]:
        """Prediction sets of new (test) images at ``alpha``.

        Args:
            score_name: One of :data:`SCORES`.
            logits: ``(M, n_classes)`` logits of the new images.
            activations: ``(M, K)`` their feature activations; only "hierarchical" needs them
                (None is accepted for "thr" and "aps").
            alpha: Miscoverage level in (0, 1).
            aps_seed: Seed of the test images' ``u`` when the APS calibration is randomised;
                default ``self.aps_seed + 1`` (a stream different from the calibration's).
                Ignored for deterministic APS.

        Returns:
            One ascending array of class indices per image.
        """
        _check_score_name(score_name)
        z, f = self._check_inputs(logits, activations)
        paths = None
        if score_name == "hierarchical":
            if f is None:
                raise ValueError("the hierarchical score needs the activations")
            paths = _ranked_paths(f, _class_features(self.weights), np.argmax(z, axis=1))
        return self._sets(score_name, alpha, softmax(z), paths, aps_seed)

    def _sets(
        self,
        score_name: str,
        alpha: float,
        probabilities: NDArray[np.float64],
        paths: tuple[NDArray[np.int64], NDArray[np.float64]] | None,
        aps_seed: int | None,
    ) -> list[NDArray[np.int64]]:
        threshold, level = self.threshold(score_name, alpha)
        if score_name == "thr":
            return thr_sets(probabilities, threshold)
        if score_name == "aps":
            return aps_sets(probabilities, threshold, seed=self._test_aps_seed(aps_seed))
        if paths is None or level is None:
            raise ValueError("the hierarchical score needs the activations")
        scores = _level_scores(paths[0], paths[1], level)
        return _mask_to_sets(_ranked_scores(scores, paths[0], level, self.level_rule) <= threshold)

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON values (lists, ints, floats); :meth:`from_json_dict` restores it exactly."""
        return {
            "format": _JSON_FORMAT,
            "version": _JSON_VERSION,
            "n_calibration": self.n_calibration,
            "k": self.k,
            "aps_seed": self.aps_seed,
            "level_rule": self.level_rule,
            "weights": self.weights.tolist(),
            "thr_true_scores": self.thr_true_scores.tolist(),
            "aps_true_scores": self.aps_true_scores.tolist(),
            "true_depths": self.true_depths.tolist(),
            "level_true_scores": self.level_true_scores.tolist(),
        }

    @classmethod
    def from_json_dict(cls, document: dict[str, Any]) -> Calibration:
        """The calibration of :meth:`to_json_dict`.

        Raises:
            ValueError: Not such a document (wrong format or version, missing fields, shapes).
        """
        if not isinstance(document, dict) or document.get("format") != _JSON_FORMAT:
            raise ValueError(f"not an {_JSON_FORMAT} document")
        if document.get("version") != _JSON_VERSION:
            raise ValueError(f"unsupported {_JSON_FORMAT} version {document.get('version')!r}")
        try:
            level_scores = document["level_true_scores"]
            n = len(document["true_depths"])
            return cls(
                weights=np.asarray(document["weights"], dtype=np.int64),
                thr_true_scores=np.asarray(document["thr_true_scores"], dtype=np.float64),
                aps_true_scores=np.asarray(document["aps_true_scores"], dtype=np.float64),
                true_depths=np.asarray(document["true_depths"], dtype=np.int64),
                level_true_scores=np.asarray(level_scores, dtype=np.float64).reshape(n, -1),
                aps_seed=document["aps_seed"],
                level_rule=document.get("level_rule", "conformal"),
            )
        except (KeyError, TypeError) as failure:
            raise ValueError(f"incomplete {_JSON_FORMAT} document: {failure}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_json_dict` to ``path`` as JSON, atomically."""
        atomic_write_text(path, json.dumps(self.to_json_dict(), allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        """Read a calibration written by :meth:`save`."""
        return cls.from_json_dict(json.loads(Path(path).read_text(encoding="utf-8")))


# --- metrics -----------------------------------------------------------------------------------


def set_coherence(sets: Sequence[ArrayLike], class_attributes: ArrayLike | None) -> float | None:
    """Set Coherence: the mean cosine similarity of the class pairs inside prediction sets.

    This follows the CHiQPM authors' code (``evaluation/Metrics/SetCoherence.py``): the cosine
    similarities of the attribute vectors of every ordered pair of distinct classes in every set
    with at least 2 classes are pooled, and their mean is returned. A set of ``m`` classes thus
    weighs ``m (m - 1)``: it is not the mean over images of per-set means. The authors use
    CUB's 312 continuous class attribute percentages
    (``class_attribute_labels_continuous.txt``).

    Args:
        sets: One array of class indices per image.
        class_attributes: ``(n_classes, A)`` attribute vectors, none all zero; or None.

    Returns:
        The mean similarity, or None when ``class_attributes`` is None or no set has 2 classes.

    Raises:
        ValueError: Attributes that are not 2-D, not finite, or a zero row; out-of-range classes.
    """
    if class_attributes is None:
        return None
    a = np.asarray(class_attributes, dtype=np.float64)
    if a.ndim != 2 or not np.isfinite(a).all():
        raise ValueError(f"class_attributes must be a finite (n_classes, A) array, got {a.shape}")
    norms = np.linalg.norm(a, axis=1)
    if np.any(norms == 0):
        raise ValueError("every class needs a non-zero attribute vector (cosine similarity)")
    unit = a / norms[:, None]
    total, pairs = 0.0, 0
    for members in sets:
        m = np.unique(np.asarray(members, dtype=np.int64))
        if m.size < 2:
            continue
        if m.min() < 0 or m.max() >= a.shape[0]:
            raise ValueError(f"set classes must lie in [0, {a.shape[0]})")
        similarity = unit[m] @ unit[m].T
        total += float(similarity.sum() - np.trace(similarity))
        pairs += m.size * (m.size - 1)
    return total / pairs if pairs else None


def conformal_metrics(
    calibration: Calibration,
    logits: ArrayLike,
    activations: ArrayLike,
    labels: ArrayLike,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    class_attributes: ArrayLike | None = None,
) -> dict[str, Any]:
    """Coverage, mean set size and set coherence of every score at every ``alpha``, on test images.

    Args:
        calibration: From :meth:`Calibration.fit` on calibration images.
        logits: ``(M, n_classes)`` logits of the TEST images.
        activations: ``(M, K)`` their feature activations.
        labels: ``(M,)`` their true classes.
        alphas: Miscoverage levels, each in (0, 1).
        class_attributes: ``(n_classes, A)`` class attribute vectors for :func:`set_coherence`,
            or None.

    Returns:
        ``{"n_calibration", "alphas", "results"}``, JSON-ready: ``results`` holds one entry per
        score (in :data:`SCORES` order) and alpha with "score", "alpha", "coverage",
        "mean_set_size", "empty_share" (the share of images whose set is empty: a score can
        leave out every class, e.g. the hierarchical one when the predicted path is weakly
        activated), "set_coherence" (None without attributes), "threshold" (None when
        infinite: every set is then all classes) and "level" (None except "hierarchical").
    """
    z, f = calibration._check_inputs(logits, activations)
    if f is None:
        raise ValueError("conformal_metrics needs the activations (for the hierarchical score)")
    y = _labels(labels, z.shape[0], z.shape[1])
    probabilities = softmax(z)
    paths = _ranked_paths(f, _class_features(calibration.weights), np.argmax(z, axis=1))
    results = []
    for score_name in SCORES:
        for alpha in alphas:
            threshold, level = calibration.threshold(score_name, float(alpha))
            sets = calibration._sets(score_name, float(alpha), probabilities, paths, None)
            coverage, size = coverage_and_size(sets, y)
            results.append(
                {
                    "score": score_name,
                    "alpha": float(alpha),
                    "coverage": coverage,
                    "mean_set_size": size,
                    "empty_share": float(np.mean([len(s) == 0 for s in sets])),
                    "set_coherence": set_coherence(sets, class_attributes),
                    "threshold": threshold if math.isfinite(threshold) else None,
                    "level": level,
                }
            )
    return {
        "n_calibration": calibration.n_calibration,
        "alphas": [float(alpha) for alpha in alphas],
        "results": results,
    }


_SCORE_LABELS = {"hierarchical": "hierarchical", "aps": "APS", "thr": "THR"}


def format_conformal_table(conformal: dict[str, Any]) -> str:
    """A plain-text table of :func:`conformal_metrics`: per alpha, each score's coverage (%),
    mean set size and Set Coherence (%, "-" without class attributes).

    Example:
        >>> row = {"score": "thr", "alpha": 0.1, "coverage": 0.9, "mean_set_size": 1.5,
        ...        "set_coherence": None, "threshold": 0.8, "level": None}
        >>> print(format_conformal_table({"n_calibration": 10, "alphas": [0.1], "results": [row]}))
        Calibrated prediction sets (10 held-out training images; test split)
        alpha  target  THR cover  THR size  THR coher.
        0.1     90.0%      90.0%      1.50           -
    """
    results = conformal["results"]
    scores = [s for s in SCORES if any(row["score"] == s for row in results)]
    headers = ["alpha", "target"]
    for score in scores:
        label = _SCORE_LABELS[score]
        headers += [f"{label} cover", f"{label} size", f"{label} coher."]
    lines = [headers]
    for alpha in conformal["alphas"]:
        cells = [f"{alpha:g}", f"{100 * (1 - alpha):.1f}%"]
        for score in scores:
            row = next(r for r in results if r["score"] == score and r["alpha"] == alpha)
            coherence = row["set_coherence"]
            cells += [
                f"{100 * row['coverage']:.1f}%",
                f"{row['mean_set_size']:.2f}",
                "-" if coherence is None else f"{100 * coherence:.1f}%",
            ]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    rendered = [
        "  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])])
        for line in lines
    ]
    title = (
        f"Calibrated prediction sets ({conformal['n_calibration']} held-out training images; "
        "test split)"
    )
    return "\n".join([title, *rendered])
