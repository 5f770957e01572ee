"""The HTML report: a folder of static pages a person opens in any browser, offline.

Layout of ``out_dir``::

    index.html          metrics, contrastive pairs, the searchable class list, the features
    pairs.html          every contrastive pair figure (two classes differing in one feature)
    classes/c0007.html  one page per class: its features on an example image, why this class
                        and not the runner-up, the classes it is contrasted with, a mistake
                        (and, with ``hierarchy``, the tree of its example: img/tree_c0007.png)
    features/f0012.html one page per feature: its classes, the test images where it is strongest
    img/                PNG images
    style.css
    explanation.json    the global explanation (see ``GlobalExplanation.to_dict``)
    metrics.json        the metrics shown, when given

All links are relative, nothing is fetched from the network and no script is needed except the
class filter on the index page.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch.utils.data import DataLoader, Subset

from openqpm._io import atomic_folder, atomic_path, atomic_write_text, eval_mode, to_jsonable
from openqpm.explain._report_html import FILTER_SCRIPT, STYLE_CSS, escape, page
from openqpm.explain.examples import (
    DatasetScan,
    choose_example,
    class_mistakes,
    scan_dataset,
    top_activating,
)
from openqpm.explain.figures import LocalExplanation, class_comparison_figure
from openqpm.explain.global_ import ContrastivePair, GlobalExplanation, write_json_atomic
from openqpm.explain.heatmaps import (
    assign_feature_colors,
    composite_overlay,
    display_image,
    heatmap_overlay,
    save_png,
    to_head_units,
)
from openqpm.explain.hierarchy import hierarchical_explanation, hierarchy_figure
from openqpm.metrics import describe, format_metric, names
from openqpm.models.head import _MIN_STD

_logger = logging.getLogger(__name__)

__all__ = ["write_report"]

ProgressCallback = Callable[[str, int, int], None]
# (logits (n_c,), head-input activations (K,)) -> the class indices of a calibrated set
PredictionSetFn = Callable[[np.ndarray, np.ndarray], Any]

_TILE_PX = 176  # side of every heatmap tile; matches the CSS
_PAIR_DPI = 90
_TREE_ALPHA = 0.1  # the miscoverage level of the calibrated set the caller's function returns
_CERTAINTY_NOTE = (
    "Heatmap brightness = strength relative to the feature's mean activation on training images "
    "where it is active."
)


@dataclass(frozen=True)
class _Certainty:
    """Certainty-carrying heatmaps: maps in head-input units, drawn relative to ``strength``."""

    mean: np.ndarray  # (K,) the head's normalisation mean
    std: np.ndarray  # (K,) the std the head divides by
    strength: np.ndarray  # (K,) each feature's mean activation where active (training images)


@dataclass(frozen=True)
class _Tree:
    """The hierarchy figure of one class page."""

    file: str  # under img/
    index: int  # the test image it explains
    calibrated: list[int] | None  # the calibrated set, when the caller gave a set function


@dataclass
class _Context:
    """Everything the page writers share."""

    out_dir: Path
    explanation: GlobalExplanation
    scan: DatasetScan
    dataset: Any
    colors: np.ndarray
    feature_labels: list[str]
    class_pages: set[int]
    examples: dict[int, int | None]
    mistakes: dict[int, int | None]
    top_images: dict[int, np.ndarray]
    feature_scales: np.ndarray
    maps: dict[int, np.ndarray]
    pair_images: dict[tuple[int, int], str]
    weights: np.ndarray
    class_means: np.ndarray  # (n_c, K) mean feature value per class over the test set
    bias: np.ndarray  # (n_c,) the head's bias (zeros for a QPM)
    weighted: bool  # signed, unequal weights (a sparse head): pages show each weight
    model_label: str  # what the model is called on the pages ("QPM", "SLDD-Model", ...)
    certainty: _Certainty | None = None  # None: each feature's 99th percentile peak is white
    trees: dict[int, _Tree] = field(default_factory=dict)  # class -> its hierarchy figure
    _display: dict[int, np.ndarray] = field(default_factory=dict)

    def display(self, index: int) -> np.ndarray:
        if index not in self._display:
            self._display[index] = display_image(self.dataset, index, size_px=_TILE_PX)
        return self._display[index]

    def class_link(self, class_index: int, root: str) -> str:
        name = escape(self.explanation.class_names[class_index])
        if class_index in self.class_pages:
            return f'<a href="{root}classes/{_class_file(class_index)}">{name}</a>'
        return name

    def feature_chip(self, feature: int, root: str, *, extra: str = "") -> str:
        color = _css_color(self.colors[feature])
        label = escape(self.feature_labels[feature])
        small = f" <small>{extra}</small>" if extra else ""
        return (
            f'<a class="chip" href="{root}features/{_feature_file(feature)}">'
            f'<span class="dot" style="background:{color}"></span>{label}{small}</a>'
        )

    def brightness_note(self) -> str:
        """The sentence saying what heatmap brightness means, with a leading space; or ""."""
        return f" {_CERTAINTY_NOTE}" if self.certainty is not None else ""

    def overlay(self, index: int, feature: int) -> np.ndarray:
        """The heatmap tile of one feature on a scanned image."""
        image, feature_map = self.display(index), self.maps[index][feature]
        color = self.colors[feature]
        if self.certainty is None:
            return heatmap_overlay(
                image, feature_map, color, scale_max=float(self.feature_scales[feature])
            )
        units = self.head_units(index, [feature])[0]
        strength = float(self.certainty.strength[feature])
        return heatmap_overlay(image, units, color, strength_scale=strength)

    def composite(self, index: int, features: Sequence[int]) -> np.ndarray:
        """Several features on a scanned image, each pixel in its strongest feature's colour."""
        image, own = self.display(index), list(features)
        if self.certainty is None:
            return composite_overlay(
                image,
                self.maps[index][own],
                self.colors[own],
                scale_maxes=self.feature_scales[own],
            )
        return composite_overlay(
            image,
            self.head_units(index, own),
            self.colors[own],
            strength_scales=self.certainty.strength[own],
        )

    def head_units(self, index: int, features: list[int]) -> np.ndarray:
        assert self.certainty is not None
        return to_head_units(
            self.maps[index][features],
            self.certainty.mean[features],
            self.certainty.std[features],
        )

    def local(self, index: int, *, versus: int | None = None) -> LocalExplanation:
        """The explanation of a scanned image; ``versus`` replaces the runner-up class."""
        features = self.scan.features[index].astype(np.float64)
        logits = self.weights @ features + self.bias  # a QPM has no bias: exactly W z
        predicted = int(self.scan.predictions[index])
        runner_up = int(self.scan.runner_up[index]) if versus is None else versus
        return LocalExplanation(
            logits=logits,
            features=features,
            feature_maps=self.maps[index],
            class_weights=self.weights,
            predicted_class=predicted,
            runner_up_class=runner_up,
        )


def _count(number: int, noun: str) -> str:
    plural = noun + ("es" if noun.endswith("s") else "s")
    return f"{number} {noun if number == 1 else plural}"


def _class_file(class_index: int) -> str:
    return f"c{class_index:04d}.html"


def _feature_file(feature: int) -> str:
    return f"f{feature:04d}.html"


def _css_color(color: np.ndarray) -> str:
    red, green, blue = (round(255 * float(c)) for c in color)
    return f"#{red:02x}{green:02x}{blue:02x}"


def write_report(
    out_dir: str | Path,
    *,
    model: torch.nn.Module,
    dataset: Any,
    metrics: Mapping[str, Any] | None = None,
    dense_metrics: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    max_classes: int | None = None,
    max_pairs: int = 24,
    n_top_images: int = 8,
    batch_size: int = 32,
    title: str | None = None,
    model_label: str = "QPM",
    progress: ProgressCallback | None = None,
    certainty_scale: np.ndarray | None = None,
    hierarchy: bool = False,
    prediction_set_fn: PredictionSetFn | None = None,
) -> Path:
    """Write the static HTML report of a QPM model over a test set.

    One pass of the model over ``dataset`` chooses the images; a second, small pass computes the
    feature maps of the chosen images only.

    Args:
        out_dir: the report folder (created, or replaced as a whole when complete).
        model: a QPM ``openqpm.QPMModel``, or one with a sparse head (its pages then list
            every class's nonzero features with their signed weights).
        dataset: the *test* split with test transforms (an openqpm data set: ``class_names``,
            ``load_image``, ``transform``; ``class_attributes`` and ``attribute_names`` are
            used when present).
        metrics: the QPM's :func:`openqpm.metrics.evaluate_model` result, shown on the index.
            Two optional keys add to it: ``"one_feature_apart_pairs"`` (class pairs sharing all
            but one feature, a row of the metrics table) and ``"conformal"``, the calibrated
            prediction sets (``{"n_calibration": int, "alphas": [...], "results": [{"score",
            "alpha", "coverage", "mean_set_size", "set_coherence", ...}, ...]}``, coverage and
            set coherence as fractions), a table of its own.
        dense_metrics: the dense model's result, shown beside it.
        device: where the forward passes run.
        max_classes: write pages for the first ``max_classes`` classes only (all by default).
        max_pairs: how many contrastive pair figures to draw (most similar pairs first).
        n_top_images: top activating images per feature page.
        batch_size: images per forward pass.
        title: the report's heading; default from the data set and backbone names.
        model_label: what the model is called on the pages (``QPM``, ``SLDD-Model``, ...).
        progress: called as ``progress(stage, done, total)``; stages ``scan``, ``maps``,
            ``images``, ``trees`` (with ``hierarchy``), ``pairs``, ``pages``.
        certainty_scale: (K,) certainty-carrying heatmaps (CHiQPM): each feature's mean
            head-input activation over the *training* images where it is active
            (:func:`openqpm.explain.heatmaps.active_means`). Every heatmap tile then shows the
            map in head-input units (:func:`~openqpm.explain.heatmaps.to_head_units`) divided
            by this scale, and the pages say so. Default: each feature's 99th percentile peak
            over the test set is full brightness. The pair figures keep their own scale.
        hierarchy: each class page also shows the hierarchical explanation (a tree, see
            :func:`openqpm.explain.hierarchy.hierarchy_figure`) of its example image (or, for a
            class without one, of its mistake). Needs a QPM (binary weights).
        prediction_set_fn: with ``hierarchy``, ``fn(logits (n_c,), activations (K,))`` giving
            the class indices of the calibrated prediction set at alpha = 0.1 of an image;
            they are boxed in the tree and listed under it.

    Returns:
        The path of ``index.html``.

    Raises:
        ValueError: for a dense model, an empty data set, class names that disagree, a
            ``certainty_scale`` of the wrong shape or not > 0, ``hierarchy`` with a sparse
            model, or ``prediction_set_fn`` without ``hierarchy``.
    """
    qpm: Any = model
    is_sparse = bool(getattr(qpm, "is_sparse", False))
    if not (getattr(qpm, "is_qpm", False) or is_sparse):
        raise ValueError(
            "write_report explains a QPM model (binary class-feature assignment) or a sparse "
            "one; got a dense model: build the report from qpm.safetensors"
        )
    if list(getattr(dataset, "class_names", qpm.class_names)) != list(qpm.class_names):
        raise ValueError("the data set's class_names differ from the model's class_names")
    if len(dataset) == 0:
        raise ValueError("the data set is empty")
    if hierarchy and is_sparse:
        raise ValueError("hierarchy needs a QPM (binary class-feature weights), not a sparse model")
    if prediction_set_fn is not None and not hierarchy:
        raise ValueError("prediction_set_fn is shown in the hierarchy figures: pass hierarchy=True")
    certainty = None if certainty_scale is None else _certainty_of(qpm, certainty_scale)
    final = Path(out_dir)
    # Built in a fresh folder beside out_dir and swapped in when complete: no page of an earlier
    # report survives (a larger n_features left stale feature pages), and a killed run leaves the
    # previous report whole instead of a mix with temporary files.
    with atomic_folder(final) as out:
        _write_pages(
            out,
            model=model,
            dataset=dataset,
            metrics=metrics,
            dense_metrics=dense_metrics,
            device=device,
            max_classes=max_classes,
            max_pairs=max_pairs,
            n_top_images=n_top_images,
            batch_size=batch_size,
            title=title,
            model_label=model_label,
            progress=progress,
            certainty=certainty,
            hierarchy=hierarchy,
            prediction_set_fn=prediction_set_fn,
        )
    index_path = final / "index.html"
    _logger.info("wrote the report to %s", index_path)
    return index_path


def _write_pages(
    out: Path,
    *,
    model: torch.nn.Module,
    dataset: Any,
    metrics: Mapping[str, Any] | None,
    dense_metrics: Mapping[str, Any] | None,
    device: torch.device | str,
    max_classes: int | None,
    max_pairs: int,
    n_top_images: int,
    batch_size: int,
    title: str | None,
    model_label: str,
    progress: ProgressCallback | None,
    certainty: _Certainty | None = None,
    hierarchy: bool = False,
    prediction_set_fn: PredictionSetFn | None = None,
) -> None:
    """Write every file of the report into the empty folder ``out``."""
    qpm: Any = model
    is_sparse = bool(getattr(qpm, "is_sparse", False))
    for folder in (out / "classes", out / "features", out / "img"):
        folder.mkdir(parents=True, exist_ok=True)

    class_attributes = getattr(dataset, "class_attributes", None)
    explanation = GlobalExplanation.from_model(model, class_attributes=class_attributes)
    n_classes, n_features = explanation.n_classes, explanation.n_features
    weights = np.asarray(explanation.class_weights, dtype=np.float64)
    head_bias = getattr(qpm.head, "bias", None) if is_sparse else None
    bias = np.zeros(n_classes)
    if head_bias is not None:
        bias = head_bias.detach().double().cpu().numpy()
    class_pages = set(range(n_classes if max_classes is None else min(max_classes, n_classes)))
    scan = scan_dataset(model, dataset, device=device, batch_size=batch_size, progress=progress)

    examples = {
        c: choose_example(scan, explanation.class_features[c], c) for c in sorted(class_pages)
    }
    mistakes: dict[int, int | None] = {}
    for c in sorted(class_pages):
        wrong = class_mistakes(scan, c)
        mistakes[c] = int(wrong[0]) if len(wrong) else None
    top_images = {d: top_activating(scan, d, n_images=n_top_images) for d in range(n_features)}
    needed = {i for i in [*examples.values(), *mistakes.values()] if i is not None}
    for indices in top_images.values():
        needed.update(int(i) for i in indices)
    maps = _feature_maps_of(
        model, dataset, sorted(needed), device=device, batch_size=batch_size, progress=progress
    )
    # one brightness scale per feature for the whole report: its 99th percentile peak over the
    # test set, so tiles of one feature are comparable across pages
    scales = np.quantile(scan.peak_activations, 0.99, axis=0).astype(np.float64)
    scales = np.where(scales > 0, scales, 1.0)

    context = _Context(
        out_dir=out,
        explanation=explanation,
        scan=scan,
        dataset=dataset,
        colors=assign_feature_colors(explanation.class_features, n_features),
        feature_labels=[f"Feature {channel}" for channel in explanation.channel_ids],
        class_pages=class_pages,
        examples=examples,
        mistakes=mistakes,
        top_images=top_images,
        feature_scales=scales,
        maps=maps,
        pair_images={},
        weights=weights,
        class_means=_class_means(scan, n_classes),
        bias=bias,
        weighted=is_sparse,
        model_label=model_label,
        certainty=certainty,
    )
    _write_images(context, progress=progress)
    if hierarchy:
        _write_tree_figures(context, prediction_set_fn, progress=progress)
    pairs = [
        pair
        for pair in explanation.contrastive_pairs
        if pair.first in class_pages
        and pair.second in class_pages
        and examples[pair.first] is not None
        and examples[pair.second] is not None
    ][:max_pairs]
    _write_pair_figures(context, pairs, progress=progress)

    atomic_write_text(out / "style.css", STYLE_CSS)
    explanation.save_json(out / "explanation.json")
    if metrics is not None or dense_metrics is not None:
        shown = {"qpm": metrics, "dense": dense_metrics}
        write_json_atomic(
            out / "metrics.json",
            # dict(): to_jsonable turns mappings other than dicts into their str
            to_jsonable({key: None if m is None else dict(m) for key, m in shown.items()}),
        )
    n_pages = len(class_pages) + n_features + 2
    done = 0
    for c in sorted(class_pages):
        atomic_write_text(out / "classes" / _class_file(c), _class_page(context, c))
        done += 1
        if progress is not None:
            progress("pages", done, n_pages)
    for d in range(n_features):
        atomic_write_text(out / "features" / _feature_file(d), _feature_page(context, d))
        done += 1
        if progress is not None:
            progress("pages", done, n_pages)
    atomic_write_text(out / "pairs.html", _pairs_page(context, pairs))
    index_path = out / "index.html"
    heading = title or _default_title(model, dataset, model_label)
    atomic_write_text(index_path, _index_page(context, pairs, metrics, dense_metrics, heading))
    if progress is not None:
        progress("pages", n_pages, n_pages)
    _logger.info("wrote %d class pages and %d feature pages", len(class_pages), n_features)


def _certainty_of(model: Any, certainty_scale: np.ndarray) -> _Certainty:
    """The head's normalisation and the checked per-feature strengths."""
    head = model.head
    mean = head.mean.detach().double().cpu().numpy()
    # the std the head divides by (a sparse head's may be trained, hence abs)
    std = head.std.detach().double().abs().clamp(min=_MIN_STD).cpu().numpy()
    strength = np.asarray(certainty_scale, dtype=np.float64)
    if strength.shape != mean.shape:
        raise ValueError(
            f"certainty_scale must have shape {mean.shape} (one value per head feature), "
            f"got {strength.shape}"
        )
    if not (np.isfinite(strength).all() and (strength > 0).all()):
        raise ValueError("certainty_scale must be finite and > 0 (see heatmaps.active_means)")
    return _Certainty(mean=mean, std=std, strength=strength)


def _class_means(scan: DatasetScan, n_classes: int) -> np.ndarray:
    sums = np.zeros((n_classes, scan.features.shape[1]))
    np.add.at(sums, scan.labels, scan.features)
    counts = np.bincount(scan.labels, minlength=n_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None]  # NaN where a class has no test image


def _default_title(model: Any, dataset: Any, model_label: str) -> str:
    backbone = getattr(getattr(model, "backbone", None), "name", "model")
    data_name = getattr(dataset, "name", None) or type(dataset).__name__
    return f"{model_label} report · {backbone} on {data_name}"


@torch.no_grad()
def _feature_maps_of(
    model: Any,
    dataset: Any,
    indices: Sequence[int],
    *,
    device: torch.device | str,
    batch_size: int,
    progress: ProgressCallback | None,
) -> dict[int, np.ndarray]:
    """The head's (K, h, w) maps of a few images, as float32 on the CPU."""
    result: dict[int, np.ndarray] = {}
    if not indices:
        return result
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False)
    position = 0
    with eval_mode(model):
        for batch_index, (images, _) in enumerate(loader):
            maps = model.head_feature_maps(model.forward_features(images.to(device)))
            maps_array = maps.float().cpu().numpy()  # (B, K, h, w)
            for row in maps_array:
                result[int(indices[position])] = row
                position += 1
            if progress is not None:
                progress("maps", batch_index + 1, len(loader))
    return result


def _tile_name(kind: str, index: int, feature: int | None = None) -> str:
    suffix = "" if feature is None else f"_f{feature:04d}"
    return f"{kind}{index:06d}{suffix}.png"


def _write_images(context: _Context, *, progress: ProgressCallback | None) -> None:
    """Every PNG tile the pages show: plain images, composites and single-feature heatmaps."""
    img = context.out_dir / "img"
    # (image index, features to draw one by one, class whose composite to draw, plain image?)
    jobs: list[tuple[int, list[int], int | None, bool]] = []
    for c in sorted(context.class_pages):
        example = context.examples[c]
        if example is not None:
            jobs.append((example, context.explanation.class_features[c], c, True))
        mistake = context.mistakes[c]
        if mistake is not None:
            predicted = int(context.scan.predictions[mistake])
            features = sorted(
                set(context.explanation.class_features[c])
                | set(context.explanation.class_features[predicted])
            )
            jobs.append((mistake, features, None, True))
    for d, indices in context.top_images.items():
        jobs.extend((int(index), [d], None, False) for index in indices)
    written: set[str] = set()
    for done, (index, features, composite_class, plain) in enumerate(jobs, start=1):
        if plain and _claim(img / _tile_name("i", index), written):
            save_png(context.display(index), img / _tile_name("i", index))
        for d in features:
            path = img / _tile_name("i", index, d)
            if _claim(path, written):
                save_png(context.overlay(index, d), path)
        if composite_class is not None:
            path = img / f"i{index:06d}_c{composite_class:04d}.png"
            if _claim(path, written):
                own = context.explanation.class_features[composite_class]
                save_png(context.composite(index, own), path)
        if progress is not None:
            progress("images", done, len(jobs))


def _claim(path: Path, written: set[str]) -> bool:
    """True the first time a file name is asked for: each tile is drawn once."""
    if path.name in written:
        return False
    written.add(path.name)
    return True


def _write_pair_figures(
    context: _Context, pairs: Sequence[ContrastivePair], *, progress: ProgressCallback | None
) -> None:
    names_ = context.explanation.class_names
    for done, pair in enumerate(pairs, start=1):
        first_index = context.examples[pair.first]
        second_index = context.examples[pair.second]
        assert first_index is not None and second_index is not None  # filtered by the caller
        maps = [context.maps[first_index], context.maps[second_index]]
        strength = None
        if context.certainty is not None:  # certainty-carrying brightness, as on the tiles
            every = list(range(maps[0].shape[0]))
            maps = [context.head_units(index, every) for index in (first_index, second_index)]
            strength = context.certainty.strength
        figure = class_comparison_figure(
            [context.display(first_index), context.display(second_index)],
            maps,
            first_only=pair.first_only,
            shared=pair.shared_features,
            second_only=pair.second_only,
            class_names=[names_[pair.first], names_[pair.second]],
            colors=context.colors,
            feature_labels=context.feature_labels,
            feature_values=[
                context.scan.features[first_index],
                context.scan.features[second_index],
            ],
            strength_scales=strength,
        )
        name = f"pair_{pair.first:04d}_{pair.second:04d}.png"
        _save_figure(figure, context.out_dir / "img" / name)
        context.pair_images[(pair.first, pair.second)] = name
        if progress is not None:
            progress("pairs", done, len(pairs))


def _write_tree_figures(
    context: _Context,
    prediction_set_fn: PredictionSetFn | None,
    *,
    progress: ProgressCallback | None,
) -> None:
    """The hierarchy figure of each class page: of its example, else of its mistake.

    Uses the head-input activations the scan kept (no further pass over the data).
    """
    names_ = context.explanation.class_names
    jobs: list[tuple[int, int]] = []  # (class, test image)
    for c in sorted(context.class_pages):
        index = context.examples[c] if context.examples[c] is not None else context.mistakes[c]
        if index is not None:
            jobs.append((c, index))
    for done, (c, index) in enumerate(jobs, start=1):
        activations = context.scan.features[index].astype(np.float64)  # (K,)
        explanation = hierarchical_explanation(
            activations, context.weights, prediction=int(context.scan.predictions[index])
        )
        calibrated = None
        if prediction_set_fn is not None:
            logits = context.weights @ activations + context.bias  # (n_c,)
            calibrated = _class_set(prediction_set_fn(logits, activations), len(names_))
        figure = hierarchy_figure(
            explanation,
            class_names=names_,
            feature_colors=context.colors,
            calibrated_set=calibrated,
            feature_labels=context.feature_labels,
        )
        name = f"tree_c{c:04d}.png"
        _save_figure(figure, context.out_dir / "img" / name)
        context.trees[c] = _Tree(file=name, index=index, calibrated=calibrated)
        if progress is not None:
            progress("trees", done, len(jobs))


def _class_set(classes: Any, n_classes: int) -> list[int]:
    """A prediction set function's answer as sorted distinct class indices, checked."""
    values = np.asarray(classes).reshape(-1)
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"prediction_set_fn must return class indices, got {values.dtype}")
    chosen = sorted({int(c) for c in values})
    if chosen and not (0 <= chosen[0] and chosen[-1] < n_classes):
        raise ValueError(f"prediction_set_fn returned classes outside [0, {n_classes}): {chosen}")
    return chosen


def _save_figure(figure: Figure, path: Path) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=_PAIR_DPI, facecolor="white")


# --------------------------------------------------------------------------------------------
# Pages
# --------------------------------------------------------------------------------------------


def _metrics_section(
    metrics: Mapping[str, Any] | None,
    dense_metrics: Mapping[str, Any] | None,
    model_label: str = "QPM",
) -> str:
    pairs = (("Dense", dense_metrics), (model_label, metrics))
    models = [(label, row) for label, row in pairs if row]
    if not models:
        return ""
    shown = [name for name in names() if any(row.get(name) is not None for _, row in models)]
    arrows = {True: " ↑", False: " ↓", None: ""}
    header = "".join(f'<th class="{label.lower()}">{label}</th>' for label, _ in models)
    body = "".join(
        f"<tr><td>{escape(describe(name).label + arrows[describe(name).higher_is_better])}</td>"
        + "".join(
            f'<td class="{label.lower()}">{escape(format_metric(name, row.get(name)))}</td>'
            for label, row in models
        )
        + f'<td class="what">{escape(describe(name).description)}</td></tr>'
        for name in shown
    )
    # counts that are not registered metrics (a registered one of the same name is shown above)
    for name, (label, description) in _EXTRA_COUNTS.items():
        if name in names() or all(row.get(name) is None for _, row in models):
            continue
        cells = "".join(
            f'<td class="{model.lower()}">{"n/a" if row.get(name) is None else int(row[name])}</td>'
            for model, row in models
        )
        body += (
            f'<tr id="metric-{name}"><td>{escape(label)}</td>{cells}'
            f'<td class="what">{escape(description)}</td></tr>'
        )
    return f"""<section class="card" id="metrics">
<h2>Metrics</h2>
<p class="lead">On the test set, in percent where a fraction (↑ higher is better, ↓ lower is
better; n/a: not available for this model or data set).</p>
<div class="table-scroll"><table class="metrics"><thead><tr><th>Metric</th>{header}
<th class="what">What it measures</th></tr></thead><tbody>{body}</tbody></table></div>
</section>
"""


# metrics-dict entries shown as integer rows of the metrics table: name -> (label, description)
_EXTRA_COUNTS = {
    "one_feature_apart_pairs": (
        "1-apart pairs",
        "Class pairs that share all but one feature (told apart by a single feature).",
    ),
}
# scores of the calibrated prediction sets, in table order, with their column titles
_CONFORMAL_SCORES = {"hierarchical": "Hierarchical (CHiQPM)", "aps": "APS", "thr": "THR"}


def _conformal_section(metrics: Mapping[str, Any] | None) -> str:
    """The table of calibrated prediction sets in ``metrics["conformal"]``; "" without one.

    One row per alpha; per score its coverage (a fraction, shown in percent), mean set size and
    set coherence (a fraction, in percent; "–" when None).
    """
    conformal = (metrics or {}).get("conformal")
    if not conformal:
        return ""
    results = list(conformal.get("results") or [])
    alphas = [float(a) for a in conformal.get("alphas") or []]
    alphas += sorted({float(r["alpha"]) for r in results} - set(alphas))
    present = {str(r["score"]) for r in results}
    scores = [s for s in _CONFORMAL_SCORES if s in present] + sorted(
        present - set(_CONFORMAL_SCORES)
    )
    cell = {(str(r["score"]), float(r["alpha"])): r for r in results}

    def number(value: Any, percent: bool) -> str:
        if value is None or not np.isfinite(float(value)):
            return "–"
        return f"{100.0 * float(value):.1f}%" if percent else f"{float(value):.2f}"

    header_scores = "".join(
        f'<th colspan="3" class="score">{escape(_CONFORMAL_SCORES.get(s, s))}</th>' for s in scores
    )
    header_columns = "<th>coverage</th><th>mean size</th><th>coherence</th>" * len(scores)
    rows = []
    for alpha in alphas:
        cells = []
        for score in scores:
            result = cell.get((score, alpha))
            if result is None:
                cells.append("<td>–</td>" * 3)
                continue
            cells.append(
                f"<td>{number(result.get('coverage'), True)}</td>"
                f"<td>{number(result.get('mean_set_size'), False)}</td>"
                f"<td>{number(result.get('set_coherence'), True)}</td>"
            )
        rows.append(
            f'<tr data-alpha="{alpha:g}"><td>{alpha:g}</td><td>{100.0 * (1.0 - alpha):.1f}%</td>'
            f"{''.join(cells)}</tr>"
        )
    n_calibration = conformal.get("n_calibration")
    calibrated_on = (
        f"{_count(int(n_calibration), 'held-out training image')}"
        if n_calibration is not None
        else "held-out training images"
    )
    return f"""<section class="card" id="conformal">
<h2>Calibrated prediction sets</h2>
<p class="lead">Instead of one class, a set of classes that holds the true class with
probability at least 1 − alpha (the target). Calibration used {calibrated_on}; coverage
(how often the set holds the true class), mean set size and set coherence are measured on the
test split. Hierarchical: the CHiQPM sets, a level of the hierarchy of the predicted class's
features; APS and THR: the usual conformal scores on the softmax.</p>
<div class="table-scroll"><table class="metrics conformal"><thead>
<tr><th rowspan="2">alpha</th><th rowspan="2">target</th>{header_scores}</tr>
<tr>{header_columns}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>
</section>
"""


def _pair_card(context: _Context, pair: ContrastivePair, root: str) -> str:
    names_ = context.explanation.class_names
    first_only = "".join(context.feature_chip(d, root) for d in pair.first_only)
    second_only = "".join(context.feature_chip(d, root) for d in pair.second_only)
    similarity = (
        ""
        if pair.attribute_similarity is None
        else f" · attribute similarity {pair.attribute_similarity:.2f}"
    )
    figure = context.pair_images.get((pair.first, pair.second))
    figure_link = (
        f' · <a href="{root}pairs.html#pair-{pair.first}-{pair.second}">figure</a>'
        if figure
        else ""
    )
    return f"""<div class="pair">
<div class="title">{context.class_link(pair.first, root)} vs
{context.class_link(pair.second, root)}</div>
<div class="meta">share {len(pair.shared_features)} features{similarity}{figure_link}</div>
<div>{escape(names_[pair.first])} only: {first_only}</div>
<div>{escape(names_[pair.second])} only: {second_only}</div>
{_attribute_differences(context, pair.first, pair.second)}
</div>"""


def _attribute_differences(context: _Context, first: int, second: int, n_shown: int = 3) -> str:
    attributes = getattr(context.dataset, "class_attributes", None)
    attribute_names = getattr(context.dataset, "attribute_names", None)
    if attributes is None or not attribute_names:
        return ""
    values = np.asarray(attributes, dtype=np.float64)
    difference = values[first] - values[second]
    order = np.argsort(-np.abs(difference), kind="stable")[:n_shown]
    names_ = context.explanation.class_names
    items = "".join(
        f"<li>{escape(_readable_attribute(attribute_names[a]))}: "
        f"{100 * values[first, a]:.0f}% ({escape(names_[first])}) vs "
        f"{100 * values[second, a]:.0f}% ({escape(names_[second])})</li>"
        for a in order
        if abs(difference[a]) > 0
    )
    if not items:
        return ""
    return f'<ul class="attrs" title="annotated attributes that differ most">{items}</ul>'


def _readable_attribute(name: str) -> str:
    return name.replace("::", ": ").replace("_", " ").strip()


def _index_page(
    context: _Context,
    pairs: Sequence[ContrastivePair],
    metrics: Mapping[str, Any] | None,
    dense_metrics: Mapping[str, Any] | None,
    heading: str,
) -> str:
    explanation = context.explanation
    scan = context.scan
    n_per_class: int | str = len(explanation.class_features[0]) if explanation.class_features else 0
    classes_lead = f"Each class is the sum of {n_per_class} features."
    if context.weighted:  # classes use different numbers of features, with signed weights
        mean_count = float(np.mean([len(f) for f in explanation.class_features]))
        n_per_class = f"{mean_count:.1f}"
        classes_lead = (
            f"Each class is a weighted sum of its features ({n_per_class} on average, weights "
            "may be negative)" + (", plus a bias." if context.bias.any() else ".")
        )
    accuracy = 100.0 * float(scan.correct.mean())
    stats = "".join(
        f'<div class="stat"><b>{escape(value)}</b><span>{escape(label)}</span></div>'
        for value, label in (
            (f"{accuracy:.1f}%", "test accuracy"),
            (explanation.n_classes, "classes"),
            (explanation.n_features, "features"),
            (n_per_class, "features per class"),
            (len(explanation.contrastive_pairs), "contrastive pairs"),
            (len(scan.labels), "test images"),
        )
    )
    cards = []
    for c in sorted(context.class_pages):
        example = context.examples[c]
        name = explanation.class_names[c]
        if example is not None:
            picture = (
                f'<img src="img/i{example:06d}_c{c:04d}.png" alt="{escape(name)}: its features" '
                'loading="lazy">'
            )
        else:
            picture = '<div class="noimg">no correctly classified test image</div>'
        dots = "".join(
            f'<span class="dot" style="background:{_css_color(context.colors[d])}" '
            f'title="{escape(context.feature_labels[d])}"></span>'
            for d in explanation.class_features[c]
        )
        cards.append(
            f'<a class="class-card" href="classes/{_class_file(c)}" '
            f'data-name="{escape(name.lower())}">{picture}<div class="name">{escape(name)}</div>'
            f'<div class="dots">{dots}</div></a>'
        )
    omitted = explanation.n_classes - len(context.class_pages)
    omitted_note = (
        f'<p class="muted">{omitted} further classes have no page (max_classes).</p>'
        if omitted
        else ""
    )
    pair_cards = "".join(_pair_card(context, pair, "") for pair in pairs[:9])
    pairs_section = (
        f"""<section class="card" id="pairs">
<h2>Contrastive pairs</h2>
<p class="lead">Classes that share all but one feature: the model tells them apart by that one
feature. Most similar pairs by annotated attributes first. <a href="pairs.html">All {len(pairs)}
figures →</a></p>
<div class="pair-list">{pair_cards}</div>
</section>"""
        if pairs
        else ""
    )
    feature_chips = "".join(
        context.feature_chip(d, "", extra=_count(len(explanation.feature_classes[d]), "class"))
        for d in range(explanation.n_features)
    )
    has_metrics = metrics is not None or dense_metrics is not None
    metrics_link = ', the metrics: <a href="metrics.json">metrics.json</a>' if has_metrics else ""
    body = f"""{_metrics_section(metrics, dense_metrics, context.model_label)}
{_conformal_section(metrics)}
{pairs_section}
<section class="card" id="classes">
<h2>Classes</h2>
<p class="lead">{classes_lead} The picture shows a correctly
classified test image with every pixel coloured by the class's strongest feature there.
{context.brightness_note()}</p>
<div class="search"><input id="class-search" type="search"
placeholder="Filter classes by name (press /)" aria-label="Filter classes by name"
autocomplete="off"><span class="count" id="class-count"></span></div>
<div class="grid">{"".join(cards)}</div>
{omitted_note}
</section>
<section class="card" id="features">
<h2>Features</h2>
<p class="lead">Every feature the classes are built from, with the number of classes using it.
Each keeps its colour everywhere in this report.</p>
<div>{feature_chips}</div>
<p class="muted">The whole global explanation (classes, features, contrastive pairs) as JSON:
<a href="explanation.json">explanation.json</a>{metrics_link}.</p>
</section>"""
    return page(
        title=heading,
        heading=heading,
        subtitle="A globally interpretable classifier: every class is a few shared features.",
        body=body,
        root="",
        stats=stats,
        script=FILTER_SCRIPT,
    )


def _contribution_bars(context: _Context, local: LocalExplanation, root: str) -> str:
    groups = [
        (local.predicted_class, local.contributions(local.predicted_class)),
        (local.runner_up_class, local.contributions(local.runner_up_class)),
    ]
    extent = max(
        [abs(value) for _, parts in groups for _, value in parts] + [1e-9]
    )  # the longest bar spans half the track
    rows = []
    for class_index, parts in groups:
        bias = float(context.bias[class_index])
        total = sum(value for _, value in parts) + bias
        bias_note = f" (bias {bias:+.2f})" if bias else ""
        rows.append(
            f'<div class="group">{context.class_link(class_index, root)} '
            f'<span class="muted">score {total:+.2f}{bias_note}</span></div>'
        )
        for feature, value in parts:
            width = 50.0 * abs(value) / extent
            left = 50.0 if value >= 0 else 50.0 - width
            color = _css_color(context.colors[feature])
            rows.append(
                f"<div>{context.feature_chip(feature, root)}</div>"
                f'<div class="track"><span class="zero" style="left:50%"></span>'
                f'<span class="bar" style="left:{left:.1f}%;width:{width:.1f}%;'
                f'background:{color}"></span></div><div class="num">{value:+.2f}</div>'
            )
    return f'<div class="bars">{"".join(rows)}</div>'


def _tile(context: _Context, index: int, feature: int, root: str, caption: str) -> str:
    color = _css_color(context.colors[feature])
    return (
        f'<figure class="tile" style="--c:{color}"><img src="{root}img/'
        f'{_tile_name("i", index, feature)}" alt="{escape(context.feature_labels[feature])}" '
        f'loading="lazy"><figcaption>{caption}</figcaption></figure>'
    )


def _class_page(context: _Context, class_index: int) -> str:
    explanation = context.explanation
    scan = context.scan
    root = "../"
    name = explanation.class_names[class_index]
    of_class = scan.labels == class_index
    n_images = int(of_class.sum())
    n_correct = int((of_class & scan.correct).sum())
    accuracy = (
        f"{100.0 * n_correct / n_images:.0f}% ({n_correct}/{n_images})" if n_images else "n/a"
    )
    sections = [
        _features_section(context, class_index, root),
        _example_section(context, class_index, root),
    ]
    if class_index in context.trees:
        sections.append(_tree_section(context, class_index, root))
    pairs = list(explanation.pairs_of(class_index))
    sections.append(_contrast_section(context, class_index, pairs, root))
    if context.mistakes[class_index] is not None:
        sections.append(_mistake_section(context, class_index, root))
    stats = (
        f'<div class="stat"><b>{escape(accuracy)}</b><span>test accuracy</span></div>'
        f'<div class="stat"><b>{len(pairs)}</b><span>contrastive pairs</span></div>'
    )
    return page(
        title=f"{name} · {context.model_label} report",
        heading=name,
        subtitle=f"class {class_index}",
        body="\n".join(sections),
        root=root,
        crumbs=f'<a href="{root}index.html#classes">← all classes</a>',
        stats=stats,
    )


def _features_section(context: _Context, class_index: int, root: str) -> str:
    """The class's features as chips (with their weights for a weighted head)."""
    name = context.explanation.class_names[class_index]
    features = context.explanation.class_features[class_index]
    chips = "".join(context.feature_chip(d, root) for d in features)
    summary = f"is the sum of these {len(features)} features."
    if context.weighted:  # every nonzero feature with its signed weight
        weights = context.weights[class_index]
        chips = "".join(
            context.feature_chip(d, root, extra=f"weight {weights[d]:+.3g}") for d in features
        )
        bias = float(context.bias[class_index])
        summary = f"is a weighted sum of these {len(features)} features" + (
            f", plus a bias of {bias:+.3g}." if bias else "."
        )
    return f"""<section class="card"><h2>Features</h2>
<p class="lead">{escape(name)} {summary}</p><div>{chips}</div>
</section>"""


def _example_section(context: _Context, class_index: int, root: str) -> str:
    """A correctly classified test image with each of the class's features' heatmap."""
    explanation = context.explanation
    name = explanation.class_names[class_index]
    features = explanation.class_features[class_index]
    example = context.examples[class_index]
    if example is None:
        return (
            '<section class="card"><h2>Example</h2><p class="lead">No test image of this class '
            "is classified correctly, so no example is shown.</p></section>"
        )
    local = context.local(example)
    why = local.why_not_sentence(explanation.class_names, context.feature_labels)
    tiles = "".join(
        _tile(
            context,
            example,
            d,
            root,
            f'<div class="cap-top">{context.feature_chip(d, root)}<span class="val">'
            f"{local.features[d]:+.2f}</span></div>"
            f'<span class="muted">used by '
            f"{_count(len(explanation.feature_classes[d]), 'class')}</span>",
        )
        for d in features
    )
    return f"""<section class="card"><h2>How the model sees a {escape(name)}</h2>
<p class="lead">A correctly classified test image, chosen so that all {len(features)} features
are active and look at different places. Each heatmap shows where one feature fires (values:
normalised feature activation).{context.brightness_note()}</p>
<div class="split"><div class="side"><img class="big-img" src="{root}img/{_tile_name("i", example)}"
alt="{escape(name)} example"><div class="caption">test image #{example}</div>
<img class="big-img" style="margin-top:10px" src="{root}img/i{example:06d}_c{class_index:04d}.png"
alt="all features"><div class="caption">all its features, each pixel in the colour of the strongest
one</div></div>
<div class="main"><div class="tiles">{tiles}</div>
<h3>Why {escape(name)} and not {escape(explanation.class_names[local.runner_up_class])}?</h3>
<div class="why">{escape(why)}</div>
{_contribution_bars(context, local, root)}
</div></div></section>"""


def _contrast_section(context: _Context, class_index: int, pairs: list[Any], root: str) -> str:
    """The classes one feature apart (at most 12 cards), else the most similar classes."""
    name = context.explanation.class_names[class_index]
    if not pairs:
        closest = _closest_classes(context, class_index)
        return f"""<section class="card"><h2>Most similar classes</h2>
<p class="lead">No class differs from {escape(name)} in a single feature; these share the most.
</p><div>{closest}</div></section>"""
    cards = "".join(_pair_card(context, pair, root) for pair in pairs[:12])
    more = f'<p class="muted">and {len(pairs) - 12} more.</p>' if len(pairs) > 12 else ""
    return f"""<section class="card"><h2>Contrasted with</h2>
<p class="lead">Classes that share all but one feature with {escape(name)}.</p>
<div class="pair-list">{cards}</div>{more}</section>"""


def _mistake_section(context: _Context, class_index: int, root: str) -> str:
    """The class's most confidently misclassified test image and the feature that decided it."""
    explanation = context.explanation
    name = explanation.class_names[class_index]
    mistake = context.mistakes[class_index]
    assert mistake is not None
    predicted = int(context.scan.predictions[mistake])
    local = context.local(mistake, versus=class_index)
    separating = local.separating_feature
    tiles = ""
    if separating is not None:
        tiles = _tile(
            context,
            mistake,
            separating,
            root,
            f'<div class="cap-top">{context.feature_chip(separating, root)}'
            f'<span class="val">{local.features[separating]:+.2f}</span></div>',
        )
    return f"""<section class="card"><h2>A mistake</h2>
<p class="lead">The test image of {escape(name)} that the model gets most confidently wrong:
it predicts {context.class_link(predicted, root)}.</p>
<div class="split"><div class="side"><img class="big-img" src="{root}img/{_tile_name("i", mistake)}"
alt="misclassified image"><div class="caption">test image #{mistake}</div></div>
<div class="main"><div class="why">{
        escape(local.why_not_sentence(explanation.class_names, context.feature_labels))
    }</div><div class="tiles">{tiles}</div>
{_contribution_bars(context, local, root)}</div></div></section>"""


def _tree_section(context: _Context, class_index: int, root: str, n_listed: int = 40) -> str:
    """The hierarchy figure of a class page, with the calibrated set listed under it."""
    tree = context.trees[class_index]
    predicted = int(context.scan.predictions[tree.index])
    if predicted == class_index:
        which = f"the example test image #{tree.index}"
    else:
        which = (
            f"test image #{tree.index}, which the model gets wrong: it predicts "
            f"{context.class_link(predicted, root)}"
        )
    boxed = "; boxed: the calibrated prediction set" if tree.calibrated is not None else ""
    listed = ""
    if tree.calibrated is not None:
        shown = ", ".join(context.class_link(c, root) for c in tree.calibrated[:n_listed])
        more = len(tree.calibrated) - n_listed
        shown += f" and {more} more" if more > 0 else ""
        listed = (
            f'<p class="calibrated">calibrated set at alpha = {_TREE_ALPHA:g}: '
            f"{shown or 'empty'}</p>"
        )
    return f"""<section class="card" id="hierarchy"><h2>Hierarchical explanation</h2>
<p class="lead">How the model narrows the classes down on {which}. Its predicted class's
features run left to right, strongest first; every class leaves the path at the first of them it
does not share (in this order). The predicted class is bold{boxed}.</p>
<img class="tree-img" src="{root}img/{tree.file}" alt="hierarchy of test image #{tree.index}"
loading="lazy">
{listed}</section>"""


def _closest_classes(context: _Context, class_index: int, n_shown: int = 6) -> str:
    uses = context.weights != 0
    shared = (uses & uses[class_index]).sum(axis=1)
    shared[class_index] = -1
    order = np.argsort(-shared, kind="stable")[:n_shown]
    return (
        "".join(
            f'<span class="chip">{context.class_link(int(c), "../")} <small>{int(shared[c])} shared'
            "</small></span>"
            for c in order
            if shared[c] > 0
        )
        or '<span class="muted">none shares a feature</span>'
    )


def _feature_page(context: _Context, feature: int) -> str:
    explanation = context.explanation
    scan = context.scan
    root = "../"
    label = context.feature_labels[feature]
    users = explanation.feature_classes[feature]
    chips = (
        "".join(f'<span class="chip">{context.class_link(c, root)}</span>' for c in users)
        or '<span class="muted">no class uses this feature</span>'
    )
    tiles = []
    for index in context.top_images[feature]:
        index = int(index)
        true_class = int(scan.labels[index])
        correct = bool(scan.correct[index])
        mark = '<span class="ok">✓</span>' if correct else '<span class="wrong">✗</span>'
        tiles.append(
            _tile(
                context,
                index,
                feature,
                root,
                f'<div class="cap-top"><span>{context.class_link(true_class, root)} {mark}</span>'
                f'<span class="val">{scan.features[index, feature]:+.2f}</span></div>',
            )
        )
    means = context.class_means[:, feature]  # (n_c,), NaN for classes without test images
    ranked = np.argsort(-np.nan_to_num(means, nan=-np.inf), kind="stable")
    order = [int(c) for c in ranked if np.isfinite(means[c])][:10]  # classes with test images
    finite = means[np.isfinite(means)]
    low, high = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    span = max(high - low, 1e-9)
    color = _css_color(context.colors[feature])
    rows = "".join(
        f"<div>{context.class_link(c, root)}{' <small>(uses it)</small>' if c in users else ''}"
        f'</div><div class="track"><span class="bar" style="left:0;width:'
        f'{100.0 * (means[c] - low) / span:.1f}%;background:{color}"></span></div>'
        f'<div class="num">{means[c]:+.2f}</div>'
        for c in order
    )
    body = f"""<section class="card"><h2>Used by {_count(len(users), "class")}</h2>
<p class="lead">A feature shared by several classes stands for something they have in common.</p>
<div>{chips}</div></section>
<section class="card"><h2>Where it is strongest</h2>
<p class="lead">The {len(tiles)} test images with the highest value of this feature (✓ correctly
classified). All heatmaps of this feature use one brightness scale.
{context.brightness_note()}</p>
<div class="tiles">{"".join(tiles)}</div></section>
<section class="card"><h2>Mean value per class</h2>
<p class="lead">The 10 classes on whose test images this feature is highest on average.</p>
<div class="bars">{rows}</div></section>"""
    swatch = f'<span class="dot" style="background:{color};width:14px;height:14px"></span>'
    return page(
        title=f"{label} · {context.model_label} report",
        heading=label,
        subtitle=f"{swatch} head feature {feature}, backbone channel "
        f"{explanation.channel_ids[feature]}",
        body=body,
        root=root,
        crumbs=f'<a href="{root}index.html#features">← all features</a>',
    )


def _pairs_page(context: _Context, pairs: Sequence[ContrastivePair]) -> str:
    names_ = context.explanation.class_names
    blocks = []
    for pair in pairs:
        figure = context.pair_images.get((pair.first, pair.second))
        if figure is None:
            continue
        similarity = (
            ""
            if pair.attribute_similarity is None
            else f" · attribute similarity {pair.attribute_similarity:.2f}"
        )
        blocks.append(
            f"""<div class="pair-figure" id="pair-{pair.first}-{pair.second}">
<h3>{context.class_link(pair.first, "")} vs {context.class_link(pair.second, "")}</h3>
<div class="muted">columns: {escape(names_[pair.first])} only · shared ·
{escape(names_[pair.second])} only{similarity}; one brightness scale per column</div>
{_attribute_differences(context, pair.first, pair.second)}
<img src="img/{figure}" alt="{escape(names_[pair.first])} vs {escape(names_[pair.second])}"
loading="lazy"></div>"""
        )
    body = (
        f'<section class="card">{"".join(blocks)}</section>'
        if blocks
        else '<section class="card"><p class="lead">No two classes share all but one feature.'
        "</p></section>"
    )
    return page(
        title=f"Contrastive pairs · {context.model_label} report",
        heading="Contrastive pairs",
        subtitle="Two classes, one row each: the features only the first uses, the shared ones, "
        "the features only the second uses.",
        body=body,
        root="",
        crumbs=f'<a href="index.html{"#pairs" if pairs else ""}">← report</a>',
    )
