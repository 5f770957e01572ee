"""Tests of the Feature Diversity Loss, its beta helpers and the Feature Grounding Loss."""

from __future__ import annotations

import math

import pytest
import torch

from openqpm.losses import (
    DIVERSITY_BETA,
    REFERENCE_BETA,
    default_diversity_beta,
    feature_diversity_loss,
    feature_grounding_loss,
    resolve_diversity_beta,
    scaled_beta,
)
from openqpm.models import backbone_names


def _naive_loss(
    maps: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor, beta: float
) -> torch.Tensor:
    """A line-by-line transcription of the reference semantics, one sample at a time."""
    total = maps.new_zeros(())
    for b in range(maps.shape[0]):
        row = weights[logits[b].argmax()]
        share = row.abs() / (row.norm() + 1e-5)  # (K,)
        means = maps[b].mean(dim=(1, 2))  # (K,)
        scale = means / torch.clamp(means.max(), min=1e-6)  # (K,)
        softmax = torch.softmax(maps[b].flatten(1), dim=1)  # (K, h*w)
        scaled = softmax * (scale * share)[:, None]  # (K, h*w)
        total = total + scaled.max(dim=0).values.sum()
    return -beta / maps.shape[0] * total


def _hand_example() -> tuple[torch.Tensor, float]:
    """Two 2x2 maps whose softmax is rational, and the loss worked out by hand.

    map 0 = [[0, 0], [0, ln 3]]: softmax = [1, 1, 1, 3] / 6, mean a0 = ln(3) / 4
    map 1 = [[ln 2, 0], [0, 0]]: softmax = [2, 1, 1, 1] / 5, mean a1 = ln(2) / 4
    s = a / max(a) = [1, r] with r = ln 2 / ln 3.
    Predicted class row W = [3, 4]: u = [3, 4] / (5 + 1e-5).
    S0 = [1, 1, 1, 3] / 6 * 1 * u0,  S1 = [2, 1, 1, 1] / 5 * r * u1.
    """
    maps = torch.tensor(
        [[[[0.0, 0.0], [0.0, math.log(3.0)]], [[math.log(2.0), 0.0], [0.0, 0.0]]]],
        dtype=torch.float64,
    )  # (1, 2, 2, 2)
    r = math.log(2.0) / math.log(3.0)
    u0, u1 = 3 / (5 + 1e-5), 4 / (5 + 1e-5)
    map0 = [u0 / 6, u0 / 6, u0 / 6, 3 * u0 / 6]  # = [0.1, 0.1, 0.1, 0.3] up to the 1e-5
    map1 = [2 * r * u1 / 5, r * u1 / 5, r * u1 / 5, r * u1 / 5]  # = [0.2019, 0.1009, ...]
    channel_max_sum = sum(max(a, b) for a, b in zip(map0, map1))  # 0.2019 + 2*0.1009 + 0.3
    return maps, channel_max_sum


def test_loss_matches_hand_computed_value() -> None:
    maps, channel_max_sum = _hand_example()
    assert channel_max_sum == pytest.approx(0.703795, abs=1e-5)  # the arithmetic above
    weights = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    logits = torch.tensor([[2.0, 1.0]], dtype=torch.float64)  # predicts class 0
    loss = feature_diversity_loss(maps, logits, weights, beta=0.5)
    assert loss.item() == pytest.approx(-0.5 * channel_max_sum, rel=1e-12)


def test_loss_uses_the_predicted_class_not_any_label() -> None:
    maps, _ = _hand_example()
    weights = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    # Class 1 predicted: u = [0, 1 / (1 + 1e-5)], so only map 1 counts and its softmax sums
    # to 1: loss = -beta * r * u1.
    logits = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    loss = feature_diversity_loss(maps, logits, weights, beta=1.0)
    r = math.log(2.0) / math.log(3.0)
    assert loss.item() == pytest.approx(-r / (1 + 1e-5), rel=1e-12)


def test_loss_averages_over_the_batch() -> None:
    maps, channel_max_sum = _hand_example()
    weights = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    r = math.log(2.0) / math.log(3.0)
    batch = torch.cat([maps, maps])  # (2, 2, 2, 2)
    logits = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    loss = feature_diversity_loss(batch, logits, weights, beta=1.0)
    assert loss.item() == pytest.approx(-(channel_max_sum + r / (1 + 1e-5)) / 2, rel=1e-12)


def test_all_zero_maps_give_zero_not_nan() -> None:
    # max mean is clamped at 1e-6, so s = 0 and the sample contributes nothing.
    maps = torch.zeros(2, 3, 4, 4, requires_grad=True)
    weights = torch.randn(5, 3)
    loss = feature_diversity_loss(maps, torch.randn(2, 5), weights, beta=0.2)
    loss.backward()
    assert loss.item() == 0.0
    assert maps.grad is not None and torch.isfinite(maps.grad).all()


def test_matches_naive_reference_in_value_and_gradients() -> None:
    generator = torch.Generator().manual_seed(3)
    maps = (torch.randn(4, 6, 5, 3, generator=generator, dtype=torch.float64) * 2).relu()
    weights = torch.randn(7, 6, generator=generator, dtype=torch.float64)
    logits = torch.randn(4, 7, generator=generator, dtype=torch.float64)
    maps_a, weights_a = maps.clone().requires_grad_(), weights.clone().requires_grad_()
    maps_b, weights_b = maps.clone().requires_grad_(), weights.clone().requires_grad_()
    fast = feature_diversity_loss(maps_a, logits, weights_a, beta=0.196)
    slow = _naive_loss(maps_b, logits, weights_b, 0.196)
    fast.backward()
    slow.backward()
    assert fast.item() == pytest.approx(slow.item(), rel=1e-12)
    assert maps_a.grad is not None and maps_b.grad is not None
    assert weights_a.grad is not None and weights_b.grad is not None
    assert torch.allclose(maps_a.grad, maps_b.grad, rtol=1e-9, atol=1e-12)
    assert torch.allclose(weights_a.grad, weights_b.grad, rtol=1e-9, atol=1e-12)


def test_gradients_reach_maps_and_weights_but_not_logits() -> None:
    maps = torch.rand(3, 4, 6, 6, requires_grad=True)
    weights = torch.randn(5, 4, requires_grad=True)
    logits = torch.randn(3, 5, requires_grad=True)
    feature_diversity_loss(maps, logits, weights, beta=0.196).backward()
    assert maps.grad is not None and maps.grad.abs().sum() > 0
    assert weights.grad is not None
    # Only the rows of predicted classes get a gradient.
    predicted = set(logits.argmax(dim=1).tolist())
    for row in range(5):
        has_gradient = bool(weights.grad[row].abs().sum() > 0)
        assert has_gradient == (row in predicted)
    assert logits.grad is None


def test_diverse_maps_have_lower_loss_than_overlapping_ones() -> None:
    # Two equally weighted maps peaking at the same place vs at different places.
    same = torch.zeros(1, 2, 3, 3)
    same[0, :, 1, 1] = 5.0
    apart = torch.zeros(1, 2, 3, 3)
    apart[0, 0, 0, 0] = 5.0
    apart[0, 1, 2, 2] = 5.0
    weights = torch.ones(1, 2)
    logits = torch.zeros(1, 1)
    loss_same = feature_diversity_loss(same, logits, weights, beta=1.0)
    loss_apart = feature_diversity_loss(apart, logits, weights, beta=1.0)
    assert loss_apart < loss_same < 0


def test_large_activations_and_half_precision_stay_finite() -> None:
    maps = torch.rand(2, 3, 4, 4) * 1000
    weights = torch.randn(4, 3)
    logits = torch.randn(2, 4)
    reference = feature_diversity_loss(maps.double(), logits, weights.double(), beta=0.1)
    half = feature_diversity_loss(maps.half(), logits.half(), weights.half(), beta=0.1)
    assert half.dtype == torch.float32
    assert torch.isfinite(half)
    assert half.item() == pytest.approx(reference.item(), rel=1e-2)


def test_zero_beta_gives_zero() -> None:
    loss = feature_diversity_loss(
        torch.rand(2, 3, 4, 4), torch.randn(2, 4), torch.randn(4, 3), beta=0.0
    )
    assert loss.item() == 0.0


@pytest.mark.parametrize(
    ("maps_shape", "logits_shape", "weights_shape"),
    [
        ((2, 3, 4), (2, 4), (4, 3)),  # maps not 4-d
        ((2, 3, 4, 4), (3, 4), (4, 3)),  # batch mismatch
        ((2, 3, 4, 4), (2, 4), (4, 2)),  # K mismatch
        ((2, 3, 4, 4), (2, 5), (4, 3)),  # class count mismatch
    ],
)
def test_shape_mismatches_are_rejected(
    maps_shape: tuple[int, ...], logits_shape: tuple[int, ...], weights_shape: tuple[int, ...]
) -> None:
    with pytest.raises(ValueError, match="must be"):
        feature_diversity_loss(
            torch.rand(maps_shape), torch.rand(logits_shape), torch.rand(weights_shape), beta=0.1
        )


def test_scaled_beta_follows_the_map_side() -> None:
    assert scaled_beta(0.196, 28, 28) == pytest.approx(0.196)
    # The paper's Inception-v3 value for 7x7 maps: 0.196 * 7 / 28.
    assert scaled_beta(0.196, 7, 7) == pytest.approx(0.049)
    assert scaled_beta(0.196, 8, 8) == pytest.approx(0.056)
    assert scaled_beta(1.0, 4, 16, reference_hw=(2, 2)) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="positive integers"):
        scaled_beta(0.196, 0, 7)
    with pytest.raises(ValueError, match="beta"):
        scaled_beta(-1.0, 7, 7)


def test_every_registered_backbone_has_a_beta() -> None:
    assert set(backbone_names()) <= set(DIVERSITY_BETA)
    assert DIVERSITY_BETA["resnet50"] == DIVERSITY_BETA["resnet34"] == REFERENCE_BETA == 0.196
    assert DIVERSITY_BETA["small_cnn"] == pytest.approx(scaled_beta(0.196, 8, 8), abs=1e-3)


def test_default_beta_falls_back_to_scaling() -> None:
    assert default_diversity_beta("resnet50") == 0.196
    assert default_diversity_beta("timm:foo", map_height=7, map_width=7) == pytest.approx(0.049)
    with pytest.raises(ValueError, match="no diversity beta"):
        default_diversity_beta("timm:foo")


def test_resolve_diversity_beta_prefers_the_override_then_the_table() -> None:
    for reduced_strides in (False, True):
        assert (
            resolve_diversity_beta(
                "resnet50", override=None, reduced_strides=reduced_strides, image_size_px=224
            )
            == 0.196
        )
    # an override wins even over the table, and even 0 (no diversity loss)
    assert (
        resolve_diversity_beta("resnet50", override=0.0, reduced_strides=True, image_size_px=224)
        == 0.0
    )
    assert resolve_diversity_beta(
        "timm:not_built", override=0.3, reduced_strides=False, image_size_px=224
    ) == pytest.approx(0.3)


def test_resolve_diversity_beta_scales_to_the_map_size_without_a_table_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(DIVERSITY_BETA, "tiny_cnn")
    monkeypatch.delitem(DIVERSITY_BETA, "resnet18")
    # tiny_cnn has 8x8 maps at 64 px: 0.196 * 8 / 28
    assert resolve_diversity_beta(
        "tiny_cnn", override=None, reduced_strides=False, image_size_px=64
    ) == pytest.approx(0.056)
    # ResNet maps at 224 px: 7x7, or 28x28 with reduced strides
    assert resolve_diversity_beta(
        "resnet18", override=None, reduced_strides=False, image_size_px=224
    ) == pytest.approx(0.049)
    assert resolve_diversity_beta(
        "resnet18", override=None, reduced_strides=True, image_size_px=224
    ) == pytest.approx(0.196)
    with pytest.raises(ValueError, match="too small"):
        resolve_diversity_beta("resnet18", override=None, reduced_strides=False, image_size_px=16)


# --------------------------------------------------------------------------------------------
# feature grounding loss (CHiQPM)


def _grounding_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two images, K = 4 features, k = 2 per class.

    W = [[1, 1, 0, 0], [0, 0, 1, 1]].
    image 0, label 0, f = [2, 1, 0.5, -1.5]:
        m_assigned = (2 + 1) / 2 = 1.5, mean of the rest = (0.5 - 1.5) / 2 = -0.5,
        scale = max |f| = 2.
        factor 2: diff = 2 * -0.5 - 1.5 = -2.5, loss_0 = -1.25
        factor 1: diff = -0.5 - 1.5 = -2.0, loss_0 = -1.0
    image 1, label 1, f = [0.004, 0.002, 0.001, 0.003] (scale clamped at 0.01):
        m_assigned = (0.001 + 0.003) / 2 = 0.002, mean of the rest = (0.004 + 0.002) / 2 = 0.003.
        factor 2: diff = 0.006 - 0.002 = 0.004, loss_1 = 0.4
        factor 1: diff = 0.003 - 0.002 = 0.001, loss_1 = 0.1
    loss = (loss_0 + loss_1) / 2: -0.425 (factor 2), -0.45 (factor 1).
    """
    features = torch.tensor(
        [[2.0, 1.0, 0.5, -1.5], [0.004, 0.002, 0.001, 0.003]], dtype=torch.float64
    )
    labels = torch.tensor([0, 1])
    matrix = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    return features, labels, matrix


def test_grounding_loss_matches_hand_computed_values() -> None:
    features, labels, matrix = _grounding_example()
    default = feature_grounding_loss(features, labels, matrix)
    assert default.dtype == torch.float64 and default.dim() == 0
    assert default.item() == pytest.approx(-0.425, rel=1e-12)
    doubled = feature_grounding_loss(features, labels, matrix, remaining_factor=2.0)
    assert doubled.item() == default.item()
    plain = feature_grounding_loss(features, labels, matrix, remaining_factor=1.0)
    assert plain.item() == pytest.approx(-0.45, rel=1e-12)


def test_grounding_loss_gradient_raises_assigned_and_lowers_other_features() -> None:
    features, labels, matrix = _grounding_example()
    features.requires_grad_()
    feature_grounding_loss(features, labels, matrix).backward()
    assert features.grad is not None
    # d loss / d f = (d diff / d f / scale - diff * d scale / d f / scale^2) / B, B = 2, with
    # d diff / d f = -1/2 on assigned features and 2 * 1/2 = 1 on the others.
    # image 0 (scale 2 = f[0], diff -2.5): f0: (-0.25 + 2.5 / 4) / 2 = 0.1875 (the scale's own
    # feature: the loss is scale-free, so raising the largest feature shrinks |loss|),
    # f1: -0.25 / 2 = -0.125, f2 and f3: 0.5 / 2 = 0.25.
    # image 1 (clamped scale 0.01): assigned f2, f3: -50 / 2 = -25; others 100 / 2 = 50.
    expected = torch.tensor(
        [[0.1875, -0.125, 0.25, 0.25], [50.0, 50.0, -25.0, -25.0]], dtype=torch.float64
    )
    assert torch.allclose(features.grad, expected, rtol=1e-12, atol=1e-12)
    # a descent step raises the assigned features and lowers the others (but for image 0's
    # largest feature, which sets the scale)
    assigned = matrix[labels].bool()
    mask = torch.ones_like(assigned)
    mask[0, 0] = False
    assert (features.grad[assigned & mask] < 0).all()
    assert (features.grad[~assigned & mask] > 0).all()


def test_grounding_loss_reads_the_true_class_rows_and_averages_over_the_batch() -> None:
    features, labels, matrix = _grounding_example()
    single = [
        feature_grounding_loss(features[i : i + 1], labels[i : i + 1], matrix).item()
        for i in range(2)
    ]
    assert single == pytest.approx([-1.25, 0.4], rel=1e-12)
    # swapping the labels swaps which features count as assigned
    swapped = feature_grounding_loss(features[:1], torch.tensor([1]), matrix, remaining_factor=1)
    # image 0 with class 1: assigned mean (0.5 - 1.5) / 2 = -0.5, rest 1.5: (1.5 + 0.5) / 2 = 1
    assert swapped.item() == pytest.approx(1.0, rel=1e-12)


def test_grounding_loss_in_half_precision_and_rows_without_zeros() -> None:
    features, labels, matrix = _grounding_example()
    half = feature_grounding_loss(features.half(), labels, matrix.half())
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(-0.425, rel=1e-2)
    # a class that uses every feature: the mean of no feature is 0, not NaN
    full = feature_grounding_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([0]), torch.ones(1, 2))
    assert full.item() == pytest.approx(-2.0 / 3.0)


@pytest.mark.parametrize(
    ("features_shape", "labels", "matrix_shape", "message"),
    [
        ((2, 4, 1), [0, 1], (2, 4), "features must be"),
        ((0, 4), [], (2, 4), "features must hold"),
        ((2, 4), [0, 1, 1], (2, 4), "labels must be"),
        ((2, 4), [[0, 1]], (2, 4), "labels must be"),
        ((2, 4), [0.0, 1.0], (2, 4), "labels must be integer"),
        ((2, 4), [0, 1], (2, 3), "class_feature_matrix must be"),
        ((2, 4), [0, 1], (4,), "class_feature_matrix must be"),
    ],
)
def test_grounding_loss_rejects_bad_shapes_naming_the_argument(
    features_shape: tuple[int, ...],
    labels: list[float],
    matrix_shape: tuple[int, ...],
    message: str,
) -> None:
    with pytest.raises(ValueError, match=message):
        feature_grounding_loss(
            torch.rand(features_shape), torch.tensor(labels), torch.ones(matrix_shape)
        )


def test_grounding_loss_rejects_a_non_finite_remaining_factor() -> None:
    with pytest.raises(ValueError, match="remaining_factor must be a finite number"):
        feature_grounding_loss(
            torch.rand(2, 4), torch.tensor([0, 1]), torch.ones(2, 4), remaining_factor=math.nan
        )
