"""Sparse multinomial logistic regression paths: the problem glm-saga solves, solved full-batch.

The SLDD-Model, Q-SENN and glm-saga5 baselines fit their last layer with glm-saga (Wong et al.,
2021) on a dense model's pooled features. This module solves the same problem along the same
regularisation path, deterministically and on the whole data at once. For features X (N, F),
labels y and classes C, a path entry at strength ``lam`` minimises over W (C, F) and b (C,)::

    mean_i CE(X_i W^T + b, y_i) + lam * (alpha * P1(W) + (1 - alpha) / 2 * ||W||_F^2)

with P1(W) = sum |W| (elastic net) or, with ``group=True``, the sum over feature columns of the
Euclidean norm of W[:, j] (group sparsity over the classes: a column is used by all classes or
by none). The bias is not penalised.

Solver: FISTA (accelerated proximal gradient) with a backtracking line search and a function-value
restart that keeps the objective monotone; the ridge term is part of the proximal operator. Along
the path every solve is warm-started from the previous one and only sees the columns that the
sequential strong rule (Tibshirani et al., 2012) keeps; after each solve the KKT conditions of the
discarded columns are checked on the full gradient and violators are added, so the screening never
changes the solution. A solve stops when the objective's relative decrease stayed below
``tolerance`` for ``lookbehind`` consecutive iterations (default 5, the authors' value), or after
``max_iterations``. Nothing is random.

Differences from glm-saga: glm-saga runs SAGA on mini-batches of a 90 % split and measures
``lookbehind`` in epochs with an absolute tolerance; here every iteration sees all given rows and
the tolerance is relative. The path's lambdas (``max_lambda`` down to ``lambda_min_ratio`` of it,
log-spaced; glm-saga's optional final ``lam = 0`` entry with ``include_zero``) are glm-saga's.

Memory: the features are held in memory as one (N, F) tensor (the caller subsamples), plus one
copy of the columns the strong rule keeps and a few (N, C) arrays: O(N * F + N * C). Time per
iteration: two (N, |active|, C) matrix products; per lambda one more (N, F, C) product for the
KKT check.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import logsumexp

__all__ = [
    "ALPHA_FLOOR",
    "STD_FLOOR",
    "PathEntry",
    "fit_path",
    "max_lambda",
    "objective",
    "select_features",
    "standardise",
]

logger = logging.getLogger(__name__)

STD_FLOOR = 1e-8  # a column whose standard deviation is below this is treated as constant
ALPHA_FLOOR = 1e-3  # glm-saga divides lambda_max by max(alpha, ALPHA_FLOOR)

_GROWTH = 1.25  # the step tried next is the last accepted one times this
_MAX_BACKTRACKS = 60
_TINY = 1e-300

Device = str | torch.device


@dataclass(frozen=True, eq=False)
class PathEntry:
    """One solution of the regularisation path.

    Attributes:
        lam: the regularisation strength.
        weight: (n_c, n_f) float64 weights.
        bias: (n_c,) float64 biases.
        n_nonzero: nonzero weights.
        n_features_used: feature columns with at least one nonzero weight.
        loss: mean cross-entropy on the given rows (no penalty).
        accuracy: accuracy on the given rows, in [0, 1].
        n_iterations: solver iterations spent on this entry (all KKT rounds together).
    """

    lam: float
    weight: np.ndarray
    bias: np.ndarray
    n_nonzero: int
    n_features_used: int
    loss: float
    accuracy: float
    n_iterations: int = 0


# ----------------------------------------------------------------------------- public helpers


def standardise(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardise every column to mean 0 and (population) standard deviation 1.

    A column whose standard deviation is below :data:`STD_FLOOR` (a constant column) gets std 1,
    so it becomes its mean-removed values (zeros for an exactly constant column) instead of a
    division by zero. Statistics are computed in float64.

    Args:
        features: (N, F) features.

    Returns:
        ``(standardised, mean, std)``: the (N, F) standardised features (float32 for float32
        input, else float64) and the (F,) float64 mean and floored std, so that
        ``standardised == (features - mean) / std``.

    Raises:
        ValueError: ``features`` is not a non-empty 2-D array.
    """
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (N, F) array, got shape {x.shape}")
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64)  # divides by N, as the authors' metadata does
    std = np.where(std >= STD_FLOOR, std, 1.0)
    out_dtype = np.float32 if x.dtype == np.float32 else np.float64
    # computed in the output dtype: no float64 (N, F) temporary for float32 features
    standardised = (x.astype(out_dtype, copy=False) - mean.astype(out_dtype)) / std.astype(
        out_dtype
    )
    return standardised, mean, std


def objective(
    features: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    lam: float,
    alpha: float,
    group: bool,
) -> float:
    """The path's objective at (weight, bias), in float64 numpy (independent of the solver).

    Args:
        features: (N, F) features.
        labels: (N,) class ids.
        weight: (C, F) weights.
        bias: (C,) biases.
        lam: regularisation strength.
        alpha: elastic-net mixing in [0, 1] (1: pure L1 or group penalty).
        group: group penalty over classes (column norms) instead of entrywise L1.

    Returns:
        Mean cross-entropy plus ``lam * (alpha * P1(W) + (1 - alpha) / 2 * ||W||_F^2)``.
    """
    x = np.asarray(features, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    logits = x @ w.T + np.asarray(bias, dtype=np.float64)  # (N, C)
    cross_entropy = float(np.mean(logsumexp(logits, axis=1) - logits[np.arange(len(y)), y]))
    p1 = float(np.linalg.norm(w, axis=0).sum()) if group else float(np.abs(w).sum())
    return cross_entropy + lam * (alpha * p1 + 0.5 * (1.0 - alpha) * float((w * w).sum()))


def max_lambda(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    n_classes: int,
    alpha: float,
    group: bool,
    device: Device = "cpu",
    dtype: torch.dtype | None = None,
) -> float:
    """The path's first lambda: the smallest at which every weight is zero (for alpha >= 1e-3).

    At W = 0 the optimal bias gives the class frequencies as predictions, so the gradient of the
    mean cross-entropy is ``G = (Ybar - Y)^T X / N`` (C, F) and W = 0 is optimal iff every column
    score (``||G[:, j]||_2`` with ``group``, ``max_c |G[c, j]|`` without) is at most
    ``lam * alpha``. As glm-saga does, the largest score is divided by ``max(alpha, 1e-3)``; for
    alpha below 1e-3 the result is therefore only glm-saga's starting point, not a zero solution.

    Args:
        features: (N, F) features (standardised, as the path expects).
        labels: (N,) class ids in ``[0, n_classes)``.
        n_classes: number of classes.
        alpha: elastic-net mixing in [0, 1].
        group: group penalty over classes.
        device: torch device of the computation.
        dtype: torch dtype of the computation (None: float32 for float32 input, else float64).

    Returns:
        lambda_max.

    Raises:
        ValueError: features not a non-empty (N, F) array, or labels outside ``[0, n_classes)``.
    """
    x, onehot, _ = _prepare(features, labels, n_classes, device, dtype)
    return _max_lambda(x, onehot, alpha, group)


# ----------------------------------------------------------------------------- the path


def fit_path(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    n_classes: int,
    alpha: float,
    n_lambdas: int = 100,
    lambda_min_ratio: float = 1e-3,
    group: bool = False,
    max_iterations: int = 1000,
    tolerance: float = 1e-4,
    lookbehind: int | None = 5,
    lambdas: Sequence[float] | None = None,
    include_zero: bool = False,
    stop: Callable[[PathEntry], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
    device: Device = "cpu",
    dtype: torch.dtype | None = None,
) -> list[PathEntry]:
    """Fit the warm-started regularisation path from lambda_max down.

    The features are used as given: glm-saga's problem assumes standardised columns (use
    :func:`standardise`). Memory is O(N * F) for the features (see the module docstring).

    Args:
        features: (N, F) features.
        labels: (N,) class ids in ``[0, n_classes)``.
        n_classes: number of classes.
        alpha: elastic-net mixing in [0, 1] (glm-saga: 0.99 for the sparse layer).
        n_lambdas: lambdas of the path, log-spaced from :func:`max_lambda` down (the first is
            ``max_lambda * (1 + sqrt(eps))`` of the dtype, so that it is all zero despite rounding).
        lambda_min_ratio: the last lambda divided by the first.
        group: group penalty over classes (feature selection) instead of entrywise L1.
        max_iterations: iteration cap of every solve.
        tolerance: a solve stops once the relative objective decrease stays below this ...
        lookbehind: ... for this many consecutive iterations (None: 1). The default 5 is the
            authors' value for the sparse layer's path; 1 stops too early on the path's
            ill-conditioned tail (relative objective gaps of a few percent there).
        lambdas: explicit lambdas (any order, each >= 0) instead of the log-spaced grid; then
            ``n_lambdas`` and ``lambda_min_ratio`` are ignored.
        include_zero: append glm-saga's unregularised ``lam = 0`` entry.
        stop: called with every new entry; returning True ends the path after that entry.
        progress: called as ``progress(done, total)`` after every entry.
        device: torch device of the computation.
        dtype: torch dtype (None: float32 for float32 features, else float64).

    Returns:
        The path entries in the order solved (decreasing lambda for the default grid).

    Raises:
        ValueError: bad arguments or labels, or a lambda_max of 0 (no column carries any signal).
    """
    _check_path_arguments(alpha, n_lambdas, lambda_min_ratio, max_iterations, tolerance, lookbehind)
    x, onehot, y = _prepare(features, labels, n_classes, device, dtype)
    if lambdas is None:
        # a hair above lambda_max, so that rounding cannot leave a weight nonzero there
        lam_max = _max_lambda(x, onehot, alpha, group) * (1.0 + math.sqrt(torch.finfo(x.dtype).eps))
        if not lam_max > 0:
            raise ValueError("lambda_max is 0: no feature column correlates with the labels")
        grid = np.geomspace(lam_max, lam_max * lambda_min_ratio, n_lambdas).tolist()
    else:
        grid = [float(lam) for lam in lambdas]
        if any(not lam >= 0 for lam in grid):
            raise ValueError(f"lambdas must be >= 0, got {grid}")
    if include_zero:
        grid.append(0.0)
    settings = _Settings(alpha, group, max_iterations, tolerance, lookbehind or 1)
    state = _PathState(x, onehot, y, settings)
    entries: list[PathEntry] = []
    for lam in grid:
        entries.append(state.advance(lam))
        if progress is not None:
            progress(len(entries), len(grid))
        if stop is not None and stop(entries[-1]):
            break
    capped = sum(entry.n_iterations >= max_iterations for entry in entries)
    if capped:
        logger.warning(
            "%d of %d path entries hit max_iterations=%d", capped, len(entries), max_iterations
        )
    return entries


def select_features(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    n_classes: int,
    n_features: int,
    alpha: float = 0.8,
    n_lambdas: int = 100,
    lambda_min_ratio: float = 1e-4,
    max_iterations: int = 1000,
    tolerance: float = 1e-4,
    lookbehind: int | None = 3,
    progress: Callable[[int, int], None] | None = None,
    device: Device = "cpu",
    dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Choose ``n_features`` columns with the group-sparse path (SLDD-Model / Q-SENN selection).

    The features are standardised (:func:`standardise`) and the ``group=True`` path is followed
    from lambda_max down; columns are admitted in the order in which they first become nonzero
    (an admitted column stays admitted). Columns that first become nonzero at the same lambda are
    admitted by the Euclidean norm of their weight column, largest first (ties: lower id), only
    as many as are still needed; the path stops as soon as ``n_features`` are admitted.

    If the path reaches its last lambda with fewer columns, the rest are filled by the norm of
    the loss gradient's column at the last entry (largest first): those columns are all zero
    there, so their weights cannot rank them, while the gradient norm is exactly what decides
    which column the group path would admit next were it continued. (Bisecting between the last
    two lambdas cannot help here: the last lambda already has the most columns.)

    The authors' code differs: it restarts the path from 0.1 * lambda_max after every admitted
    column and lets a modified proximal operator admit at most one new column (the largest-norm
    one) per step, keeping admitted columns unthresholded. Both admit columns one at a time by
    the group norm; the path order here is the standard group-lasso entry order.

    Args:
        features: (N, F) raw (unstandardised) features; memory O(N * F).
        labels: (N,) class ids in ``[0, n_classes)``.
        n_classes: number of classes.
        n_features: columns to select, 1 <= n_features <= F.
        alpha: elastic-net mixing of the group path (authors: 0.8).
        n_lambdas: lambdas of the path.
        lambda_min_ratio: the last lambda divided by lambda_max (the authors' path reaches
            1e-4 lambda_max); a smaller value costs nothing unless it is reached.
        max_iterations: iteration cap of every solve.
        tolerance: relative objective tolerance of every solve.
        lookbehind: iterations without sufficient decrease before a solve stops (None: 1;
            the default 3 is the authors' value for the selection).
        progress: called as ``progress(done, total)`` after every path entry.
        device: torch device of the computation.
        dtype: torch dtype (None: float32 for float32 features, else float64).

    Returns:
        (n_features,) int64 column ids, ascending.

    Raises:
        ValueError: ``n_features`` outside ``[1, F]``.
    """
    n_columns = np.shape(features)[1] if np.ndim(features) == 2 else 0
    if not 1 <= n_features <= n_columns:
        raise ValueError(f"cannot select n_features={n_features} of {n_columns} feature columns")
    if n_features == n_columns:
        return np.arange(n_columns, dtype=np.int64)
    standardised, _, _ = standardise(features)
    admission = _Admission(n_features)
    path = fit_path(
        standardised,
        labels,
        n_classes=n_classes,
        alpha=alpha,
        n_lambdas=n_lambdas,
        lambda_min_ratio=lambda_min_ratio,
        group=True,
        max_iterations=max_iterations,
        tolerance=tolerance,
        lookbehind=lookbehind,
        stop=admission,
        progress=progress,
        device=device,
        dtype=dtype,
    )
    order = admission.order
    if len(order) < n_features:
        logger.info(
            "group path ended with %d of %d columns; filling by gradient norm",
            len(order),
            n_features,
        )
        scores = _gradient_scores(standardised, labels, path[-1], n_classes, device, dtype)  # (F,)
        scores[order] = -np.inf
        ranked = sorted(range(n_columns), key=lambda j: (-scores[j], j))
        order.extend(ranked[: n_features - len(order)])
    logger.info("selected %d columns after %d path entries", len(order), len(path))
    return np.sort(np.asarray(order, dtype=np.int64))


class _Admission:
    """The path's ``stop`` callback of :func:`select_features`: admits columns in entry order."""

    def __init__(self, n_features: int) -> None:
        self.n_features = n_features
        self.order: list[int] = []

    def __call__(self, entry: PathEntry) -> bool:
        norms = np.linalg.norm(entry.weight, axis=0)  # (F,) group norms
        admitted = set(self.order)
        new = [int(j) for j in np.flatnonzero(norms > 0) if int(j) not in admitted]
        new.sort(key=lambda j: (-norms[j], j))  # simultaneous entries: largest norm first
        self.order.extend(new[: self.n_features - len(self.order)])
        return len(self.order) >= self.n_features


# ----------------------------------------------------------------------------- internals


@dataclass(frozen=True)
class _Settings:
    alpha: float
    group: bool
    max_iterations: int
    tolerance: float
    lookbehind: int


@dataclass
class _Point:
    """An iterate (W restricted to the active columns, b) and its logits X_A W^T + b."""

    w: torch.Tensor  # (C, A)
    b: torch.Tensor  # (C,)
    logits: torch.Tensor  # (N, C)


def _check_path_arguments(
    alpha: float,
    n_lambdas: int,
    lambda_min_ratio: float,
    max_iterations: int,
    tolerance: float,
    lookbehind: int | None,
) -> None:
    checks = [
        (0.0 <= alpha <= 1.0, f"alpha must be in [0, 1], got {alpha}"),
        (n_lambdas >= 1, f"n_lambdas must be >= 1, got {n_lambdas}"),
        (
            0.0 < lambda_min_ratio <= 1.0,
            f"lambda_min_ratio must be in (0, 1], got {lambda_min_ratio}",
        ),
        (max_iterations >= 1, f"max_iterations must be >= 1, got {max_iterations}"),
        (tolerance >= 0.0, f"tolerance must be >= 0, got {tolerance}"),
        (lookbehind is None or lookbehind >= 1, f"lookbehind must be >= 1, got {lookbehind}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _prepare(
    features: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    device: Device,
    dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (N, F), one-hot labels (N, C) and labels (N,) as tensors on ``device``."""
    x_np = np.asarray(features)
    y_np = np.asarray(labels).astype(np.int64, copy=False).reshape(-1)
    if x_np.ndim != 2 or x_np.shape[0] == 0 or x_np.shape[1] == 0:
        raise ValueError(f"features must be a non-empty (N, F) array, got shape {x_np.shape}")
    if y_np.shape[0] != x_np.shape[0]:
        raise ValueError(f"{y_np.shape[0]} labels for {x_np.shape[0]} feature rows")
    if n_classes < 1 or y_np.min() < 0 or y_np.max() >= n_classes:
        raise ValueError(f"labels must lie in [0, n_classes={n_classes})")
    if dtype is None:
        dtype = torch.float32 if x_np.dtype == np.float32 else torch.float64
    x = torch.as_tensor(x_np, device=device).to(dtype)
    y = torch.as_tensor(y_np, device=device)
    onehot = torch.nn.functional.one_hot(y, n_classes).to(dtype)  # (N, C)
    return x, onehot, y


def _column_scores(grad: torch.Tensor, group: bool) -> torch.Tensor:
    """(C, F) gradient -> (F,) score compared with lam * alpha in the KKT conditions of W = 0."""
    return grad.norm(dim=0) if group else grad.abs().amax(dim=0)


def _max_lambda(x: torch.Tensor, onehot: torch.Tensor, alpha: float, group: bool) -> float:
    centred = onehot - onehot.mean(dim=0)  # (N, C)
    grad = centred.T @ x / x.shape[0]  # (C, F)
    return float(_column_scores(grad, group).max()) / max(alpha, ALPHA_FLOOR)


def _cross_entropy(logits: torch.Tensor, onehot: torch.Tensor) -> float:
    return float((torch.logsumexp(logits, dim=1) - (logits * onehot).sum(dim=1)).mean())


def _residual(logits: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """d(mean CE)/d(logits): (softmax - onehot) / N, (N, C)."""
    return (torch.softmax(logits, dim=1) - onehot) / logits.shape[0]


def _penalty(w: torch.Tensor, lam: float, settings: _Settings) -> float:
    p1 = w.norm(dim=0).sum() if settings.group else w.abs().sum()
    return lam * float(settings.alpha * p1 + 0.5 * (1.0 - settings.alpha) * (w * w).sum())


def _prox(v: torch.Tensor, step: float, lam: float, settings: _Settings) -> torch.Tensor:
    """Proximal operator of ``step * penalty``: shrink (entrywise or by column), then scale."""
    threshold = step * lam * settings.alpha
    if settings.group:
        norms = v.norm(dim=0, keepdim=True)  # (1, A)
        norms = norms.clamp_min(torch.finfo(v.dtype).tiny)
        shrunk = v * torch.clamp(1.0 - threshold / norms, min=0.0)
    else:
        shrunk = torch.sign(v) * torch.clamp(v.abs() - threshold, min=0.0)
    return shrunk / (1.0 + step * lam * (1.0 - settings.alpha))


def _prox_step(
    x: torch.Tensor,
    onehot: torch.Tensor,
    y: _Point,
    step: float,
    min_step: float,
    lam: float,
    s: _Settings,
) -> tuple[_Point, float, float]:
    """One proximal gradient step from ``y`` with backtracking; returns (point, CE, step)."""
    residual = _residual(y.logits, onehot)  # (N, C)
    f_y = _cross_entropy(y.logits, onehot)
    grad_w, grad_b = residual.T @ x, residual.sum(dim=0)  # (C, A), (C,)
    slack = 16.0 * torch.finfo(x.dtype).eps * max(1.0, abs(f_y))
    for _ in range(_MAX_BACKTRACKS):
        w = _prox(y.w - step * grad_w, step, lam, s)
        b = y.b - step * grad_b
        logits = x @ w.T + b  # (N, C)
        f_z = _cross_entropy(logits, onehot)
        dw, db = w - y.w, b - y.b
        linear = float((grad_w * dw).sum() + (grad_b * db).sum())
        quadratic = float((dw * dw).sum() + (db * db).sum()) / (2.0 * step)
        if f_z <= f_y + linear + quadratic + slack or step <= min_step:
            break
        step = max(0.5 * step, min_step)
    return _Point(w, b, logits), f_z, step


def _solve(
    x: torch.Tensor,
    onehot: torch.Tensor,
    start: _Point,
    step: float,
    min_step: float,
    lam: float,
    s: _Settings,
) -> tuple[_Point, float, int]:
    """Monotone FISTA from ``start`` on the active columns ``x``; returns (point, step, iterations)."""
    current = start
    value = _cross_entropy(current.logits, onehot) + _penalty(current.w, lam, s)
    y, theta, stalled, iterations = current, 1.0, 0, 0
    while iterations < s.max_iterations:
        iterations += 1
        z, f_z, step = _prox_step(x, onehot, y, step, min_step, lam, s)
        value_z = f_z + _penalty(z.w, lam, s)
        if value_z <= value:
            decrease = (value - value_z) / max(abs(value_z), _TINY)
            theta_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * theta * theta))
            beta = (theta - 1.0) / theta_next
            y = _Point(
                z.w + beta * (z.w - current.w),
                z.b + beta * (z.b - current.b),
                z.logits + beta * (z.logits - current.logits),  # logits are linear in (W, b)
            )
            current, value, theta = z, value_z, theta_next
            stalled = 0 if decrease > s.tolerance else stalled + 1
        else:
            # momentum overshot: restart from the current iterate; if even a plain step from it
            # does not decrease the objective, it is converged to rounding
            stalled += int(theta == 1.0)
            y, theta = current, 1.0
        if stalled >= s.lookbehind:
            break
        step *= _GROWTH
    return current, step, iterations


class _PathState:
    """The warm start carried from one lambda to the next, and the strong-rule screening."""

    def __init__(
        self, x: torch.Tensor, onehot: torch.Tensor, y: torch.Tensor, settings: _Settings
    ) -> None:
        n, n_classes = onehot.shape
        self.x, self.onehot, self.y, self.settings = x, onehot, y, settings
        self.weight = x.new_zeros((n_classes, x.shape[1]))  # (C, F)
        # the optimal bias for W = 0 (log class frequencies; kept finite for an absent class)
        self.bias = torch.log(onehot.sum(dim=0).clamp_min(0.5) / n)  # (C,)
        self.logits = self.bias.expand(n, n_classes).clone()  # (N, C)
        self.grad = _residual(self.logits, onehot).T @ x  # (C, F)
        self.column_sq = (x * x).sum(dim=0)  # (F,) for the Lipschitz bound
        self.step = 1.0 / _lipschitz_estimate(x)
        self.previous_lam: float | None = None
        self._active_key: tuple[int, ...] = ()
        self._active_x = x[:, :0]

    def advance(self, lam: float) -> PathEntry:
        s = self.settings
        previous = lam if self.previous_lam is None else self.previous_lam
        scores = _column_scores(self.grad, s.group)
        active = (self.weight != 0).any(dim=0) | (scores >= s.alpha * (2.0 * lam - previous))
        iterations = 0
        while True:
            iterations += self._solve_active(active, lam)
            self.grad = _residual(self.logits, self.onehot).T @ self.x  # (C, F)
            scores = _column_scores(self.grad, s.group)
            violators = ~active & (scores > s.alpha * lam * (1.0 + s.tolerance))
            if not bool(violators.any()):
                break
            active = active | violators
        self.previous_lam = lam
        return self._entry(lam, iterations)

    def _solve_active(self, active: torch.Tensor, lam: float) -> int:
        index = torch.nonzero(active).reshape(-1)  # (A,)
        key = tuple(index.tolist())
        if key != self._active_key:
            self._active_key, self._active_x = key, self.x[:, index]  # (N, A)
        n = self.x.shape[0]
        min_step = 2.0 / (float(self.column_sq[index].sum()) / n + 1.0)  # 1 / Frobenius bound
        start = _Point(self.weight[:, index], self.bias, self.logits)
        point, step, iterations = _solve(
            self._active_x, self.onehot, start, self.step, min_step, lam, self.settings
        )
        self.step = step
        self.weight = torch.zeros_like(self.weight)
        self.weight[:, index] = point.w
        self.bias, self.logits = point.b, point.logits
        return iterations

    def _entry(self, lam: float, iterations: int) -> PathEntry:
        weight = self.weight.to(torch.float64).cpu().numpy()
        accuracy = float((self.logits.argmax(dim=1) == self.y).to(torch.float64).mean())
        logger.debug(
            "lambda %.6g: %d nonzero, %d iterations", lam, int(np.count_nonzero(weight)), iterations
        )
        return PathEntry(
            lam=float(lam),
            weight=weight,
            bias=self.bias.to(torch.float64).cpu().numpy(),
            n_nonzero=int(np.count_nonzero(weight)),
            n_features_used=int(np.count_nonzero(np.any(weight != 0, axis=0))),
            loss=_cross_entropy(self.logits, self.onehot),
            accuracy=accuracy,
            n_iterations=iterations,
        )


def _lipschitz_estimate(x: torch.Tensor, n_power: int = 20) -> float:
    """Estimate of the gradient's Lipschitz constant, 0.5 * lambda_max([X, 1]^T [X, 1] / N).

    Softmax curvature is at most 1/2 (Boehning's bound); the power iteration underestimates
    lambda_max slightly, which the backtracking line search corrects.
    """
    n = x.shape[0]
    v = torch.ones(x.shape[1] + 1, dtype=x.dtype, device=x.device)  # deterministic start
    eigenvalue = 1.0
    for _ in range(n_power):
        v = v / v.norm()
        u = x @ v[:-1] + v[-1]  # (N,)
        v = torch.cat([x.T @ u, u.sum().reshape(1)]) / n  # (F + 1,)
        eigenvalue = float(v.norm())
    return 0.5 * max(eigenvalue, 1e-12)


def _gradient_scores(
    features: np.ndarray,
    labels: np.ndarray,
    entry: PathEntry,
    n_classes: int,
    device: Device,
    dtype: torch.dtype | None,
) -> np.ndarray:
    """(F,) column norms of the cross-entropy gradient at ``entry``'s weights."""
    x, onehot, _ = _prepare(features, labels, n_classes, device, dtype)
    weight = torch.as_tensor(entry.weight, device=x.device).to(x.dtype)
    bias = torch.as_tensor(entry.bias, device=x.device).to(x.dtype)
    grad = _residual(x @ weight.T + bias, onehot).T @ x  # (C, F)
    return _column_scores(grad, True).to(torch.float64).cpu().numpy()
