"""The hierarchical explanation of one image and its tree figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

from openqpm.explain.heatmaps import assign_feature_colors
from openqpm.explain.hierarchy import (
    HierarchicalExplanation,
    hierarchical_explanation,
    hierarchy_figure,
)

# 4 classes, K = 5 features, k = 2 features per class
WEIGHTS = np.array(
    [
        [1, 1, 0, 0, 0],  # class 0: features 0, 1
        [1, 0, 1, 0, 0],  # class 1: features 0, 2
        [0, 1, 0, 1, 0],  # class 2: features 1, 3
        [0, 0, 1, 0, 1],  # class 3: features 2, 4
    ]
)
FEATURES = np.array([0.9, 0.5, 0.7, 0.1, 0.3])
# scores: class 0 = 1.4, class 1 = 1.6, class 2 = 0.6, class 3 = 1.0 -> prediction 1
# paths by activation: 0 -> [0, 1], 1 -> [0, 2], 2 -> [1, 3], 3 -> [2, 4]
NAMES = ["Albatross", "Blue Jay", "Cardinal", "Dove"]


def _explanation() -> HierarchicalExplanation:
    return hierarchical_explanation(FEATURES, WEIGHTS)


def _colors() -> np.ndarray:
    return assign_feature_colors([[0, 1], [0, 2], [1, 3], [2, 4]], 5)


def _texts(figure: Figure) -> list[Text]:
    return [t for t in figure.findobj(Text) if t.get_text()]


def test_levels_path_and_class_paths_by_hand() -> None:
    explanation = _explanation()
    assert explanation.prediction == 1
    # class 3 uses feature 2 (the prediction's second) but not first: it leaves at the root
    assert explanation.levels == [[0, 1, 2, 3], [0, 1], [1]]
    assert explanation.path == [0, 2]
    assert explanation.activations == pytest.approx([0.9, 0.7])
    assert explanation.class_paths == {0: [0, 1], 1: [0, 2]}
    assert explanation.k == 2


def test_explicit_prediction() -> None:
    explanation = hierarchical_explanation(FEATURES, WEIGHTS, prediction=0)
    assert explanation.prediction == 0
    assert explanation.levels == [[0, 1, 2, 3], [0, 1], [0]]
    assert explanation.path == [0, 1]
    assert explanation.activations == pytest.approx([0.9, 0.5])


def test_ties_order_by_lower_feature_index() -> None:
    features = np.array([0.5, 0.5, 0.5, 0.0, 0.0])
    explanation = hierarchical_explanation(features, WEIGHTS, prediction=3)
    assert explanation.path == [2, 4]
    explanation = hierarchical_explanation(features, WEIGHTS, prediction=1)
    assert explanation.path == [0, 2]
    assert explanation.class_paths == {0: [0, 1], 1: [0, 2]}


def test_set_at_and_depth() -> None:
    explanation = _explanation()
    assert explanation.set_at(0) == [0, 1, 2, 3]
    assert explanation.set_at(1) == [0, 1]
    assert explanation.set_at(2) == [1]
    with pytest.raises(ValueError, match="level"):
        explanation.set_at(3)
    with pytest.raises(ValueError, match="level"):
        explanation.set_at(-1)
    assert [explanation.depth_of(c) for c in range(4)] == [1, 2, 0, 0]
    # set_at returns a copy
    explanation.set_at(1).append(99)
    assert explanation.set_at(1) == [0, 1]


def test_frozen() -> None:
    explanation = _explanation()
    with pytest.raises(AttributeError):
        explanation.prediction = 0  # type: ignore[misc]


def test_non_binary_weights_raise() -> None:
    with pytest.raises(ValueError, match="binary"):
        hierarchical_explanation(FEATURES, WEIGHTS * 0.5)


def test_bad_shapes_and_prediction_raise() -> None:
    with pytest.raises(ValueError, match="features"):
        hierarchical_explanation(FEATURES[None, :], WEIGHTS)
    with pytest.raises(ValueError, match="class_weights"):
        hierarchical_explanation(FEATURES[:4], WEIGHTS)
    with pytest.raises(ValueError):
        hierarchical_explanation(FEATURES, WEIGHTS, prediction=4)


def test_figure_prediction_bold_and_calibrated_boxed() -> None:
    figure = hierarchy_figure(
        _explanation(), class_names=NAMES, feature_colors=_colors(), calibrated_set=[0, 1]
    )
    assert isinstance(figure, Figure)
    texts = {t.get_text(): t for t in _texts(figure)}
    assert all(name in texts for name in NAMES)
    assert texts["Blue Jay"].get_fontweight() == "bold"
    assert texts["Cardinal"].get_fontweight() == "normal"
    for name in ("Albatross", "Blue Jay"):  # the calibrated set
        patch = texts[name].get_bbox_patch()
        assert patch is not None
        assert patch.get_facecolor() != (0.0, 0.0, 0.0, 0.0)
    for name in ("Cardinal", "Dove"):
        assert texts[name].get_bbox_patch() is None
    # the path's nodes carry their features' colours
    colors = _colors()
    for feature in (0, 2):
        (node,) = [
            a for a in figure.axes[0].collections if a.get_gid() == f"hierarchy-feature-{feature}"
        ]
        assert np.allclose(node.get_facecolor()[0][:3], colors[feature])
    figure.canvas.draw()  # renders without error


def test_figure_into_given_axes() -> None:
    target = Figure()
    axis = target.add_subplot(1, 1, 1)
    figure = hierarchy_figure(_explanation(), class_names=NAMES, feature_colors=_colors(), ax=axis)
    assert figure is target
    assert not any(t.get_bbox_patch() is not None for t in _texts(figure))


def test_figure_truncates_with_more() -> None:
    rng = np.random.default_rng(0)
    n_classes, n_features, k = 40, 12, 3
    weights = np.zeros((n_classes, n_features), dtype=np.int64)
    for c in range(n_classes):
        weights[c, rng.choice(n_features, size=k, replace=False)] = 1
    features = rng.random(n_features)
    explanation = hierarchical_explanation(features, weights)
    names = [f"class {c}" for c in range(n_classes)]
    colors = assign_feature_colors([list(np.flatnonzero(row)) for row in weights], n_features)
    calibrated = explanation.set_at(1)
    figure = hierarchy_figure(
        explanation,
        class_names=names,
        feature_colors=colors,
        calibrated_set=calibrated,
        max_classes=12,
    )
    texts = [t.get_text() for t in _texts(figure)]
    named = [t for t in texts if t in names]
    assert len(named) == 12
    assert names[explanation.prediction] in named
    more = [int(t.split()[0][1:]) for t in texts if t.endswith("more")]
    assert more and sum(more) == n_classes - 12


def test_figure_rejects_wrong_names() -> None:
    with pytest.raises(ValueError, match="class names"):
        hierarchy_figure(_explanation(), class_names=NAMES[:3], feature_colors=_colors())
