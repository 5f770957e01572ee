"""The latent-attribute instance generator: sizes, determinism, structure."""

from __future__ import annotations

import numpy as np
import pytest

from openqpm.constants import feature_redundancy
from openqpm.instances import (
    SCALES,
    UNIT_KINDS,
    _with_strong_penalties,
    generate_instance,
    instance_penalties,
    instance_scales,
    make_instance,
    make_world,
    strong_penalties,
)
from openqpm.solver.problem import AssignmentProblem


def test_tiny_instance_has_the_requested_sizes() -> None:
    problem = make_instance("tiny", seed=0)
    assert problem.A.shape == (12, 40)
    assert problem.R.shape == (40, 40) and problem.b.shape == (40,)
    assert (problem.n_features, problem.n_per_class) == (8, 3)
    assert problem.metadata["scale"] == "tiny"
    # what openqpm.constants promises: A scaled to max |A| = 1, b to max |b| = 1/sqrt(10)
    assert np.abs(problem.A).max() == pytest.approx(1.0)
    assert np.abs(problem.b).max() == pytest.approx(1.0 / np.sqrt(10.0))
    assert problem.n_penalised_pairs > 0


def test_scales_are_the_issue_sizes() -> None:
    sizes = {
        name: (s.n_all_features, s.n_classes, s.n_features, s.n_per_class)
        for name, s in SCALES.items()
    }
    assert sizes == {
        "tiny": (40, 12, 8, 3),
        "small": (128, 30, 15, 4),
        "medium": (512, 100, 30, 5),
        "cub": (2048, 200, 50, 5),
        "imagenet": (2048, 1000, 50, 5),
    }
    assert instance_scales() == list(SCALES)


def test_instances_are_deterministic_per_seed() -> None:
    first = generate_instance(30, 8, 6, 2, seed=3)
    again = generate_instance(30, 8, 6, 2, seed=3)
    other = generate_instance(30, 8, 6, 2, seed=4)
    for name in ("A", "R", "b"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.A, other.A)


def test_dead_units_get_zero_similarity_whatever_the_batch_size() -> None:
    small_batches = generate_instance(30, 8, 6, 2, seed=1, batch_size=7)
    one_batch = generate_instance(30, 8, 6, 2, seed=1, batch_size=10_000)
    assert small_batches.A.shape == one_batch.A.shape
    # the same world: the dead unit is the same and has no class similarity in both
    world = make_world(30, 8, seed=1)
    dead = np.flatnonzero(world.unit_kind == UNIT_KINDS.index("dead"))
    assert dead.size >= 1
    assert np.all(small_batches.A[:, dead] == 0) and np.all(one_batch.A[:, dead] == 0)


def test_world_has_every_unit_kind_and_sane_samples() -> None:
    world = make_world(200, 20, seed=0)
    kinds = set(world.unit_kind.tolist())
    assert kinds == set(range(len(UNIT_KINDS)))
    copies = np.flatnonzero(world.copy_source >= 0)
    assert np.all(world.unit_kind[world.copy_source[copies]] != UNIT_KINDS.index("copy"))
    labels = np.arange(20).repeat(3)
    pooled, peak_softmax, peak_index = world.sample(labels, np.random.default_rng(0))
    assert pooled.shape == peak_softmax.shape == peak_index.shape == (60, 200)
    assert pooled.min() >= 0
    assert np.all(pooled[:, world.unit_kind == UNIT_KINDS.index("dead")] == 0)
    assert peak_softmax.min() >= 1 / 49 - 1e-12 and peak_softmax.max() <= 1
    assert peak_index.min() >= 0 and peak_index.max() < 49


def test_redundant_copies_are_penalised_with_their_source() -> None:
    world = make_world(120, 12, seed=2)
    problem = generate_instance(120, 12, 10, 3, seed=2, n_images_per_class=60)
    copies = np.flatnonzero(world.copy_source >= 0)
    live = [d for d in copies if np.abs(problem.A[:, world.copy_source[d]]).max() > 0.2]
    assert live, "no copy of a class-related unit in this world"
    # a copy's class profile follows its source's: the pair must be penalised
    penalised = [problem.R[d, world.copy_source[d]] > 0 for d in live]
    assert np.mean(penalised) > 0.9


def test_unknown_scale_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="tiny, small, medium, cub, imagenet"):
        make_instance("huge")


def test_bad_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="n_all_features >= 10"):
        make_world(5, 3)
    with pytest.raises(ValueError, match="n_images_per_class"):
        generate_instance(20, 4, 4, 2, n_images_per_class=1)


# ----------------------------------------------------------------------------------------------
# the strong penalty family (issue 17)


def _upper(matrix: np.ndarray) -> np.ndarray:
    """The strict upper triangle, row-major, as a vector."""
    return matrix[np.triu_indices(matrix.shape[0], k=1)]


@pytest.mark.parametrize("scale", ["tiny", "small"])
def test_strong_instances_penalise_a_quarter_of_pairs_at_mean_weight_0_3(scale: str) -> None:
    problem = make_instance(scale, seed=0, penalty="strong")
    weights = _upper(problem.R)
    wanted = round(0.25 * weights.size)
    assert np.count_nonzero(weights) == wanted
    assert problem.n_penalised_pairs == problem.metadata["n_penalised_pairs"] == wanted
    assert weights[weights > 0].mean() == pytest.approx(0.3, rel=1e-12)
    assert problem.metadata["penalty"] == "strong"
    assert problem.metadata["scale"] == scale


@pytest.mark.parametrize("scale", ["tiny", "small"])
def test_strong_instances_share_a_and_b_with_the_default(scale: str) -> None:
    default = make_instance(scale, seed=1)
    strong = make_instance(scale, seed=1, penalty="strong")
    assert default.metadata["penalty"] == "default"
    np.testing.assert_array_equal(strong.A, default.A)
    np.testing.assert_array_equal(strong.b, default.b)
    assert (strong.n_features, strong.n_per_class) == (default.n_features, default.n_per_class)
    assert not np.array_equal(strong.R, default.R)


@pytest.mark.parametrize("scale", ["tiny", "small"])
def test_strong_penalties_are_symmetric_non_negative_with_zero_diagonal(scale: str) -> None:
    penalties, _ = strong_penalties(make_instance(scale, seed=2).A)
    np.testing.assert_array_equal(penalties, penalties.T)
    assert np.all(np.diagonal(penalties) == 0)
    assert penalties.min() >= 0


def test_strong_instances_are_deterministic_per_seed() -> None:
    first = make_instance("tiny", seed=3, penalty="strong")
    again = make_instance("tiny", seed=3, penalty="strong")
    other = make_instance("tiny", seed=4, penalty="strong")
    for name in ("A", "R", "b"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert first.eps == again.eps
    assert not np.array_equal(first.R, other.R)


@pytest.mark.parametrize("scale", ["tiny", "small"])
def test_strong_penalties_are_the_most_similar_pairs_with_proportional_weights(
    scale: str,
) -> None:
    default = make_instance(scale, seed=0)
    strong = make_instance(scale, seed=0, penalty="strong")
    similarity = _upper(feature_redundancy(default.A))
    weights = _upper(strong.R)
    penalised = weights > 0
    # every penalised pair is at least as similar as every unpenalised one
    assert similarity[penalised].min() >= similarity[~penalised].max()
    assert strong.eps == similarity[penalised].min()
    # the weights are the similarity times one factor
    ratio = weights[penalised] / similarity[penalised]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)
    # the default R is monotone in the same similarity and penalises more than a quarter here,
    # so the strong pairs are its most heavily weighted ones
    default_weights = _upper(default.R)
    assert np.count_nonzero(default_weights) > np.count_nonzero(penalised)
    assert default_weights[penalised].min() >= default_weights[~penalised].max()


def test_strong_instances_keep_only_a_compatible_start_selection() -> None:
    # features 0 and 1 have the same class profile: the most similar pair, penalised
    A = np.array([[1.0, 1.0, 0.2, 0.0, 0.1], [0.0, 0.0, 1.0, 0.3, 0.9], [0.5, 0.5, 0.0, 1.0, 0.4]])
    problem = AssignmentProblem(A, np.zeros((5, 5)), np.zeros(5), 3, 1)
    problem.metadata["start_features"] = [0, 1, 3]
    strong = _with_strong_penalties(problem)
    assert strong.R[0, 1] > 0
    assert "start_features" not in strong.metadata
    # on the benchmark scales the constants' start selection stays compatible and is kept
    for scale in ("tiny", "small"):
        instance = make_instance(scale, seed=0, penalty="strong")
        recorded = instance.metadata["start_features"]
        assert len(recorded) == SCALES[scale].n_features
        assert instance.R[np.ix_(recorded, recorded)].max() == 0


def test_unknown_penalty_lists_the_valid_ones() -> None:
    assert instance_penalties() == ["default", "strong"]
    with pytest.raises(ValueError, match=r"'harsh'.*default, strong"):
        make_instance("tiny", penalty="harsh")
    with pytest.raises(ValueError, match=r"'harsh'.*default, strong"):
        generate_instance(30, 8, 6, 2, penalty="harsh")


def test_strong_penalties_reject_what_they_cannot_build() -> None:
    with pytest.raises(ValueError, match="share"):
        strong_penalties(np.eye(4, 6), share=0.0)
    with pytest.raises(ValueError, match="mean_weight"):
        strong_penalties(np.eye(4, 6), mean_weight=-1.0)
    # orthogonal class profiles: no pair has a positive similarity to penalise
    with pytest.raises(ValueError, match="only 0 pairs have a positive similarity"):
        strong_penalties(np.eye(6))
