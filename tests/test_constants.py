"""Constants of the QPM problem: streamed statistics, similarity, eps search, biases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from openqpm.constants import (
    DEFAULT_BIAS_STRENGTH,
    FeatureStatistics,
    MapStatistics,
    _mean_shift_1d,
    build_problem,
    class_feature_similarity,
    clip_center_scale,
    compute_bias,
    feature_redundancy,
    find_compatibility_threshold,
    rescale_redundancy,
    summarize_feature_maps,
)


def _features(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """30 samples, 6 features with class signal, 4 classes; feature 4 is dead (constant 2)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(30) % 4
    features = rng.random((30, 6)) + 0.8 * np.eye(4, 6)[labels] + 0.3 * np.eye(4, 6, 1)[labels]
    features[:, 4] = 2.0
    return features, labels


def _stats(features: np.ndarray, labels: np.ndarray, batch_size: int) -> FeatureStatistics:
    stats = FeatureStatistics(features.shape[1], 4)
    for start in range(0, len(labels), batch_size):
        stats.update(features[start : start + batch_size], labels[start : start + batch_size])
    return stats


def test_class_similarity_is_pearson_correlation_and_dead_features_get_zero() -> None:
    features, labels = _features()
    similarity, dead = class_feature_similarity(_stats(features, labels, 30))
    assert dead.tolist() == [4]
    for c, d in itertools.product(range(4), range(6)):
        if d == 4:
            assert similarity[c, d] == 0.0
            continue
        expected = np.corrcoef(features[:, d], labels == c)[0, 1]
        assert similarity[c, d] == pytest.approx(expected, abs=1e-12)


def test_streaming_in_batches_and_merging_equal_one_batch() -> None:
    features, labels = _features(1)
    whole = _stats(features, labels, 30).to_arrays()
    batched = _stats(features, labels, 7).to_arrays()
    merged = _stats(features[:11], labels[:11], 4).merge(_stats(features[11:], labels[11:], 30))
    for key, value in whole.items():
        np.testing.assert_allclose(batched[key], value, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(merged.to_arrays()[key], value, rtol=1e-13, atol=1e-13)
    restored = FeatureStatistics.from_arrays(whole)
    np.testing.assert_allclose(restored.mean, features.mean(axis=0))
    np.testing.assert_allclose(restored.std, features.std(axis=0), atol=1e-7)
    assert restored.count == 30 and restored.class_counts.tolist() == [8, 8, 7, 7]
    with pytest.raises(ValueError, match="missing key 'feature_sum'"):
        FeatureStatistics.from_arrays({k: v for k, v in whole.items() if k != "feature_sum"})
    with pytest.raises(ValueError, match="cannot merge"):
        FeatureStatistics(6, 4).merge(FeatureStatistics(6, 5))


def test_feature_statistics_reject_bad_batches() -> None:
    stats = FeatureStatistics(3, 2)
    with pytest.raises(ValueError, match=r"features must have shape \(B, 3\)"):
        stats.update(np.zeros((2, 4)), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"non-finite value nan at \[1, 2\]"):
        stats.update(np.array([[0, 0, 0], [0, 0, np.nan]]), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        stats.update(np.zeros((2, 3)), np.array([0, 2]))
    with pytest.raises(ValueError, match="one per row"):
        stats.update(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="empty"):
        class_feature_similarity(stats)


def test_redundancy_is_relu_cosine_of_class_profiles() -> None:
    # columns = features' class profiles: (1, 0), (1, 1), (-1, 0), dead (0, 0)
    similarity = np.array([[1.0, 1.0, -1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    redundancy = feature_redundancy(similarity)
    expected = np.zeros((4, 4))
    expected[0, 1] = expected[1, 0] = 1 / math.sqrt(2)  # cos 45 degrees; all others <= 0 or dead
    np.testing.assert_allclose(redundancy, expected, atol=1e-12)


def test_eps_on_a_planted_compatible_set_is_exact() -> None:
    n_all = 10
    rng = np.random.default_rng(2)
    others = 0.5 + 0.4 * rng.permutation(45) / 45  # distinct, all >= 0.5
    redundancy = np.zeros((n_all, n_all))
    redundancy[np.triu_indices(n_all, 1)] = others
    planted = [1, 4, 6, 8]
    for value, (a, b) in zip(
        [0.1, 0.15, 0.2, 0.25, 0.3, 0.12], itertools.combinations(planted, 2), strict=True
    ):
        redundancy[a, b] = value
    redundancy = np.triu(redundancy, 1) + np.triu(redundancy, 1).T
    eps, clique = find_compatibility_threshold(redundancy, 4)
    # only the planted set is compatible below 0.5; the next value above 0.3 is min(others)
    assert clique == planted
    assert eps == pytest.approx(others.min())


def test_eps_equals_brute_force_on_small_graphs() -> None:
    rng = np.random.default_rng(3)
    for trial in range(12):
        n_all, target = 9, 3 + trial % 3
        upper = np.round(rng.random(36), 1)  # rounded: ties and zeros occur
        redundancy = np.zeros((n_all, n_all))
        redundancy[np.triu_indices(n_all, 1)] = upper
        redundancy += redundancy.T
        # brute force: the best set's largest pair; eps is the next candidate value above it
        smallest_max = min(
            max(redundancy[a, b] for a, b in itertools.combinations(subset, 2))
            for subset in itertools.combinations(range(n_all), target)
        )
        candidates = np.unique(upper)
        above = candidates[candidates > smallest_max]
        expected = above[0] if above.size else np.nextafter(upper.max(), np.inf)
        eps, clique = find_compatibility_threshold(redundancy, target, seed=trial)
        assert eps == expected
        assert len(clique) >= target
        assert all(redundancy[a, b] < eps for a, b in itertools.combinations(clique, 2))


def test_rescaling_of_penalised_pairs() -> None:
    redundancy = np.zeros((4, 4))
    for (a, b), value in {(0, 1): 0.2, (0, 2): 0.4, (1, 3): 0.8}.items():
        redundancy[a, b] = redundancy[b, a] = value
    code, n_code = rescale_redundancy(redundancy, 0.4, scaling="code")
    paper, n_paper = rescale_redundancy(redundancy, 0.4, scaling="paper")
    assert n_code == n_paper == 2
    assert code[0, 2] == pytest.approx((0.4 - 0.2) / (0.8 - 0.2)) and code[1, 3] == 1.0
    assert paper[0, 2] == pytest.approx(0.5) and paper[1, 3] == 1.0
    assert code[0, 1] == paper[0, 1] == 0.0 and np.array_equal(code, code.T)
    flat = (redundancy > 0) * 0.3
    equal, n_equal = rescale_redundancy(flat, 0.3)
    assert n_equal == 3 and set(np.unique(equal)) == {0.0, 1.0}
    with pytest.raises(ValueError, match="unknown r_scaling 'other'; valid: code, paper"):
        rescale_redundancy(redundancy, 0.4, scaling="other")


def test_summarize_feature_maps_by_hand() -> None:
    maps = np.zeros((1, 2, 2, 2))
    maps[0, 0] = [[0.0, 1.0], [2.0, 3.0]]
    maps[0, 1] = [[5.0, 5.0], [0.0, 0.0]]
    pooled, peak_softmax, peak_index = summarize_feature_maps(maps)
    assert pooled.tolist() == [[1.5, 2.5]]
    e = math.e
    assert peak_softmax[0, 0] == pytest.approx(e**3 / (1 + e + e**2 + e**3))
    assert peak_softmax[0, 1] == pytest.approx(e**5 / (2 * e**5 + 2))
    assert peak_index.tolist() == [[3, 0]]  # a tie goes to the first maximum


def _map_stats() -> MapStatistics:
    """2 samples, 2 features, 3x3 maps (argmax 4 = centre, 0/1/8 = border)."""
    stats = MapStatistics(2)
    stats.update(
        np.array([[1.0, 3.0], [2.0, 0.0]]),
        np.array([[0.5, 0.2], [0.4, 0.9]]),
        np.array([[4, 0], [1, 8]]),
        map_height=3,
        map_width=3,
    )
    return stats


def test_map_statistics_by_hand() -> None:
    arrays = _map_stats().to_arrays()
    # shares: sample 0 (1, 3) / 4, sample 1 (2, 0) / 2
    np.testing.assert_allclose(arrays["pooled_sum"], [3.0, 3.0])
    np.testing.assert_allclose(arrays["peak_pooled_sum"], [0.5 * 1 + 0.4 * 2, 0.2 * 3])
    np.testing.assert_allclose(arrays["peak_share_sum"], [0.5 * 0.25 + 0.4 * 1, 0.2 * 0.75])
    np.testing.assert_allclose(arrays["edge_share_sum"], [1.0, 0.75])
    np.testing.assert_allclose(arrays["center_pooled_sum"], [1 / 2 + 2 / 1, 3 / 1 + 0])
    assert arrays["count"] == 2 and arrays["map_size"].tolist() == [3, 3]
    restored = MapStatistics.from_arrays(arrays).merge(_map_stats())
    np.testing.assert_allclose(restored.to_arrays()["pooled_sum"], [6.0, 6.0])
    with pytest.raises(ValueError, match="map size changed from 3x3 to 4x4"):
        restored.update(
            np.ones((1, 2)), np.ones((1, 2)), np.zeros((1, 2), int), map_height=4, map_width=4
        )
    with pytest.raises(ValueError, match=r"peak_index must lie in \[0, 9\)"):
        restored.update(
            np.ones((1, 2)), np.ones((1, 2)), np.full((1, 2), 9), map_height=3, map_width=3
        )


def test_paper_locality_and_center_bias_formulas() -> None:
    stats = _map_stats()
    locality = compute_bias(stats, "locality_paper", n_features=2, strength=1.0)
    center = compute_bias(stats, "center", n_features=2, strength=1.0)
    # eq. 8: (1.3, 0.6) / (2 * 3); eq. 26: -(2.5, 3.0) / (2 * 3); two values centre to -1 and 1
    np.testing.assert_allclose(locality, [1.0, -1.0])
    np.testing.assert_allclose(center, [1.0, -1.0])
    # the paper's lambda for the centre bias (appendix D), whatever strength says
    center_paper = compute_bias(stats, "center_paper", n_features=2, strength=1.0)
    np.testing.assert_allclose(center_paper, [10**1.5, -(10**1.5)])
    np.testing.assert_array_equal(compute_bias(None, "none", n_features=2), [0.0, 0.0])
    with pytest.raises(ValueError, match="unknown bias 'edges'; valid: locality"):
        compute_bias(stats, "edges", n_features=2)
    with pytest.raises(ValueError, match="needs map statistics"):
        compute_bias(None, "center", n_features=2)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        compute_bias(None, np.zeros(3), n_features=2)


def test_code_locality_gives_border_features_the_lowest_bias() -> None:
    stats = MapStatistics(4)
    rng = np.random.default_rng(4)
    pooled = rng.random((40, 4)) + 0.5
    peak = np.tile([0.1, 0.3, 0.2, 0.9], (40, 1)) * rng.uniform(0.9, 1.1, (40, 4))
    index = np.tile([12, 12, 12, 0], (40, 1))  # 5x5 maps: 12 is the centre, 0 a corner
    stats.update(pooled, peak, index, map_height=5, map_width=5)
    bias = compute_bias(stats, "locality", n_features=4)
    # feature 3 is the peakiest but always peaks on the border: it gets the lowest locality,
    # the value of the least local feature (0)
    assert bias[3] == pytest.approx(bias.min()) and bias[3] == pytest.approx(bias[0])
    assert bias[1] > bias[2] > bias[0]
    assert np.abs(bias).max() == pytest.approx(DEFAULT_BIAS_STRENGTH)
    assert bias.mean() == pytest.approx(0.0, abs=1e-12)


def test_clip_center_scale_clips_outliers_like_the_reference() -> None:
    values = np.array([0.0, 0.1, 0.2, 0.1, 0.15, 0.05, 5.0])
    clipped = np.array([0.0, 0.1, 0.2, 0.1, 0.15, 0.05, 0.2])  # 5.0 -> top of the main cluster
    expected = (clipped - clipped.mean()) / np.abs(clipped - clipped.mean()).max() * 0.5
    np.testing.assert_allclose(clip_center_scale(values, strength=0.5), expected)
    # below the cluster: |low| * sign(value), so a negative outlier becomes -|low|
    values = np.array([-5.0, 0.05, 0.1, 0.2, 0.1, 0.15, 0.05])
    clipped = np.array([-0.05, 0.05, 0.1, 0.2, 0.1, 0.15, 0.05])
    expected = (clipped - clipped.mean()) / np.abs(clipped - clipped.mean()).max()
    np.testing.assert_allclose(clip_center_scale(values, strength=1.0), expected)
    np.testing.assert_array_equal(clip_center_scale(np.full(4, 3.0)), np.zeros(4))


def test_mean_shift_matches_scikit_learn() -> None:
    from sklearn.cluster import MeanShift, estimate_bandwidth

    rng = np.random.default_rng(5)
    samples = [
        rng.lognormal(0.0, 1.0, 80),
        np.concatenate([rng.normal(0, 1, 60), rng.normal(5, 0.5, 30)]),
        np.round(rng.normal(0, 1, 70), 1),
    ]
    for values in samples:
        bandwidth = float(estimate_bandwidth(values[:, None]))
        reference = MeanShift(bandwidth=bandwidth).fit(values[:, None])
        labels, centres = _mean_shift_1d(values, bandwidth)
        np.testing.assert_array_equal(labels, reference.labels_)
        np.testing.assert_allclose(centres, reference.cluster_centers_.ravel(), rtol=1e-12)


def test_build_problem_end_to_end() -> None:
    rng = np.random.default_rng(6)
    labels = np.repeat(np.arange(6), 12)
    features = rng.random((72, 16)) + np.eye(6, 16)[labels] + 0.5 * np.eye(6, 16, 6)[labels]
    features[:, 15] = 0.0  # dead
    stats = FeatureStatistics(16, 6)
    stats.update(features, labels)
    maps = MapStatistics(16)
    maps.update(features, rng.uniform(0.05, 0.5, (72, 16)), rng.integers(0, 16, (72, 16)),
                map_height=4, map_width=4)  # fmt: skip
    problem, report = build_problem(stats, maps, n_features=6, n_per_class=2)
    assert np.abs(problem.A).max() == pytest.approx(1.0)
    assert report.dead_features == [15] and np.all(problem.A[:, 15] == 0)
    assert len(report.start_features) == 6 == len(set(report.start_features))
    redundancy = feature_redundancy(problem.A)
    for a, b in itertools.combinations(report.start_features, 2):
        assert redundancy[a, b] < report.eps
    penalised = np.triu((redundancy >= report.eps) & (redundancy > 0), 1)
    assert report.n_penalised_pairs == int(penalised.sum()) == problem.metadata["n_penalised_pairs"]
    assert set(zip(*np.nonzero(np.triu(problem.R, 1)), strict=True)) <= set(
        zip(*np.nonzero(penalised), strict=True)
    )
    assert problem.eps == report.eps and problem.metadata["start_features"] == report.start_features
    assert np.abs(problem.b).max() == pytest.approx(DEFAULT_BIAS_STRENGTH)
    no_bias, _ = build_problem(stats, n_features=6, n_per_class=2, bias="none", r_scaling="paper")
    assert np.all(no_bias.b == 0) and no_bias.R.max() <= 1.0
    with pytest.raises(ValueError, match="needs map statistics"):
        build_problem(stats, n_features=6, n_per_class=2)
    with pytest.raises(ValueError, match="unknown r_scaling"):
        build_problem(stats, maps, r_scaling="shifted")
    with pytest.raises(ValueError, match="n_features=20 exceeds the 16 features"):
        build_problem(stats, maps, n_features=20)
