"""Choosing a path entry and compressing its weights, as the SLDD-Model and Q-SENN baselines do.

* SLDD-Model: :func:`sldd_entry` (the densest entry with at most ``2 * n_per_class`` nonzeros per
  class on average), then :func:`keep_largest` with ``n_per_class * n_classes`` weights. The
  authors' code keeps ``5 * n_classes`` whatever ``n_per_class`` is; callers pass
  ``n_per_class * n_classes``.
* Q-SENN: :func:`qsenn_entry` (the least-regularised entry with ``lam > 0``), :func:`ternary`
  weights in ``{-alpha, 0, +alpha}`` and :func:`qsenn_bias`.

Deviations from the authors' code (reference spec section 9), all in corner cases:

* Ties in ``|w|`` at the cut: the authors' threshold halfway between the ``n_keep``-th and the
  next value drops *all* tied weights there (fewer than ``n_keep`` survive); here exactly
  ``n_keep`` survive, ties broken by the row-major position (earlier first).
* The authors' bucketing maps a weight equal to ``-max|w|`` to ``+alpha`` and leaves it out of the
  mean; here every kept weight keeps its sign and enters the mean.
* Equal per-class counts in :func:`qsenn_bias`: the authors divide by zero; here every bias is 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from openqpm.sparsify.glm import PathEntry

__all__ = ["keep_largest", "qsenn_bias", "qsenn_entry", "sldd_entry", "ternary"]


def keep_largest(weight: np.ndarray, n_keep: int) -> np.ndarray:
    """Zero all but the ``n_keep`` largest-magnitude weights.

    Ties in magnitude are broken by row-major position (the earlier entry is kept), so the result
    is deterministic. With ``n_keep`` at least the number of nonzeros the weights are unchanged.

    Args:
        weight: (n_c, K) weights.
        n_keep: how many weights to keep, >= 0.

    Returns:
        A float64 copy of ``weight`` with at most ``n_keep`` nonzeros.

    Raises:
        ValueError: ``n_keep`` is negative.
    """
    if n_keep < 0:
        raise ValueError(f"n_keep must be >= 0, got {n_keep}")
    w = np.array(weight, dtype=np.float64)
    flat = w.reshape(-1)  # (n_c * K,) view, row-major
    order = np.argsort(-np.abs(flat), kind="stable")  # largest first, ties by position
    flat[order[n_keep:]] = 0.0
    return w


def ternary(weight: np.ndarray, n_keep: int) -> tuple[np.ndarray, float]:
    """Q-SENN's ternary weights: the ``n_keep`` largest ``|w|`` become ``sign(w) * alpha``.

    The authors keep the weights above a threshold halfway between the ``n_keep``-th and the
    ``(n_keep + 1)``-th largest ``|w|``; with distinct magnitudes that is exactly the ``n_keep``
    largest, which is what is kept here (ties as in :func:`keep_largest`). ``alpha`` is the mean
    ``|w|`` of the kept weights.

    Args:
        weight: (n_c, K) real weights.
        n_keep: how many weights stay nonzero (fewer if ``weight`` has fewer nonzeros).

    Returns:
        ``(ternary_weight, alpha)``: float64 weights in ``{-alpha, 0, +alpha}`` and alpha (0.0 if
        nothing is kept).

    Raises:
        ValueError: ``n_keep`` is negative.
    """
    kept = keep_largest(weight, n_keep)
    mask = kept != 0
    if not mask.any():
        return np.zeros_like(kept), 0.0
    alpha = float(np.abs(kept[mask]).mean())
    return np.sign(kept) * alpha, alpha


def qsenn_bias(bias: np.ndarray, ternary_weight: np.ndarray) -> np.ndarray:
    """Q-SENN's quantised bias.

    With ``B = max |b|`` and ``count_c`` = positive minus negative weights of class c, the bias is
    ``B - (count_c - min count) * 2B / (max count - min count)``, clipped to ``[-B, B]``: the
    classes with the fewest net positive weights get ``+B``, those with the most ``-B``. When all
    counts are equal the authors' code divides by zero; then every bias is 0 (a constant bias
    leaves every prediction unchanged).

    Args:
        bias: (n_c,) real biases of the chosen path entry.
        ternary_weight: (n_c, K) quantised weights (only their signs matter).

    Returns:
        (n_c,) float64 quantised biases.

    Raises:
        ValueError: ``bias`` and ``ternary_weight`` disagree on the number of classes.
    """
    b = np.asarray(bias, dtype=np.float64).reshape(-1)
    w = np.asarray(ternary_weight)
    if w.ndim != 2 or w.shape[0] != b.shape[0]:
        raise ValueError(f"bias has {b.shape[0]} classes, ternary_weight has shape {w.shape}")
    counts = (w > 0).sum(axis=1) - (w < 0).sum(axis=1)  # (n_c,)
    spread = int(counts.max() - counts.min())
    if spread == 0:
        return np.zeros_like(b)
    top = float(np.abs(b).max())
    quantised = top - (counts - counts.min()) * (2.0 * top / spread)
    return np.clip(quantised, -top, top)


def sldd_entry(path: Sequence[PathEntry], *, n_classes: int, n_per_class: int) -> PathEntry:
    """The SLDD-Model's entry: the densest one with at most ``2 * n_per_class`` nonzeros per class.

    Among the entries with ``0 < n_nonzero <= 2 * n_per_class * n_classes`` the densest is taken;
    of equally dense ones the first in path order (the most regularised, as the authors'
    ``argmax``). If none qualifies, the sparsest entry with any nonzero weight (again the first
    of equals). The authors' ``2 *`` is their ``drop_rate = 0.5``.

    Args:
        path: the path entries, in path order.
        n_classes: number of classes.
        n_per_class: the average number of weights per class the model aims at.

    Returns:
        The chosen entry.

    Raises:
        ValueError: the path is empty or all its weights are zero.
    """
    nonzero = [entry for entry in path if entry.n_nonzero > 0]
    if not nonzero:
        raise ValueError(f"no path entry has a nonzero weight (path of {len(path)} entries)")
    limit = 2 * n_per_class * n_classes
    fitting = [entry for entry in nonzero if entry.n_nonzero <= limit]
    if fitting:
        densest = max(entry.n_nonzero for entry in fitting)
        return next(entry for entry in fitting if entry.n_nonzero == densest)
    sparsest = min(entry.n_nonzero for entry in nonzero)
    return next(entry for entry in nonzero if entry.n_nonzero == sparsest)


def qsenn_entry(path: Sequence[PathEntry]) -> PathEntry:
    """Q-SENN's entry: the least-regularised one with ``lam > 0``.

    The authors drop glm-saga's final unregularised (``lam = 0``) entry and take the last of the
    rest; this takes the smallest positive lambda whatever the order (first of equals).

    Args:
        path: the path entries.

    Returns:
        The chosen entry.

    Raises:
        ValueError: no entry has ``lam > 0``.
    """
    positive = [entry for entry in path if entry.lam > 0]
    if not positive:
        raise ValueError(f"no path entry has lam > 0 (path of {len(path)} entries)")
    smallest = min(entry.lam for entry in positive)
    return next(entry for entry in positive if entry.lam == smallest)
