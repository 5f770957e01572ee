"""Every metric of the QPM paper, as plain array functions and as one streamed model evaluation.

The array functions take numpy arrays or torch tensors and return a float. Fractions are in
[0, 1]; percent appears only in :func:`format_metrics_table` and in the ``accuracy`` entry of
:func:`evaluate_model` (the paper reports accuracy in percent).

The model-level :func:`evaluate_model` makes one pass over the test set and one over the training
set and keeps only accumulators whose size does not depend on the number of images (per-class
sums, the Gram matrix of the features, running minima, SID@5 sums). Contrastiveness needs the
feature values themselves: they are kept for at most 1000 features, a seeded uniform sample of
the features beyond that (a dense ResNet-50's 2048; the reference code skips Contrastiveness
there, so the paper's dense row could not be reproduced; the result records the sample size as
``contrastiveness_n_features``), and for at most ``max_contrastiveness_images`` training images,
a seeded uniform sample beyond that (all images on CUB-sized data sets).

Which features are evaluated: the columns of the classifier weight that have any nonzero entry
("used" features). For a QPM those are the selected features that a class is assigned to; for a
dense model all channels. The train features are those the classifier reads
(``forward_head(maps, pre_logits=True)``): raw pooled features for a dense model, normalised ones
for a QPM, as in the reference code.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from openqpm._io import eval_mode, unpack_batch

_logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor
# progress(stage, done, total): stage is "test", "train" or "contrastiveness"
ProgressCallback = Callable[[str, int, int], None]

#: Contrastiveness fits one Gaussian mixture per feature; of models with more used features than
#: this it is the mean over a seeded uniform sample of this many features
#: (:func:`contrastiveness_features`), an unbiased estimate of the mean over all of them.
MAX_CONTRASTIVENESS_FEATURES = 1000


class _ReservoirSample:
    """A uniform random sample of at most ``capacity`` rows of a stream (Vitter's algorithm R).

    Exact (every row, in order) while the stream is not longer than ``capacity``.
    """

    def __init__(self, capacity: int, n_columns: int, *, seed: int) -> None:
        if capacity < 1:
            raise ValueError(f"the sample capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.rows = np.zeros((capacity, n_columns), dtype=np.float32)
        self.n_seen = 0
        self._generator = np.random.default_rng(seed)

    def update(self, rows: np.ndarray) -> None:
        n_free = max(0, min(self.capacity - self.n_seen, len(rows)))
        self.rows[self.n_seen : self.n_seen + n_free] = rows[:n_free]
        rest = rows[n_free:]
        if len(rest):
            # row t (0-based, in the stream) replaces a random slot with chance capacity / (t + 1)
            positions = self.n_seen + n_free + np.arange(len(rest))
            slots = self._generator.integers(0, positions + 1)
            taken = slots < self.capacity
            for slot, row in zip(slots[taken], rest[taken]):  # in stream order: later rows win
                self.rows[slot] = row
        self.n_seen += len(rows)

    def sample(self) -> np.ndarray:
        return self.rows[: min(self.n_seen, self.capacity)]


_EPS_TOTAL = 1e-8  # guard for a feature whose min-shifted activation sums to zero
_EPS_MEAN_ABS = 1e-5  # guard of SID@k's division by the mean absolute activation (reference)
_EPS_NORM = 1e-8  # guard of cosine similarities for all-zero vectors


# --------------------------------------------------------------------------------------------
# The metric registry: names, labels and directions for tables and the report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricInfo:
    """How one entry of :func:`evaluate_model`'s result is named and shown.

    Attributes:
        name: the key in the result dict.
        label: short column title.
        higher_is_better: direction of improvement (True, False, or None when neutral).
        kind: ``"percent"`` (value already in percent), ``"fraction"`` (shown as percent),
            ``"count"`` (integer), ``"number"`` (one decimal) or ``"ratio"`` (two decimals).
        description: one sentence for the report.
    """

    name: str
    label: str
    higher_is_better: bool | None
    kind: str
    description: str


_METRICS: dict[str, MetricInfo] = {}


def register(info: MetricInfo) -> MetricInfo:
    """Register a metric description so that tables and the report know how to show it.

    Args:
        info: the description; its ``name`` must be new.

    Returns:
        The same description.

    Raises:
        ValueError: if the name is taken.
    """
    if info.name in _METRICS:
        raise ValueError(f"metric {info.name!r} is already registered")
    _METRICS[info.name] = info
    return info


def names() -> list[str]:
    """Names of the registered metrics, in table order."""
    return list(_METRICS)


def describe(name: str) -> MetricInfo:
    """The description of one registered metric.

    Args:
        name: a name from :func:`names`.

    Returns:
        Its :class:`MetricInfo`.

    Raises:
        KeyError: for an unknown name; the message lists the valid ones.
    """
    try:
        return _METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; valid names: {', '.join(_METRICS)}") from None


for _info in (
    MetricInfo("accuracy", "Accuracy", True, "percent", "Top-1 test accuracy."),
    MetricInfo("n_features_used", "Features", False, "count", "Features with a nonzero weight."),
    MetricInfo(
        "features_per_class", "Feat./class", False, "number", "Nonzero weights per class (mean)."
    ),
    MetricInfo(
        "sid_at_5",
        "SID@5",
        True,
        "fraction",
        "Scale-invariant diversity: how spatially distinct the 5 most weighted feature maps of "
        "the predicted class are (paper eqs. 15-16).",
    ),
    MetricInfo(
        "class_independence",
        "Class-Ind.",
        True,
        "fraction",
        "Share of each feature's zero-based activation outside its most related class (eq. 14).",
    ),
    MetricInfo(
        "contrastiveness",
        "Contrast.",
        True,
        "fraction",
        "1 - overlap of the two normals of a 2-component Gaussian mixture per feature (eq. 13).",
    ),
    MetricInfo(
        "structural_grounding",
        "SG",
        True,
        "fraction",
        "Class similarity of the model relative to the ground truth on the 25 most similar class "
        "pairs by annotated attributes (eq. 12).",
    ),
    MetricInfo(
        "correlation",
        "Correlation",
        False,
        "fraction",
        "Mean over features of the largest cosine similarity to another feature (App. C.B).",
    ),
    MetricInfo(
        "diversity_at_5",
        "Div@5",
        True,
        "fraction",
        "diversity@5, the older metric: as SID@5 but without the scale normalisation.",
    ),
    MetricInfo(
        "feature_alignment",
        "Alignment",
        True,
        "ratio",
        "Q-SENN feature alignment with annotated image attributes (App. H eq. 29).",
    ),
    MetricInfo(
        "part_hit_rate",
        "Part hits",
        True,
        "fraction",
        "How often the peak of a used feature map lies near an annotated visible part.",
    ),
):
    register(_info)


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------


def _to_numpy(values: ArrayLike, *, name: str, ndim: int, dtype: Any = np.float64) -> np.ndarray:
    """A numpy copy-or-view of ``values`` with a checked number of dimensions."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=dtype)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
    return array


def _to_tensor(values: ArrayLike, *, name: str, ndim: int) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    if tensor.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    return tensor


def _check_labels(labels: np.ndarray, n_rows: int, *, name: str = "labels") -> np.ndarray:
    if labels.shape != (n_rows,):
        raise ValueError(f"{name} must have shape ({n_rows},), got {labels.shape}")
    if n_rows and labels.min() < 0:
        raise ValueError(f"{name} must be non-negative class indices, got {labels.min()}")
    return labels.astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy as a fraction.

    Args:
        predictions: predicted classes (N,), or logits (N, n_c) whose argmax is taken.
        labels: true classes (N,).

    Returns:
        The fraction of rows whose prediction equals the label.

    Raises:
        ValueError: on empty input or mismatched lengths.

    Example:
        >>> accuracy(np.array([0, 1, 1]), np.array([0, 1, 0]))
        0.6666666666666666
    """
    predicted = torch.as_tensor(predictions)
    if predicted.ndim == 2:
        predicted = predicted.argmax(dim=1)
    predicted_array = _to_numpy(predicted, name="predictions", ndim=1, dtype=np.int64)
    label_array = _check_labels(
        _to_numpy(labels, name="labels", ndim=1, dtype=np.int64), len(predicted_array)
    )
    if len(label_array) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float(np.mean(predicted_array == label_array))


# --------------------------------------------------------------------------------------------
# Train-feature statistics, streamed: Class-Independence, Correlation, Alignment
# --------------------------------------------------------------------------------------------


class _FeatureSums:
    """Accumulators over train features whose size does not grow with the number of images.

    Holds per-class sums and counts, the per-feature minimum and total, the Gram matrix and,
    when attributes are given, the sums over images where each attribute is present / absent.
    """

    def __init__(self, n_features: int, n_classes: int, *, n_attributes: int | None = None):
        self.n_features = n_features
        self.n_classes = n_classes
        self.count = 0
        self.class_sums = np.zeros((n_classes, n_features))
        self.class_counts = np.zeros(n_classes, dtype=np.int64)
        self.minimum = np.full(n_features, np.inf)
        self.total = np.zeros(n_features)
        self.gram = np.zeros((n_features, n_features))
        self.n_attributes = n_attributes
        if n_attributes is not None:
            self.present_sums = np.zeros((n_attributes, n_features))
            self.absent_sums = np.zeros((n_attributes, n_features))
            self.present_counts = np.zeros(n_attributes, dtype=np.int64)
            self.absent_counts = np.zeros(n_attributes, dtype=np.int64)

    def update(
        self, features: np.ndarray, labels: np.ndarray, attributes: np.ndarray | None = None
    ) -> None:
        if features.shape[1] != self.n_features:
            raise ValueError(
                f"features have {features.shape[1]} columns, expected {self.n_features}"
            )
        if len(labels) and labels.max() >= self.n_classes:
            raise ValueError(f"label {labels.max()} is out of range for {self.n_classes} classes")
        self.count += len(features)
        np.add.at(self.class_sums, labels, features)
        self.class_counts += np.bincount(labels, minlength=self.n_classes)
        if len(features):
            self.minimum = np.minimum(self.minimum, features.min(axis=0))
        self.total += features.sum(axis=0)
        self.gram += features.T @ features  # (K, K)
        if self.n_attributes is not None:
            if attributes is None or attributes.shape != (len(features), self.n_attributes):
                raise ValueError(
                    f"attributes must have shape ({len(features)}, {self.n_attributes})"
                )
            present = (attributes == 1).astype(np.float64)  # (B, n_attr)
            absent = (attributes == 0).astype(np.float64)
            self.present_sums += present.T @ features  # (n_attr, K)
            self.absent_sums += absent.T @ features
            self.present_counts += present.sum(axis=0).astype(np.int64)
            self.absent_counts += absent.sum(axis=0).astype(np.int64)

    def class_independence(self) -> float:
        # sum over class c of (f - min f) = class sum - class count * min
        shifted = self.class_sums - self.class_counts[:, None] * self.minimum[None, :]  # (n_c, K)
        total = shifted.sum(axis=0)  # (K,)
        share = shifted / np.maximum(total, _EPS_TOTAL)[None, :]
        return float(1.0 - share.max(axis=0).mean())

    def correlation(self) -> float:
        norms = np.sqrt(np.clip(np.diag(self.gram), 0.0, None))
        norms = np.maximum(norms, _EPS_NORM)
        cosine = self.gram / np.outer(norms, norms)
        np.fill_diagonal(cosine, 0.0)
        return float(np.clip(cosine.max(axis=1), 0.0, 1.0).mean())

    def feature_alignment(self) -> float:
        if self.n_attributes is None:
            raise ValueError("no attributes were accumulated")
        usable = (self.present_counts > 0) & (self.absent_counts > 0)
        if not usable.any():
            raise ValueError("no attribute is both present and absent in some images")
        present_mean = self.present_sums[usable] / self.present_counts[usable, None]
        absent_mean = self.absent_sums[usable] / self.absent_counts[usable, None]
        difference = present_mean - absent_mean  # (n_usable_attr, K)
        mean_shifted = self.total / self.count - self.minimum  # (K,)
        scale = 1.0 / np.maximum(mean_shifted, _EPS_TOTAL)
        return float((difference.max(axis=0) * scale).mean())


def _checked_features(features: ArrayLike, *, min_rows: int = 1) -> np.ndarray:
    array = _to_numpy(features, name="features", ndim=2)
    if array.shape[0] < min_rows:
        raise ValueError(f"features need at least {min_rows} rows, got {array.shape[0]}")
    if array.shape[1] < 1:
        raise ValueError("features need at least one column")
    if not np.isfinite(array).all():
        raise ValueError("features contain NaN or inf")
    return array


def class_independence(features: ArrayLike, labels: ArrayLike) -> float:
    """Class-Independence tau (paper eq. 14): how little each feature focuses on one class.

    Each feature is shifted by its minimum over the images; tau is one minus the mean, over
    features, of the largest share of a feature's shifted activation that falls on one class.
    A feature constant over all images contributes 1 (its share is 0), as in the reference code.

    Args:
        features: (N, K) features of the training images.
        labels: (N,) class indices.

    Returns:
        tau in [0, 1 - 1/n_c] for balanced classes; 0 means every feature fires on one class only.

    Raises:
        ValueError: on shape mismatches or non-finite values.

    Example:
        >>> one_hot = np.eye(3)[[0, 1, 2, 0]]  # a detector per class
        >>> class_independence(one_hot, [0, 1, 2, 0])
        0.0
    """
    array = _checked_features(features)
    label_array = _check_labels(
        _to_numpy(labels, name="labels", ndim=1, dtype=np.int64), array.shape[0]
    )
    sums = _FeatureSums(array.shape[1], int(label_array.max()) + 1)
    sums.update(array, label_array)
    return sums.class_independence()


def correlation(features: ArrayLike) -> float:
    """Correlation of features (paper App. C.B eq. 18).

    Cosine similarity between feature columns; for each feature the largest similarity to another
    feature; the mean over features. As in the reference code the diagonal is set to zero before
    the maximum, so a feature whose similarities are all negative counts 0.

    Args:
        features: (N, K) features, K >= 2.

    Returns:
        A value in [0, 1]; 1 means every feature has an exact (positive) copy.

    Raises:
        ValueError: for fewer than two features or non-finite values.
    """
    array = _checked_features(features)
    if array.shape[1] < 2:
        raise ValueError("correlation needs at least two features")
    sums = _FeatureSums(array.shape[1], 1)
    sums.update(array, np.zeros(len(array), dtype=np.int64))
    return sums.correlation()


def feature_alignment(features: ArrayLike, image_attributes: ArrayLike) -> float:
    """Q-SENN feature alignment with annotated image attributes (paper App. H eqs. 28-29).

    For feature d and attribute a: the mean of d over images where a is annotated present minus
    the mean over images where it is annotated absent (uncertain annotations, -1, are left out).
    Each feature's best attribute difference is divided by the feature's mean min-shifted
    activation; the result is the mean over features. It is a ratio, not a fraction: values
    above 1 mean a feature rises by more than its mean activation when its attribute is present.

    Args:
        features: (N, K) training features.
        image_attributes: (N, n_attr) with 1 present, 0 absent, -1 not confident.

    Returns:
        The alignment.

    Raises:
        ValueError: on shape mismatches, or when no attribute is both present and absent.
    """
    array = _checked_features(features)
    attributes = _to_numpy(image_attributes, name="image_attributes", ndim=2, dtype=np.int64)
    if attributes.shape[0] != array.shape[0]:
        raise ValueError(
            f"image_attributes has {attributes.shape[0]} rows, features have {array.shape[0]}"
        )
    sums = _FeatureSums(array.shape[1], 1, n_attributes=attributes.shape[1])
    sums.update(array, np.zeros(len(array), dtype=np.int64), attributes)
    return sums.feature_alignment()


# --------------------------------------------------------------------------------------------
# Contrastiveness
# --------------------------------------------------------------------------------------------


def feature_overlaps(features: ArrayLike, *, seed: int = 0) -> np.ndarray:
    """Per feature, the overlap of the two normals of a 2-component Gaussian mixture.

    The overlapping coefficient (Inman & Bradley 1989) is the area under the minimum of the two
    normal densities: 1 for identical components, near 0 for well separated ones. A constant
    feature has no two modes and gets 1.

    Args:
        features: (N, K) features, N >= 2.
        seed: random state of each mixture fit (the reference code leaves it unseeded).

    Returns:
        (K,) overlaps in [0, 1].

    Raises:
        ValueError: for fewer than two rows or non-finite values.
    """
    # Imported here: scikit-learn's import costs about a second and most callers never need it.
    from threadpoolctl import threadpool_limits

    array = _checked_features(features, min_rows=2)
    overlaps = np.ones(array.shape[1])
    # One thread per fit: a 1-D mixture is tiny, and k-means' thread start-up otherwise costs
    # several times the fit itself.
    with threadpool_limits(limits=1):
        for column_index in range(array.shape[1]):
            overlaps[column_index] = _mixture_overlap(array[:, column_index], seed=seed)
    return overlaps


def _mixture_overlap(column: np.ndarray, *, seed: int) -> float:
    """The overlap of the two normals of a 2-component mixture fitted to one feature."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    if np.ptp(column) <= 1e-12 * max(1.0, float(np.abs(column).max())):
        return 1.0  # constant: one mode, complete overlap
    mixture = GaussianMixture(n_components=2, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mixture.fit(column.reshape(-1, 1))  # (N, 1): sklearn wants a 2-D sample matrix
    means = mixture.means_.ravel()
    sigmas = np.sqrt(mixture.covariances_.ravel())
    first = statistics.NormalDist(float(means[0]), float(sigmas[0]))
    second = statistics.NormalDist(float(means[1]), float(sigmas[1]))
    return min(1.0, max(0.0, first.overlap(second)))


def contrastiveness(features: ArrayLike, *, seed: int = 0) -> float:
    """Contrastiveness (paper eq. 13): 1 - mean overlap of each feature's two mixture components.

    Args:
        features: (N, K) training features.
        seed: random state of the Gaussian mixture fits.

    Returns:
        A fraction; near 1 when every feature is clearly bimodal ("on" or "off").

    Raises:
        ValueError: for fewer than two rows or non-finite values.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> bimodal = np.r_[rng.normal(0, 0.1, 200), rng.normal(5, 0.1, 200)][:, None]
        >>> contrastiveness(bimodal) > 0.99
        True
    """
    return float(1.0 - feature_overlaps(features, seed=seed).mean())


def contrastiveness_features(n_features: int, *, seed: int = 0) -> np.ndarray:
    """The features Contrastiveness is computed on: all, or a seeded sample of the maximum.

    Args:
        n_features: how many features the model uses.
        seed: seeds the sample.

    Returns:
        Ascending feature indices: ``arange(n_features)`` up to
        :data:`MAX_CONTRASTIVENESS_FEATURES`, else a uniform sample of that many without
        replacement.
    """
    limit = MAX_CONTRASTIVENESS_FEATURES
    if n_features <= limit:
        return np.arange(n_features)
    # its own stream: the choice does not depend on how many images the sample of rows saw
    generator = np.random.default_rng([seed, 13])
    return np.sort(generator.choice(n_features, size=limit, replace=False))


# --------------------------------------------------------------------------------------------
# Structural Grounding
# --------------------------------------------------------------------------------------------


def class_similarity(vectors: ArrayLike) -> np.ndarray:
    """Cosine similarity between the rows of ``vectors``, with a zero diagonal.

    Args:
        vectors: (n_c, D) one vector per class (attribute vectors or classifier rows).

    Returns:
        (n_c, n_c) symmetric similarities; an all-zero row is similar to nothing.
    """
    array = _to_numpy(vectors, name="vectors", ndim=2)
    norms = np.maximum(np.linalg.norm(array, axis=1), _EPS_NORM)
    unit = array / norms[:, None]
    similarity = unit @ unit.T  # (n_c, n_c)
    np.fill_diagonal(similarity, 0.0)
    return similarity


def most_similar_pairs(similarity: np.ndarray, n_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_pairs`` unordered pairs (i < j) with the largest similarity, largest first.

    Ties keep the row-major order of the upper triangle, so the choice is deterministic.

    Args:
        similarity: (n_c, n_c) symmetric matrix.
        n_pairs: how many pairs, at most n_c (n_c - 1) / 2.

    Returns:
        Two (n_pairs,) index arrays (first, second).

    Raises:
        ValueError: if ``n_pairs`` is out of range.
    """
    n_classes = similarity.shape[0]
    n_available = n_classes * (n_classes - 1) // 2
    if not 1 <= n_pairs <= n_available:
        raise ValueError(f"n_pairs must be in [1, {n_available}] for {n_classes} classes")
    first, second = np.triu_indices(n_classes, k=1)
    order = np.argsort(-similarity[first, second], kind="stable")[:n_pairs]
    return first[order], second[order]


def structural_grounding(
    class_weights: ArrayLike, class_attributes: ArrayLike, *, n_pairs: int = 25
) -> float:
    """Structural Grounding (paper eq. 12): does the model see the truly similar classes as similar?

    The n_pairs class pairs most similar by the cosine of their attribute vectors are taken; the
    result is the sum over them of the cosine of the classifier rows divided by the sum of the
    attribute cosines. For a binary QPM two classes sharing s of n_per_class features have
    similarity s / n_per_class. The ratio is not clipped: it is 1 when the classifier's
    similarity equals the ground truth on those pairs, and a dense model with signed weights can
    make it negative.

    Args:
        class_weights: (n_c, K) classifier weights.
        class_attributes: (n_c, n_attr) class attribute vectors (CUB: percentages / 100).
        n_pairs: how many of the most similar pairs to compare (paper: 25).

    Returns:
        The ratio.

    Raises:
        ValueError: on a class-count mismatch, a bad ``n_pairs``, or when the chosen ground-truth
            similarities sum to zero.
    """
    weights = _to_numpy(class_weights, name="class_weights", ndim=2)
    attributes = _to_numpy(class_attributes, name="class_attributes", ndim=2)
    if weights.shape[0] != attributes.shape[0]:
        raise ValueError(
            f"class_weights has {weights.shape[0]} classes, class_attributes {attributes.shape[0]}"
        )
    truth = class_similarity(attributes)
    first, second = most_similar_pairs(truth, n_pairs)
    truth_sum = truth[first, second].sum()
    if truth_sum <= 0:
        raise ValueError("the most similar class pairs have zero attribute similarity")
    model_similarity = class_similarity(weights)
    return float(model_similarity[first, second].sum() / truth_sum)


# --------------------------------------------------------------------------------------------
# SID@k and diversity@k
# --------------------------------------------------------------------------------------------


def _top_features(class_weights: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class the k largest (signed) weights' feature indices, and which classes have k."""
    n_classes, n_features = class_weights.shape
    has_k = (class_weights != 0).sum(dim=1) >= k  # (n_c,)
    if k > n_features:
        return torch.zeros(n_classes, k, dtype=torch.long), torch.zeros_like(has_k)
    return torch.topk(class_weights, k, dim=1).indices, has_k  # (n_c, k)


def _diversity_scores(
    feature_maps: torch.Tensor,
    top_features: torch.Tensor,
    predictions: torch.Tensor,
    *,
    scale_invariant: bool,
) -> torch.Tensor:
    """Per image: sum over positions of the max over the k chosen softmax maps, divided by k."""
    batch_size, _, height, width = feature_maps.shape
    k = top_features.shape[1]
    chosen_index = top_features[predictions]  # (B, k)
    flat_maps = feature_maps.reshape(batch_size, -1, height * width)  # (B, K, h*w)
    gather_index = chosen_index[:, :, None].expand(-1, -1, height * width)  # (B, k, h*w)
    chosen = torch.gather(flat_maps, 1, gather_index).float()  # (B, k, h*w)
    if scale_invariant:
        mean_abs = chosen.abs().mean(dim=2, keepdim=True).clamp_min(_EPS_MEAN_ABS)  # (B, k, 1)
        chosen = chosen / mean_abs
    spatial_softmax = chosen.softmax(dim=2)  # (B, k, h*w)
    return spatial_softmax.amax(dim=1).sum(dim=1) / k  # (B,)


def diversity_scores(
    feature_maps: torch.Tensor,
    class_weights: torch.Tensor,
    predictions: torch.Tensor,
    *,
    k: int = 5,
    scale_invariant: bool = True,
) -> torch.Tensor:
    """Per-image SID@k (or diversity@k) scores, for every image.

    Unlike :func:`sid_at_k` no image is left out: a predicted class with fewer than k nonzero
    weights still gets its k most weighted maps (some with zero weight).

    Args:
        feature_maps: (N, K, h, w) the maps the classifier reads.
        class_weights: (n_c, K) classifier weights (at least k columns).
        predictions: (N,) predicted classes.
        k: how many features per image.
        scale_invariant: SID (True) or the older diversity (False).

    Returns:
        (N,) scores in [1/k, 1], on the maps' device.

    Raises:
        ValueError: when k exceeds the number of features.
    """
    if not 1 <= k <= class_weights.shape[1]:
        raise ValueError(f"k must be in [1, {class_weights.shape[1]}], got {k}")
    top_features, _ = _top_features(class_weights.detach().float().cpu(), k)
    return _diversity_scores(
        feature_maps,
        top_features.to(feature_maps.device),
        predictions.to(feature_maps.device),
        scale_invariant=scale_invariant,
    )


class _DiversitySums:
    """Streamed SID@k and diversity@k: sums of per-image scores over images that qualify."""

    def __init__(self, class_weights: torch.Tensor, *, k: int) -> None:
        self.k = k
        self.top_features, self.has_k = _top_features(class_weights, k)
        self.sid_sum = 0.0
        self.diversity_sum = 0.0
        self.count = 0

    def update(self, feature_maps: torch.Tensor, predictions: torch.Tensor) -> None:
        top_features = self.top_features.to(feature_maps.device)
        keep = self.has_k.to(predictions.device)[predictions]  # (B,)
        if not bool(keep.any()):
            return
        maps = feature_maps[keep]
        kept_predictions = predictions[keep]
        self.sid_sum += float(
            _diversity_scores(maps, top_features, kept_predictions, scale_invariant=True).sum()
        )
        self.diversity_sum += float(
            _diversity_scores(maps, top_features, kept_predictions, scale_invariant=False).sum()
        )
        self.count += int(keep.sum())

    def sid(self) -> float | None:
        return self.sid_sum / self.count if self.count else None

    def diversity(self) -> float | None:
        return self.diversity_sum / self.count if self.count else None


def _diversity_at_k(
    feature_maps: ArrayLike,
    class_weights: ArrayLike,
    predictions: ArrayLike,
    *,
    k: int,
    scale_invariant: bool,
) -> float:
    maps = _to_tensor(feature_maps, name="feature_maps", ndim=4).float()
    weights = _to_tensor(class_weights, name="class_weights", ndim=2).float()
    predicted = _to_tensor(predictions, name="predictions", ndim=1).long()
    if maps.shape[1] != weights.shape[1]:
        raise ValueError(
            f"feature_maps have {maps.shape[1]} channels, class_weights {weights.shape[1]} columns"
        )
    if predicted.shape[0] != maps.shape[0]:
        raise ValueError(f"{predicted.shape[0]} predictions for {maps.shape[0]} feature maps")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(predicted) and not 0 <= int(predicted.min()) <= int(predicted.max()) < len(weights):
        raise ValueError(f"predictions must be class indices in [0, {len(weights)})")
    sums = _DiversitySums(weights, k=k)
    sums.update(maps, predicted)
    value = sums.sid() if scale_invariant else sums.diversity()
    if value is None:
        raise ValueError(f"no image's predicted class has at least k={k} nonzero weights")
    return value


def sid_at_k(
    feature_maps: ArrayLike, class_weights: ArrayLike, predictions: ArrayLike, *, k: int = 5
) -> float:
    """Scale-Invariant Diversity at k (paper eqs. 15-16), averaged over images.

    For each image the k feature maps with the largest weights for its predicted class are
    divided by their mean absolute value, turned into spatial softmax maps, and the sum over
    positions of their pointwise maximum is divided by k. Images whose predicted class has fewer
    than k nonzero weights are left out (as in the reference code); no image is dropped otherwise.

    Args:
        feature_maps: (N, K, h, w) the maps the classifier reads.
        class_weights: (n_c, K) classifier weights.
        predictions: (N,) predicted classes.
        k: how many features per image.

    Returns:
        A value in [1/k, 1]; 1 when the k maps peak on different positions.

    Raises:
        ValueError: on shape mismatches, or when no image's predicted class has k nonzero weights.
    """
    return _diversity_at_k(feature_maps, class_weights, predictions, k=k, scale_invariant=True)


def diversity_at_k(
    feature_maps: ArrayLike, class_weights: ArrayLike, predictions: ArrayLike, *, k: int = 5
) -> float:
    """diversity@k (Norrenbrock et al. 2022): :func:`sid_at_k` without the scale normalisation.

    The plain spatial softmax makes the value depend on the scale of the maps (paper Table 8).
    Arguments and errors are those of :func:`sid_at_k`; the value is in [1/k, 1].
    """
    return _diversity_at_k(feature_maps, class_weights, predictions, k=k, scale_invariant=False)


# --------------------------------------------------------------------------------------------
# Part hits
# --------------------------------------------------------------------------------------------


def peak_positions(feature_maps: ArrayLike) -> np.ndarray:
    """Where each feature map peaks, as (x, y) relative to the image.

    Args:
        feature_maps: (N, K, h, w).

    Returns:
        (N, K, 2) float: x = (column + 0.5) / w, y = (row + 0.5) / h, the centre of the peak cell.
    """
    maps = _to_tensor(feature_maps, name="feature_maps", ndim=4)
    n_images, n_features, height, width = maps.shape
    flat_index = maps.reshape(n_images, n_features, height * width).argmax(dim=2)  # (N, K)
    rows = torch.div(flat_index, width, rounding_mode="floor")
    columns = flat_index - rows * width
    x = (columns.double() + 0.5) / width
    y = (rows.double() + 0.5) / height
    return torch.stack([x, y], dim=2).cpu().numpy()  # (N, K, 2)


def _part_hits(
    positions: np.ndarray, part_locations: np.ndarray, *, radius: float
) -> tuple[int, int]:
    """(hits, counted) over (image, feature) pairs of images with a visible part."""
    visible: np.ndarray = part_locations[:, :, 2] > 0  # (N, n_parts)
    offsets = positions[:, :, None, :] - part_locations[:, None, :, :2]  # (N, K, n_parts, 2)
    distances = np.sqrt((offsets**2).sum(axis=3))  # (N, K, n_parts)
    distances = np.where(visible[:, None, :], distances, np.inf)
    near = distances.min(axis=2) <= radius  # (N, K): the nearest visible part is close
    counted = visible.any(axis=1)  # (N,)
    return int(near[counted].sum()), int(counted.sum()) * positions.shape[1]


def part_hit_rate(
    peak_positions: ArrayLike, part_locations: ArrayLike, *, radius: float = 0.1
) -> float:
    """How often a feature's peak lies within ``radius`` of an annotated visible part.

    Positions and part locations are relative to the image (x, y in [0, 1]); the network input
    and the annotated image must show the same region (true for the squashing resize used on
    cropped birds; a centre crop shifts the coordinates).

    Args:
        peak_positions: (N, K, 2) peak (x, y) per image and feature, from :func:`peak_positions`.
        part_locations: (N, n_parts, 3) x, y, visibility (0/1) per image and part.
        radius: distance, as a fraction of the image side, that still counts as on the part.

    Returns:
        hits / (image, feature) pairs, over images with at least one visible part.

    Raises:
        ValueError: on shape mismatches or when no image has a visible part.
    """
    positions = _to_numpy(peak_positions, name="peak_positions", ndim=3)
    parts = _to_numpy(part_locations, name="part_locations", ndim=3)
    if positions.shape[2] != 2 or parts.shape[2] != 3 or positions.shape[0] != parts.shape[0]:
        raise ValueError(
            f"expected peak_positions (N, K, 2) and part_locations (N, n_parts, 3), got "
            f"{positions.shape} and {parts.shape}"
        )
    hits, counted = _part_hits(positions, parts, radius=radius)
    if counted == 0:
        raise ValueError("no image has a visible part")
    return hits / counted


# --------------------------------------------------------------------------------------------
# Model-level evaluation
# --------------------------------------------------------------------------------------------


def _check_sequential(loader: Any, *, name: str, what: str) -> None:
    """Raise unless the loader visits its data set in index order, each image once."""
    sampler = getattr(loader, "sampler", None)
    if sampler is None or isinstance(sampler, torch.utils.data.SequentialSampler):
        return
    dataset = getattr(loader, "dataset", None)
    in_order = False
    if dataset is not None and hasattr(sampler, "__len__") and len(sampler) == len(dataset):
        # e.g. a one-process ShardSampler: any sampler whose order is 0, 1, 2, ... will do
        in_order = all(int(got) == want for got, want in zip(sampler, range(len(dataset))))
    if not in_order:
        raise ValueError(
            f"{name} must iterate the data set in order (no shuffling, no sharding) so that "
            f"{what} lines up with the images; got sampler {type(sampler).__name__}"
        )


def evaluate_model(
    model: torch.nn.Module,
    test_loader: Any,
    train_loader: Any | None,
    *,
    device: torch.device | str,
    class_attributes: ArrayLike | None = None,
    image_attributes: ArrayLike | None = None,
    part_locations: ArrayLike | None = None,
    part_radius: float = 0.1,
    max_contrastiveness_images: int = 20_000,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Evaluate a dense or QPM model with every metric of the paper, in bounded memory.

    One pass over the test loader gives accuracy, SID@5, diversity@5 and part hits; one pass over
    the training loader (use the *test* transform there, as the paper does) gives
    Class-Independence, Correlation, Contrastiveness and feature alignment. Memory does not grow
    with the number of images: Contrastiveness keeps at most ``max_contrastiveness_images`` rows
    of at most 1000 features (a seeded sample of the features beyond that).

    Args:
        model: an ``openqpm.QPMModel`` (or anything with its ``forward_features``,
            ``head_feature_maps``, ``forward_head``, ``class_weights`` and ``is_qpm``). It is
            moved to ``device`` and put in eval mode; its training flag is restored afterwards.
        test_loader: yields (images, labels) of the test split.
        train_loader: yields (images, labels) of the training split with test transforms, or
            None to skip the training-set metrics.
        device: where the forward passes run.
        class_attributes: (n_c, n_attr) class attribute vectors for Structural Grounding.
        image_attributes: (n_train, n_attr) of the training split, in the loader's order, for
            feature alignment.
        part_locations: (n_test, n_parts, 3) of the test split, in the loader's order, for the
            part hit rate.
        part_radius: distance from a part that still counts as a hit (fraction of image side).
        max_contrastiveness_images: Contrastiveness fits its mixtures on all training images up
            to this many, on a seeded uniform sample of this many beyond (the fits' time grows
            with the images, one fit per feature).
        seed: seed of the Gaussian mixtures of Contrastiveness and of that sample.
        progress: called as ``progress(stage, done, total)`` after every batch.

    Returns:
        A dict: ``accuracy`` (percent), ``n_test_images``, ``n_train_images``,
        ``n_features_used``, ``features_per_class``, ``sid_at_5``, ``diversity_at_5``,
        ``class_independence``, ``contrastiveness``, ``correlation``, ``structural_grounding``,
        ``feature_alignment``, ``part_hit_rate`` (fractions in [0, 1] except the ratios
        ``structural_grounding`` and ``feature_alignment``; None where not available),
        ``is_qpm``, ``time_s`` and ``contrastiveness_n_features`` (how many features
        Contrastiveness averages over: all used ones, or a sample of 1000).

    Raises:
        ValueError: on an empty test loader, a shuffling loader paired with per-image annotations,
            or annotations whose length does not match the data.
    """
    start_s = time.perf_counter()
    # the QPMModel methods are looked up dynamically: any module with them is accepted
    qpm: Any = model
    model.to(device)
    with eval_mode(model):
        weights = qpm.class_weights().detach().float().cpu()
        used = torch.nonzero((weights != 0).any(dim=0)).ravel()  # (K_used,)
        used_weights = weights[:, used]  # (n_c, K_used)
        n_classes = weights.shape[0]
        result: dict[str, Any] = {
            "is_qpm": bool(getattr(model, "is_qpm", False)),
            "n_features_used": len(used),
            "features_per_class": float((used_weights != 0).sum()) / n_classes,
        }
        result.update(
            _evaluate_test(
                qpm,
                test_loader,
                used=used,
                used_weights=used_weights,
                device=device,
                part_locations=part_locations,
                part_radius=part_radius,
                progress=progress,
            )
        )
        result.update(
            _evaluate_train(
                qpm,
                train_loader,
                used=used,
                n_classes=n_classes,
                device=device,
                image_attributes=image_attributes,
                max_contrastiveness_images=max_contrastiveness_images,
                seed=seed,
                progress=progress,
            )
        )
        result["structural_grounding"] = None
        if class_attributes is not None:
            n_pairs = min(25, n_classes * (n_classes - 1) // 2)
            result["structural_grounding"] = structural_grounding(
                used_weights, class_attributes, n_pairs=n_pairs
            )
    result["time_s"] = time.perf_counter() - start_s
    _logger.info("evaluated model in %.1f s: %s", result["time_s"], result)
    return {name: result.get(name) for name in [*names(), *sorted(set(result) - set(names()))]}


@torch.no_grad()
def _evaluate_test(
    model: Any,
    loader: Any,
    *,
    used: torch.Tensor,
    used_weights: torch.Tensor,
    device: torch.device | str,
    part_locations: ArrayLike | None,
    part_radius: float,
    progress: ProgressCallback | None,
) -> dict[str, Any]:
    diversity = _DiversitySums(used_weights, k=5)
    parts = None
    if part_locations is not None:
        parts = _to_numpy(part_locations, name="part_locations", ndim=3)
        _check_sequential(loader, name="test_loader", what="part_locations")
    # part hits look at each predicted class's features, at most 5 (as SID@5) and at most as
    # many as the smallest class has
    n_weights_min = int((used_weights != 0).sum(dim=1).min()) if len(used_weights) else 0
    part_features, _ = _top_features(used_weights, max(1, min(5, n_weights_min)))
    used_on_device = used.to(device)
    n_correct = n_images = part_hits = part_counted = 0
    n_batches = len(loader) if hasattr(loader, "__len__") else 0
    for batch_index, batch in enumerate(loader):
        images, labels = unpack_batch(batch, name="test_loader")
        backbone_maps = model.forward_features(images.to(device))  # (B, n_f, h, w)
        logits = model.forward_head(backbone_maps)  # (B, n_c)
        predictions = logits.argmax(dim=1)
        maps = model.head_feature_maps(backbone_maps)[:, used_on_device]  # (B, K_used, h, w)
        diversity.update(maps, predictions)
        n_correct += int((predictions.cpu() == labels).sum())
        if parts is not None:
            batch_parts = parts[n_images : n_images + len(labels)]
            if len(batch_parts) != len(labels):
                raise ValueError(f"part_locations has {len(parts)} rows, the test set has more")
            # the decision's features: the predicted class's (up to) 5 most weighted ones
            chosen = part_features.to(device)[predictions]  # (B, k_parts)
            height, width = maps.shape[2:]
            chosen_maps = torch.gather(
                maps.reshape(len(maps), -1, height * width),
                1,
                chosen[:, :, None].expand(-1, -1, height * width),
            ).reshape(len(maps), -1, height, width)  # (B, k_parts, h, w)
            hits, counted = _part_hits(peak_positions(chosen_maps), batch_parts, radius=part_radius)
            part_hits += hits
            part_counted += counted
        n_images += len(labels)
        if progress is not None:
            progress("test", batch_index + 1, n_batches)
    if n_images == 0:
        raise ValueError("test_loader yielded no images")
    if parts is not None and len(parts) != n_images:
        raise ValueError(f"part_locations has {len(parts)} rows for {n_images} test images")
    return {
        "accuracy": 100.0 * n_correct / n_images,
        "n_test_images": n_images,
        "sid_at_5": diversity.sid(),
        "diversity_at_5": diversity.diversity(),
        "part_hit_rate": part_hits / part_counted if part_counted else None,
    }


@torch.no_grad()
def _evaluate_train(
    model: Any,
    loader: Any | None,
    *,
    used: torch.Tensor,
    n_classes: int,
    device: torch.device | str,
    image_attributes: ArrayLike | None,
    max_contrastiveness_images: int,
    seed: int,
    progress: ProgressCallback | None,
) -> dict[str, Any]:
    empty: dict[str, Any] = {
        "n_train_images": 0,
        "class_independence": None,
        "contrastiveness": None,
        "contrastiveness_n_features": None,
        "correlation": None,
        "feature_alignment": None,
    }
    if loader is None:
        return empty
    attributes = None
    if image_attributes is not None:
        attributes = _to_numpy(image_attributes, name="image_attributes", ndim=2, dtype=np.int64)
        _check_sequential(loader, name="train_loader", what="image_attributes")
    n_used = len(used)
    sums = _FeatureSums(
        n_used, n_classes, n_attributes=None if attributes is None else attributes.shape[1]
    )
    sampled_features = contrastiveness_features(n_used, seed=seed)
    sample = _ReservoirSample(max_contrastiveness_images, len(sampled_features), seed=seed)
    used_on_device = used.to(device)
    n_batches = len(loader) if hasattr(loader, "__len__") else 0
    for batch_index, batch in enumerate(loader):
        images, labels = unpack_batch(batch, name="train_loader")
        backbone_maps = model.forward_features(images.to(device))  # (B, n_f, h, w)
        features = model.forward_head(backbone_maps, pre_logits=True)[:, used_on_device]
        features_array = features.double().cpu().numpy()  # (B, K_used)
        batch_attributes = None
        if attributes is not None:
            batch_attributes = attributes[sums.count : sums.count + len(labels)]
            if len(batch_attributes) != len(labels):
                raise ValueError(
                    f"image_attributes has {len(attributes)} rows, the training set has more"
                )
        sums.update(features_array, labels.numpy().astype(np.int64), batch_attributes)
        sample.update(features_array[:, sampled_features].astype(np.float32))
        if progress is not None:
            progress("train", batch_index + 1, n_batches)
    if sums.count == 0:
        return empty
    if attributes is not None and len(attributes) != sums.count:
        raise ValueError(
            f"image_attributes has {len(attributes)} rows for {sums.count} training images"
        )
    result: dict[str, Any] = dict(empty)
    result["n_train_images"] = sums.count
    result["class_independence"] = sums.class_independence()
    result["correlation"] = sums.correlation() if n_used >= 2 else None
    if attributes is not None:
        try:
            result["feature_alignment"] = sums.feature_alignment()
        except ValueError as error:
            _logger.warning("feature alignment not available: %s", error)
    if sums.count >= 2 and len(sampled_features):
        if progress is not None:
            progress("contrastiveness", 0, 1)
        result["contrastiveness"] = contrastiveness(sample.sample(), seed=seed)
        result["contrastiveness_n_features"] = len(sampled_features)
        if progress is not None:
            progress("contrastiveness", 1, 1)
    return result


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

_TABLE_COLUMNS = [
    "accuracy",
    "n_features_used",
    "features_per_class",
    "sid_at_5",
    "class_independence",
    "contrastiveness",
    "structural_grounding",
    "correlation",
]
_OPTIONAL_COLUMNS = ["diversity_at_5", "feature_alignment", "part_hit_rate"]


@torch.no_grad()
def top_weight_baseline_accuracy(
    model: torch.nn.Module,
    loader: Any,
    *,
    n_features: int,
    n_per_class: int,
    device: torch.device | str,
) -> float:
    """Accuracy of a dense model pruned to a QPM's size without any optimisation.

    The ``n_features`` features with the largest total absolute dense weight are kept, and each
    class keeps its ``n_per_class`` largest (signed) weights among them; the kept weights and the
    bias are unchanged, the head's dropout is not applied. This is the naive baseline that a QPM
    of the same size must beat.

    Args:
        model: a dense ``openqpm.QPMModel`` (``forward_features``, ``class_weights`` and a head
            with a ``linear`` layer whose bias is used when present). It is moved to ``device``
            and put in eval mode; its training flag is restored afterwards.
        loader: yields ``(images, labels)``, usually the test split.
        n_features: how many features are kept (the QPM's n_f*).
        n_per_class: how many of them each class keeps.
        device: where the forward passes run.

    Returns:
        The accuracy as a fraction in [0, 1] (0 for an empty loader).

    Raises:
        ValueError: sizes outside ``1 <= n_per_class <= n_features <= n_f``, or a loader that
            does not yield ``(images, labels)``.
    """
    qpm: Any = model.to(device)
    weight = qpm.class_weights().detach()  # (n_c, n_f)
    if not 1 <= n_per_class <= n_features <= weight.shape[1]:
        raise ValueError(
            f"need 1 <= n_per_class ({n_per_class}) <= n_features ({n_features}) <= the "
            f"model's {weight.shape[1]} features"
        )
    keep_features = torch.topk(weight.abs().sum(dim=0), n_features).indices  # (n_features,)
    kept = weight[:, keep_features]  # (n_c, n_features)
    top = torch.topk(kept, n_per_class, dim=1).indices  # (n_c, n_per_class)
    rows = torch.arange(weight.shape[0], device=weight.device)[:, None]
    pruned = torch.zeros_like(weight)
    pruned[rows, keep_features[top]] = kept[rows, top]
    bias = getattr(getattr(qpm.head, "linear", None), "bias", None)
    n_correct = n_images = 0
    with eval_mode(model):
        for batch in loader:
            images, labels = unpack_batch(batch, name="loader")
            pooled = qpm.forward_features(images.to(device)).mean(dim=(2, 3))  # (B, n_f)
            logits = pooled @ pruned.T
            if bias is not None:
                logits = logits + bias.detach()
            n_correct += int((logits.argmax(dim=1).cpu() == labels).sum())
            n_images += int(labels.numel())
    return n_correct / max(n_images, 1)


def format_metric(name: str, value: Any) -> str:
    """One metric value as shown in tables: percent with one decimal, counts as integers.

    Args:
        name: a registered metric name (see :func:`names`).
        value: its value, or None.

    Returns:
        The text; ``"n/a"`` for None or NaN.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    kind = describe(name).kind
    if kind == "percent":
        return f"{value:.1f}"
    if kind == "fraction":
        return f"{100.0 * value:.1f}"
    if kind == "count":
        return f"{int(value)}"
    if kind == "ratio":
        return f"{value:.2f}"
    # "number": whole large values (a dense model's 2048 features per class) without decimals
    if float(value).is_integer() and abs(value) >= 100:
        return f"{int(value)}"
    return f"{value:.1f}"


def format_metrics_table(
    dense: Mapping[str, Any] | None, qpm: Mapping[str, Any] | None = None, *, label: str = "QPM"
) -> str:
    """A plain-text table of one or two evaluations, like the paper's Tables 2 and 3.

    Rows are the models, columns the metrics (percent with one decimal; arrows say which
    direction is better). Optional metrics (diversity@5, alignment, part hits) get a column only
    when some row has them.

    Args:
        dense: :func:`evaluate_model` result of the dense model, or None.
        qpm: the same for the QPM (or another sparse model), or None.
        label: the second row's name (``QPM``, ``SLDD``, ...).

    Returns:
        The table, lines joined by newlines, no trailing newline.

    Raises:
        ValueError: when both are None.

    Example:
        >>> print(format_metrics_table(None, {"accuracy": 85.1, "sid_at_5": 0.901}))
        ... # doctest: +SKIP
    """
    rows = [(name, row) for name, row in (("Dense", dense), (label, qpm)) if row is not None]
    if not rows:
        raise ValueError("format_metrics_table needs at least one evaluation")
    columns = list(_TABLE_COLUMNS)
    columns += [
        name for name in _OPTIONAL_COLUMNS if any(row.get(name) is not None for _, row in rows)
    ]
    arrows = {True: " ↑", False: " ↓", None: ""}
    headers = ["Model"] + [
        describe(name).label + arrows[describe(name).higher_is_better] for name in columns
    ]
    body = [
        [label] + [format_metric(name, row.get(name)) for name in columns] for label, row in rows
    ]
    widths = [max(len(line[index]) for line in [headers, *body]) for index in range(len(headers))]

    def render(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest])

    rule = "-" * len(render(headers))
    return "\n".join([render(headers), rule, *[render(line) for line in body]])
