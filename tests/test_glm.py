"""Tests of the glm-saga-style regularisation paths (openqpm.sparsify.glm)."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression

from openqpm.sparsify.glm import (
    PathEntry,
    fit_path,
    max_lambda,
    objective,
    select_features,
    standardise,
)

PLANTED = (2, 5, 7)
# scikit-learn >= 1.8 reads the penalty from l1_ratio; older versions need penalty="elasticnet"
_PENALTY = (
    {}
    if inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated"
    else {"penalty": "elasticnet"}
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These problems are tiny: one thread avoids OpenMP spin-waits on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _problem(
    n: int = 150, n_features: int = 6, n_classes: int = 3, informative: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Standardised Gaussian features; labels from a random linear model on the first columns."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_features))
    w = rng.normal(size=(n_classes, n_features))
    w[:, informative:] = 0.0
    labels = (x @ w.T + rng.gumbel(size=(n, n_classes))).argmax(axis=1)
    standardised, _, _ = standardise(x)
    return standardised, labels


def _planted(
    n: int = 600, n_features: int = 12, n_classes: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Labels depend only on the columns PLANTED; the rest is noise."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, n_features))
    mixing = 3.0 * rng.normal(size=(n_classes, len(PLANTED)))
    labels = (x[:, list(PLANTED)] @ mixing.T + 0.5 * rng.gumbel(size=(n, n_classes))).argmax(axis=1)
    return x, labels


def _ce_gradient(
    x: np.ndarray, labels: np.ndarray, entry: PathEntry
) -> tuple[np.ndarray, np.ndarray]:
    """Gradient of the mean cross-entropy w.r.t. (W, b), in numpy."""
    probabilities = softmax(x @ entry.weight.T + entry.bias, axis=1)  # (N, C)
    residual = probabilities - np.eye(entry.weight.shape[0])[labels]
    return residual.T @ x / len(labels), residual.mean(axis=0)


# ----------------------------------------------------------------------------- standardise, objective


def test_standardise_population_std_and_constant_column() -> None:
    x = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 2.0], [5.0, 5.0, 8.0]])
    standardised, mean, std = standardise(x)
    assert mean == pytest.approx([3.0, 5.0, 4.0])
    assert std == pytest.approx(
        [math.sqrt(8 / 3), 1.0, math.sqrt(8.0)]
    )  # divides by N; constant: 1
    assert np.array_equal(standardised[:, 1], np.zeros(3))
    assert standardised == pytest.approx((x - mean) / std)
    assert standardise(x.astype(np.float32))[0].dtype == np.float32


def test_objective_hand_computed() -> None:
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    labels = np.array([0, 1])
    weight = np.array([[3.0, 0.0], [-4.0, 0.0]])
    bias = np.array([0.0, 1.0])
    # logits row 0: (3, -3) -> CE = log(1 + e^-6); row 1: (0, 1) -> CE = log(1 + e^-1)
    ce = 0.5 * (math.log1p(math.exp(-6.0)) + math.log1p(math.exp(-1.0)))
    plain = objective(x, labels, weight, bias, lam=0.1, alpha=0.5, group=False)
    group = objective(x, labels, weight, bias, lam=0.1, alpha=0.5, group=True)
    assert plain == pytest.approx(ce + 0.1 * (0.5 * 7.0 + 0.25 * 25.0))  # sum |W| = 7
    assert group == pytest.approx(ce + 0.1 * (0.5 * 5.0 + 0.25 * 25.0))  # column norm = 5


# ----------------------------------------------------------------------------- against scikit-learn


@pytest.mark.parametrize(
    ("alpha", "fraction"),
    [(0.5, 0.3), (0.5, 0.1), (0.5, 0.03), (1.0, 0.1), (1.0, 0.03), (0.05, 0.1), (0.0, None)],
)
def test_fit_matches_sklearn_elastic_net(alpha: float, fraction: float | None) -> None:
    x, labels = _problem()
    n = len(labels)
    # a fraction of lambda_max; pure ridge (alpha 0) has no lambda_max, take lam = 0.05
    lam = (
        0.05
        if fraction is None
        else fraction * max_lambda(x, labels, n_classes=3, alpha=alpha, group=False)
    )
    ours = fit_path(
        x,
        labels,
        n_classes=3,
        alpha=alpha,
        lambdas=[lam],
        tolerance=1e-13,
        lookbehind=5,
        max_iterations=20_000,
    )[0]
    reference = LogisticRegression(
        C=1.0 / (n * lam), l1_ratio=alpha, solver="saga", tol=1e-12, max_iter=1_000_000, **_PENALTY
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FutureWarnings about penalty/l1_ratio in some versions
        reference.fit(x, labels)
    assert reference.coef_.shape == ours.weight.shape  # multinomial: one row per class
    assert np.array_equal(ours.weight != 0, reference.coef_ != 0)
    if alpha > 0:
        assert 0 < ours.n_nonzero < ours.weight.size  # the support comparison means something
    mine = objective(x, labels, ours.weight, ours.bias, lam=lam, alpha=alpha, group=False)
    theirs = objective(
        x, labels, reference.coef_, reference.intercept_, lam=lam, alpha=alpha, group=False
    )
    assert mine <= theirs + 1e-9 * abs(theirs)
    assert mine == pytest.approx(theirs, rel=1e-8)
    assert ours.weight == pytest.approx(reference.coef_, abs=1e-4)


# ----------------------------------------------------------------------------- group KKT, lambda_max


def test_group_solution_satisfies_kkt() -> None:
    x, labels = _problem(n=200, n_features=8, n_classes=4, informative=4, seed=3)
    alpha = 0.8
    lam = 0.2 * max_lambda(x, labels, n_classes=4, alpha=alpha, group=True)
    entry = fit_path(
        x,
        labels,
        n_classes=4,
        alpha=alpha,
        group=True,
        lambdas=[lam],
        tolerance=1e-13,
        lookbehind=5,
        max_iterations=20_000,
    )[0]
    grad_w, grad_b = _ce_gradient(x, labels, entry)
    norms = np.linalg.norm(entry.weight, axis=0)
    zero, used = norms == 0, norms > 0
    assert zero.any() and used.any()
    assert np.all(np.linalg.norm(grad_w[:, zero], axis=0) <= lam * alpha + 1e-7)
    w_used = entry.weight[:, used]
    stationarity = grad_w[:, used] + lam * (alpha * w_used / norms[used] + (1 - alpha) * w_used)
    assert np.abs(stationarity).max() < 1e-6
    assert np.abs(grad_b).max() < 1e-6  # the bias is unpenalised
    assert entry.n_features_used == int(used.sum())


@pytest.mark.parametrize("group", [False, True])
def test_max_lambda_is_the_zero_threshold(group: bool) -> None:
    x, labels = _problem(seed=4)
    alpha = 0.8
    lam_max = max_lambda(x, labels, n_classes=3, alpha=alpha, group=group)
    centred = np.eye(3)[labels] - np.eye(3)[labels].mean(axis=0)
    grad = centred.T @ x / len(labels)  # (C, F)
    score = np.linalg.norm(grad, axis=0).max() if group else np.abs(grad).max()
    assert lam_max == pytest.approx(score / alpha)
    above, below = fit_path(
        x,
        labels,
        n_classes=3,
        alpha=alpha,
        group=group,
        lambdas=[1.001 * lam_max, 0.99 * lam_max],
        tolerance=1e-10,
    )
    assert above.n_nonzero == 0
    assert below.n_nonzero > 0


def test_max_lambda_alpha_floor() -> None:
    x, labels = _problem(seed=4)
    at_floor = max_lambda(x, labels, n_classes=3, alpha=1e-3, group=False)
    assert max_lambda(x, labels, n_classes=3, alpha=1e-5, group=False) == pytest.approx(at_floor)


# ----------------------------------------------------------------------------- the path


def test_path_grid_and_entries() -> None:
    x, labels = _problem(seed=5)
    calls: list[tuple[int, int]] = []
    path = fit_path(
        x,
        labels,
        n_classes=3,
        alpha=0.99,
        n_lambdas=12,
        lambda_min_ratio=1e-2,
        include_zero=True,
        progress=lambda done, total: calls.append((done, total)),
    )
    lam_max = max_lambda(x, labels, n_classes=3, alpha=0.99, group=False)
    lams = [entry.lam for entry in path]
    assert lams[:-1] == pytest.approx(np.geomspace(lam_max, 1e-2 * lam_max, 12).tolist())
    assert lams[-1] == 0.0
    assert calls == [(i, 13) for i in range(1, 14)]
    assert path[0].n_nonzero == 0 and path[-1].n_nonzero == path[-1].weight.size
    assert path[0].accuracy < path[-2].accuracy and path[-2].loss < path[0].loss
    for entry in path:
        assert entry.weight.shape == (3, 6) and entry.weight.dtype == np.float64
        assert entry.n_nonzero == np.count_nonzero(entry.weight)
        assert entry.n_features_used == np.count_nonzero(np.any(entry.weight != 0, axis=0))
        assert entry.loss == pytest.approx(
            objective(x, labels, entry.weight, entry.bias, lam=0.0, alpha=0.0, group=False)
        )


def test_path_stop_is_deterministic_and_warm_start_agrees_with_cold() -> None:
    x, labels = _problem(n=200, n_features=10, seed=6)
    settings = {"n_classes": 3, "alpha": 0.9, "n_lambdas": 20, "tolerance": 1e-12, "lookbehind": 3}
    first = fit_path(x, labels, **settings, stop=lambda entry: entry.n_features_used >= 4)
    second = fit_path(x, labels, **settings, stop=lambda entry: entry.n_features_used >= 4)
    assert first[-1].n_features_used >= 4 and all(entry.n_features_used < 4 for entry in first[:-1])
    assert len(first) < 20
    assert all(
        np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias)
        for a, b in zip(first, second)
    )
    warm = first[-1]
    cold = fit_path(
        x, labels, n_classes=3, alpha=0.9, lambdas=[warm.lam], tolerance=1e-12, lookbehind=3
    )[0]
    assert np.array_equal(warm.weight != 0, cold.weight != 0)
    assert warm.weight == pytest.approx(cold.weight, abs=1e-6)


def test_float32_path_close_to_float64() -> None:
    x, labels = _problem(seed=7)
    exact = fit_path(
        x, labels, n_classes=3, alpha=0.99, n_lambdas=8, lambda_min_ratio=1e-2, tolerance=1e-10
    )
    single = fit_path(
        x.astype(np.float32),
        labels,
        n_classes=3,
        alpha=0.99,
        n_lambdas=8,
        lambda_min_ratio=1e-2,
        tolerance=1e-6,
    )
    for a, b in zip(exact, single):
        assert b.weight.dtype == np.float64  # numpy out is float64 whatever the computation
        value_a = objective(x, labels, a.weight, a.bias, lam=a.lam, alpha=0.99, group=False)
        value_b = objective(x, labels, b.weight, b.bias, lam=a.lam, alpha=0.99, group=False)
        assert value_b == pytest.approx(value_a, rel=1e-4)


def test_fit_path_rejects_bad_arguments() -> None:
    x, labels = _problem()
    with pytest.raises(ValueError, match="alpha"):
        fit_path(x, labels, n_classes=3, alpha=1.5)
    with pytest.raises(ValueError, match="labels"):
        fit_path(x, labels, n_classes=2, alpha=0.5)
    with pytest.raises(ValueError, match="lambdas"):
        fit_path(x, labels, n_classes=3, alpha=0.5, lambdas=[-1.0])
    with pytest.raises(ValueError, match="lambda_max is 0"):
        fit_path(np.zeros((10, 3)), labels[:10], n_classes=3, alpha=0.5)


# ----------------------------------------------------------------------------- selection


def test_select_features_finds_planted_columns_first() -> None:
    x, labels = _planted()
    assert select_features(x, labels, n_classes=4, n_features=3).tolist() == list(PLANTED)
    five = select_features(x, labels, n_classes=4, n_features=5)
    assert len(five) == 5 and len(set(five.tolist())) == 5
    assert np.all(np.diff(five) > 0)
    assert set(PLANTED) <= set(five.tolist())


def test_select_features_admits_simultaneous_columns_by_group_norm() -> None:
    x, labels = _planted()
    # a two-lambda path: nothing at lambda_max, several columns at once at 0.3 lambda_max
    settings = {"n_classes": 4, "alpha": 0.8, "n_lambdas": 2, "lambda_min_ratio": 0.3}
    entry = fit_path(standardise(x)[0], labels, group=True, **settings)[1]
    norms = np.linalg.norm(entry.weight, axis=0)
    assert entry.n_features_used >= 3
    expected = np.sort(np.argsort(-norms, kind="stable")[:2])
    assert np.array_equal(select_features(x, labels, n_features=2, **settings), expected)


def test_select_features_ignores_column_scale() -> None:
    x, labels = _planted()
    scales = np.random.default_rng(2).uniform(0.01, 100.0, size=x.shape[1])
    plain = select_features(x, labels, n_classes=4, n_features=4)
    scaled = select_features(x * scales, labels, n_classes=4, n_features=4)
    assert np.array_equal(plain, scaled)  # standardised internally


def test_select_features_fills_when_the_path_ends_short() -> None:
    x, labels = _planted()
    # a two-lambda path that stops at 0.9 lambda_max admits at most a column or two
    short = select_features(x, labels, n_classes=4, n_features=6, n_lambdas=2, lambda_min_ratio=0.9)
    assert short.dtype == np.int64 and len(short) == 6 and len(set(short.tolist())) == 6
    assert np.all(np.diff(short) > 0)
    assert set(PLANTED) <= set(short.tolist())  # the gradient ranks the signal columns first


def test_package_exports_lazily() -> None:
    from openqpm import sparsify

    assert sparsify.fit_path is fit_path and sparsify.PathEntry is PathEntry
    assert set(sparsify.__all__) <= set(dir(sparsify))
    assert all(getattr(sparsify, name) is not None for name in sparsify.__all__)


def test_select_features_counts() -> None:
    x, labels = _planted()
    with pytest.raises(ValueError, match=r"n_features=13 of 12"):
        select_features(x, labels, n_classes=4, n_features=13)
    with pytest.raises(ValueError, match=r"n_features=0 of 12"):
        select_features(x, labels, n_classes=4, n_features=0)
    assert select_features(x, labels, n_classes=4, n_features=12).tolist() == list(range(12))
