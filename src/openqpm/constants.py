"""The constants of the QPM problem, computed from streamed feature statistics (numpy only).

* Class similarity (the paper's A, section 3.2): Pearson correlation of every feature with every
  one-hot class indicator over the training set, from running sums, scaled to max |value| = 1;
  or, for the ablation of appendix J, the AUROC of each feature for "class c vs rest" (from the
  pooled training features, not from sums), mapped to [-1, 1] as 2 AUC - 1 and scaled the same way.
* Feature redundancy (the paper's R, section 3.3): ReLU of the cosine similarity between two
  features' class-similarity profiles, zero diagonal, then thresholded at eps (the lowest value at
  which ``n_features`` mutually compatible features exist, section 4.1.1) and rescaled.
* Feature bias (the paper's b, section 3.4 and appendix D): locality (the reference code's variant
  or the paper's eq. 8), centre bias (eqs. 26-27) at ``bias_strength`` or at the paper's
  lambda = 10**(3/2) (``"center_paper"``), none, or a user vector; outliers clipped, centred and
  scaled to max |value| = ``bias_strength``.

The ablations of the paper's table 4 switch the terms off: ``build_problem(use_similarity=False)``
gives R = 0 (no Z_R) and ``bias="none"`` gives b = 0 (no Z_B); the report records which was used.

Everything is streamed: :class:`FeatureStatistics` and :class:`MapStatistics` hold sums only,
can be merged across processes, and round-trip through plain arrays.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from openqpm.solver.problem import AssignmentProblem

_logger = logging.getLogger(__name__)

__all__ = [
    "BIAS_NAMES",
    "CENTER_PAPER_STRENGTH",
    "CLASS_MEASURES",
    "DEFAULT_BIAS_STRENGTH",
    "R_SCALINGS",
    "ConstantsReport",
    "FeatureStatistics",
    "MapStatistics",
    "build_problem",
    "class_feature_auroc",
    "class_feature_similarity",
    "clip_center_scale",
    "closest_class_pairs",
    "compute_bias",
    "feature_redundancy",
    "find_compatibility_threshold",
    "rescale_redundancy",
    "summarize_feature_maps",
]

# The paper's lambda (section 4.1.1, "empirically found"). With the class term scaled so that one
# perfect assignment is worth ~1 (A scaled to max 1, times 1000 / (5 * 200) for CUB), a bias of at
# most ~0.32 per selected feature is a third of the best single assignment: enough to decide
# between features of similar class fit, never enough to select a feature no class wants.
DEFAULT_BIAS_STRENGTH = 1.0 / math.sqrt(10.0)

# The lambda of the centre bias in the paper's steerability experiment: appendix D ("The resulting
# improved accuracy on TravelingBirds with lambda = 10^(3/2), shown in table 11"). It is 100 times
# DEFAULT_BIAS_STRENGTH: up to ~31.6 per selected feature, i.e. ~32 perfect class assignments at
# the CUB scaling, so the bias dominates the class term rather than breaking ties.
CENTER_PAPER_STRENGTH = 10**1.5

# The one list of valid bias names (the config and the pipeline check against it). "center_paper"
# is "center" at CENTER_PAPER_STRENGTH, whatever bias_strength says.
BIAS_NAMES = ("locality", "locality_paper", "center", "center_paper", "none")
R_SCALINGS = ("code", "paper")
# The one list of valid class-feature similarity measures (section 3.2 / appendix J).
CLASS_MEASURES = ("pearson", "auroc")

# a feature whose variance is below this fraction of its mean square is constant up to round-off
_DEAD_RELATIVE_VARIANCE = 1e-12


def _as_2d_float(value: Any, name: str, n_columns: int) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != n_columns:
        raise ValueError(f"{name} must have shape (B, {n_columns}), got {array.shape}")
    if not np.all(np.isfinite(array)):
        row, column = (int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise ValueError(f"{name} has a non-finite value {array[row, column]} at [{row}, {column}]")
    return array


def _checked_labels(labels: Any, n_rows: int, n_classes: int, *, rows_of: str) -> np.ndarray:
    """``labels`` as an integer array of ``n_rows`` class indices in ``[0, n_classes)``."""
    labels = np.asarray(labels)
    if labels.shape != (n_rows,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be {n_rows} integers (one per row of {rows_of}), got "
            f"shape {labels.shape} dtype {labels.dtype}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got {labels.min()}..{labels.max()}")
    return labels


def _checked_arrays(
    arrays: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], owner: str
) -> dict[str, np.ndarray]:
    """Copies of ``arrays[key]`` for every key of ``shapes``, checked for presence and shape."""
    checked = {}
    for key, shape in shapes.items():
        if key not in arrays:
            raise ValueError(f"{owner}.from_arrays: missing key {key!r} (needs {sorted(shapes)})")
        array = np.array(arrays[key], dtype=np.float64)
        if array.shape != shape:
            raise ValueError(
                f"{owner}.from_arrays: {key!r} must have shape {shape}, got {array.shape}"
            )
        checked[key] = array
    return checked


def _leading_shape(
    arrays: Mapping[str, Any], key: str, owner: str, *, ndim: int
) -> tuple[int, ...]:
    """The shape of ``arrays[key]``, the array that gives the sizes the others are checked to."""
    if key not in arrays:
        raise ValueError(f"{owner}.from_arrays: missing key {key!r}")
    shape = tuple(int(n) for n in np.shape(arrays[key]))
    if len(shape) != ndim:
        raise ValueError(f"{owner}.from_arrays: {key!r} must be {ndim}-D, got shape {shape}")
    return shape


# ----------------------------------------------------------------------------------------------
# streamed statistics


class FeatureStatistics:
    """Running float64 sums of pooled features, overall and per class.

    Memory is O(n_features * n_classes); the feature matrix itself is never kept.

    Args:
        n_features: Number of backbone features (channels) n_f.
        n_classes: Number of classes n_c.

    Raises:
        ValueError: If a size is not positive.

    Example:
        >>> import numpy as np
        >>> stats = FeatureStatistics(3, 2)
        >>> stats.update(np.array([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0]]), np.array([0, 1]))
        >>> stats.mean.tolist(), stats.std.tolist()
        ([2.0, 0.0, 2.0], [1.0, 0.0, 0.0])
    """

    def __init__(self, n_features: int, n_classes: int) -> None:
        if n_features < 1 or n_classes < 1:
            raise ValueError(
                f"n_features and n_classes must be positive, got {n_features}, {n_classes}"
            )
        self.n_features = int(n_features)
        self.n_classes = int(n_classes)
        self.count = 0
        self.class_counts = np.zeros(n_classes, dtype=np.int64)
        self.feature_sum = np.zeros(n_features)
        self.feature_sum_squares = np.zeros(n_features)
        self.class_feature_sums = np.zeros((n_classes, n_features))

    def update(self, features: Any, labels: Any) -> None:
        """Add a batch.

        Args:
            features: (B, n_features) pooled features (any float dtype).
            labels: (B,) class indices in [0, n_classes).

        Raises:
            ValueError: On a wrong shape, a non-finite feature or a label out of range.
        """
        features = _as_2d_float(features, "features", self.n_features)
        labels = _checked_labels(labels, features.shape[0], self.n_classes, rows_of="features")
        self.count += int(features.shape[0])
        self.class_counts += np.bincount(labels, minlength=self.n_classes)
        self.feature_sum += features.sum(axis=0)
        self.feature_sum_squares += np.square(features).sum(axis=0)
        np.add.at(self.class_feature_sums, labels, features)

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        """Add another accumulator's sums into this one (e.g. from another process).

        Args:
            other: Statistics of the same sizes.

        Returns:
            ``self``.

        Raises:
            ValueError: If the sizes differ.
        """
        if (other.n_features, other.n_classes) != (self.n_features, self.n_classes):
            raise ValueError(
                f"cannot merge FeatureStatistics of sizes ({other.n_features}, "
                f"{other.n_classes}) into ({self.n_features}, {self.n_classes})"
            )
        self.count += other.count
        self.class_counts += other.class_counts
        self.feature_sum += other.feature_sum
        self.feature_sum_squares += other.feature_sum_squares
        self.class_feature_sums += other.class_feature_sums
        return self

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The sums as arrays (for ``np.savez`` or a distributed all-reduce)."""
        return {
            "count": np.asarray(self.count, dtype=np.int64),
            "class_counts": self.class_counts.copy(),
            "feature_sum": self.feature_sum.copy(),
            "feature_sum_squares": self.feature_sum_squares.copy(),
            "class_feature_sums": self.class_feature_sums.copy(),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> FeatureStatistics:
        """Rebuild from :meth:`to_arrays` output.

        Raises:
            ValueError: If a key is missing or shapes disagree.
        """
        n_classes, n_features = _leading_shape(
            arrays, "class_feature_sums", "FeatureStatistics", ndim=2
        )
        checked = _checked_arrays(
            arrays,
            {
                "count": (),
                "class_counts": (n_classes,),
                "feature_sum": (n_features,),
                "feature_sum_squares": (n_features,),
                "class_feature_sums": (n_classes, n_features),
            },
            "FeatureStatistics",
        )
        stats = cls(n_features, n_classes)
        stats.count = int(checked["count"])
        stats.class_counts = checked["class_counts"].astype(np.int64)
        stats.feature_sum = checked["feature_sum"]
        stats.feature_sum_squares = checked["feature_sum_squares"]
        stats.class_feature_sums = checked["class_feature_sums"]
        if stats.class_counts.sum() != stats.count:
            raise ValueError(
                f"FeatureStatistics.from_arrays: class_counts sum to {stats.class_counts.sum()} "
                f"but count is {stats.count}"
            )
        return stats

    def _require_samples(self) -> None:
        if self.count == 0:
            raise ValueError("FeatureStatistics is empty: call update() with at least one batch")

    @property
    def mean(self) -> np.ndarray:
        """(n_features,) mean of every feature."""
        self._require_samples()
        return self.feature_sum / self.count

    @property
    def variance(self) -> np.ndarray:
        """(n_features,) population variance (divided by the count), clipped at 0."""
        self._require_samples()
        mean = self.feature_sum / self.count
        return np.maximum(self.feature_sum_squares / self.count - np.square(mean), 0.0)

    @property
    def std(self) -> np.ndarray:
        """(n_features,) population standard deviation, the QPM head's normalisation."""
        return np.sqrt(self.variance)

    @property
    def dead_features(self) -> np.ndarray:
        """Ids of the features that are constant over the data (std 0 up to round-off)."""
        mean_square = self.feature_sum_squares / max(self.count, 1)
        return np.flatnonzero(self.variance <= _DEAD_RELATIVE_VARIANCE * mean_square)


class MapStatistics:
    """Running sums over feature-map summaries, everything the feature biases need.

    Per feature d over samples j, with pooled value f_jd, spatial-softmax peak p_jd, the per-sample
    share w_jd = f_jd / sum_d' f_jd' and the distance e_jd of the map's argmax to the nearest edge:
    ``pooled_sum`` = sum f, ``peak_pooled_sum`` = sum p*f (paper eq. 8), ``peak_share_sum`` =
    sum p*w and ``edge_share_sum`` = sum [argmax on the border]*w (reference code's locality),
    ``center_pooled_sum`` = sum f / (1 + e) (appendix D, eq. 26).

    Args:
        n_features: Number of backbone features (channels) n_f.

    Raises:
        ValueError: If ``n_features`` is not positive.
    """

    _SUM_KEYS = (
        "pooled_sum",
        "peak_pooled_sum",
        "peak_share_sum",
        "edge_share_sum",
        "center_pooled_sum",
    )

    def __init__(self, n_features: int) -> None:
        if n_features < 1:
            raise ValueError(f"n_features must be positive, got {n_features}")
        self.n_features = int(n_features)
        self.count = 0
        self.map_height: int | None = None
        self.map_width: int | None = None
        self.pooled_sum = np.zeros(n_features)
        self.peak_pooled_sum = np.zeros(n_features)
        self.peak_share_sum = np.zeros(n_features)
        self.edge_share_sum = np.zeros(n_features)
        self.center_pooled_sum = np.zeros(n_features)

    def _set_map_size(self, map_height: int, map_width: int) -> None:
        if map_height < 1 or map_width < 1:
            raise ValueError(f"map size must be positive, got {map_height}x{map_width}")
        if self.map_height is None:
            self.map_height, self.map_width = int(map_height), int(map_width)
        elif (self.map_height, self.map_width) != (map_height, map_width):
            raise ValueError(
                f"map size changed from {self.map_height}x{self.map_width} to "
                f"{map_height}x{map_width}; all batches must use the same size"
            )

    def update(
        self,
        pooled: Any,
        peak_softmax: Any,
        peak_index: Any,
        *,
        map_height: int,
        map_width: int,
    ) -> None:
        """Add a batch of map summaries (see :func:`summarize_feature_maps`).

        Args:
            pooled: (B, n_features) spatial means of the (non-negative) maps.
            peak_softmax: (B, n_features) maximum of each map's spatial softmax, in (0, 1].
            peak_index: (B, n_features) flat argmax of each map in ``[0, map_height*map_width)``.
            map_height: Map height h.
            map_width: Map width w.

        Raises:
            ValueError: On a wrong shape, a non-finite value, an index out of range or a map size
                that differs from earlier batches.
        """
        self._set_map_size(map_height, map_width)
        pooled = _as_2d_float(pooled, "pooled", self.n_features)
        peak_softmax = _as_2d_float(peak_softmax, "peak_softmax", self.n_features)
        peak_index = np.asarray(peak_index)
        if peak_softmax.shape != pooled.shape or peak_index.shape != pooled.shape:
            raise ValueError(
                f"pooled, peak_softmax and peak_index must share a shape, got {pooled.shape}, "
                f"{peak_softmax.shape}, {peak_index.shape}"
            )
        if not np.issubdtype(peak_index.dtype, np.integer):
            raise ValueError(f"peak_index must hold integers, got dtype {peak_index.dtype}")
        n_positions = map_height * map_width
        if peak_index.size and (peak_index.min() < 0 or peak_index.max() >= n_positions):
            raise ValueError(
                f"peak_index must lie in [0, {n_positions}) for {map_height}x{map_width} maps, "
                f"got {peak_index.min()}..{peak_index.max()}"
            )
        row, column = np.divmod(peak_index, map_width)  # (B, n_f) each
        on_edge = (row == 0) | (row == map_height - 1) | (column == 0) | (column == map_width - 1)
        # appendix D eq. 27 with 0-based indices: steps from the argmax to the nearest border
        edge_distance = np.minimum(
            np.minimum(row, map_height - 1 - row), np.minimum(column, map_width - 1 - column)
        )
        sample_total = pooled.sum(axis=1, keepdims=True)  # (B, 1)
        # an all-zero sample has no activation to share out: its shares are 0, not NaN
        share = np.divide(
            pooled, sample_total, out=np.zeros_like(pooled), where=sample_total > 0
        )  # (B, n_f)
        self.count += int(pooled.shape[0])
        self.pooled_sum += pooled.sum(axis=0)
        self.peak_pooled_sum += (peak_softmax * pooled).sum(axis=0)
        self.peak_share_sum += (peak_softmax * share).sum(axis=0)
        self.edge_share_sum += (on_edge * share).sum(axis=0)
        self.center_pooled_sum += (pooled / (1.0 + edge_distance)).sum(axis=0)

    def merge(self, other: MapStatistics) -> MapStatistics:
        """Add another accumulator's sums into this one.

        Returns:
            ``self``.

        Raises:
            ValueError: If the sizes or map sizes differ.
        """
        if other.n_features != self.n_features:
            raise ValueError(
                f"cannot merge MapStatistics of {other.n_features} features into {self.n_features}"
            )
        if other.map_height is not None and other.map_width is not None:
            self._set_map_size(other.map_height, other.map_width)
        self.count += other.count
        for key in self._SUM_KEYS:
            setattr(self, key, getattr(self, key) + getattr(other, key))
        return self

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The sums as arrays; the map size is stored as (0, 0) while unknown."""
        arrays = {key: getattr(self, key).copy() for key in self._SUM_KEYS}
        arrays["count"] = np.asarray(self.count, dtype=np.int64)
        arrays["map_size"] = np.asarray([self.map_height or 0, self.map_width or 0], np.int64)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> MapStatistics:
        """Rebuild from :meth:`to_arrays` output.

        Raises:
            ValueError: If a key is missing or shapes disagree.
        """
        (n_features,) = _leading_shape(arrays, "pooled_sum", "MapStatistics", ndim=1)
        shapes: dict[str, tuple[int, ...]] = dict.fromkeys(cls._SUM_KEYS, (n_features,))
        shapes.update({"count": (), "map_size": (2,)})
        checked = _checked_arrays(arrays, shapes, "MapStatistics")
        stats = cls(n_features)
        stats.count = int(checked["count"])
        height, width = (int(v) for v in checked["map_size"])
        if height > 0 and width > 0:
            stats.map_height, stats.map_width = height, width
        for key in cls._SUM_KEYS:
            setattr(stats, key, checked[key])
        return stats


def summarize_feature_maps(feature_maps: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-map summaries :class:`MapStatistics` needs (numpy reference implementation).

    Args:
        feature_maps: (B, n_f, h, w) feature maps.

    Returns:
        ``(pooled, peak_softmax, peak_index)``, each (B, n_f): the spatial mean, the maximum of the
        softmax over the h*w positions, and the flat index of the first maximum.

    Raises:
        ValueError: If the input is not 4-D or not finite.
    """
    maps = np.asarray(feature_maps, dtype=np.float64)
    if maps.ndim != 4:
        raise ValueError(f"feature_maps must have shape (B, n_f, h, w), got {maps.shape}")
    if not np.all(np.isfinite(maps)):
        raise ValueError("feature_maps contain non-finite values")
    batch, n_features, height, width = maps.shape
    flat = maps.reshape(batch, n_features, height * width)  # (B, n_f, h*w)
    pooled = flat.mean(axis=2)
    peak_index = flat.argmax(axis=2)
    peak = flat.max(axis=2, keepdims=True)  # (B, n_f, 1)
    # the softmax maximum is exp(0) / sum exp(x - max): stable for any map scale
    peak_softmax = 1.0 / np.exp(flat - peak).sum(axis=2)
    return pooled, peak_softmax, peak_index.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# class similarity and redundancy


def class_feature_similarity(stats: FeatureStatistics) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation of every feature with every one-hot class indicator (unscaled).

    Population statistics from the running sums: cov = E[f 1_c] - E[f] p_c, var(1_c) =
    p_c (1 - p_c). Constant features, and classes with no or all samples, get 0 instead of NaN.

    Args:
        stats: Statistics of the training features.

    Returns:
        ``(similarity, dead_features)``: (n_c, n_f) correlations and the ids of the constant
        features.

    Raises:
        ValueError: If the statistics are empty.
    """
    stats._require_samples()
    count = float(stats.count)
    class_share = stats.class_counts / count  # (n_c,) p_c
    mean = stats.feature_sum / count  # (n_f,)
    covariance = stats.class_feature_sums / count - class_share[:, None] * mean[None, :]
    dead = stats.dead_features
    feature_std = stats.std.copy()
    feature_std[dead] = 0.0
    class_std = np.sqrt(class_share * (1.0 - class_share))  # (n_c,)
    denominator = class_std[:, None] * feature_std[None, :]  # (n_c, n_f)
    similarity = np.divide(
        covariance, denominator, out=np.zeros_like(covariance), where=denominator > 0
    )
    # round-off can push |correlation| a hair above 1
    return np.clip(similarity, -1.0, 1.0), dead


# values per block of ranked columns: bounds the temporaries of rankdata to ~32 MiB each
_RANK_BLOCK_VALUES = 1 << 22


def class_feature_auroc(pooled: Any, labels: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """AUROC of every feature for every "class c vs rest" split, mapped to [-1, 1] (unscaled).

    The paper's appendix J (table 10) ablates A with "the Area under the receiver operating
    characteristic curve (AUROC)" instead of the Pearson correlation, without saying how the AUC is
    turned into a similarity. Here feature d's pooled value is the score, class c the positives and
    all other samples the negatives, and the AUC is mapped to 2 AUC - 1 (Somers' D): 0 for a
    feature that does not separate the class (AUC 0.5), 1 when every sample of c scores above
    every other sample, -1 for the reverse, the same sign convention and range as the correlation.
    :func:`build_problem` then scales it to max |A| = 1 like the correlation (section 4.1.1).

    Exact, from ranks (Mann-Whitney U, ties between a positive and a negative count 1/2): with
    average ranks r over all N samples, n_c samples of class c and rank sum S_c over them,
    U = S_c - n_c (n_c + 1) / 2 and AUC = U / (n_c (N - n_c)). Each feature column is ranked
    once (``scipy.stats.rankdata``) and the rank sums of all classes come from one pass; columns
    are processed in blocks, so the extra memory is O(N * block) on top of the O(N * n_f) input.

    Args:
        pooled: (N, n_f) pooled training features, finite, any real dtype (not converted as a
            whole: a float32 matrix stays float32).
        labels: (N,) class indices in [0, n_classes).
        n_classes: Number of classes n_c.

    Returns:
        ``(similarity, constant_features)``: (n_c, n_f) values 2 AUC - 1 in [-1, 1], and the ids of
        the features with one value over all samples (their AUC is exactly 0.5, so they get 0). A
        class with no samples, or with every sample, has no AUC and gets 0.

    Raises:
        ValueError: On a wrong shape or dtype, a non-finite value or a label out of range.

    Example:
        >>> import numpy as np
        >>> pooled = np.array([[0.1, 1.0], [0.4, 1.0], [0.35, 1.0], [0.8, 1.0]])
        >>> similarity, constant = class_feature_auroc(pooled, np.array([0, 0, 1, 1]), 2)
        >>> similarity[1].tolist(), constant.tolist()  # AUC 0.75 for class 1, feature 1 constant
        ([0.5, 0.0], [1])
    """
    from scipy.stats import rankdata

    features = np.asarray(pooled)
    if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] < 1:
        raise ValueError(f"pooled must have shape (N, n_f) with N, n_f >= 1, got {features.shape}")
    if not (
        np.issubdtype(features.dtype, np.integer) or np.issubdtype(features.dtype, np.floating)
    ):
        raise ValueError(f"pooled must hold real numbers, got dtype {features.dtype}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be positive, got {n_classes}")
    n_samples, n_all_features = features.shape
    labels = _checked_labels(labels, n_samples, n_classes, rows_of="pooled")
    class_counts = np.bincount(labels, minlength=n_classes)  # (n_c,)
    present = np.flatnonzero(class_counts)
    # samples sorted by class: each present class is one contiguous run of rows
    order = np.argsort(labels, kind="stable")
    run_starts = np.concatenate([[0], np.cumsum(class_counts)[:-1]])[present]
    positives = class_counts[present].astype(np.float64)  # (n_present,)
    negatives = float(n_samples) - positives
    pairs = positives * negatives  # positive-negative pairs; 0 when a class has every sample
    similarity = np.zeros((n_classes, n_all_features))
    constant = np.zeros(n_all_features, dtype=bool)
    block = max(1, min(n_all_features, _RANK_BLOCK_VALUES // n_samples))
    for first in range(0, n_all_features, block):
        columns = slice(first, min(first + block, n_all_features))
        values = features[order, columns]  # (N, block), rows grouped by class
        if not np.all(np.isfinite(values)):
            row, column = (int(i) for i in np.argwhere(~np.isfinite(values))[0])
            raise ValueError(
                f"pooled has a non-finite value {values[row, column]} at "
                f"[{int(order[row])}, {first + column}]"
            )
        constant[columns] = np.all(values == values[:1], axis=0)
        ranks = rankdata(values, axis=0)  # (N, block) average ranks 1..N, ties share their mean
        rank_sums = np.add.reduceat(ranks, run_starts, axis=0)  # (n_present, block)
        # 2 AUC - 1 = (2 U - n_pos n_neg) / (n_pos n_neg); the numerator is exact (half-integers)
        u_statistic = rank_sums - (positives * (positives + 1.0) / 2.0)[:, None]
        numerator = 2.0 * u_statistic - pairs[:, None]
        similarity[present, columns] = np.divide(
            numerator,
            pairs[:, None],
            out=np.zeros_like(numerator),
            where=pairs[:, None] > 0,
        )
    return np.clip(similarity, -1.0, 1.0), np.flatnonzero(constant)


def feature_redundancy(class_similarity: np.ndarray) -> np.ndarray:
    """ReLU of the cosine similarity between features' class profiles, zero diagonal.

    The reference code also divides by the maximum; with the diagonal at 1 before it is zeroed
    that is a no-op and is left out.

    Args:
        class_similarity: (n_c, n_f) class-feature similarity; column d is feature d's profile.

    Returns:
        (n_f, n_f) symmetric, non-negative, zero diagonal.
    """
    profiles = np.asarray(class_similarity, dtype=np.float64).T  # (n_f, n_c)
    norms = np.maximum(np.linalg.norm(profiles, axis=1), 1e-8)  # a dead feature has norm 0
    unit = profiles / norms[:, None]
    cosine = unit @ unit.T  # (n_f, n_f)
    redundancy = np.clip((cosine + cosine.T) / 2.0, 0.0, 1.0)  # exact symmetry, ReLU
    np.fill_diagonal(redundancy, 0.0)
    return redundancy


def _k_core(adjacency: np.ndarray, min_degree: int) -> np.ndarray:
    """Mask of the vertices left after repeatedly removing those with degree < ``min_degree``."""
    alive = np.ones(adjacency.shape[0], dtype=bool)
    adjacency_counts = adjacency.astype(np.float32)
    while True:
        degree = adjacency_counts @ alive.astype(np.float32)
        dropping = alive & (degree < min_degree - 0.5)
        if not dropping.any():
            return alive
        alive &= ~dropping


def _find_clique(
    adjacency: np.ndarray, target: int, *, rng: np.random.Generator, max_steps: int
) -> list[int]:
    """A clique of at least ``target`` vertices if the heuristic finds one, else its largest.

    Greedy construction from the highest-degree vertices (always add the candidate with most
    neighbours among the remaining candidates), then a tabu local search with add moves and
    one-for-one swaps (a vertex missing exactly one clique neighbour replaces that neighbour).
    """
    n_vertices = adjacency.shape[0]
    if target <= 1:
        return [0] if n_vertices else []
    alive = _k_core(adjacency, target - 1)
    vertices = np.flatnonzero(alive)
    if len(vertices) < target:
        return []
    graph = adjacency[np.ix_(vertices, vertices)]  # (m, m) the k-core only
    graph_counts = graph.astype(np.float32)
    degree = graph_counts.sum(axis=1)
    best: list[int] = []
    for seed_vertex in np.argsort(-degree, kind="stable")[:4]:
        clique = [int(seed_vertex)]
        candidates = graph[seed_vertex].copy()
        # inside[v] = neighbours of v among the candidates, updated as candidates drop out, so a
        # whole construction costs one pass over the adjacency matrix
        inside = graph_counts @ candidates.astype(np.float32)  # (m,)
        while candidates.any():
            score = np.where(candidates, inside, -1.0)
            chosen = int(np.argmax(score))
            clique.append(chosen)
            dropped = np.flatnonzero(candidates & ~graph[chosen])  # includes chosen itself
            candidates[dropped] = False
            if candidates.any():
                inside -= graph_counts[dropped].sum(axis=0)  # symmetric: rows = columns
        if len(clique) > len(best):
            best = clique
        if len(best) >= target:
            return sorted(int(vertices[v]) for v in best)

    # tabu search from the best greedy clique
    m = len(vertices)
    in_clique = np.zeros(m, dtype=bool)
    in_clique[best] = True
    # missing[v] = clique members that are not neighbours of v (v itself excluded)
    missing = (~graph[:, in_clique]).sum(axis=1) - in_clique
    tabu_until = np.zeros(m, dtype=np.int64)
    size = len(best)
    for step in range(max_steps):
        allowed = ~in_clique & (tabu_until <= step)
        adds = np.flatnonzero(allowed & (missing == 0))
        if adds.size:
            vertex = int(adds[rng.integers(adds.size)])
            in_clique[vertex] = True
            missing += ~graph[vertex]
            missing[vertex] -= 1  # a vertex is not its own non-neighbour
            size += 1
            if size > len(best):
                best = np.flatnonzero(in_clique).tolist()
                if size >= target:
                    break
            continue
        swaps = np.flatnonzero(allowed & (missing == 1))
        if swaps.size:
            vertex = int(swaps[rng.integers(swaps.size)])
            members = np.flatnonzero(in_clique)
            leaving = int(members[~graph[vertex, members]][0])
        else:
            members = np.flatnonzero(in_clique)
            if members.size == 0:  # everything tabu and nothing to drop: restart anywhere
                vertex = int(rng.integers(m))
                in_clique[vertex] = True
                missing += ~graph[vertex]
                missing[vertex] -= 1
                size = 1
                continue
            vertex = -1
            leaving = int(members[rng.integers(members.size)])
        in_clique[leaving] = False
        missing -= ~graph[leaving]
        missing[leaving] += 1
        tabu_until[leaving] = step + 7 + int(rng.integers(max(1, swaps.size) + 1))
        size -= 1
        if vertex >= 0:
            in_clique[vertex] = True
            missing += ~graph[vertex]
            missing[vertex] -= 1
            size += 1
    return sorted(int(vertices[v]) for v in best)


def find_compatibility_threshold(
    redundancy: np.ndarray,
    n_features: int,
    *,
    seed: int = 0,
    max_steps: int | None = None,
) -> tuple[float, list[int]]:
    """The lowest threshold eps at which ``n_features`` mutually compatible features exist.

    Two features are compatible when their redundancy is below eps; a compatible set is a clique
    of that graph. eps is bisected over the sorted distinct redundancy values (plus one value above
    the maximum, where every pair is compatible); at each value a heuristic clique search decides.
    Unlike the reference code, the target is the requested ``n_features`` (it hard-codes 50). The
    heuristic can miss a clique that exists, which only makes eps higher than the true minimum.

    Args:
        redundancy: (n_f, n_f) symmetric, non-negative, zero diagonal.
        n_features: Size of the compatible set wanted.
        seed: Seed of the clique search's random choices.
        max_steps: Tabu-search steps per threshold tried (default ``50 * n_features``).

    Returns:
        ``(eps, clique)``: pairs with redundancy >= eps are the penalised ones; ``clique`` holds
        at least ``n_features`` ascending ids whose pairwise redundancies are all below eps.

    Raises:
        ValueError: If ``n_features`` exceeds the number of features.
    """
    redundancy = np.asarray(redundancy, dtype=np.float64)
    n_all = redundancy.shape[0]
    if not 1 <= n_features <= n_all:
        raise ValueError(f"n_features must lie in [1, {n_all}], got {n_features}")
    if max_steps is None:
        max_steps = 50 * n_features
    upper = redundancy[np.triu_indices(n_all, k=1)]
    maximum = float(upper.max()) if upper.size else 0.0
    # candidate thresholds, ascending; the last one makes every pair compatible
    thresholds = np.append(np.unique(upper), np.nextafter(maximum, np.inf))
    off_diagonal = ~np.eye(n_all, dtype=bool)

    def clique_at(index: int) -> list[int]:
        adjacency = (redundancy < thresholds[index]) & off_diagonal
        # the same seed for every threshold: the answer depends only on the graph
        found = _find_clique(
            adjacency, n_features, rng=np.random.default_rng(seed), max_steps=max_steps
        )
        return found if len(found) >= n_features else []

    low, high = 0, len(thresholds) - 1
    best_clique = clique_at(high)
    if not best_clique:  # cannot happen: the complete graph has every clique
        best_clique = list(range(n_features))
    while low < high:
        middle = (low + high) // 2
        found = clique_at(middle)
        if found:
            high, best_clique = middle, found
        else:
            low = middle + 1
    eps = float(thresholds[high])
    return eps, best_clique


def rescale_redundancy(
    redundancy: np.ndarray, eps: float, *, scaling: str = "code"
) -> tuple[np.ndarray, int]:
    """Keep the penalised pairs (redundancy >= eps) and rescale them; all others become 0.

    Args:
        redundancy: (n_f, n_f) symmetric, non-negative, zero diagonal.
        eps: Threshold from :func:`find_compatibility_threshold`.
        scaling: ``"code"``: (r - m) / (M - m) with m the smallest positive and M the largest
            redundancy, as the reference code does (a pair at exactly m gets weight 0; when
            M == m every penalised pair gets 1). ``"paper"``: r / M ("scaled to a maximum of 1").

    Returns:
        ``(penalties, n_penalised_pairs)``: the (n_f, n_f) matrix for the problem, and the number
        of unordered pairs at or above eps.

    Raises:
        ValueError: If ``scaling`` is unknown.
    """
    if scaling not in R_SCALINGS:
        raise ValueError(f"unknown r_scaling {scaling!r}; valid: {', '.join(R_SCALINGS)}")
    redundancy = np.asarray(redundancy, dtype=np.float64)
    penalised = (redundancy >= eps) & (redundancy > 0)
    np.fill_diagonal(penalised, False)
    n_penalised = int(np.count_nonzero(np.triu(penalised, k=1)))
    penalties = np.zeros_like(redundancy)
    if n_penalised == 0:
        return penalties, 0
    positive = redundancy[redundancy > 0]
    smallest, largest = float(positive.min()), float(positive.max())
    if scaling == "paper":
        penalties[penalised] = redundancy[penalised] / largest
    elif largest > smallest:
        penalties[penalised] = (redundancy[penalised] - smallest) / (largest - smallest)
    else:
        penalties[penalised] = 1.0
    return penalties, n_penalised


# ----------------------------------------------------------------------------------------------
# bias


def _mean_shift_1d(
    values: np.ndarray, bandwidth: float, *, max_iterations: int = 300
) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``MeanShift(bandwidth).fit`` for 1-D data, vectorised over all seeds.

    Same algorithm (flat kernel, every point a seed, a seed stops when it moves by at most
    1e-3 * bandwidth or after ``max_iterations``; centres ranked by (points within, value),
    centres within ``bandwidth`` of a better one dropped; each point labelled by its nearest
    centre), but the window sums come from prefix sums over the sorted values, so all seeds
    advance together, orders of magnitude faster for thousands of values (a test checks both
    agree).

    Returns:
        ``(labels, centres)``: (n,) cluster index of each value, centres by falling intensity.
    """
    ordered = np.sort(values)
    shift = float(np.median(ordered))  # keeps the prefix sums small, hence exact enough
    prefix = np.concatenate([[0.0], np.cumsum(ordered - shift)])
    means = values.astype(np.float64).copy()
    n_within = np.zeros(len(values), dtype=np.int64)
    n_iterations = np.zeros(len(values), dtype=np.int64)
    active = np.ones(len(values), dtype=bool)
    stop_distance = 1e-3 * bandwidth
    while active.any():
        moving = np.flatnonzero(active)
        old = means[moving]
        # points at distance <= bandwidth, boundary included as in scikit-learn
        low = np.searchsorted(ordered, old - bandwidth, side="left")
        high = np.searchsorted(ordered, old + bandwidth, side="right")
        count = high - low
        new = (prefix[high] - prefix[low]) / count + shift
        n_within[moving] = count
        finished = (np.abs(new - old) <= stop_distance) | (n_iterations[moving] == max_iterations)
        means[moving] = new
        n_iterations[moving[~finished]] += 1
        active[moving[finished]] = False
    intensity: dict[float, int] = {}
    for mean, count in zip(means.tolist(), n_within.tolist()):
        intensity[mean] = count  # a later seed with the same centre overwrites, as in sklearn
    ranked = sorted(intensity.items(), key=lambda item: (item[1], item[0]), reverse=True)
    centres = np.array([centre for centre, _ in ranked])
    keep = np.ones(len(centres), dtype=bool)
    for index in range(len(centres)):
        if keep[index]:
            keep[np.abs(centres - centres[index]) <= bandwidth] = False
            keep[index] = True
    centres = centres[keep]
    labels = np.argmin(np.abs(values[:, None] - centres[None, :]), axis=1)  # (n,) nearest centre
    return labels, centres


def clip_center_scale(values: Any, *, strength: float = DEFAULT_BIAS_STRENGTH) -> np.ndarray:
    """Clip outliers as the reference code does, centre, and scale to max |value| = ``strength``.

    Outliers: a 1-D mean shift (scikit-learn's algorithm and estimated bandwidth) finds the most
    populated cluster and its value range [low, high]; values below low become |low| * sign(value)
    and values above high become |high| * sign(value) (a plain clip when signs agree; zeros stay
    zero).

    Args:
        values: (n,) finite values.
        strength: Maximum absolute value after scaling (the paper's lambda).

    Returns:
        (n,) float64 with mean 0 and max |value| = ``strength`` (all zeros if constant).

    Raises:
        ValueError: If ``values`` is not 1-D and finite or ``strength`` is negative.
    """
    from sklearn.cluster import estimate_bandwidth

    vector = np.array(values, dtype=np.float64)
    if vector.ndim != 1 or not np.all(np.isfinite(vector)):
        raise ValueError(f"values must be a finite 1-D array, got shape {vector.shape}")
    if not strength >= 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    scale_reference = max(1.0, float(np.abs(vector).max())) if vector.size else 1.0
    bandwidth = float(estimate_bandwidth(vector[:, None])) if len(vector) > 1 else 0.0
    if bandwidth > 0:
        labels, _ = _mean_shift_1d(vector, bandwidth)
        main_cluster = vector[labels == np.bincount(labels).argmax()]
        low, high = float(main_cluster.min()), float(main_cluster.max())
        vector = np.where(vector < low, abs(low) * np.sign(vector), vector)
        vector = np.where(vector > high, abs(high) * np.sign(vector), vector)
    vector = vector - vector.mean()
    largest = float(np.abs(vector).max()) if vector.size else 0.0
    if largest <= 1e-12 * scale_reference:
        return np.zeros_like(vector)
    return vector * (strength / largest)


def compute_bias(
    map_stats: MapStatistics | None,
    bias: str | np.ndarray,
    *,
    n_features: int,
    strength: float = DEFAULT_BIAS_STRENGTH,
) -> np.ndarray:
    """The feature bias vector.

    Args:
        map_stats: Map statistics of the training set (needed by every named bias but "none").
        bias: ``"locality"`` (reference code: per-sample activation shares, border mask),
            ``"locality_paper"`` (paper eq. 8), ``"center"`` (appendix D eq. 26),
            ``"center_paper"`` (eq. 26 at the paper's lambda :data:`CENTER_PAPER_STRENGTH`),
            ``"none"`` (exact zeros), or a user vector (n_features,) that is clipped, centred and
            scaled like the others.
        n_features: Number of backbone features n_f.
        strength: Maximum absolute bias (the paper's lambda); ignored by ``"center_paper"``,
            which always uses :data:`CENTER_PAPER_STRENGTH`, and by ``"none"``.

    Returns:
        (n_features,) bias.

    Raises:
        ValueError: If the name is unknown, the map statistics are missing or empty, or a user
            vector has the wrong shape.
    """
    if not isinstance(bias, str):
        vector = np.asarray(bias, dtype=np.float64)
        if vector.shape != (n_features,):
            raise ValueError(f"a user bias must have shape ({n_features},), got {vector.shape}")
        return clip_center_scale(vector, strength=strength)
    if bias not in BIAS_NAMES:
        raise ValueError(f"unknown bias {bias!r}; valid: {', '.join(BIAS_NAMES)} or a vector")
    if bias == "none":
        return np.zeros(n_features)
    if map_stats is None or map_stats.count == 0:
        raise ValueError(f"bias {bias!r} needs map statistics from a features pass; got none")
    if map_stats.n_features != n_features:
        raise ValueError(
            f"map statistics have {map_stats.n_features} features, the features {n_features}"
        )
    count = float(map_stats.count)
    if bias == "locality_paper":
        # eq. 8: b_d = sum_j peak_jd f_jd / (n_T sum_j f_jd), an activation-weighted peakiness
        raw = np.divide(
            map_stats.peak_pooled_sum,
            count * map_stats.pooled_sum,
            out=np.zeros(n_features),
            where=map_stats.pooled_sum > 0,
        )
        return clip_center_scale(raw, strength=strength)
    if bias in ("center", "center_paper"):
        # eq. 26: b_d = -sum_j f_jd / (1 + d_e) / (n_T sum_j f_jd)
        raw = -np.divide(
            map_stats.center_pooled_sum,
            count * map_stats.pooled_sum,
            out=np.zeros(n_features),
            where=map_stats.pooled_sum > 0,
        )
        if bias == "center_paper":
            strength = CENTER_PAPER_STRENGTH
        return clip_center_scale(raw, strength=strength)
    # the reference code's locality: L from per-sample shares, E = -border share; features whose
    # maps peak on the border more than average (normalised E < 0) get the lowest locality
    locality = clip_center_scale(map_stats.peak_share_sum / count, strength=strength)
    border = clip_center_scale(-map_stats.edge_share_sum, strength=strength)
    masked = np.where(border >= 0, locality, locality.min())
    return clip_center_scale(masked, strength=strength)


# ----------------------------------------------------------------------------------------------
# the problem


@dataclass
class ConstantsReport:
    """What :func:`build_problem` found along the way, and which terms (ablation) it used.

    Args:
        eps: Redundancy threshold; pairs at or above it are penalised. None when
            ``use_similarity`` is False: R is then all zeros and no threshold is searched.
        start_features: ``n_features`` mutually compatible features (ascending), a start selection
            (without the similarity term: the ``n_features`` features most similar to some class).
        dead_features: Constant features (their class similarity is 0).
        n_penalised_pairs: Unordered pairs with redundancy >= eps (0 without the similarity term).
        bias: Name of the bias used ("user" for a vector; "none" means b = 0, no Z_B).
        r_scaling: Rescaling of the penalised pairs ("code" or "paper"; moot without R).
        use_similarity: Whether R (the paper's Z_R) is in the problem; False is table 4's "without
            Z_R" ablation.
        class_measure: How A was computed, a name of :data:`CLASS_MEASURES` ("auroc" is the
            ablation of appendix J).
        bias_strength: The lambda the bias was scaled to: ``bias_strength`` as given,
            :data:`CENTER_PAPER_STRENGTH` for "center_paper", 0 for "none".
        timings_s: Seconds spent per step.
    """

    eps: float | None
    start_features: list[int]
    dead_features: list[int]
    n_penalised_pairs: int
    bias: str
    r_scaling: str
    use_similarity: bool = True
    class_measure: str = "pearson"
    bias_strength: float = DEFAULT_BIAS_STRENGTH
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary."""
        return asdict(self)


def _check_choices(*, r_scaling: str, class_measure: str, bias: str | np.ndarray) -> None:
    """Every name against its one list, before any work."""
    if r_scaling not in R_SCALINGS:
        raise ValueError(f"unknown r_scaling {r_scaling!r}; valid: {', '.join(R_SCALINGS)}")
    if class_measure not in CLASS_MEASURES:
        raise ValueError(
            f"unknown class_measure {class_measure!r}; valid: {', '.join(CLASS_MEASURES)}"
        )
    if isinstance(bias, str) and bias not in BIAS_NAMES:
        raise ValueError(f"unknown bias {bias!r}; valid: {', '.join(BIAS_NAMES)} or a vector")


def _class_similarity(
    feature_stats: FeatureStatistics,
    class_measure: str,
    pooled: np.ndarray | None,
    labels: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """A (n_c, n_f) scaled to max |A| = 1, and the dead features."""
    similarity, dead = class_feature_similarity(feature_stats)
    if class_measure == "auroc":
        similarity, dead = _auroc_similarity(feature_stats, pooled, labels, dead)
    largest = float(np.abs(similarity).max())
    if largest == 0:
        raise ValueError("every feature is constant or uncorrelated with the classes: no problem")
    return similarity / largest, dead


def _penalties_and_start(
    similarity: np.ndarray,
    n_features: int,
    *,
    use_similarity: bool,
    r_scaling: str,
    seed: int,
    timings: dict[str, float],
) -> tuple[float | None, np.ndarray, int, list[int]]:
    """``(eps, R, penalised pairs, start selection)``; without R nothing is thresholded."""
    n_all = similarity.shape[1]
    if not use_similarity:
        # no Z_R: every set is compatible; start from the features most similar to some class
        start_ids = np.argsort(-similarity.max(axis=0), kind="stable")[:n_features]
        return None, np.zeros((n_all, n_all)), 0, sorted(int(d) for d in start_ids)
    clock = time.perf_counter()
    redundancy = feature_redundancy(similarity)
    timings["redundancy_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    eps, clique = find_compatibility_threshold(redundancy, n_features, seed=seed)
    timings["threshold_s"] = time.perf_counter() - clock
    penalties, n_penalised = rescale_redundancy(redundancy, eps, scaling=r_scaling)
    # the clique may be larger than needed: keep the members most similar to some class
    usefulness = similarity[:, clique].max(axis=0)
    start_ids = np.asarray(clique)[np.argsort(-usefulness, kind="stable")[:n_features]]
    return eps, penalties, n_penalised, sorted(int(d) for d in start_ids)


def _used_strength(bias_name: str, bias_strength: float) -> float:
    """The bias strength that applies (the preset's, or none without a bias)."""
    if bias_name == "center_paper":
        return CENTER_PAPER_STRENGTH
    if bias_name == "none":
        return 0.0
    return float(bias_strength)


def build_problem(
    feature_stats: FeatureStatistics,
    map_stats: MapStatistics | None = None,
    *,
    n_features: int = 50,
    n_per_class: int = 5,
    bias: str | np.ndarray = "locality",
    bias_strength: float = DEFAULT_BIAS_STRENGTH,
    r_scaling: str = "code",
    use_similarity: bool = True,
    class_measure: str = "pearson",
    pooled: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[AssignmentProblem, ConstantsReport]:
    """All constants of the QPM problem from streamed statistics.

    The switches give the paper's ablations: ``use_similarity=False`` drops Z_R and
    ``bias="none"`` drops Z_B (table 4), ``bias="center_paper"`` is the centre bias at the paper's
    lambda (appendix D, table 11) and ``class_measure="auroc"`` builds A from AUROC (appendix J).
    The report and ``problem.metadata`` record all of them.

    Args:
        feature_stats: Pooled-feature statistics of the training set (test transforms).
        map_stats: Map statistics, required unless ``bias`` is "none" or a vector.
        n_features: Features to select (the paper's n_f*).
        n_per_class: Features per class (the paper's n_wc).
        bias: See :func:`compute_bias`; "none" gives b = 0 exactly (no Z_B).
        bias_strength: Maximum absolute bias (the paper's lambda); "center_paper" ignores it.
        r_scaling: ``"code"`` or ``"paper"``, see :func:`rescale_redundancy`.
        use_similarity: False sets R = 0 (no Z_R, the feature-feature similarity penalty). The
            threshold search only serves R, so it is skipped: the report's and the problem's eps
            are None, no pair is penalised, and the start selection is the ``n_features`` features
            most similar to some class.
        class_measure: ``"pearson"`` (the paper's A, from ``feature_stats``) or ``"auroc"``
            (appendix J, see :func:`class_feature_auroc`; needs ``pooled`` and ``labels``). Either
            is scaled to max |A| = 1.
        pooled: (N, n_f) pooled training features, needed by ``class_measure="auroc"`` only
            (ignored otherwise).
        labels: (N,) their class indices, with ``pooled``.
        seed: Seed of the compatible-set search.

    Returns:
        ``(problem, report)``.

    Raises:
        ValueError: If the statistics are empty, every feature is dead, an option is unknown,
            ``pooled`` or ``labels`` is missing or misshapen for "auroc", or the sizes are
            infeasible.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> labels = np.repeat(np.arange(4), 10)
        >>> stats = FeatureStatistics(12, 4)
        >>> stats.update(rng.random((40, 12)) + np.eye(4, 12)[labels], labels)
        >>> problem, report = build_problem(stats, n_features=6, n_per_class=2, bias="none")
        >>> float(np.abs(problem.A).max()), len(report.start_features)
        (1.0, 6)
        >>> no_r, report = build_problem(stats, n_features=6, n_per_class=2, bias="none",
        ...                              use_similarity=False)
        >>> float(np.abs(no_r.R).max()), report.eps, report.use_similarity
        (0.0, None, False)
    """
    _check_choices(r_scaling=r_scaling, class_measure=class_measure, bias=bias)
    if n_features > feature_stats.n_features:
        raise ValueError(
            f"n_features={n_features} exceeds the {feature_stats.n_features} features available"
        )
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    similarity, dead = _class_similarity(feature_stats, class_measure, pooled, labels)
    timings["class_similarity_s"] = time.perf_counter() - clock
    if dead.size:
        _logger.warning("%d constant (dead) features get class similarity 0", dead.size)
    eps, penalties, n_penalised, start = _penalties_and_start(
        similarity,
        n_features,
        use_similarity=use_similarity,
        r_scaling=r_scaling,
        seed=seed,
        timings=timings,
    )

    clock = time.perf_counter()
    bias_vector = compute_bias(
        map_stats, bias, n_features=feature_stats.n_features, strength=bias_strength
    )
    timings["bias_s"] = time.perf_counter() - clock

    bias_name = bias if isinstance(bias, str) else "user"
    used_strength = _used_strength(bias_name, bias_strength)
    report = ConstantsReport(
        eps=eps,
        start_features=start,
        dead_features=[int(d) for d in dead],
        n_penalised_pairs=n_penalised,
        bias=bias_name,
        r_scaling=r_scaling,
        use_similarity=bool(use_similarity),
        class_measure=class_measure,
        bias_strength=used_strength,
        timings_s=timings,
    )
    problem = AssignmentProblem(
        similarity,
        penalties,
        bias_vector,
        n_features,
        n_per_class,
        eps=eps,
        metadata={
            "bias": bias_name,
            "bias_strength": used_strength,
            "r_scaling": r_scaling,
            "use_similarity": bool(use_similarity),
            "class_measure": class_measure,
            "n_penalised_pairs": n_penalised,
            "dead_features": report.dead_features,
            "start_features": start,
            "n_samples": int(feature_stats.count),
        },
    )
    _logger.info(
        "constants (A: %s, R: %s, b: %s at %.4g): eps %s, %d penalised pairs, %d dead features",
        class_measure,
        "on" if use_similarity else "off",
        bias_name,
        used_strength,
        "none" if eps is None else f"{eps:.4f}",
        n_penalised,
        dead.size,
    )
    return problem, report


def _auroc_similarity(
    feature_stats: FeatureStatistics,
    pooled: np.ndarray | None,
    labels: np.ndarray | None,
    dead: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`class_feature_auroc` for :func:`build_problem`, checked against the statistics.

    The dead features are the union of the statistics' (constant up to round-off) and the columns
    of ``pooled`` with a single value; all of them get similarity 0.
    """
    if pooled is None:
        raise ValueError(
            "class_measure='auroc' needs the pooled training features: pass pooled=(N, n_f) "
            "array (and labels=(N,))"
        )
    if labels is None:
        raise ValueError("class_measure='auroc' needs labels=(N,) class indices with pooled")
    n_columns = int(np.shape(pooled)[-1]) if np.ndim(pooled) == 2 else -1
    if n_columns != feature_stats.n_features:
        raise ValueError(
            f"pooled must have shape (N, {feature_stats.n_features}) to match the feature "
            f"statistics, got {np.shape(pooled)}"
        )
    if np.ndim(labels) == 1 and len(labels) != feature_stats.count:
        _logger.warning(
            "AUROC from %d pooled samples, the feature statistics hold %d",
            len(labels),
            feature_stats.count,
        )
    similarity, constant = class_feature_auroc(pooled, labels, feature_stats.n_classes)
    dead = np.union1d(dead, constant).astype(np.int64)
    similarity[:, dead] = 0.0
    return similarity, dead


def closest_class_pairs(class_weights: Any, rho: float) -> list[tuple[int, int]]:
    """CHiQPM's forced pairs: the ``round(rho * n_classes)`` class pairs with the closest rows.

    The rows are the dense model's class weight vectors; closeness is their Euclidean distance
    (ties: the pair first in row-major order of the lower triangle). A class may be in several
    pairs, as in the authors' code (which takes ``int(rho * n_classes)``; the two agree for the
    default rho = 0.5 and an even class count).

    Args:
        class_weights: (n_classes, n_features) dense class weights.
        rho: pairs per class, >= 0.

    Returns:
        ``(c, c')`` with ``c < c'``, closest first.

    Raises:
        ValueError: ``rho`` negative, or more pairs asked for than there are.
    """
    weights = np.asarray(class_weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[0] < 2:
        raise ValueError(f"class_weights must have shape (n_classes >= 2, n), got {weights.shape}")
    if not (rho >= 0 and math.isfinite(rho)):
        raise ValueError(f"rho must be a finite number >= 0, got {rho}")
    n_classes = weights.shape[0]
    n_pairs = round(rho * n_classes)
    n_all = n_classes * (n_classes - 1) // 2
    if n_pairs > n_all:
        raise ValueError(
            f"rho={rho} asks for {n_pairs} pairs but {n_classes} classes have only {n_all}"
        )
    squared = (weights**2).sum(axis=1)
    distance = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * weights @ weights.T, 0))
    rows, columns = np.tril_indices(n_classes, -1)
    order = np.argsort(distance[rows, columns], kind="stable")[:n_pairs]
    return [(int(columns[i]), int(rows[i])) for i in order]
