"""Explanations: global structure and pairs, example choice, heatmaps, figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from matplotlib.figure import Figure
from PIL import Image
from torch.utils.data import TensorDataset

from openqpm.explain.examples import (
    DatasetScan,
    choose_example,
    class_mistakes,
    example_scores,
    scan_dataset,
    top_activating,
)
from openqpm.explain.figures import (
    LocalExplanation,
    class_comparison_figure,
    explain_image,
    local_explanation_figure,
)
from openqpm.explain.global_ import GlobalExplanation
from openqpm.explain.heatmaps import (
    active_means,
    assign_feature_colors,
    composite_overlay,
    display_image,
    feature_palette,
    heatmap_overlay,
    to_head_units,
    upsample_map,
)
from openqpm.models import QPMHead, QPMModel, create_backbone

# classes 0: {0, 1}, 1: {0, 2}, 2: {3, 4}, 3: {1, 2}; pairs sharing one feature: (0,1), (0,3), (1,3)
WEIGHTS = np.array(
    [[1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 0, 0, 1, 1], [0, 1, 1, 0, 0]], dtype=float
)
NAMES = ["alpha", "beta", "gamma", "delta"]


# ---------------------------------------------------------------------------------------------
# global explanations


def test_global_explanation_lists_features_classes_and_pairs() -> None:
    explanation = GlobalExplanation.from_weights(
        WEIGHTS, class_names=NAMES, channel_ids=[10, 11, 12, 13, 14]
    )
    assert explanation.class_features == [[0, 1], [0, 2], [3, 4], [1, 2]]
    assert explanation.feature_classes == [[0, 1], [0, 3], [1, 3], [2], [2]]
    pairs = [(p.first, p.second) for p in explanation.contrastive_pairs]
    assert pairs == [(0, 1), (0, 3), (1, 3)]  # class order without attributes
    first = explanation.contrastive_pairs[0]
    assert (first.shared_features, first.first_only, first.second_only) == ((0,), (1,), (2,))
    assert first.attribute_similarity is None
    assert [(p.first, p.second) for p in explanation.pairs_of(2)] == []


def test_contrastive_pairs_are_ranked_by_attribute_similarity() -> None:
    attributes = np.array(
        [[1.0, 0.0, 0.2], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0], [0.7, 0.7, 0.0]]
    )  # beta and delta are the most alike, then alpha and beta, then alpha and delta
    explanation = GlobalExplanation.from_weights(
        WEIGHTS, class_names=NAMES, class_attributes=attributes
    )
    pairs = explanation.contrastive_pairs
    assert [(p.first, p.second) for p in pairs] == [(1, 3), (0, 1), (0, 3)]
    similarities = [p.attribute_similarity for p in pairs]
    assert similarities == sorted(similarities, reverse=True)
    unit = attributes / np.linalg.norm(attributes, axis=1, keepdims=True)
    assert similarities[0] == pytest.approx(float(unit[1] @ unit[3]))


def test_pairs_need_equal_feature_counts_and_all_but_one_shared() -> None:
    weights = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 1]])
    explanation = GlobalExplanation.from_weights(weights, class_names=list("abcd"))
    # a and c share 2 of 3: a pair; b has 2 features only; d shares one with a and c
    assert [(p.first, p.second) for p in explanation.contrastive_pairs] == [(0, 2)]


def test_class_features_are_ordered_by_weight() -> None:
    weights = np.array([[0.5, 0.0, 2.0, -1.0], [1.0, 1.0, 0.0, 0.0]])
    explanation = GlobalExplanation.from_weights(weights, class_names=["a", "b"])
    assert explanation.class_features == [[2, 0, 3], [0, 1]]


def test_global_explanation_json_round_trip(tmp_path) -> None:
    explanation = GlobalExplanation.from_weights(
        WEIGHTS, class_names=NAMES, channel_ids=[3, 5, 8, 13, 21], class_attributes=np.eye(4) + 0.1
    )
    path = explanation.save_json(tmp_path / "explanation.json")
    data = json.loads(path.read_text())
    assert data["classes"][3] == {
        "index": 3,
        "name": "delta",
        "features": [1, 2],
        "channels": [5, 8],
        "weights": [1.0, 1.0],
    }
    assert data["features"][4] == {"index": 4, "channel": 21, "classes": [2]}
    assert GlobalExplanation.from_dict(data) == explanation
    assert [p.name for p in tmp_path.iterdir()] == ["explanation.json"]  # no temporary left
    with pytest.raises(ValueError, match="global explanation"):
        GlobalExplanation.from_dict({"format": "something else"})


def test_global_explanation_rejects_mismatched_names() -> None:
    with pytest.raises(ValueError, match="class names"):
        GlobalExplanation.from_weights(WEIGHTS, class_names=["a"])


# ---------------------------------------------------------------------------------------------
# example choice


def _scan(labels, predictions, features, distinctness) -> DatasetScan:
    n_images = len(labels)
    features = np.asarray(features, dtype=np.float32)
    return DatasetScan(
        labels=np.asarray(labels),
        predictions=np.asarray(predictions),
        runner_up=np.zeros(n_images, dtype=np.int64),
        logit_margin=np.arange(n_images, dtype=np.float32),
        features=features,
        peak_activations=np.abs(features),
        distinctness=np.asarray(distinctness, dtype=np.float32),
    )


def test_choose_example_never_picks_a_misclassified_image() -> None:
    scan = _scan(
        labels=[0, 0, 0, 1],
        predictions=[0, 1, 0, 1],
        # image 1 (misclassified) and image 3 (another class) score best of all
        features=[[0.5, 0.5], [5.0, 5.0], [1.0, 2.0], [9.0, 9.0]],
        distinctness=[0.5, 1.0, 0.9, 1.0],
    )
    assert choose_example(scan, [0, 1], 0) == 2
    scores = example_scores(scan, [0, 1])
    assert scores.argmax() in (1, 3)  # so the filter is what excludes them
    wrong_only = _scan([0, 0], [1, 2], [[1.0, 1.0], [2.0, 2.0]], [0.5, 0.6])
    assert choose_example(wrong_only, [0, 1], 0) is None


def test_example_score_wants_every_feature_active() -> None:
    scan = _scan(
        labels=[0, 0],
        predictions=[0, 0],
        features=[[3.0, -2.0], [1.0, 1.0]],  # image 0 has one strong and one inactive feature
        distinctness=[0.8, 0.8],
    )
    assert choose_example(scan, [0, 1], 0) == 1


def test_class_mistakes_and_top_activating() -> None:
    scan = _scan(
        labels=[0, 0, 0, 1],
        predictions=[1, 0, 1, 0],
        features=[[0.1], [0.7], [0.3], [0.9]],
        distinctness=[1, 1, 1, 1],
    )
    assert class_mistakes(scan, 0).tolist() == [2, 0]  # larger logit margin first
    assert top_activating(scan, 0, n_images=3).tolist() == [3, 1, 2]
    with pytest.raises(IndexError):
        top_activating(scan, 1)


def _tiny_qpm() -> QPMModel:
    torch.manual_seed(0)
    matrix = [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    head = QPMHead([2, 5, 11], torch.full((3,), 0.3), torch.full((3,), 0.2), matrix)
    return QPMModel(create_backbone("tiny_cnn"), head, class_names=["a", "b", "c"]).eval()


def test_scan_dataset_matches_the_model() -> None:
    model = _tiny_qpm()
    images = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    scan = scan_dataset(model, TensorDataset(images, labels), batch_size=3)
    with torch.no_grad():
        logits = model(images)
        features = model.forward_head(model.forward_features(images), pre_logits=True)
    np.testing.assert_array_equal(scan.predictions, logits.argmax(dim=1).numpy())
    np.testing.assert_array_equal(scan.labels, labels.numpy())
    np.testing.assert_allclose(scan.features, features.numpy(), rtol=1e-5, atol=1e-6)
    top_two = logits.topk(2, dim=1)
    np.testing.assert_array_equal(scan.runner_up, top_two.indices[:, 1].numpy())
    assert ((scan.distinctness >= 0.5 - 1e-6) & (scan.distinctness <= 1.0 + 1e-6)).all()


# ---------------------------------------------------------------------------------------------
# heatmaps


def test_feature_colors_are_distinct_and_deterministic() -> None:
    class_features = [[0, 1, 2], [0, 3, 4], [1, 3, 5], [2, 4, 5]]
    colors = assign_feature_colors(class_features, 6)
    assert colors.shape == (6, 3) and ((colors >= 0) & (colors <= 1)).all()
    assert len({tuple(c) for c in colors.round(6)}) == 6
    np.testing.assert_array_equal(colors, assign_feature_colors(class_features, 6))
    many = feature_palette(60)
    assert len({tuple(c) for c in many.round(6)}) == 60
    for features in class_features:  # features of one class are clearly different colours
        chosen = colors[features]
        distances = np.linalg.norm(chosen[:, None] - chosen[None], axis=2)
        assert distances[np.triu_indices(3, 1)].min() > 0.3


def test_upsample_map_keeps_constants_and_size() -> None:
    upsampled = upsample_map(np.full((2, 3), 4.0), (10, 15))
    assert upsampled.shape == (10, 15)
    np.testing.assert_allclose(upsampled, 4.0)


def test_heatmap_overlay_colours_the_peak_and_leaves_the_rest_grey() -> None:
    image = np.full((8, 8, 3), 200, dtype=np.uint8)
    feature_map = np.zeros((8, 8))
    feature_map[2, 5] = 1.0
    red = (1.0, 0.0, 0.0)
    overlay = heatmap_overlay(image, feature_map, red)
    far = overlay[7, 0].astype(int)
    assert far[0] == far[1] == far[2]  # no activation: grey
    peak = overlay[2, 5].astype(int)
    assert peak[0] > 200 and peak[1] < 40 and peak[2] < 40
    # a shared, larger scale draws the same map dimmer: comparable brightness across images
    dimmer = heatmap_overlay(image, feature_map, red, scale_max=4.0)[2, 5].astype(int)
    assert dimmer[0] - dimmer[1] < peak[0] - peak[1]


def test_composite_overlay_takes_the_strongest_feature_per_pixel() -> None:
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    maps = np.zeros((2, 4, 4))
    maps[0, :, :2] = 1.0  # left half: feature 0
    maps[1, :, 2:] = 1.0  # right half: feature 1
    colors = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    overlay = composite_overlay(image, maps, colors).astype(int)
    assert overlay[1, 0, 0] > overlay[1, 0, 2]  # red on the left
    assert overlay[1, 3, 2] > overlay[1, 3, 0]  # blue on the right


def test_active_means_by_hand() -> None:
    activations = np.array(
        [
            [1.0, -2.0, 0.0, 0.5],
            [3.0, -1.0, 0.0, -4.0],
            [-5.0, -3.0, 0.0, 1.5],
        ]
    )
    # feature 0: mean of 1 and 3; 1: never active -> its largest |activation| 3; 2: all zero ->
    # 1.0; 3: mean of 0.5 and 1.5
    np.testing.assert_allclose(active_means(activations), [2.0, 3.0, 1.0, 1.0])
    np.testing.assert_allclose(active_means(torch.tensor([[2.0, 0.0]])), [2.0, 1.0])
    np.testing.assert_allclose(active_means(np.zeros((0, 3))), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        active_means(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="N, K"):
        active_means(np.ones(3))


def test_head_units_average_to_the_head_input() -> None:
    """A map in head units is (map - mean) / std per position: its mean is what the head reads."""
    torch.manual_seed(0)
    mean, std = torch.tensor([0.3, 1.0, -0.2]), torch.tensor([0.2, 0.5, 2.0])
    head = QPMHead([0, 1, 2], mean, std, [[1, 1, 0], [0, 1, 1]], dropout=0.0).eval()
    maps = torch.rand(2, 3, 5, 4) * 3.0
    units = to_head_units(maps, mean, std)
    assert units.shape == (2, 3, 5, 4) and units.dtype == np.float32
    np.testing.assert_allclose(units.mean(axis=(2, 3)), head.pre_logits(maps).numpy(), atol=1e-5)
    np.testing.assert_allclose(units[1, 2], (maps[1, 2].numpy() + 0.2) / 2.0, rtol=1e-5)
    with pytest.raises(ValueError, match="std"):
        to_head_units(maps[0], mean, torch.tensor([0.2, 0.0, 1.0]))
    with pytest.raises(ValueError, match="K, h, w"):
        to_head_units(maps[0], mean[:2], std[:2])


def _drawn_level(overlay: np.ndarray, background: np.ndarray) -> float:
    """The brightness a red heatmap was drawn with, from the green channel it darkens.

    The blend is ``grey * (1 - level**2) + red * level**2``; red has no green, so
    ``green = grey_green * (1 - level**2)``.
    """
    green, grey_green = float(overlay[..., 1].mean()), float(background[..., 1].mean())
    return float(np.sqrt(1.0 - green / grey_green))


def test_certainty_scale_draws_a_twice_stronger_feature_half_as_bright() -> None:
    image = np.full((16, 16, 3), 200, dtype=np.uint8)
    units = np.full((4, 4), 0.8)  # a map in head units, constant: upsampling keeps it exact
    red = (1.0, 0.0, 0.0)
    background = heatmap_overlay(image, np.zeros((4, 4)), red)
    typical = _drawn_level(heatmap_overlay(image, units, red, strength_scale=1.0), background)
    strong = _drawn_level(heatmap_overlay(image, units, red, strength_scale=2.0), background)
    assert typical == pytest.approx(0.8, abs=0.02)
    assert strong == pytest.approx(typical / 2.0, abs=0.02)
    # without it, the map's own maximum is full brightness: strength is lost
    own = _drawn_level(heatmap_overlay(image, units, red), background)
    assert own == pytest.approx(1.0, abs=0.02)
    # beyond the typical strength it saturates; below the training mean nothing is drawn
    saturated = heatmap_overlay(image, units * 10, red, strength_scale=1.0)
    assert _drawn_level(saturated, background) == pytest.approx(1.0, abs=0.02)
    below = heatmap_overlay(image, -units, red, strength_scale=1.0)
    np.testing.assert_array_equal(below, background)

    # the composite: the same map value, features of typical strength 1 and 2
    maps = np.stack([units, units])
    maps[0, :, 2:] = 0.0  # feature 0 only on the left, feature 1 everywhere
    reds = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # one colour: compare brightness only
    composite = composite_overlay(image, maps, reds, strength_scales=[1.0, 2.0])
    left, right = composite[:, :6], composite[:, -6:]  # away from the bilinear seam
    assert _drawn_level(left, background) == pytest.approx(0.8, abs=0.02)
    assert _drawn_level(right, background) == pytest.approx(0.4, abs=0.02)


def test_certainty_scale_is_checked() -> None:
    image = np.full((8, 8, 3), 200, dtype=np.uint8)
    with pytest.raises(ValueError, match="not both"):
        heatmap_overlay(image, np.ones((2, 2)), (1, 0, 0), scale_max=1.0, strength_scale=1.0)
    with pytest.raises(ValueError, match="> 0"):
        heatmap_overlay(image, np.ones((2, 2)), (1, 0, 0), strength_scale=0.0)
    with pytest.raises(ValueError, match="strength_scales"):
        composite_overlay(image, np.ones((2, 2, 2)), np.ones((2, 3)), strength_scales=[1.0])


class _PictureSet:
    """A one-image data set whose picture has a red left fifth (for the crop check)."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def load_image(self, index: int) -> Image.Image:
        array = np.zeros((30, 60, 3), dtype=np.uint8)  # 60 wide, 30 high
        array[:, :12] = (255, 0, 0)
        return Image.fromarray(array)


def test_display_image_squashes_or_centre_crops_like_the_transform() -> None:
    squashed = display_image(_PictureSet(T.Compose([T.Resize((16, 16))])), 0, size_px=12)
    assert squashed.shape == (12, 12, 3)
    assert squashed[6, 0, 0] > 200  # the red left fifth is visible
    cropped = display_image(_PictureSet(T.Compose([T.Resize(16), T.CenterCrop(16)])), 0, size_px=12)
    assert cropped[6, 0, 0] < 50  # the centre square starts at x = 15, right of the red part


@pytest.mark.parametrize(
    "steps",
    [
        [T.Resize(256), T.CenterCrop(224)],  # ImageNet's test view: the centre 7/8
        [T.Resize(64), T.CenterCrop(64)],  # centre square
        [T.Resize((64, 64))],  # squash
        [T.Resize(96), T.CenterCrop((48, 80))],  # a non-square crop, drawn squashed to a square
    ],
)
def test_network_view_matches_what_the_transform_feeds_the_network(steps) -> None:
    from openqpm.explain.heatmaps import network_view

    height, width = 300, 400
    y, x = np.mgrid[0:height, 0:width]
    picture = np.stack([x * 255 / width, y * 255 / height, (x + y) % 64 * 4], axis=-1)
    image = Image.fromarray(picture.astype(np.uint8))
    seen = np.asarray(T.Compose(steps)(image), dtype=float)  # what the network gets (as pixels)
    side = 64
    expected = np.asarray(Image.fromarray(seen.astype(np.uint8)).resize((side, side)), dtype=float)
    view = network_view(image, T.Compose(steps), size_px=side).astype(float)
    # the red and green ramps give the position: a shifted or zoomed view differs by several
    # grey levels everywhere (the old full-centre-square view was off by 16 at the border)
    assert np.abs(view[..., :2] - expected[..., :2]).mean() < 2.0


# ---------------------------------------------------------------------------------------------
# local explanations and figures


def _local(features) -> LocalExplanation:
    weights = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    values = np.asarray(features, dtype=float)
    return LocalExplanation(
        logits=weights @ values,
        features=values,
        feature_maps=np.random.default_rng(0).uniform(size=(3, 4, 4)),
        class_weights=weights,
        predicted_class=0,
        runner_up_class=1,
    )


def test_separating_feature_is_why_this_and_not_that() -> None:
    own_feature_active = _local([1.0, 2.0, -1.0])  # gains: feature 1: +2, feature 2: +1
    assert own_feature_active.separating_feature == 1
    assert own_feature_active.separating_gain() == pytest.approx(2.0)
    assert "f1 is A's only, and it is active" in own_feature_active.why_not_sentence(
        ["A", "B"], ["f0", "f1", "f2"]
    )
    rival_feature_missing = _local([1.0, 0.1, -3.0])  # gains: feature 1: 0.1, feature 2: +3
    assert rival_feature_missing.separating_feature == 2
    assert "f2 is B's only, and it is weak" in rival_feature_missing.why_not_sentence(
        ["A", "B"], ["f0", "f1", "f2"]
    )
    parts = own_feature_active.contributions(0)
    assert parts == [(1, 2.0), (0, 1.0)]
    assert sum(value for _, value in parts) == pytest.approx(own_feature_active.logits[0])


def test_explain_image_contributions_sum_to_the_logits() -> None:
    model = _tiny_qpm()
    image = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(2))
    local = explain_image(model, image)
    with torch.no_grad():
        logits = model(image[None])[0].numpy()
    np.testing.assert_allclose(local.logits, logits, rtol=1e-5)
    assert local.predicted_class == int(logits.argmax())
    for class_index in range(3):
        total = sum(value for _, value in local.contributions(class_index))
        assert total == pytest.approx(float(logits[class_index]), rel=1e-4, abs=1e-5)
    assert local.feature_maps.shape[0] == 3
    with pytest.raises(ValueError, match="one image"):
        explain_image(model, torch.zeros(2, 3, 32, 32))


def test_class_comparison_figure_can_carry_certainty() -> None:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (20, 20, 3), dtype=np.uint8) for _ in range(2)]
    maps = [np.full((3, 4, 4), 1.0), np.full((3, 4, 4), 2.0)]  # feature values 1 and 2
    colors = assign_feature_colors([[0, 1], [1, 2]], 3)
    options: dict = {
        "first_only": [0],
        "shared": [1],
        "second_only": [2],
        "class_names": ["a", "b"],
    }
    plain = class_comparison_figure(images, maps, colors=colors, **options)
    strengths = np.array([4.0, 4.0, 1.0])
    certain = class_comparison_figure(
        images, maps, colors=colors, strength_scales=strengths, **options
    )

    def panel(figure, row: int, column: int) -> np.ndarray:
        return np.asarray(figure.axes[row * 4 + column].get_images()[0].get_array())

    # plain: the stronger image of a column is drawn at full brightness
    assert np.array_equal(
        panel(plain, 1, 2), heatmap_overlay(images[1], maps[1][1], colors[1], scale_max=2.0)
    )
    # certainty: brightness = value / the feature's typical strength, the same in every figure
    for row in range(2):
        for column, feature in ((1, 0), (2, 1), (3, 2)):
            expected = heatmap_overlay(
                images[row], maps[row][feature], colors[feature], strength_scale=strengths[feature]
            )
            assert np.array_equal(panel(certain, row, column), expected)
    assert not np.array_equal(panel(plain, 1, 2), panel(certain, 1, 2))


def test_class_comparison_figure_has_a_column_per_feature(tmp_path) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (20, 20, 3), dtype=np.uint8) for _ in range(2)]
    maps = [rng.uniform(size=(5, 4, 4)) for _ in range(2)]
    colors = assign_feature_colors([[0, 1, 2], [1, 2, 3]], 5)
    figure = class_comparison_figure(
        images,
        maps,
        first_only=[0],
        shared=[1, 2],
        second_only=[3],
        class_names=["Shiny Cowbird", "Bronzed Cowbird"],
        colors=colors,
        feature_values=[rng.normal(size=5), rng.normal(size=5)],
    )
    assert isinstance(figure, Figure)
    axes = figure.axes
    assert len(axes) == 2 * 5
    titles = [axis.get_title() for axis in axes[1:5]]
    assert titles[0].startswith("Shiny Cowbird only") and titles[3].startswith("Bronzed")
    assert titles[1].startswith("shared")
    figure.savefig(tmp_path / "pair.png")
    assert (tmp_path / "pair.png").stat().st_size > 1000
    # drawing into given axes
    target = Figure()
    grid = np.asarray(target.subplots(2, 5, squeeze=False))
    assert (
        class_comparison_figure(
            images,
            maps,
            first_only=[0],
            shared=[1, 2],
            second_only=[3],
            class_names=["a", "b"],
            colors=colors,
            axes=grid,
        )
        is target
    )
    with pytest.raises(ValueError, match="axes"):
        class_comparison_figure(
            images,
            maps,
            first_only=[0],
            shared=[1],
            second_only=[3],
            class_names=["a", "b"],
            colors=colors,
            axes=grid,
        )


def test_local_explanation_figure(tmp_path) -> None:
    local = _local([1.0, 2.0, -1.0])
    image = np.random.default_rng(1).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    colors = assign_feature_colors([[0, 1], [0, 2]], 3)
    figure = local_explanation_figure(image, local, class_names=["A", "B"], colors=colors)
    assert isinstance(figure, Figure)
    assert "Why A and not B" in figure.get_suptitle()
    assert len(figure.axes) == 3 + 2  # image, composite, bars, one heatmap per feature of A
    figure.savefig(tmp_path / "local.png")
    with pytest.raises(ValueError, match="axes"):
        local_explanation_figure(
            image, local, class_names=["A", "B"], colors=colors, axes=figure.axes[:3]
        )


def test_local_explanation_figure_can_carry_certainty() -> None:
    from openqpm.explain.heatmaps import composite_overlay

    local = _local([1.0, 2.0, -1.0])  # class A uses features 0 and 1
    image = np.random.default_rng(1).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    colors = assign_feature_colors([[0, 1], [0, 2]], 3)
    head_maps = np.stack([np.full((4, 4), value) for value in (0.5, 3.0, 1.0)])
    strengths = np.array([1.0, 6.0, 1.0])
    figure = local_explanation_figure(
        image,
        local,
        class_names=["A", "B"],
        colors=colors,
        strength_scales=strengths,
        head_maps=head_maps,
    )
    drawn = [np.asarray(axis.get_images()[0].get_array()) for axis in figure.axes[3:]]
    features = [feature for feature, _ in local.contributions(0)]
    for panel, feature in zip(drawn, features):
        expected = heatmap_overlay(
            image, head_maps[feature], colors[feature], strength_scale=strengths[feature]
        )
        assert np.array_equal(panel, expected)
    composite = np.asarray(figure.axes[1].get_images()[0].get_array())
    assert np.array_equal(
        composite,
        composite_overlay(
            image, head_maps[features], colors[features], strength_scales=strengths[features]
        ),
    )
    with pytest.raises(ValueError, match="head_maps"):
        local_explanation_figure(
            image, local, class_names=["A", "B"], colors=colors, strength_scales=strengths
        )


def test_composite_overlay_of_no_feature_is_the_background() -> None:
    """A sparse baseline's class can lose every weight: its composite is the image's background."""
    from openqpm.explain.heatmaps import composite_overlay

    image = np.full((8, 8, 3), 200, dtype=np.uint8)
    empty = composite_overlay(image, np.zeros((0, 2, 2)), np.zeros((0, 3)))
    zero_level = composite_overlay(image, np.zeros((1, 2, 2)), np.ones((1, 3)), scale_maxes=[1.0])
    assert empty.dtype == np.uint8 and empty.shape == (8, 8, 3)
    np.testing.assert_array_equal(empty, zero_level)
