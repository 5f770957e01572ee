"""Metrics: hand-computed values on tiny arrays, invariances, and the streamed model evaluation."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from openqpm import metrics
from openqpm.models import Backbone, DenseHead, QPMHead, QPMModel, create_backbone

# ---------------------------------------------------------------------------------------------
# accuracy


def test_accuracy_of_predictions_and_of_logits() -> None:
    labels = np.array([0, 1, 2, 1])
    assert metrics.accuracy(np.array([0, 1, 1, 1]), labels) == pytest.approx(0.75)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 5.0], [9.0, 0.0, 0.0]])
    assert metrics.accuracy(logits, torch.as_tensor(labels)) == pytest.approx(0.75)


def test_accuracy_rejects_empty_and_mismatched_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        metrics.accuracy(np.array([], dtype=int), np.array([], dtype=int))
    with pytest.raises(ValueError, match="shape"):
        metrics.accuracy(np.array([0, 1]), np.array([0]))


# ---------------------------------------------------------------------------------------------
# Class-Independence


def test_class_independence_hand_computed() -> None:
    # feature 0: class sums 4 and 2 -> top share 4/6; feature 1: 1 and 5 -> 5/6
    features = np.array([[1.0, 0.0], [3.0, 1.0], [0.0, 2.0], [2.0, 3.0]])
    labels = np.array([0, 0, 1, 1])
    assert metrics.class_independence(features, labels) == pytest.approx(1 - (4 / 6 + 5 / 6) / 2)


def test_class_independence_of_one_detector_per_class_is_zero() -> None:
    labels = np.repeat(np.arange(5), 4)
    detector = np.eye(5)[labels]  # feature c fires on class c only
    assert metrics.class_independence(detector, labels) == pytest.approx(0.0)
    # shifting and scaling a feature does not change it (the minimum is subtracted)
    assert metrics.class_independence(3.0 * detector - 7.0, labels) == pytest.approx(0.0)


def test_class_independence_of_a_class_blind_feature_is_one_minus_one_over_n_classes() -> None:
    rng = np.random.default_rng(0)
    n_classes = 4
    labels = np.tile(np.arange(n_classes), 10)
    values = rng.uniform(1, 2, 10)
    blind = np.repeat(values, n_classes)[:, None]  # every class sees the same values
    assert metrics.class_independence(blind, labels) == pytest.approx(1 - 1 / n_classes)


def test_class_independence_accepts_torch_and_rejects_nan() -> None:
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert metrics.class_independence(features, torch.tensor([0, 1])) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="NaN"):
        metrics.class_independence(np.array([[np.nan], [1.0]]), np.array([0, 1]))


# ---------------------------------------------------------------------------------------------
# Correlation


def test_correlation_hand_computed() -> None:
    # columns (1,0), (1,1), (0,1): each has 1/sqrt(2) as its largest cosine to another column
    features = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    assert metrics.correlation(features) == pytest.approx(1 / math.sqrt(2))


def test_correlation_of_copies_is_one_and_of_opposites_is_zero() -> None:
    column = np.random.default_rng(1).normal(size=(50, 1))
    assert metrics.correlation(np.hstack([column, 2.0 * column])) == pytest.approx(1.0)
    centred = column - column.mean()
    assert metrics.correlation(np.hstack([centred, -centred])) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="two features"):
        metrics.correlation(column)


# ---------------------------------------------------------------------------------------------
# Contrastiveness


def test_contrastiveness_of_clearly_bimodal_features_is_near_one() -> None:
    rng = np.random.default_rng(0)
    low = rng.normal(0.0, 0.1, (300, 3))
    high = rng.normal(6.0, 0.1, (300, 3))
    assert metrics.contrastiveness(np.vstack([low, high])) > 0.99


def test_contrastiveness_of_a_unimodal_gaussian_is_low() -> None:
    gaussian = np.random.default_rng(0).normal(size=(2000, 2))
    value = metrics.contrastiveness(gaussian)
    assert value < 0.7  # the mixture splits one bump into two overlapping halves


def test_feature_overlap_recovers_the_overlap_of_two_known_normals() -> None:
    # two equal-weight normals with sd 1 and means 2 apart overlap by 2 * Phi(-1)
    rng = np.random.default_rng(0)
    sample = np.r_[rng.normal(0.0, 1.0, 20000), rng.normal(2.0, 1.0, 20000)][:, None]
    expected = statistics.NormalDist(0, 1).overlap(statistics.NormalDist(2, 1))
    assert expected == pytest.approx(2 * statistics.NormalDist().cdf(-1))
    assert metrics.feature_overlaps(sample)[0] == pytest.approx(expected, abs=0.05)


def test_contrastiveness_is_seeded_and_a_constant_feature_has_full_overlap() -> None:
    features = np.random.default_rng(3).gamma(2.0, size=(400, 2))
    assert metrics.contrastiveness(features, seed=5) == metrics.contrastiveness(features, seed=5)
    constant = np.full((10, 1), 3.0)
    assert metrics.feature_overlaps(constant)[0] == 1.0
    assert metrics.contrastiveness(constant) == 0.0


def test_reservoir_sample_is_exact_when_short_and_uniform_when_long() -> None:
    stream = np.arange(20, dtype=np.float32)[:, None]  # (20, 1): row i holds i
    short = metrics._ReservoirSample(25, 1, seed=0)
    for start in range(0, 20, 3):
        short.update(stream[start : start + 3])
    np.testing.assert_array_equal(short.sample(), stream)
    counts = np.zeros(20)
    for seed in range(300):
        sample = metrics._ReservoirSample(5, 1, seed=seed)
        for start in range(0, 20, 3):
            sample.update(stream[start : start + 3])
        kept = sample.sample()[:, 0].astype(int)
        assert len(set(kept.tolist())) == 5  # distinct rows of the stream
        counts[kept] += 1
    # every row is kept with probability 5/20; 300 draws: standard error 0.025
    np.testing.assert_allclose(counts / 300, 0.25, atol=0.1)


# ---------------------------------------------------------------------------------------------
# Structural Grounding


def test_structural_grounding_hand_computed() -> None:
    attributes = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # classes 0 and 1 share one of two features: model similarity 1/2; truth 1/sqrt(2)
    weights = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]])
    value = metrics.structural_grounding(weights, attributes, n_pairs=1)
    assert value == pytest.approx(0.5 / (1 / math.sqrt(2)))


def test_structural_grounding_of_weights_equal_to_the_attributes_is_one() -> None:
    attributes = np.random.default_rng(0).uniform(size=(12, 30))
    assert metrics.structural_grounding(attributes, attributes) == pytest.approx(1.0)
    # cosine similarities ignore the scale of each class row
    scaled = attributes * np.arange(1, 13)[:, None]
    assert metrics.structural_grounding(scaled, attributes, n_pairs=5) == pytest.approx(1.0)


def test_structural_grounding_uses_the_most_similar_pairs_only() -> None:
    attributes = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0]])
    # the model agrees on the two similar pairs (0,1) and (2,3) and on nothing else
    weights = np.array([[1, 0], [1, 0], [0, 1], [0, 1]])
    truth = metrics.class_similarity(attributes)
    expected = 2.0 / (truth[0, 1] + truth[2, 3])
    assert metrics.structural_grounding(weights, attributes, n_pairs=2) == pytest.approx(expected)


def test_structural_grounding_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="classes"):
        metrics.structural_grounding(np.eye(3), np.eye(4))
    with pytest.raises(ValueError, match="n_pairs"):
        metrics.structural_grounding(np.eye(3), np.eye(3) + 1, n_pairs=4)


# ---------------------------------------------------------------------------------------------
# SID@k and diversity@k


def _two_by_one_maps(scale: float) -> torch.Tensor:
    # two maps on a 1x2 grid, each peaking on a different cell: (1, 2, 1, 2)
    return torch.tensor([[[[scale, 0.0]], [[0.0, scale]]]])


def test_sid_hand_computed_and_scale_invariant() -> None:
    weights = torch.tensor([[1.0, 1.0]])
    prediction = torch.tensor([0])
    # divided by its mean |M| = scale/2 each map is (2, 0): softmax (e^2, 1) / (e^2 + 1)
    expected = math.exp(2) / (math.exp(2) + 1)
    for scale in (0.5, 1.0, 40.0):
        value = metrics.sid_at_k(_two_by_one_maps(scale), weights, prediction, k=2)
        assert value == pytest.approx(expected, rel=1e-5)


def test_diversity_at_k_depends_on_scale() -> None:
    weights = torch.tensor([[1.0, 1.0]])
    prediction = torch.tensor([0])
    for scale in (1.0, 3.0):
        expected = math.exp(scale) / (math.exp(scale) + 1)
        value = metrics.diversity_at_k(_two_by_one_maps(scale), weights, prediction, k=2)
        assert value == pytest.approx(expected, rel=1e-5)


def test_sid_of_identical_maps_is_one_over_k_and_scaling_one_map_changes_nothing() -> None:
    rng = torch.Generator().manual_seed(0)
    one_map = torch.rand(1, 1, 5, 5, generator=rng)
    identical = one_map.repeat(1, 5, 1, 1)  # (1, 5, 5, 5)
    weights = torch.ones(1, 5)
    assert metrics.sid_at_k(identical, weights, torch.tensor([0])) == pytest.approx(0.2)
    maps = torch.rand(3, 5, 5, 5, generator=rng)
    scaled = maps.clone()
    scaled[:, 2] *= 17.0
    predictions = torch.zeros(3, dtype=torch.long)
    assert metrics.sid_at_k(scaled, weights, predictions) == pytest.approx(
        metrics.sid_at_k(maps, weights, predictions), rel=1e-5
    )


def test_sid_takes_the_largest_signed_weights_and_skips_classes_with_fewer_than_k() -> None:
    # class 0 weighs features 0 and 2 most (feature 1 is negative); class 1 has one weight
    weights = torch.tensor([[3.0, -5.0, 1.0], [0.0, 2.0, 0.0]])
    maps = torch.zeros(2, 3, 1, 2)
    maps[:, 0, 0, 0] = 1.0  # features 0 and 2 peak on different cells: high SID
    maps[:, 2, 0, 1] = 1.0
    maps[:, 1, 0, 0] = 1.0
    expected = math.exp(2) / (math.exp(2) + 1)
    predictions = torch.tensor([0, 1])  # the second image's class has one weight: left out
    assert metrics.sid_at_k(maps, weights, predictions, k=2) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="k=2"):
        metrics.sid_at_k(maps, weights, torch.tensor([1, 1]), k=2)


def test_sid_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="channels"):
        metrics.sid_at_k(torch.rand(1, 3, 2, 2), torch.ones(1, 4), torch.tensor([0]), k=2)
    with pytest.raises(ValueError, match="predictions"):
        metrics.sid_at_k(torch.rand(2, 3, 2, 2), torch.ones(1, 3), torch.tensor([0]), k=2)


# ---------------------------------------------------------------------------------------------
# alignment and part hits


def test_feature_alignment_hand_computed() -> None:
    features = np.array([[0.0], [2.0], [4.0], [2.0]])
    attributes = np.array(
        [
            [1, 0],  # attribute 0: present on images 0, 1 (mean 1), absent on 2 (mean 4): -3
            [1, 1],  # attribute 1: present on 1, 2 (mean 3), absent on 0, 3 (mean 1): +2
            [0, 1],
            [-1, 0],  # not confident: left out of attribute 0
        ]
    )
    # best difference 2, divided by the mean min-shifted activation (0+2+4+2)/4 = 2
    assert metrics.feature_alignment(features, attributes) == pytest.approx(1.0)


def test_peak_positions_and_part_hit_rate() -> None:
    maps = torch.zeros(2, 1, 2, 2)
    maps[0, 0, 1, 0] = 1.0  # peak at row 1, column 0: centre (0.25, 0.75)
    maps[1, 0, 0, 1] = 1.0  # peak at (0.75, 0.25)
    positions = metrics.peak_positions(maps)
    np.testing.assert_allclose(positions[:, 0], [[0.25, 0.75], [0.75, 0.25]])
    parts = np.array(
        [
            [[0.3, 0.7, 1.0], [0.75, 0.25, 0.0]],  # a visible part near the peak
            [[0.2, 0.2, 1.0], [0.75, 0.25, 0.0]],  # the part at the peak is not visible
        ]
    )
    assert metrics.part_hit_rate(positions, parts, radius=0.1) == pytest.approx(0.5)
    assert metrics.part_hit_rate(positions, parts, radius=0.6) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="visible"):
        metrics.part_hit_rate(positions, parts * np.array([1, 1, 0]))


# ---------------------------------------------------------------------------------------------
# the metric registry and the table


def test_registry_lists_every_evaluated_metric_and_unknown_names_fail() -> None:
    assert {"accuracy", "sid_at_5", "structural_grounding", "contrastiveness"} <= set(
        metrics.names()
    )
    with pytest.raises(KeyError, match="valid names: accuracy"):
        metrics.describe("sid@5")


def test_format_metrics_table_shows_percent_and_na() -> None:
    dense = {"accuracy": 86.6, "n_features_used": 2048, "features_per_class": 2048.0}
    dense |= {"sid_at_5": 0.577, "class_independence": 0.98, "contrastiveness": None}
    qpm = {"accuracy": 85.1, "n_features_used": 50, "features_per_class": 5.0}
    qpm |= {"sid_at_5": 0.901, "structural_grounding": 0.479, "part_hit_rate": 0.25}
    lines = metrics.format_metrics_table(dense, qpm).splitlines()
    assert lines[0].split()[:3] == ["Model", "Accuracy", "↑"]
    assert "Part hits ↑" in lines[0]  # an optional column, present because QPM has it
    dense_cells, qpm_cells = lines[2].split(), lines[3].split()
    assert dense_cells[:5] == ["Dense", "86.6", "2048", "2048", "57.7"]
    assert qpm_cells[:5] == ["QPM", "85.1", "50", "5.0", "90.1"]
    assert "n/a" in dense_cells and qpm_cells[-1] == "25.0"
    with pytest.raises(ValueError):
        metrics.format_metrics_table(None, None)


# ---------------------------------------------------------------------------------------------
# evaluate_model


N_CLASSES = 4


def _qpm_model() -> QPMModel:
    backbone = create_backbone("tiny_cnn")
    selected = [1, 4, 7, 9, 12, 20]
    matrix = [[1, 1, 1, 0, 0, 0], [1, 0, 0, 1, 1, 0], [0, 1, 0, 1, 0, 1], [0, 0, 1, 0, 1, 1]]
    head = QPMHead(selected, torch.full((6,), 0.2), torch.full((6,), 0.1), matrix)
    return QPMModel(backbone, head, class_names=[f"class {c}" for c in range(N_CLASSES)]).eval()


def _images(n_images: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, 3, 32, 32, generator=generator)
    labels = torch.arange(n_images) % N_CLASSES
    return TensorDataset(images, labels)


@torch.no_grad()
def _reference_arrays(model: QPMModel, test: TensorDataset, train: TensorDataset) -> dict:
    test_maps = model.forward_features(test.tensors[0])
    train_maps = model.forward_features(train.tensors[0])
    return {
        "logits": model.forward_head(test_maps),
        "maps": model.head_feature_maps(test_maps),
        "train_features": model.forward_head(train_maps, pre_logits=True).numpy(),
    }


def test_evaluate_model_streams_the_same_values_as_the_array_functions() -> None:
    model = _qpm_model()
    test, train = _images(10, seed=1), _images(14, seed=2)
    attributes = np.random.default_rng(0).uniform(size=(N_CLASSES, 8))
    result = metrics.evaluate_model(
        model,
        DataLoader(test, batch_size=3),
        DataLoader(train, batch_size=5),
        device="cpu",
        class_attributes=attributes,
    )
    reference = _reference_arrays(model, test, train)
    predictions = reference["logits"].argmax(dim=1)
    weights = model.class_weights()
    labels = train.tensors[1].numpy()
    assert result["accuracy"] == pytest.approx(
        100 * metrics.accuracy(reference["logits"], test.tensors[1])
    )
    assert result["n_features_used"] == 6 and result["features_per_class"] == 3.0
    assert result["n_test_images"] == 10 and result["n_train_images"] == 14
    assert result["sid_at_5"] is None  # 3 features per class: SID@5 does not apply
    assert result["class_independence"] == pytest.approx(
        metrics.class_independence(reference["train_features"], labels)
    )
    assert result["correlation"] == pytest.approx(metrics.correlation(reference["train_features"]))
    assert result["contrastiveness"] == pytest.approx(
        metrics.contrastiveness(reference["train_features"]), abs=1e-6
    )
    assert result["structural_grounding"] == pytest.approx(
        metrics.structural_grounding(weights, attributes, n_pairs=6)
    )
    assert result["feature_alignment"] is None and result["part_hit_rate"] is None
    three = metrics.sid_at_k(reference["maps"], weights, predictions, k=3)
    assert 1 / 3 <= three <= 1.0


def test_evaluate_model_of_a_dense_model_does_not_depend_on_the_batch_size(monkeypatch) -> None:
    monkeypatch.setattr(metrics, "MAX_CONTRASTIVENESS_FEATURES", 8)  # 32 mixture fits are slow
    torch.manual_seed(0)
    model = QPMModel(
        create_backbone("tiny_cnn"), DenseHead(32, N_CLASSES), class_names=list("abcd")
    ).eval()
    test, train = _images(9, seed=3), _images(12, seed=4)
    parts = np.random.default_rng(0).uniform(size=(9, 3, 3)).round()
    image_attributes = np.random.default_rng(1).integers(-1, 2, size=(12, 5))
    results = [
        metrics.evaluate_model(
            model,
            DataLoader(test, batch_size=batch_size),
            DataLoader(train, batch_size=batch_size),
            device="cpu",
            image_attributes=image_attributes,
            part_locations=parts,
        )
        for batch_size in (2, 5)
    ]
    for name in metrics.names():
        first, second = results[0][name], results[1][name]
        assert (first is None) == (second is None), name
        if first is not None:
            assert first == pytest.approx(second, rel=1e-6, abs=1e-9), name
    result = results[0]
    assert result["n_features_used"] == 32 and result["features_per_class"] == 32.0
    assert result["structural_grounding"] is None  # no attributes: not available
    reference = _reference_arrays(model, test, train)
    predictions = reference["logits"].argmax(dim=1)
    assert result["sid_at_5"] == pytest.approx(
        metrics.sid_at_k(reference["maps"], model.class_weights(), predictions), rel=1e-5
    )
    assert 0.0 <= result["part_hit_rate"] <= 1.0


def test_evaluate_model_samples_the_features_of_contrastiveness_beyond_the_maximum(
    monkeypatch,
) -> None:
    model, test, train = _qpm_model(), DataLoader(_images(4, 0)), DataLoader(_images(9, 1))
    sampled = metrics.evaluate_model(model, test, train, device="cpu", max_contrastiveness_images=4)
    assert 0.0 <= sampled["contrastiveness"] <= 1.0
    assert sampled["contrastiveness_n_features"] == 6  # all of them
    monkeypatch.setattr(metrics, "MAX_CONTRASTIVENESS_FEATURES", 5)
    result = metrics.evaluate_model(model, test, train, device="cpu")
    assert 0.0 <= result["contrastiveness"] <= 1.0 and result["contrastiveness_n_features"] == 5
    assert result["class_independence"] is not None


class _WideModel(torch.nn.Module):
    """A dense model with more features than Contrastiveness fits (a ResNet-50 has 2048)."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.maps = torch.nn.Conv2d(3, n_features, kernel_size=4, stride=4)
        self.weight = torch.nn.Parameter(torch.randn(N_CLASSES, n_features, generator=generator))
        self.is_qpm = False

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.maps(images))  # (B, K, 8, 8)

    def head_feature_maps(self, maps: torch.Tensor) -> torch.Tensor:
        return maps

    def forward_head(self, maps: torch.Tensor, *, pre_logits: bool = False) -> torch.Tensor:
        pooled = maps.mean(dim=(2, 3))
        return pooled if pre_logits else pooled @ self.weight.T

    def class_weights(self) -> torch.Tensor:
        return self.weight.detach()


def test_contrastiveness_of_more_than_a_thousand_features_is_computed_on_a_sample(
    monkeypatch,
) -> None:
    """The paper's dense ResNet-50 row: 2048 features used to give no Contrastiveness at all."""
    chosen = metrics.contrastiveness_features(2048, seed=0)
    assert len(chosen) == metrics.MAX_CONTRASTIVENESS_FEATURES == 1000
    assert np.all(np.diff(chosen) > 0) and chosen[-1] < 2048
    assert not np.array_equal(chosen, metrics.contrastiveness_features(2048, seed=1))
    np.testing.assert_array_equal(metrics.contrastiveness_features(700), np.arange(700))

    # the same path through evaluate_model, with a smaller maximum to keep the mixture fits few
    monkeypatch.setattr(metrics, "MAX_CONTRASTIVENESS_FEATURES", 30)
    torch.manual_seed(0)
    model = _WideModel(1100).eval()
    test, train = _images(6, seed=5), _images(10, seed=6)
    result = metrics.evaluate_model(
        model, DataLoader(test), DataLoader(train, batch_size=4), device="cpu", seed=3
    )
    assert result["n_features_used"] == 1100 and result["contrastiveness_n_features"] == 30
    with torch.no_grad():
        features = model.forward_head(model.forward_features(train.tensors[0]), pre_logits=True)
    columns = metrics.contrastiveness_features(1100, seed=3)
    expected = metrics.contrastiveness(features.numpy()[:, columns], seed=3)
    assert result["contrastiveness"] == pytest.approx(expected, abs=1e-6)


def test_evaluate_model_rejects_shuffled_loaders_with_per_image_annotations() -> None:
    train = _images(6, 0)
    with pytest.raises(ValueError, match="in order"):
        metrics.evaluate_model(
            _qpm_model(),
            DataLoader(_images(4, 1)),
            DataLoader(train, shuffle=True),
            device="cpu",
            image_attributes=np.zeros((6, 2), dtype=np.int8),
        )
    with pytest.raises(ValueError, match="rows"):
        metrics.evaluate_model(
            _qpm_model(),
            DataLoader(_images(4, 1)),
            DataLoader(train),
            device="cpu",
            image_attributes=np.zeros((5, 2), dtype=np.int8),
        )


def test_evaluate_model_accepts_any_sampler_that_keeps_the_order() -> None:
    model, train = _qpm_model(), _images(6, 0)
    loader = DataLoader(train, sampler=list(range(6)), batch_size=4)
    result = metrics.evaluate_model(
        model,
        DataLoader(_images(4, 1)),
        loader,
        device="cpu",
        image_attributes=np.ones((6, 2), dtype=np.int8) * np.array([1, 0], dtype=np.int8),
    )
    assert result["n_train_images"] == 6
    reversed_order = DataLoader(train, sampler=list(range(5, -1, -1)), batch_size=4)
    with pytest.raises(ValueError, match="in order"):
        metrics.evaluate_model(
            model,
            DataLoader(_images(4, 1)),
            reversed_order,
            device="cpu",
            image_attributes=np.zeros((6, 2), dtype=np.int8),
        )


def test_evaluate_model_restores_the_training_flag() -> None:
    model = _qpm_model().train()
    metrics.evaluate_model(model, DataLoader(_images(4, 1)), None, device="cpu")
    assert model.training


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluate_model_on_cuda_equals_cpu() -> None:
    model = _qpm_model()
    test, train = DataLoader(_images(8, 1), batch_size=3), DataLoader(_images(8, 2), batch_size=3)
    parts = np.random.default_rng(0).uniform(size=(8, 2, 3)).round()
    on_cpu = metrics.evaluate_model(model, test, train, device="cpu", part_locations=parts)
    on_gpu = metrics.evaluate_model(model, test, train, device="cuda", part_locations=parts)
    for name in metrics.names():
        if on_cpu[name] is None:
            assert on_gpu[name] is None, name
        else:
            assert on_gpu[name] == pytest.approx(on_cpu[name], rel=1e-4, abs=1e-5), name


# ---------------------------------------------------------------------------------------------
# top-weight baseline


class _PassThrough(Backbone):
    """A backbone whose maps are its input: the test chooses the pooled features directly."""

    name = "pass_through"
    n_features = 3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images


def _baseline_model() -> QPMModel:
    head = DenseHead(3, 2, dropout=0.5)
    with torch.no_grad():
        # |weight| column sums 5, 2, 0.7: features 0 and 1 are kept; then class 0 keeps its
        # weight 3 on feature 0, class 1 its weight 1 on feature 1 (the largest signed ones)
        head.linear.weight.copy_(torch.tensor([[3.0, -1.0, 0.5], [-2.0, 1.0, 0.2]]))
        head.linear.bias.copy_(torch.tensor([0.0, 0.5]))
    return QPMModel(_PassThrough(), head, class_names=["a", "b"])


def test_top_weight_baseline_accuracy_hand_computed() -> None:
    # pooled features z; pruned logits (3 z0, z1 + 0.5); dense logits use every weight
    pooled = torch.tensor([[1.0, 0.0, 9.0], [0.0, 1.0, 0.0], [0.1, 0.0, 10.0], [0.2, 0.5, 0.0]])
    labels = torch.tensor([0, 1, 0, 0])
    # (2, 2) maps whose spatial mean is z: the baseline pools by the mean, as the dense head
    pattern = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    images = pooled[:, :, None, None] * pattern
    model = _baseline_model().train()
    dense_predictions = model.eval()(images).argmax(dim=1)
    assert dense_predictions.tolist() == [0, 1, 0, 1]  # image 2 needs the pruned feature 2
    model.train()
    # pruned predictions: 0 (3 > 0.5), 1 (0 < 1.5), 1 (0.3 < 0.5), 1 (0.6 < 1.0)
    for batch_size in (1, 3):
        loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size)
        accuracy = metrics.top_weight_baseline_accuracy(
            model, loader, n_features=2, n_per_class=1, device="cpu"
        )
        assert accuracy == pytest.approx(2 / 4)
        assert model.training  # the training flag is restored
    loader = DataLoader(TensorDataset(images, labels), batch_size=2)
    # all three features, one per class: class 0 keeps 3 (feature 0), class 1 keeps 1 (feature 1)
    assert metrics.top_weight_baseline_accuracy(
        model, loader, n_features=3, n_per_class=1, device="cpu"
    ) == pytest.approx(2 / 4)
    # every weight kept: the dense model itself (3 of 4 right)
    assert metrics.top_weight_baseline_accuracy(
        model, loader, n_features=3, n_per_class=3, device="cpu"
    ) == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="n_features"):
        metrics.top_weight_baseline_accuracy(
            model, loader, n_features=4, n_per_class=1, device="cpu"
        )
    with pytest.raises(ValueError, match="n_per_class"):
        metrics.top_weight_baseline_accuracy(
            model, loader, n_features=2, n_per_class=3, device="cpu"
        )


def test_metrics_table_names_the_sparse_model() -> None:
    table = metrics.format_metrics_table({"accuracy": 80.0}, {"accuracy": 85.0}, label="SLDD")
    lines = table.splitlines()
    assert lines[-1].startswith("SLDD") and lines[-2].startswith("Dense")
    assert "QPM" not in table
