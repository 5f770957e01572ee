"""Realistic QPM problems without images: a latent-attribute world and its constants.

The solvers need test and benchmark problems whose structure resembles what a trained backbone
produces, at every size from a brute-forceable toy to ImageNet. A :class:`LatentWorld` is a small
generative model of a data set seen through a backbone:

* Classes come in *families* (like the gulls or the warblers of CUB): the classes of one family
  share a prototype of binary attributes; each differs from it in a few attributes, and some are
  siblings that differ from another class of the family in exactly one attribute.
* Each image of a class shows each attribute with a class-specific probability (like CUB's
  continuous class attributes), plus a random "background" vector.
* The backbone's units (features) are of five kinds: *attribute units* that respond to a sparse
  mixture of one to three attributes (sometimes inhibited by one), *class detectors* that respond
  to one class, *redundant copies* of another unit (noisy, rescaled), *nuisance units* that
  respond to the background only, and *dead units* that never fire.
* Every unit also has a map behaviour: how peaked its spatial maps are when it fires, and how
  often its peak lies on the map border. These give the locality bias something to measure.

Images are sampled in batches and streamed into :class:`openqpm.constants.FeatureStatistics`
and :class:`openqpm.constants.MapStatistics`; :func:`openqpm.constants.build_problem` then
makes A, R, eps and b exactly as for a real model. Nothing is ever held for the whole data set,
so the ImageNet-sized world (1000 classes, 2048 units) builds in seconds.

Two penalty families (:func:`instance_penalties`) share the world, A and b and differ in R:
``"default"`` is R as :func:`openqpm.constants.build_problem` makes it (at CUB scale about 27 %
of pairs penalised, mean weight about 0.15); ``"strong"`` (issue 17's harder family, see
:func:`strong_penalties`) penalises the most similar quarter of all pairs with mean weight 0.3.

Example:
    >>> problem = make_instance("tiny", seed=0)
    >>> problem.A.shape, problem.n_features, problem.n_per_class
    ((12, 40), 8, 3)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from openqpm.constants import (
    FeatureStatistics,
    MapStatistics,
    build_problem,
    feature_redundancy,
)
from openqpm.solver.problem import AssignmentProblem

_logger = logging.getLogger(__name__)

__all__ = [
    "PENALTIES",
    "SCALES",
    "STRONG_MEAN_WEIGHT",
    "STRONG_PENALISED_SHARE",
    "InstanceScale",
    "LatentWorld",
    "generate_instance",
    "instance_penalties",
    "instance_scales",
    "make_instance",
    "make_world",
    "strong_penalties",
]

# unit kinds, in the order of LatentWorld.unit_kind codes
UNIT_KINDS = ("attribute", "family", "class_detector", "copy", "nuisance", "dead")
_ATTRIBUTE, _FAMILY, _DETECTOR, _COPY, _NUISANCE, _DEAD = range(len(UNIT_KINDS))

# share of each unit kind among the n_f units; attribute units take the rest. A trained ResNet has
# a few dead channels, many redundant ones (the reason the paper penalises R) and some that
# respond to backgrounds rather than birds.
_DEAD_SHARE = 0.01
_NUISANCE_SHARE = 0.10
_DETECTOR_SHARE = 0.08
_COPY_SHARE = 0.18
_FAMILY_SHARE = 0.30

_N_BACKGROUND = 8  # dimensions of the per-image background vector
_CONJUNCTION_THRESHOLD = 0.8  # drive subtracted per extra excitatory input of an attribute unit
_NOISE_RANGE = (0.1, 0.4)  # per-unit noise standard deviation
_MAP_SIZE = 7  # ResNet-50 maps at 224 px without reduced strides are 7 x 7

# the penalty families of R (see the module docstring); the strong one is issue 17's harder
# problem: a quarter of all pairs penalised, twice CUB's default mean weight
PENALTIES = ("default", "strong")
STRONG_PENALISED_SHARE = 0.25
STRONG_MEAN_WEIGHT = 0.3


@dataclass(frozen=True)
class InstanceScale:
    """The sizes of one named benchmark scale.

    Args:
        n_all_features: Backbone features n_f (units of the world).
        n_classes: Classes n_c.
        n_features: Features to select (the paper's n_f*).
        n_per_class: Features per class (the paper's n_wc).
        n_images_per_class: Training images sampled per class for the statistics.
    """

    n_all_features: int
    n_classes: int
    n_features: int
    n_per_class: int
    n_images_per_class: int


SCALES: dict[str, InstanceScale] = {
    "tiny": InstanceScale(40, 12, 8, 3, 30),
    "small": InstanceScale(128, 30, 15, 4, 30),
    "medium": InstanceScale(512, 100, 30, 5, 30),
    # CUB-200-2011 has about 30 training images per class
    "cub": InstanceScale(2048, 200, 50, 5, 30),
    # ImageNet has ~1300 per class; 12 keep the build fast and the correlations already stable
    "imagenet": InstanceScale(2048, 1000, 50, 5, 12),
}


def instance_scales() -> list[str]:
    """Names accepted by :func:`make_instance`, smallest first."""
    return list(SCALES)


def instance_penalties() -> list[str]:
    """Penalty families accepted by :func:`make_instance` and :func:`generate_instance`."""
    return list(PENALTIES)


def _check_penalty(penalty: str) -> None:
    """Raise a ValueError naming ``penalty`` and the valid families unless it is one of them."""
    if penalty not in PENALTIES:
        raise ValueError(f"unknown penalty {penalty!r}; valid: {', '.join(PENALTIES)}")


@dataclass(frozen=True)
class LatentWorld:
    """A sampled latent-attribute world (see the module docstring).

    Args:
        class_family: (n_c,) family index of every class.
        attribute_probability: (n_c, n_attr) probability that an image of a class shows an
            attribute.
        unit_kind: (n_f,) index into ``UNIT_KINDS``.
        attribute_weights: (n_f, n_attr) response of each unit to the attributes.
        class_weights: (n_f, n_c) response of each unit to the class itself (detectors).
        background_weights: (n_f, n_background) response of each unit to the background.
        copy_source: (n_f,) the unit a redundant copy follows, -1 for the others.
        copy_gain: (n_f,) scale of a copy relative to its source.
        gain: (n_f,) overall gain of each unit.
        offset: (n_f,) threshold (negative bias) of each unit before the ReLU.
        noise: (n_f,) standard deviation of each unit's own noise.
        locality: (n_f,) in [0, 1], how peaked the unit's maps are when it fires.
        border_rate: (n_f,) probability that the unit's map peaks on the border.
        detector_reliability: Probability that a class detector fires on an image of its class.
    """

    class_family: np.ndarray
    attribute_probability: np.ndarray
    unit_kind: np.ndarray
    attribute_weights: np.ndarray
    class_weights: np.ndarray
    background_weights: np.ndarray
    copy_source: np.ndarray
    copy_gain: np.ndarray
    gain: np.ndarray
    offset: np.ndarray
    noise: np.ndarray
    locality: np.ndarray
    border_rate: np.ndarray
    detector_reliability: float = 0.5

    @property
    def n_classes(self) -> int:
        """Number of classes n_c."""
        return int(self.attribute_probability.shape[0])

    @property
    def n_all_features(self) -> int:
        """Number of units n_f."""
        return int(self.unit_kind.shape[0])

    def sample(
        self, labels: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sample what the backbone sees for a batch of images of the given classes.

        Args:
            labels: (B,) class of every image.
            rng: Source of randomness.

        Returns:
            ``(pooled, peak_softmax, peak_index)``, each (B, n_f), as
            :func:`openqpm.constants.summarize_feature_maps` would return them for 7 x 7 maps.
        """
        labels = np.asarray(labels, dtype=np.int64)
        batch = labels.size
        n_all = self.n_all_features
        shown = (
            rng.random((batch, self.attribute_probability.shape[1]))
            < (self.attribute_probability[labels])
        )  # (B, n_attr)
        background = rng.normal(size=(batch, self.background_weights.shape[1]))  # (B, n_bg)
        detected = np.zeros((batch, self.n_classes))  # (B, n_c), one-hot where the detector fires
        detected[np.arange(batch), labels] = rng.random(batch) < self.detector_reliability
        drive = (
            shown.astype(np.float64) @ self.attribute_weights.T
            + detected @ self.class_weights.T
            + background @ self.background_weights.T
        )  # (B, n_f)
        drive = self.gain * drive + self.offset + self.noise * rng.normal(size=(batch, n_all))
        copies = np.flatnonzero(self.copy_source >= 0)
        drive[:, copies] = drive[:, self.copy_source[copies]] * self.copy_gain[copies] + (
            0.3 * rng.normal(size=(batch, copies.size))
        )
        pooled = np.maximum(drive, 0.0)
        pooled[:, self.unit_kind == _DEAD] = 0.0

        # a firing local unit has a sharp map (softmax peak near 1), a silent or diffuse one a
        # flat map (peak near 1 / (h*w))
        n_positions = _MAP_SIZE * _MAP_SIZE
        sharpness = 1.0 / (1.0 + np.exp(-(4.0 * pooled - 2.0)))  # (B, n_f)
        peak_softmax = 1.0 / n_positions + (1.0 - 1.0 / n_positions) * self.locality * sharpness
        on_border = rng.random((batch, n_all)) < self.border_rate  # (B, n_f)
        border_positions = _border_positions()
        interior_positions = np.setdiff1d(np.arange(n_positions), border_positions)
        peak_index = np.where(
            on_border,
            border_positions[rng.integers(border_positions.size, size=(batch, n_all))],
            interior_positions[rng.integers(interior_positions.size, size=(batch, n_all))],
        )
        return pooled, peak_softmax, peak_index.astype(np.int64)


def _border_positions() -> np.ndarray:
    """Flat indices of the border cells of a 7 x 7 map."""
    row, column = np.divmod(np.arange(_MAP_SIZE * _MAP_SIZE), _MAP_SIZE)
    last = _MAP_SIZE - 1
    return np.flatnonzero((row == 0) | (row == last) | (column == 0) | (column == last))


def make_world(n_all_features: int, n_classes: int, *, seed: int = 0) -> LatentWorld:
    """Sample a latent-attribute world.

    Args:
        n_all_features: Number of backbone units n_f (at least 10).
        n_classes: Number of classes n_c (at least 2).
        seed: Seed; the world is a deterministic function of the three arguments.

    Returns:
        The world.

    Raises:
        ValueError: If a size is too small.
    """
    if n_all_features < 10 or n_classes < 2:
        raise ValueError(
            f"need n_all_features >= 10 and n_classes >= 2, got {n_all_features}, {n_classes}"
        )
    rng = np.random.default_rng(seed)
    # CUB has 312 attributes for 200 classes; small worlds still need enough to tell classes apart
    n_attributes = int(np.clip(n_classes // 2 + 20, 24, 320))

    # families of 2 to 8 classes sharing a prototype
    class_family = np.empty(n_classes, dtype=np.int64)
    has_attribute = np.zeros((n_classes, n_attributes), dtype=bool)
    first, family = 0, 0
    while first < n_classes:
        size = min(int(rng.integers(2, 9)), n_classes - first)
        prototype = rng.random(n_attributes) < 0.22
        for member in range(first, first + size):
            if member > first and rng.random() < 0.4:
                # a sibling: the previous class with exactly one attribute flipped
                pattern = has_attribute[member - 1].copy()
                flipped = int(rng.integers(n_attributes))
                pattern[flipped] = not pattern[flipped]
            else:
                pattern = prototype ^ (rng.random(n_attributes) < 0.08)
            has_attribute[member] = pattern
            class_family[member] = family
        first += size
        family += 1
    attribute_probability = np.where(
        has_attribute,
        rng.uniform(0.6, 0.95, has_attribute.shape),
        rng.uniform(0.0, 0.15, has_attribute.shape),
    )

    counts = {
        _DEAD: max(1, int(_DEAD_SHARE * n_all_features)),
        _NUISANCE: int(_NUISANCE_SHARE * n_all_features),
        _DETECTOR: int(min(n_classes, _DETECTOR_SHARE * n_all_features)),
        _COPY: int(_COPY_SHARE * n_all_features),
        _FAMILY: int(_FAMILY_SHARE * n_all_features),
    }
    counts[_ATTRIBUTE] = n_all_features - sum(counts.values())
    unit_kind = np.concatenate([np.full(counts[kind], kind) for kind in range(len(UNIT_KINDS))])
    rng.shuffle(unit_kind)

    attribute_weights = np.zeros((n_all_features, n_attributes))
    class_weights = np.zeros((n_all_features, n_classes))
    background_weights = np.zeros((n_all_features, _N_BACKGROUND))
    copy_source = np.full(n_all_features, -1, dtype=np.int64)
    conjunction = np.zeros(n_all_features)
    originals = np.flatnonzero(
        (unit_kind == _ATTRIBUTE) | (unit_kind == _FAMILY) | (unit_kind == _DETECTOR)
    )
    n_families = family
    # attributes most members of a family show: what a family unit can key on
    family_share = np.zeros((n_families, n_attributes))  # (n_families, n_attr)
    np.add.at(family_share, class_family, has_attribute.astype(np.float64))
    family_share /= np.bincount(class_family, minlength=n_families)[:, None]
    for unit, kind in enumerate(unit_kind):
        if kind == _ATTRIBUTE:
            n_inputs = int(rng.integers(1, 4))
            inputs = rng.choice(n_attributes, n_inputs, replace=False)
            # mostly excitatory; now and then an attribute inhibits the unit
            sign = np.where(rng.random(n_inputs) < 0.15, -0.5, 1.0)
            attribute_weights[unit, inputs] = rng.uniform(0.5, 1.5, n_inputs) * sign
            # a unit with several inputs fires mostly on their conjunction, which makes it
            # specific to few classes, as trained features are
            conjunction[unit] = _CONJUNCTION_THRESHOLD * float(np.clip(sign, 0, 1).sum() - 1)
            background_weights[unit] = rng.normal(0.0, 0.15, _N_BACKGROUND)
        elif kind == _FAMILY:
            chosen_family = int(rng.integers(n_families))
            typical = np.flatnonzero(family_share[chosen_family] >= 0.5)
            if typical.size == 0:
                typical = np.arange(n_attributes)
            n_inputs = min(int(typical.size), int(rng.integers(2, 4)))
            inputs = rng.choice(typical, n_inputs, replace=False)
            attribute_weights[unit, inputs] = rng.uniform(0.8, 1.5, n_inputs)
            conjunction[unit] = _CONJUNCTION_THRESHOLD * (n_inputs - 1)
            background_weights[unit] = rng.normal(0.0, 0.15, _N_BACKGROUND)
        elif kind == _DETECTOR:
            class_weights[unit, rng.integers(n_classes)] = rng.uniform(0.5, 1.0)
            background_weights[unit] = rng.normal(0.0, 0.15, _N_BACKGROUND)
        elif kind == _NUISANCE:
            background_weights[unit] = rng.normal(0.0, 1.0, _N_BACKGROUND)
        elif kind == _COPY:
            copy_source[unit] = rng.choice(originals)

    return LatentWorld(
        class_family=class_family,
        attribute_probability=attribute_probability,
        unit_kind=unit_kind,
        attribute_weights=attribute_weights,
        class_weights=class_weights,
        background_weights=background_weights,
        copy_source=copy_source,
        copy_gain=rng.uniform(0.7, 1.3, n_all_features),
        gain=rng.uniform(0.5, 2.0, n_all_features),
        offset=rng.normal(-0.3, 0.3, n_all_features) - conjunction,
        noise=rng.uniform(_NOISE_RANGE[0], _NOISE_RANGE[1], n_all_features),
        locality=rng.beta(2.0, 2.0, n_all_features),
        border_rate=rng.beta(1.0, 4.0, n_all_features),
    )


def strong_penalties(
    A: np.ndarray,
    *,
    share: float = STRONG_PENALISED_SHARE,
    mean_weight: float = STRONG_MEAN_WEIGHT,
) -> tuple[np.ndarray, float]:
    """R of the strong family: the most similar pairs, proportional weights of a given mean.

    The similarity is the one the default R is thresholded from,
    :func:`openqpm.constants.feature_redundancy` of A (ReLU of the cosine between the features'
    class profiles). Since :func:`openqpm.constants.build_problem` computes it from the same A
    (scaling A leaves cosines unchanged), it is recomputed here exactly, for every pair, including
    those the default R leaves at 0. Exactly ``round(share * n_pairs)`` of the
    ``n_f (n_f - 1) / 2`` pairs are penalised: the most similar ones, ties broken by the lower
    pair index (row-major upper triangle). Their weights are the similarity scaled by one factor
    so that their mean is ``mean_weight`` (up to round-off): proportional, so strictly monotone in
    the similarity.

    Args:
        A: (n_c, n_f) class-feature similarity of the problem.
        share: Share of all pairs to penalise, in (0, 1].
        mean_weight: Mean weight of the penalised pairs, positive.

    Returns:
        ``(R, eps)``: the (n_f, n_f) symmetric, non-negative, zero-diagonal penalties and the
        smallest similarity among the penalised pairs (the threshold, for the record).

    Raises:
        ValueError: If ``share`` or ``mean_weight`` is out of range, ``share * n_pairs`` rounds
            to no pair, or fewer pairs than wanted have a positive similarity (a weight would
            be 0).
    """
    if not 0 < share <= 1 or not mean_weight > 0:
        raise ValueError(f"need 0 < share <= 1 and mean_weight > 0, got {share}, {mean_weight}")
    redundancy = feature_redundancy(A)  # (n_f, n_f)
    n_all = redundancy.shape[0]
    first, second = np.triu_indices(n_all, k=1)
    similarity = redundancy[first, second]  # (n_pairs,)
    n_penalised = round(share * similarity.size)
    if n_penalised < 1:
        raise ValueError(f"{n_all} features have no pair to penalise at share {share}")
    chosen = np.argsort(-similarity, kind="stable")[:n_penalised]
    smallest = float(similarity[chosen[-1]])
    if smallest <= 0:
        n_positive = int(np.count_nonzero(similarity > 0))
        raise ValueError(
            f"only {n_positive} pairs have a positive similarity; {n_penalised} needed"
        )
    weights = similarity[chosen] * (mean_weight / float(similarity[chosen].mean()))
    penalties = np.zeros_like(redundancy)
    penalties[first[chosen], second[chosen]] = weights
    penalties[second[chosen], first[chosen]] = weights
    return penalties, smallest


def _with_strong_penalties(problem: AssignmentProblem) -> AssignmentProblem:
    """The same problem (A, b, sizes) with the strong family's R (see :func:`strong_penalties`).

    The recorded start selection is kept only if no pair of it is penalised under the new R.
    """
    penalties, eps = strong_penalties(problem.A)
    metadata = dict(problem.metadata)
    metadata["n_penalised_pairs"] = int(np.count_nonzero(np.triu(penalties, k=1)))
    metadata["penalty_mean_weight"] = STRONG_MEAN_WEIGHT
    start = metadata.get("start_features")
    if isinstance(start, list) and np.any(penalties[np.ix_(start, start)] > 0):
        del metadata["start_features"]
    return AssignmentProblem(
        problem.A,
        penalties,
        problem.b,
        problem.n_features,
        problem.n_per_class,
        eps=eps,
        metadata=metadata,
    )


def generate_instance(
    n_all_features: int,
    n_classes: int,
    n_features: int,
    n_per_class: int,
    *,
    n_images_per_class: int = 30,
    seed: int = 0,
    bias: str = "locality",
    batch_size: int = 2048,
    penalty: str = "default",
) -> AssignmentProblem:
    """A QPM problem from a freshly sampled latent-attribute world.

    Args:
        n_all_features: Backbone units n_f.
        n_classes: Classes n_c.
        n_features: Features to select.
        n_per_class: Features per class.
        n_images_per_class: Training images sampled per class.
        seed: Seed of the world, the images and the constants' clique search.
        bias: Any bias name :func:`openqpm.constants.build_problem` accepts.
        batch_size: Images sampled and streamed at a time (memory is O(batch_size * n_f)).
        penalty: One of :func:`instance_penalties`: ``"default"`` keeps R as
            :func:`openqpm.constants.build_problem` makes it; ``"strong"`` replaces it by
            :func:`strong_penalties` of the same A (A and b unchanged).

    Returns:
        The problem, with ``metadata`` naming the generator, its sizes, seed and penalty.

    Raises:
        ValueError: If a size is invalid (too small a world, or sizes the problem rejects) or
            ``penalty`` is unknown (the message lists the valid ones).
    """
    _check_penalty(penalty)
    if n_images_per_class < 2 or batch_size < 1:
        raise ValueError(
            f"need n_images_per_class >= 2 and batch_size >= 1, got {n_images_per_class}, "
            f"{batch_size}"
        )
    world = make_world(n_all_features, n_classes, seed=seed)
    rng = np.random.default_rng([seed, 1])  # images: a stream independent of the world's
    labels = np.repeat(np.arange(n_classes), n_images_per_class)
    rng.shuffle(labels)
    feature_stats = FeatureStatistics(n_all_features, n_classes)
    map_stats = MapStatistics(n_all_features)
    for first in range(0, labels.size, batch_size):
        batch_labels = labels[first : first + batch_size]
        pooled, peak_softmax, peak_index = world.sample(batch_labels, rng)
        feature_stats.update(pooled, batch_labels)
        map_stats.update(
            pooled, peak_softmax, peak_index, map_height=_MAP_SIZE, map_width=_MAP_SIZE
        )
    problem, _ = build_problem(
        feature_stats,
        map_stats,
        n_features=n_features,
        n_per_class=n_per_class,
        bias=bias,
        seed=seed,
    )
    problem.metadata.update(
        {
            "generator": "openqpm.instances.generate_instance",
            "n_images_per_class": n_images_per_class,
            "seed": seed,
            "penalty": penalty,
        }
    )
    if penalty == "strong":
        problem = _with_strong_penalties(problem)
    _logger.info(
        "instance n_f=%d n_c=%d (%s penalty): eps %.4f, %d penalised pairs",
        n_all_features,
        n_classes,
        penalty,
        problem.eps,
        problem.n_penalised_pairs,
    )
    return problem


def make_instance(scale: str, *, seed: int = 0, penalty: str = "default") -> AssignmentProblem:
    """A problem of one of the named benchmark scales (see :data:`SCALES`).

    Args:
        scale: One of :func:`instance_scales`: ``tiny`` (40 features, 12 classes, select 8,
            3 per class), ``small`` (128, 30, 15, 4), ``medium`` (512, 100, 30, 5), ``cub``
            (2048, 200, 50, 5), ``imagenet`` (2048, 1000, 50, 5).
        seed: Seed; the problem is a deterministic function of ``scale``, ``seed`` and
            ``penalty``.
        penalty: One of :func:`instance_penalties` (see :func:`generate_instance`); the
            families of one scale and seed share A and b.

    Returns:
        The problem; ``metadata["scale"]`` and ``metadata["penalty"]`` name the scale and the
        penalty family.

    Raises:
        ValueError: If ``scale`` or ``penalty`` is unknown (the message lists the valid ones).
    """
    if scale not in SCALES:
        raise ValueError(f"unknown instance scale {scale!r}; valid: {', '.join(SCALES)}")
    _check_penalty(penalty)
    sizes = SCALES[scale]
    problem = generate_instance(
        sizes.n_all_features,
        sizes.n_classes,
        sizes.n_features,
        sizes.n_per_class,
        n_images_per_class=sizes.n_images_per_class,
        seed=seed,
        penalty=penalty,
    )
    problem.metadata["scale"] = scale
    return problem
