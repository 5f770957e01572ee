"""Figures: two classes side by side (paper Figures 1 and 4) and the explanation of one image.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot, no global state, no
window); the caller saves them (``figure.savefig(path)``). Each function accepts axes to draw
into and returns the figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from openqpm._io import eval_mode
from openqpm.explain.heatmaps import composite_overlay, heatmap_overlay

__all__ = [
    "LocalExplanation",
    "class_comparison_figure",
    "explain_image",
    "local_explanation_figure",
]

_PANEL_INCHES = 2.0


@dataclass
class LocalExplanation:
    """Why a model classified one image as it did.

    Attributes:
        logits: (n_c,) class scores.
        features: (K,) what the class weights multiply (QPM: normalised feature values).
        feature_maps: (K, h, w) the maps the head reads.
        class_weights: (n_c, K).
        predicted_class: the argmax class.
        runner_up_class: the class with the second largest logit.
    """

    logits: np.ndarray
    features: np.ndarray
    feature_maps: np.ndarray
    class_weights: np.ndarray
    predicted_class: int
    runner_up_class: int

    def contributions(self, class_index: int) -> list[tuple[int, float]]:
        """(feature, weight x value) for each feature the class uses, largest first.

        For a QPM the contributions sum to the class's logit.
        """
        row = self.class_weights[class_index]
        used = np.flatnonzero(row)
        values = row[used] * self.features[used]
        order = np.argsort(-values, kind="stable")
        return [(int(used[i]), float(values[i])) for i in order]

    @property
    def separating_feature(self) -> int | None:
        """The feature that most favours the predicted class over the runner-up.

        Among features whose weights differ between the two classes, the one with the largest
        ``(w_pred - w_runner_up) x value``: an active feature of the predicted class only, or an
        inactive (negative) feature of the runner-up only. None if the two rows are equal.
        """
        difference = (
            self.class_weights[self.predicted_class] - self.class_weights[self.runner_up_class]
        )
        candidates = np.flatnonzero(difference)
        if len(candidates) == 0:
            return None
        gains = difference[candidates] * self.features[candidates]
        return int(candidates[int(np.argmax(gains))])

    def separating_gain(self) -> float:
        """How much the separating feature adds to the logit margin (0 without one)."""
        feature = self.separating_feature
        if feature is None:
            return 0.0
        difference = (
            self.class_weights[self.predicted_class, feature]
            - self.class_weights[self.runner_up_class, feature]
        )
        return float(difference * self.features[feature])

    def why_not_sentence(self, class_names: Sequence[str], feature_labels: Sequence[str]) -> str:
        """One sentence: why the predicted class and not the runner-up."""
        predicted = class_names[self.predicted_class]
        runner_up = class_names[self.runner_up_class]
        feature = self.separating_feature
        if feature is None:
            return f"{predicted} and {runner_up} use the same features."
        value = float(self.features[feature])
        label = feature_labels[feature]
        predicted_weight = float(self.class_weights[self.predicted_class, feature])
        runner_up_weight = float(self.class_weights[self.runner_up_class, feature])
        if predicted_weight > 0 and runner_up_weight == 0:
            return (
                f"Why {predicted} and not {runner_up}: {label} is {predicted}'s only, and it is "
                f"active here ({value:+.2f})."
            )
        if predicted_weight == 0 and runner_up_weight > 0:
            return (
                f"Why {predicted} and not {runner_up}: {label} is {runner_up}'s only, and it is "
                f"weak here ({value:+.2f})."
            )
        # signed or unequal weights (a sparse head): say what the feature adds to the margin
        return (
            f"Why {predicted} and not {runner_up}: {label} ({value:+.2f} here) has weight "
            f"{predicted_weight:+.2f} for {predicted} and {runner_up_weight:+.2f} for "
            f"{runner_up}, which adds {self.separating_gain():+.2f} to the margin."
        )


@torch.no_grad()
def explain_image(
    model: torch.nn.Module, image: torch.Tensor, *, device: torch.device | str = "cpu"
) -> LocalExplanation:
    """The local explanation of one transformed image.

    Args:
        model: an ``openqpm.QPMModel``; evaluated in eval mode (training flag restored).
        image: (3, H, W) or (1, 3, H, W), normalised as the model expects.
        device: where the forward pass runs.

    Returns:
        The :class:`LocalExplanation`.

    Raises:
        ValueError: for a batch of more than one image or a model with one class.
    """
    qpm: Any = model
    batch = image[None] if image.ndim == 3 else image
    if batch.ndim != 4 or batch.shape[0] != 1:
        raise ValueError(f"expected one image (3, H, W), got shape {tuple(image.shape)}")
    with eval_mode(model):
        backbone_maps = qpm.forward_features(batch.to(device))  # (1, n_f, h, w)
        logits = qpm.forward_head(backbone_maps)[0].float().cpu().numpy()  # (n_c,)
        features = qpm.forward_head(backbone_maps, pre_logits=True)[0].float().cpu().numpy()
        maps = qpm.head_feature_maps(backbone_maps)[0].float().cpu().numpy()  # (K, h, w)
    if len(logits) < 2:
        raise ValueError("a local explanation needs a model with at least two classes")
    order = np.argsort(-logits, kind="stable")
    return LocalExplanation(
        logits=logits,
        features=features,
        feature_maps=maps,
        class_weights=qpm.class_weights().detach().float().cpu().numpy(),
        predicted_class=int(order[0]),
        runner_up_class=int(order[1]),
    )


def _figure_of(axis: Axes) -> Figure:
    figure: Any = axis.figure
    while not isinstance(figure, Figure):  # a SubFigure sits inside its parent figure
        figure = figure.figure
    return figure


def _hide_ticks(axis: Axes) -> None:
    axis.set_xticks([])
    axis.set_yticks([])
    for spine in axis.spines.values():
        spine.set_visible(False)


def _labels(n_features: int, feature_labels: Sequence[str] | None) -> list[str]:
    if feature_labels is None:
        return [f"Feature {d}" for d in range(n_features)]
    if len(feature_labels) != n_features:
        raise ValueError(f"{len(feature_labels)} feature labels for {n_features} features")
    return list(feature_labels)


def class_comparison_figure(
    images: Sequence[np.ndarray],
    feature_maps: Sequence[np.ndarray],
    *,
    first_only: Sequence[int],
    shared: Sequence[int],
    second_only: Sequence[int],
    class_names: Sequence[str],
    colors: np.ndarray,
    feature_labels: Sequence[str] | None = None,
    feature_values: Sequence[np.ndarray] | None = None,
    axes: np.ndarray | None = None,
    strength_scales: Sequence[float] | np.ndarray | None = None,
) -> Figure:
    """Two classes, a row each; columns: the image, then features only the first class uses,
    shared features, features only the second class uses (paper Figures 1 and 4).

    Every column shows one feature on both images with one brightness scale, the larger of the
    two maps' maxima, so the image where the feature is weaker is drawn dimmer. With
    ``strength_scales`` the scale is instead the feature's typical strength (certainty-carrying
    drawing, see :func:`openqpm.explain.heatmaps.heatmap_overlay`), the same in every figure.

    Args:
        images: two (H, W, 3) uint8 images (see ``heatmaps.display_image``).
        feature_maps: two (K, h, w) arrays, the head's maps of each image.
        first_only: features of the first class only (head indices).
        shared: features of both.
        second_only: features of the second class only.
        class_names: the two row titles.
        colors: (K, 3) one colour per feature.
        feature_labels: K column titles; default ``"Feature d"``.
        feature_values: two (K,) arrays of feature values written in each panel's corner.
        axes: a (2, 1 + n_columns) array of axes to draw into; default a new figure.
        strength_scales: (K,) each feature's typical strength (``heatmaps.active_means``); the
            maps are then in head-input units (``heatmaps.to_head_units``).

    Returns:
        The figure.

    Raises:
        ValueError: on inputs of the wrong length or an axes array of the wrong shape.
    """
    if len(images) != 2 or len(feature_maps) != 2 or len(class_names) != 2:
        raise ValueError("class_comparison_figure needs exactly two images, maps and names")
    columns = [*first_only, *shared, *second_only]
    # column titles stay within their column: long class names are shortened
    kinds = (
        [_short(f"{class_names[0]} only", 24)] * len(first_only)
        + ["shared"] * len(shared)
        + [_short(f"{class_names[1]} only", 24)] * len(second_only)
    )
    labels = _labels(feature_maps[0].shape[0], feature_labels)
    n_columns = 1 + len(columns)
    if axes is None:
        figure = Figure(figsize=(_PANEL_INCHES * n_columns, _PANEL_INCHES * 2 + 0.7))
        axes = np.asarray(figure.subplots(2, n_columns, squeeze=False))
        figure.subplots_adjust(left=0.03, right=0.99, top=0.82, bottom=0.02, wspace=0.04)
    else:
        axes = np.asarray(axes)
        if axes.shape != (2, n_columns):
            raise ValueError(f"axes must have shape (2, {n_columns}), got {axes.shape}")
        figure = _figure_of(axes[0, 0])
    for row in range(2):
        axes[row, 0].imshow(images[row])
        _hide_ticks(axes[row, 0])
        axes[row, 0].set_ylabel(_wrap(class_names[row]), fontsize=10)
    for column, feature in enumerate(columns, start=1):
        scale_max = max(
            float(feature_maps[0][feature].max()), float(feature_maps[1][feature].max())
        )
        scales: dict[str, float | None] = {"scale_max": scale_max or None}
        if strength_scales is not None:
            scales = {"strength_scale": float(strength_scales[feature])}
        color = colors[feature]
        for row in range(2):
            axis = axes[row, column]
            axis.imshow(heatmap_overlay(images[row], feature_maps[row][feature], color, **scales))
            _hide_ticks(axis)
            if feature_values is not None:
                axis.text(
                    0.04,
                    0.05,
                    f"{float(feature_values[row][feature]):+.2f}",
                    transform=axis.transAxes,
                    color="white",
                    fontsize=9,
                    bbox={"facecolor": "black", "alpha": 0.55, "pad": 1.5, "linewidth": 0},
                )
        top = axes[0, column]
        top.set_title(
            f"{kinds[column - 1]}\n{labels[feature]}",
            fontsize=8,
            color=tuple(float(c) for c in color),
            fontweight="bold",
        )
        for spine in top.spines.values():
            spine.set_visible(True)
            spine.set_edgecolor(tuple(float(c) for c in color))
            spine.set_linewidth(2.5)
    return figure


def _wrap(text: str, width: int = 18) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines)


def local_explanation_figure(
    image: np.ndarray,
    explanation: LocalExplanation,
    *,
    class_names: Sequence[str],
    colors: np.ndarray,
    feature_labels: Sequence[str] | None = None,
    axes: Sequence[Axes] | None = None,
    strength_scales: Sequence[float] | np.ndarray | None = None,
    head_maps: np.ndarray | None = None,
) -> Figure:
    """The explanation of one image: prediction, each feature's contribution, heatmaps, and the
    feature that separates the prediction from the runner-up ("why this and not that").

    Top row: the image, all the predicted class's features over it (each pixel in the colour of
    its strongest feature), and the contributions (weight x value) of the predicted class's and
    the runner-up's features. Bottom row: one heatmap per feature of the predicted class.

    Args:
        image: (H, W, 3) uint8, the picture the maps belong to.
        explanation: from :func:`explain_image`.
        class_names: n_c names.
        colors: (K, 3) one colour per feature.
        feature_labels: K labels; default ``"Feature d"``.
        axes: 3 + k axes (image, composite, bars, then one per predicted-class feature, k of
            them); default a new figure.
        strength_scales: (K,) each feature's typical strength (``heatmaps.active_means``):
            certainty-carrying heatmaps (brightness = value / strength) drawn from
            ``head_maps``; default: the heatmaps share the brightest feature's scale.
        head_maps: (K, h, w) the feature maps in head-input units
            (``heatmaps.to_head_units``), required with ``strength_scales``.

    Returns:
        The figure.

    Raises:
        ValueError: when ``axes`` has the wrong length, or ``strength_scales`` comes without
            ``head_maps``.
    """
    if strength_scales is not None and head_maps is None:
        raise ValueError("strength_scales needs head_maps (the maps in head-input units)")
    labels = _labels(explanation.feature_maps.shape[0], feature_labels)
    predicted = explanation.predicted_class
    runner_up = explanation.runner_up_class
    predicted_parts = explanation.contributions(predicted)
    runner_up_parts = explanation.contributions(runner_up)
    features = [feature for feature, _ in predicted_parts]
    n_heatmaps = len(features)
    if axes is None:
        n_columns = max(n_heatmaps, 4)
        figure = Figure(figsize=(_PANEL_INCHES * n_columns, _PANEL_INCHES * 2 + 1.2))
        grid = figure.add_gridspec(2, n_columns, height_ratios=[1.0, 1.0])
        axis_list = [
            figure.add_subplot(grid[0, 0]),
            figure.add_subplot(grid[0, 1]),
            figure.add_subplot(grid[0, 2:]),
        ] + [figure.add_subplot(grid[1, i]) for i in range(n_heatmaps)]
        figure.subplots_adjust(left=0.02, right=0.98, top=0.84, bottom=0.03, wspace=0.08)
    else:
        axis_list = list(axes)
        if len(axis_list) != 3 + n_heatmaps:
            raise ValueError(f"axes must hold {3 + n_heatmaps} axes, got {len(axis_list)}")
        figure = _figure_of(axis_list[0])
    image_axis, composite_axis, bar_axis, *heat_axes = axis_list
    maps = explanation.feature_maps
    image_axis.imshow(image)
    image_axis.set_title("input", fontsize=9)
    _hide_ticks(image_axis)
    if strength_scales is not None and head_maps is not None:
        strength = np.asarray(strength_scales, dtype=np.float64)
        maps = head_maps
        composite = composite_overlay(
            image, maps[features], colors[features], strength_scales=strength[features]
        )
    else:
        composite = composite_overlay(image, maps[features], colors[features])
    composite_axis.imshow(composite)
    composite_axis.set_title(f"{class_names[predicted]}'s features", fontsize=9)
    _hide_ticks(composite_axis)

    rows = [(f"{labels[f]} · {class_names[predicted]}", v, colors[f]) for f, v in predicted_parts]
    rows += [(f"{labels[f]} · {class_names[runner_up]}", v, colors[f]) for f, v in runner_up_parts]
    positions = np.arange(len(rows))[::-1]
    bar_axis.barh(
        positions,
        [value for _, value, _ in rows],
        color=[tuple(float(c) for c in color) for _, _, color in rows],
        alpha=1.0,
        edgecolor="none",
    )
    for index in range(len(predicted_parts), len(rows)):
        bar_axis.patches[index].set_alpha(0.45)  # the runner-up's bars are drawn lighter
    bar_axis.set_yticks(positions, [_short(label, 34) for label, _, _ in rows], fontsize=7)
    bar_axis.axvline(0.0, color="#444444", linewidth=0.8)
    bar_axis.set_xlabel("contribution to the class score (weight × value)", fontsize=8)
    bar_axis.tick_params(axis="x", labelsize=7)
    for side in ("top", "right"):
        bar_axis.spines[side].set_visible(False)

    scale_max = float(maps[features].max()) if features else 0.0
    for axis, (feature, value) in zip(heat_axes, predicted_parts):
        scales: dict[str, float | None] = {"scale_max": scale_max or None}
        if strength_scales is not None:
            scales = {"strength_scale": float(strength_scales[feature])}
        axis.imshow(heatmap_overlay(image, maps[feature], colors[feature], **scales))
        axis.set_title(f"{labels[feature]}  {value:+.2f}", fontsize=8, color=tuple(colors[feature]))
        _hide_ticks(axis)
    separating = explanation.separating_feature
    if separating is not None and separating in features:
        for spine in heat_axes[features.index(separating)].spines.values():
            spine.set_visible(True)
            spine.set_edgecolor("black")
            spine.set_linewidth(3)
    logits = explanation.logits
    figure.suptitle(
        f"Predicted {class_names[predicted]} ({logits[predicted]:.2f}), runner-up "
        f"{class_names[runner_up]} ({logits[runner_up]:.2f})\n"
        + explanation.why_not_sentence(class_names, labels),
        fontsize=10,
    )
    return figure


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
