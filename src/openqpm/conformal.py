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

The hierarchy (CHiQPM): a QPM assigns each class exactly ``k`` of ``K`` features (a binary
weight matrix ``W`` of shape ``(n_classes, K)``). For one image with feature activations ``f``,
each class's features are sorted by activation, strongest first (ties: lower feature index
first). The *depth* of a class is the length of the longest common prefix of its sorted feature
list with the predicted class's sorted list. Level ``j`` (``0 <= j <= k``) holds the classes of
depth at least ``j``: level 0 is every class, level 1 the classes whose strongest feature is the
predicted class's strongest feature, ..., level ``k`` the classes with the predicted class's
``k`` features in the same order (only the prediction itself when the rows of ``W`` differ).
Levels are nested. The hierarchical score of a class is ``k - depth``, so the set for an integer
threshold ``t`` is level ``k - t``: calibrating picks the deepest level whose calibration coverage
reaches the conformal quantile (at least ``1 - alpha``).

This module uses numpy only (no torch).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "aps_scores",
    "aps_sets",
    "calibrate",
    "coverage_and_size",
    "hierarchical_scores",
    "hierarchical_sets",
    "hierarchy_depths",
    "hierarchy_levels",
    "level_for_threshold",
    "softmax",
    "split_calibration",
    "thr_scores",
    "thr_sets",
]

_SUM_TOLERANCE = 1e-4


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
        pred = np.argmax(f @ np.asarray(weights, dtype=np.float64).T, axis=1)
    else:
        pred = _labels(predictions, f.shape[0], features.shape[0])
    values = f[:, features]  # (N, n_classes, k)
    order = np.argsort(-values, axis=2, kind="stable")
    ranked = np.take_along_axis(np.broadcast_to(features, values.shape), order, axis=2)
    same = ranked == ranked[np.arange(f.shape[0]), pred][:, None, :]
    return np.cumprod(same, axis=2).sum(axis=2).astype(np.int64)


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


def hierarchical_scores(
    activations: ArrayLike,
    weights: ArrayLike,
    labels: ArrayLike,
    predictions: ArrayLike | None = None,
) -> NDArray[np.float64]:
    """CHiQPM score: ``k - depth`` of the true class (0 when it shares the prediction's path).

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
    """The hierarchy level whose classes are those with score ``<= threshold``.

    ``k - floor(threshold)``, clipped to [0, k]: a threshold of 0 keeps level ``k``, ``inf``
    (and anything ``>= k``) level 0, every class.
    """
    if math.isinf(threshold) and threshold > 0:
        return 0
    return int(min(k, max(0, k - math.floor(threshold))))


def hierarchical_sets(
    activations: ArrayLike,
    weights: ArrayLike,
    threshold: float,
    predictions: ArrayLike | None = None,
) -> list[NDArray[np.int64]]:
    """CHiQPM sets: for each image, its hierarchy level :func:`level_for_threshold`.

    Args:
        activations: ``(N, K)`` feature activations.
        weights: ``(n_classes, K)`` binary class-feature matrix, ``k`` ones per row.
        threshold: Output of :func:`calibrate` on :func:`hierarchical_scores`.
        predictions: ``(N,)`` predicted classes; default as in :func:`hierarchy_depths`.

    Returns:
        One ascending array of class indices per image (never empty: it holds the prediction).
    """
    depth = hierarchy_depths(activations, weights, predictions)
    level = level_for_threshold(threshold, _class_features(weights).shape[1])
    return _mask_to_sets(depth >= level)
