"""The hierarchical explanation of one image (CHiQPM).

A QPM class is a short list of features. Sorting every class's features by how strongly the
image activates them turns the classes into a tree: level ``j`` holds the classes whose ``j``
strongest features are, in order, the predicted class's ``j`` strongest (the rule is
:func:`openqpm.conformal.hierarchy_levels`). Walking down the predicted class's path, each
feature narrows the candidate classes; a calibrated CHiQPM prediction set is one of these levels.

From a :class:`~openqpm.explain.figures.LocalExplanation` ``local``::

    explanation = hierarchical_explanation(
        local.features, local.class_weights, prediction=local.predicted_class
    )
    figure = hierarchy_figure(explanation, class_names=names, feature_colors=colors)

The figure is built on ``matplotlib.figure.Figure`` directly (no pyplot); the caller saves it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from openqpm.conformal import hierarchy_levels

__all__ = ["HierarchicalExplanation", "hierarchical_explanation", "hierarchy_figure"]

_ROOT_COLOR = "0.55"
_EDGE_COLOR = "0.6"
_CALIBRATED_FACE = "#fff2b3"
_CALIBRATED_EDGE = "#d98c00"


@dataclass(frozen=True)
class HierarchicalExplanation:
    """The hierarchy of one image's classification.

    Attributes:
        prediction: the predicted class.
        levels: ``levels[j]``, ascending, the classes sharing the prediction's ``j`` strongest
            features in order; ``levels[0]`` is every class, ``levels[k]`` contains the
            prediction.
        path: the predicted class's features, strongest activation first (ties: lower index).
        activations: the activations of ``path``, same order.
        class_paths: for every class of ``levels[1]``, its features ordered as ``path`` is.
    """

    prediction: int
    levels: list[list[int]]
    path: list[int]
    activations: list[float]
    class_paths: dict[int, list[int]]

    @property
    def k(self) -> int:
        """Features per class (the number of levels below the root)."""
        return len(self.path)

    def set_at(self, level: int) -> list[int]:
        """The classes of ``level`` (0 = all classes, ``k`` = the prediction's full path)."""
        if not 0 <= level <= self.k:
            raise ValueError(f"level must lie in [0, {self.k}], got {level}")
        return list(self.levels[level])

    def depth_of(self, class_index: int) -> int:
        """The deepest level containing ``class_index`` (how much of the path it shares)."""
        if class_index not in self.levels[0]:
            raise ValueError(f"class {class_index} is not one of the {len(self.levels[0])}")
        return max(j for j, members in enumerate(self.levels) if class_index in members)


def _ranked_features(features: np.ndarray, row: np.ndarray) -> list[int]:
    """The features used by ``row``, strongest first, ties by lower index (as in conformal)."""
    used = np.flatnonzero(row)  # ascending
    order = np.argsort(-features[used], kind="stable")
    return [int(d) for d in used[order]]


def hierarchical_explanation(
    features: ArrayLike, class_weights: ArrayLike, *, prediction: int | None = None
) -> HierarchicalExplanation:
    """The hierarchy of one image, from its feature activations and the binary class weights.

    Args:
        features: ``(K,)`` activations of the features the QPM layer reads.
        class_weights: ``(n_c, K)`` binary (0/1) weights, ``k`` ones per class.
        prediction: the predicted class; default ``argmax(class_weights @ features)`` (first
            index on ties), as in :func:`openqpm.conformal.hierarchy_levels`.

    Returns:
        The explanation.

    Raises:
        ValueError: non-binary weights, unequal ``k`` per class, mismatched shapes or a
            prediction out of range.
    """
    f = np.asarray(features, dtype=np.float64)
    w = np.asarray(class_weights)
    if f.ndim != 1:
        raise ValueError(f"features must have shape (K,), got {f.shape}")
    if w.ndim != 2 or w.shape[1] != f.shape[0]:
        raise ValueError(f"class_weights must have shape (n_c, {f.shape[0]}), got {w.shape}")
    # hierarchy_levels validates the weights (binary, same k per class)
    levels = hierarchy_levels(f, w, prediction)
    if prediction is None:
        predicted = int(np.argmax(w.astype(np.float64) @ f))
    else:
        predicted = int(prediction)
        if not 0 <= predicted < w.shape[0]:
            raise ValueError(f"prediction must lie in [0, {w.shape[0]}), got {prediction}")
    path = _ranked_features(f, w[predicted])
    class_paths = {int(c): _ranked_features(f, w[c]) for c in levels[1]}
    return HierarchicalExplanation(
        prediction=predicted,
        levels=[[int(c) for c in level] for level in levels],
        path=path,
        activations=[float(f[d]) for d in path],
        class_paths=class_paths,
    )


def _figure_of(axis: Axes) -> Figure:
    figure: Any = axis.figure
    while not isinstance(figure, Figure):  # a SubFigure sits inside its parent figure
        figure = figure.figure
    return figure


def _short(text: str, width: int = 28) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _leaf_rows(
    explanation: HierarchicalExplanation, calibrated: set[int], max_classes: int
) -> list[tuple[int, int | None, int]]:
    """Rows of the leaf column, top to bottom: ``(depth, class or None, hidden count)``.

    Classes are grouped by the level at which they leave the path, deepest first. At most
    ``max_classes`` classes are named: the prediction, then the calibrated set, then the
    deepest; each group with unnamed classes ends with a ``None`` row counting them.
    """
    depth = {c: explanation.depth_of(c) for c in explanation.levels[0]}

    def priority(c: int) -> tuple[bool, bool, int, int]:
        return (c != explanation.prediction, c not in calibrated, -depth[c], c)

    shown = set(sorted(depth, key=priority)[:max_classes])
    rows: list[tuple[int, int | None, int]] = []
    for j in range(explanation.k, -1, -1):
        members = sorted((c for c in depth if depth[c] == j), key=priority)
        named = [c for c in members if c in shown]
        rows.extend((j, c, 0) for c in named)
        if len(members) > len(named):
            rows.append((j, None, len(members) - len(named)))
    return rows


def hierarchy_figure(
    explanation: HierarchicalExplanation,
    *,
    class_names: Sequence[str],
    feature_colors: ArrayLike,
    calibrated_set: Collection[int] | None = None,
    max_classes: int = 12,
    feature_labels: Sequence[str] | None = None,
    ax: Axes | None = None,
) -> Figure:
    """The hierarchy as a tree: the root, the predicted path, and the classes leaving it.

    The predicted path runs left to right along the top: the root (every class), then one dot
    per feature in the feature's colour, labelled with its activation and, above, the size of
    the level it opens. The classes are listed in a column on the right, each joined to the node
    after which it leaves the path (the prediction, sharing the whole path, to the last node);
    the prediction is bold, the classes of ``calibrated_set`` sit in a coloured box.

    Args:
        explanation: from :func:`hierarchical_explanation`.
        class_names: n_c readable names.
        feature_colors: ``(K, 3)`` RGB colours, e.g. from
            :func:`openqpm.explain.heatmaps.assign_feature_colors`.
        calibrated_set: classes of a calibrated prediction set to highlight.
        max_classes: most class names drawn; the rest are counted as "+N more" per branch.
        feature_labels: K feature names; default ``"#d"``.
        ax: axes to draw into; default a new figure.

    Returns:
        The figure.
    """
    colors = _checked_colors(explanation, class_names, feature_colors, max_classes, feature_labels)
    calibrated = {int(c) for c in calibrated_set} if calibrated_set is not None else set()
    rows = _leaf_rows(explanation, calibrated, max_classes)
    if ax is None:
        figure = Figure(figsize=(1.3 * (explanation.k + 1) + 3.2, 1.6 + 0.32 * max(len(rows), 3)))
        ax = figure.add_subplot(1, 1, 1)
    else:
        figure = _figure_of(ax)
    _draw_path(ax, explanation, colors, feature_labels)
    row_y = _draw_leaves(ax, explanation, rows, class_names, calibrated)
    title = "Hierarchical explanation"
    if calibrated:
        noun = "class" if len(calibrated) == 1 else "classes"
        title += f" (boxed: calibrated set, {len(calibrated)} {noun})"
    ax.set_title(title, fontsize=10)
    ax.set_xlim(-0.5, _leaf_x(explanation) + 2.6)
    ax.set_ylim(min(row_y, default=-1.0) - 0.45, 0.9)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    return figure


def _checked_colors(
    explanation: HierarchicalExplanation,
    class_names: Sequence[str],
    feature_colors: ArrayLike,
    max_classes: int,
    feature_labels: Sequence[str] | None,
) -> np.ndarray:
    """The feature colours as a (K, 3|4) array, after checking every argument of the figure."""
    n_classes = len(explanation.levels[0])
    if len(class_names) != n_classes:
        raise ValueError(f"{len(class_names)} class names for {n_classes} classes")
    if max_classes < 1:
        raise ValueError(f"max_classes must be >= 1, got {max_classes}")
    colors = np.asarray(feature_colors, dtype=np.float64)
    if colors.ndim != 2 or colors.shape[1] not in (3, 4):
        raise ValueError(f"feature_colors must have shape (K, 3), got {colors.shape}")
    if any(d >= colors.shape[0] for d in explanation.path):
        raise ValueError(f"{colors.shape[0]} feature colours do not cover path {explanation.path}")
    if feature_labels is not None and any(d >= len(feature_labels) for d in explanation.path):
        raise ValueError(f"{len(feature_labels)} feature labels do not cover the path")
    return colors


def _leaf_x(explanation: HierarchicalExplanation) -> float:
    """Where the column of class names starts."""
    return explanation.k + 0.9


def _draw_path(
    ax: Axes,
    explanation: HierarchicalExplanation,
    colors: np.ndarray,
    feature_labels: Sequence[str] | None,
) -> None:
    """The root and the predicted path along the top, each node with its label and level size."""
    k = explanation.k
    ax.plot(range(k + 1), [0.0] * (k + 1), color=_EDGE_COLOR, lw=2, zorder=1)
    ax.scatter([0], [0], s=260, color=_ROOT_COLOR, zorder=3, gid="hierarchy-root")
    n_classes = len(explanation.levels[0])
    ax.text(0, 0.28, f"all {n_classes}\nclasses", ha="center", va="bottom", fontsize=8)
    for j, (feature, activation) in enumerate(
        zip(explanation.path, explanation.activations), start=1
    ):
        ax.scatter(
            [j],
            [0],
            s=260,
            color=colors[feature],
            edgecolors="black",
            linewidths=0.6,
            zorder=3,
            gid=f"hierarchy-feature-{feature}",
        )
        label = feature_labels[feature] if feature_labels is not None else f"#{feature}"
        ax.text(
            j, 0.28, f"{_short(label, 14)}\n{activation:.2f}", ha="center", va="bottom", fontsize=8
        )
        ax.text(
            j - 0.5,
            -0.1,
            f"{len(explanation.levels[j])} left",
            ha="center",
            va="top",
            fontsize=7,
            color="0.35",
        )


def _draw_leaves(
    ax: Axes,
    explanation: HierarchicalExplanation,
    rows: list[tuple[int, int | None, int]],
    class_names: Sequence[str],
    calibrated: set[int],
) -> list[float]:
    """The class column: an elbow from the node each class leaves at; returns the rows' y.

    Deeper groups lie higher, so the elbows never cross.
    """
    leaf_x = _leaf_x(explanation)
    row_y = [-(0.75 + 0.5 * i) for i in range(len(rows))]
    lowest: dict[int, float] = {}
    for (j, _, _), y in zip(rows, row_y):
        lowest[j] = min(lowest.get(j, 0.0), y)
    for j, y_end in lowest.items():
        ax.plot([j, j], [0.0, y_end], color=_EDGE_COLOR, lw=1, zorder=1)
    for (j, c, hidden), y in zip(rows, row_y):
        ax.plot([j, leaf_x - 0.05], [y, y], color=_EDGE_COLOR, lw=1, zorder=1)
        if c is None:
            ax.text(
                leaf_x,
                y,
                f"+{hidden} more",
                ha="left",
                va="center",
                fontsize=8,
                style="italic",
                color="0.35",
            )
            continue
        text = ax.text(
            leaf_x,
            y,
            _short(class_names[c]),
            ha="left",
            va="center",
            fontsize=9,
            fontweight="bold" if c == explanation.prediction else "normal",
            gid=f"class-{c}",
        )
        if c in calibrated:
            text.set_bbox(
                {
                    "boxstyle": "round,pad=0.25",
                    "facecolor": _CALIBRATED_FACE,
                    "edgecolor": _CALIBRATED_EDGE,
                    "linewidth": 1.2,
                }
            )
    return row_y
