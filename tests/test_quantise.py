"""Tests of the SLDD-Model and Q-SENN weight compression (openqpm.sparsify.quantise)."""

from __future__ import annotations

import numpy as np
import pytest

from openqpm.sparsify.glm import PathEntry
from openqpm.sparsify.quantise import keep_largest, qsenn_bias, qsenn_entry, sldd_entry, ternary

WEIGHT = np.array([[0.5, -2.0, 0.1], [1.0, -0.3, 2.0]])


def _entry(lam: float, n_nonzero: int, tag: float = 0.0) -> PathEntry:
    """A (2, 10) entry with ``n_nonzero`` nonzeros; ``tag`` tells entries apart via the bias."""
    weight = np.zeros((2, 10))
    weight.reshape(-1)[:n_nonzero] = 1.0
    return PathEntry(
        lam=lam,
        weight=weight,
        bias=np.array([tag, 0.0]),
        n_nonzero=n_nonzero,
        n_features_used=int(np.count_nonzero(weight.any(axis=0))),
        loss=1.0,
        accuracy=0.5,
    )


def test_keep_largest_by_magnitude_ties_by_position() -> None:
    original = WEIGHT.copy()
    # |w| ranks: 2.0 (pos 1), 2.0 (pos 5), 1.0, 0.5, 0.3, 0.1
    assert np.array_equal(keep_largest(WEIGHT, 3), [[0.0, -2.0, 0.0], [1.0, 0.0, 2.0]])
    assert np.array_equal(
        keep_largest(WEIGHT, 1), [[0.0, -2.0, 0.0], [0.0, 0.0, 0.0]]
    )  # tie: earlier
    assert np.array_equal(keep_largest(WEIGHT, 6), WEIGHT)
    assert np.array_equal(keep_largest(WEIGHT, 100), WEIGHT)
    assert not keep_largest(WEIGHT, 0).any()
    assert np.array_equal(WEIGHT, original)  # input untouched
    with pytest.raises(ValueError, match="n_keep"):
        keep_largest(WEIGHT, -1)


def test_ternary_threshold_halfway_and_alpha() -> None:
    weight = np.array([[0.5, -2.0, 0.1], [1.0, -0.3, 3.0]])
    quantised, alpha = ternary(weight, 3)
    # kept |w|: 3, 2, 1 (everything above the halfway threshold (1.0 + 0.5) / 2 = 0.75)
    assert alpha == pytest.approx(2.0)
    assert np.array_equal(quantised, [[0.0, -2.0, 0.0], [2.0, 0.0, 2.0]])
    assert np.array_equal(np.abs(weight) > 0.75, quantised != 0)
    # the largest magnitude negative keeps its sign (the authors' bucketing flips it)
    flipped, alpha_neg = ternary(np.array([[-4.0, 1.0, 0.2]]), 2)
    assert alpha_neg == pytest.approx(2.5)
    assert np.array_equal(flipped, [[-2.5, 2.5, 0.0]])


def test_ternary_fewer_nonzeros_than_asked_and_nothing_kept() -> None:
    quantised, alpha = ternary(np.array([[0.0, 0.5], [-1.5, 0.0]]), 5)
    assert alpha == pytest.approx(1.0)
    assert np.array_equal(quantised, [[0.0, 1.0], [-1.0, 0.0]])
    zeros, alpha_zero = ternary(WEIGHT, 0)
    assert alpha_zero == 0.0 and not zeros.any()


def test_qsenn_bias_steps_from_plus_to_minus_b() -> None:
    a = 0.7
    ternary_weight = np.array(
        [
            [a, a, 0.0, 0.0],  # count +2
            [a, -a, 0.0, 0.0],  # count 0
            [-a, 0.0, -a, 0.0],  # count -2
            [a, 0.0, 0.0, 0.0],  # count +1
        ]
    )
    bias = np.array([0.5, -1.5, 1.0, 0.2])  # B = 1.5; step 2B / (2 - (-2)) = 0.75
    quantised = qsenn_bias(bias, ternary_weight)
    assert quantised == pytest.approx([-1.5, 0.0, 1.5, -0.75])
    assert np.all(np.abs(quantised) <= 1.5)  # clipped range; the extremes reach it exactly


def test_qsenn_bias_equal_counts_gives_zero() -> None:
    bias = np.array([1.0, 2.0, -3.0])
    # counts 1, 1, 1 (one +1 and no -1; two +1 and one -1; one +1): the authors divide by zero
    equal = np.array([[0.3, 0.0, 0.0], [0.3, 0.3, -0.3], [0.0, 0.0, 0.3]])
    assert np.array_equal(qsenn_bias(bias, equal), np.zeros(3))
    # counts 1, -1, 0: B = 3, step 2B / 2 = 3
    unequal = np.array([[0.3, 0.0, 0.0], [0.0, -0.3, 0.0], [0.3, -0.3, 0.0]])
    assert qsenn_bias(bias, unequal) == pytest.approx([-3.0, 3.0, 0.0])
    with pytest.raises(ValueError, match="classes"):
        qsenn_bias(np.zeros(2), equal)


def test_sldd_entry_densest_within_twice_n_per_class() -> None:
    path = [
        _entry(1.0, 0, 0),
        _entry(0.5, 2, 1),
        _entry(0.2, 5, 2),
        _entry(0.1, 7, 3),
        _entry(0.05, 7, 4),
        _entry(0.0, 12, 5),
    ]
    chosen = sldd_entry(path, n_classes=2, n_per_class=2)  # at most 2 * 2 * 2 = 8 nonzeros
    assert chosen.bias[0] == 3  # the first of the two entries with 7 nonzeros
    assert sldd_entry(path, n_classes=2, n_per_class=3).bias[0] == 5  # limit 12: the lam = 0 entry
    assert sldd_entry(path, n_classes=2, n_per_class=0).bias[0] == 1  # none fits: sparsest nonzero
    with pytest.raises(ValueError, match="nonzero"):
        sldd_entry([_entry(1.0, 0)], n_classes=2, n_per_class=2)


def test_qsenn_entry_least_regularised_positive_lambda() -> None:
    path = [_entry(1.0, 0, 0), _entry(0.5, 2, 1), _entry(0.1, 5, 2), _entry(0.0, 12, 3)]
    assert qsenn_entry(path).bias[0] == 2
    assert qsenn_entry(list(reversed(path))).bias[0] == 2
    with pytest.raises(ValueError, match="lam > 0"):
        qsenn_entry([_entry(0.0, 3)])
