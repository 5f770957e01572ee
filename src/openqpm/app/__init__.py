"""``openqpm app``: a local browser explorer of a finished run (optional extra ``openqpm[app]``).

Tab *Image*: upload an image or pick one of the run's test images; it shows the prediction, the
top-k classes, a grid (rows: the image, then each candidate class on a representative correctly
classified training image; columns: the features those classes use; each cell the feature's
heatmap in its report colour) and the contrast with the runner-up or a chosen class. The forward
pass of an image is cached, so changing k or the compared class recomputes nothing.

For a QPM or CHiQPM model (a binary head) it also draws the image's hierarchical explanation as
a tree: the predicted class's features, strongest first, and the classes leaving that path at
each feature. When the run was calibrated (trained with ``data.calibration_fraction`` > 0), a
target coverage slider (1 - alpha, 0.80 to 0.99) sets the calibrated prediction set, listed and
boxed in the tree; without a calibration a note says why there is none. A CHiQPM model with a
calibration draws its heatmaps with certainty-carrying brightness (strength relative to the
feature's typical strength on the held-out training images), as its report does.

Tab *Global*: every class and its features, filtered by a search box, linked to the report's
pages when the run has a ``report/``.

Gradio is imported only inside :func:`build_app`; nothing is sent anywhere (analytics off, no
share link, no web fonts).
"""

from __future__ import annotations

import hashlib
import html
import io
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from openqpm.app._loaded import LoadedRun, image_files, load_run

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure
    from PIL import Image

    from openqpm.explain.figures import LocalExplanation

__all__ = ["AppState", "GradioMissingError", "build_app", "image_files", "launch", "require_gradio"]

INSTALL_HINT = 'the app needs gradio: pip install "openqpm[app]"'
RUNNER_UP = "(runner-up)"
_CELL_PX = 128
_CACHE_SIZE = 32
# the coverage slider: target coverage 1 - alpha of the calibrated prediction sets
COVERAGE_MIN, COVERAGE_MAX, COVERAGE_DEFAULT = 0.80, 0.99, 0.90
_SCORE_LABELS = {"hierarchical": "CHiQPM (hierarchical)", "aps": "APS", "thr": "THR"}
_MAX_LISTED = 40  # class names listed per prediction set


class GradioMissingError(ImportError):
    """gradio is not installed; the message says how to install it."""


def require_gradio() -> Any:
    """Import gradio with analytics off, or raise :class:`GradioMissingError` naming the extra."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as error:
        raise GradioMissingError(INSTALL_HINT) from error
    return gradio


class AppState:
    """The app's model, caches and pictures, independent of gradio (testable on its own)."""

    def __init__(self, loaded: LoadedRun) -> None:
        self.loaded = loaded
        self._locals: OrderedDict[str, tuple[np.ndarray, LocalExplanation]] = OrderedDict()
        self._examples: dict[int, tuple[np.ndarray, np.ndarray] | None] = {}
        self._splits: dict[str, Any] = {}
        self.n_forward_passes = 0  # how many images went through the model (cache misses)

    # ------------------------------------------------------------------ data

    def split(self, name: str) -> Any:
        """The run's ``train`` or ``test`` split with the test transform, or None if unreadable."""
        if name not in self._splits:
            from openqpm.data import create_dataset
            from openqpm.data._base import DatasetError
            from openqpm.data._registry import resolved_crop

            data = self.loaded.config.data
            try:
                crop = resolved_crop(data.dataset, data.crop)
                dataset = create_dataset(data.dataset, data.root, name, crop=crop)
                dataset.transform = self.loaded.transform()
            except (DatasetError, OSError, ValueError, KeyError):  # moved or deleted data
                dataset = None
            self._splits[name] = dataset
        return self._splits[name]

    def test_images(self, limit: int = 200) -> list[str]:
        """Paths of test images to pick from (spread over the classes)."""
        dataset = self.split("test")
        if dataset is None:
            return []
        paths = [str(p) for p in dataset.image_paths]
        step = max(1, len(paths) // limit)
        return paths[::step][:limit]

    # ------------------------------------------------------------------ forward passes

    def analyse(self, image: Image.Image) -> tuple[np.ndarray, LocalExplanation]:
        """(display picture, local explanation) of an RGB image; cached by its pixels."""
        key = hashlib.sha1(np.asarray(image).tobytes() + str(image.size).encode()).hexdigest()
        if key in self._locals:
            self._locals.move_to_end(key)
            return self._locals[key]
        result = (self.loaded.display(image), self.loaded.local(image))
        self.n_forward_passes += 1
        self._locals[key] = result
        if len(self._locals) > _CACHE_SIZE:
            self._locals.popitem(last=False)
        return result

    def example(self, class_index: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(display picture, feature maps) of a correctly classified training image of the
        class (the most confident among its first 32; any, when none is correct), or None
        without training images."""
        if class_index in self._examples:
            return self._examples[class_index]
        import torch

        from openqpm._io import eval_mode

        found = None
        dataset = self.split("train")
        if dataset is not None:
            indices = dataset.indices_of_class(class_index)[:32]
            if len(indices):
                model: Any = self.loaded.model
                batch = torch.stack([dataset[int(i)][0] for i in indices])
                with torch.no_grad(), eval_mode(model):
                    logits = model(batch.to(self.loaded.device)).float().cpu().numpy()
                correct = np.flatnonzero(logits.argmax(axis=1) == class_index)
                # none classified correctly (a weak model): its most confident image instead
                pool = correct if len(correct) else np.arange(len(indices))
                best = int(indices[pool[np.argmax(logits[pool, class_index])]])
                picture = dataset.load_image(best)
                _, local = self.analyse(picture)
                found = (self.loaded.display(picture), local.feature_maps)
        self._examples[class_index] = found
        return found

    # ------------------------------------------------------------------ outputs

    def top_k(self, local: LocalExplanation, k: int) -> list[int]:
        return [int(c) for c in np.argsort(-local.logits, kind="stable")[:k]]

    def scores_markdown(self, local: LocalExplanation, k: int) -> str:
        names = self.loaded.class_names
        lines = ["| rank | class | score |", "|---:|---|---:|"]
        for rank, c in enumerate(self.top_k(local, k), start=1):
            lines.append(f"| {rank} | {names[c]} | {local.logits[c]:.3f} |")
        predicted = local.predicted_class
        parts = local.contributions(predicted)
        terms = " + ".join(f"{self.loaded.feature_labels[f]} ({v:+.2f})" for f, v in parts[:12])
        more = " + …" if len(parts) > 12 else ""
        lines += [
            "",
            f"**{names[predicted]}**: score {local.logits[predicted]:.3f} = {terms}{more}",
        ]
        return "\n".join(lines)

    def contrast_text(self, local: LocalExplanation, versus: int | None) -> str:
        import dataclasses

        if versus is not None:
            local = dataclasses.replace(local, runner_up_class=versus)
        names, labels = self.loaded.class_names, self.loaded.feature_labels
        first, second = local.predicted_class, local.runner_up_class
        used_first = set(np.flatnonzero(local.class_weights[first]).tolist())
        used_second = set(np.flatnonzero(local.class_weights[second]).tolist())

        def listed(features: set[int]) -> str:
            return ", ".join(labels[f] for f in sorted(features)) or "none"

        return "\n".join(
            [
                local.why_not_sentence(names, labels),
                (
                    f"Margin {local.logits[first] - local.logits[second]:.3f} "
                    f"({names[first]} {local.logits[first]:.3f}, "
                    f"{names[second]} {local.logits[second]:.3f})."
                ),
                f"Only {names[first]}: {listed(used_first - used_second)}.",
                f"Only {names[second]}: {listed(used_second - used_first)}.",
                f"Shared: {listed(used_first & used_second)}.",
            ]
        )

    # ------------------------------------------------------------------ hierarchy and sets

    def calibrated_sets(self, local: LocalExplanation, coverage: float) -> dict[str, Any]:
        """``{score: PredictionSet}`` at target coverage ``coverage`` (alpha = 1 - coverage);
        empty without a calibration.

        Raises:
            ValueError: ``coverage`` is not in (0, 1).
        """
        return self.loaded.prediction_sets(local, coverage_to_alpha(coverage))

    def hierarchy_view(
        self, local: LocalExplanation, coverage: float | None
    ) -> tuple[np.ndarray | None, str]:
        """(the tree as an RGB picture, or None for a head that is not binary; markdown with the
        path and the calibrated sets at ``coverage``, or the note why there are none)."""
        from openqpm.api import _path_text

        loaded = self.loaded
        hierarchy = loaded.hierarchy(local)
        if hierarchy is None:
            return None, (
                f"The {loaded.method} model's head is not binary (QPM, CHiQPM): no hierarchical "
                "explanation and no calibrated prediction sets."
            )
        lines = [_path_text(hierarchy, loaded.class_names, loaded.feature_labels)]
        sets = {} if coverage is None else self.calibrated_sets(local, coverage)
        chosen = sets.get("hierarchical")
        if chosen is None:
            lines += ["", f"*No calibrated prediction sets: {_note(loaded)}*"]
        else:
            header = (
                f"**Calibrated set** at target coverage {coverage:.0%} "
                f"(alpha = {chosen.alpha:g}, calibrated at tree level {chosen.level}): "
                f"{_listed(chosen.class_names)}"
            )
            lines += [
                "",
                header,
                "",
                "| score | size | classes |",
                "|---|---:|---|",
            ]
            for score, found in sets.items():
                label = _SCORE_LABELS.get(score, score)
                lines.append(f"| {label} | {len(found.classes)} | {_listed(found.class_names)} |")
        tree = loaded.tree_figure(
            hierarchy, calibrated_set=None if chosen is None else chosen.classes
        )
        return _figure_pixels(tree), "\n".join(lines)

    def grid(self, picture: np.ndarray, local: LocalExplanation, classes: list[int]) -> np.ndarray:
        """Rows: the image, then each class on its example; columns: the classes' features."""
        from openqpm.explain.heatmaps import heatmap_overlay

        weights = local.class_weights
        columns: list[int] = []
        for c in classes:
            for feature, _ in local.contributions(c):
                if feature not in columns:
                    columns.append(feature)
        columns = columns[:16]
        rows: list[tuple[str, np.ndarray | None, np.ndarray | None, int | None]] = [
            ("this image", picture, local.feature_maps, None)
        ]
        for c in classes:
            example = self.example(c)
            rows.append(
                (
                    self.loaded.class_names[c],
                    None if example is None else example[0],
                    None if example is None else example[1],
                    c,
                )
            )
        strength = self.loaded.certainty_scale  # CHiQPM: brightness = certainty
        cell = _CELL_PX
        header, label_w = 22, 150
        out = np.full(
            (header + cell * len(rows), label_w + cell * (1 + len(columns)), 3), 255, np.uint8
        )
        for r, (_, image, maps, row_class) in enumerate(rows):
            top = header + r * cell
            if image is None or maps is None:
                out[top + 2 : top + cell - 2, label_w + 2 : label_w + cell - 2] = 230
                continue
            out[top : top + cell, label_w : label_w + cell] = _resize(image, cell)
            units = None if strength is None else self.loaded.head_units(maps)
            for j, feature in enumerate(columns):
                left = label_w + (1 + j) * cell
                if row_class is not None and weights[row_class, feature] == 0:
                    out[top + 2 : top + cell - 2, left + 2 : left + cell - 2] = 240
                    continue
                color = self.loaded.colors[feature]
                if units is None or strength is None:
                    tile = heatmap_overlay(_resize(image, cell), maps[feature], color)
                else:
                    tile = heatmap_overlay(
                        _resize(image, cell),
                        units[feature],
                        color,
                        strength_scale=float(strength[feature]),
                    )
                out[top : top + cell, left : left + cell] = tile
        return _annotate(out, rows, columns, self, header=header, label_w=label_w, cell=cell)


def coverage_to_alpha(coverage: float) -> float:
    """alpha = 1 - coverage, rounded so that a slider's 0.9 gives 0.1, not 0.09999999999999998.

    Raises:
        ValueError: ``coverage`` is not in (0, 1).
    """
    if not 0.0 < float(coverage) < 1.0:
        raise ValueError(f"target coverage must be in (0, 1), got {coverage!r}")
    return round(1.0 - float(coverage), 10)


def _note(loaded: LoadedRun) -> str:
    """Why the run has no calibrated prediction sets, and how to get them."""
    reason = loaded.calibration_note or "the run has no calibration"
    return (
        f"{reason.rstrip('.')}. Train with `--set data.calibration_fraction=0.1` to hold out "
        "training images to calibrate on."
    )


def _listed(names: list[str]) -> str:
    if not names:
        return "(empty)"
    # markdown: escape HTML and the table's column bar
    shown = ", ".join(html.escape(name).replace("|", "\\|") for name in names[:_MAX_LISTED])
    return shown + (f" +{len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _figure_pixels(figure: Figure) -> np.ndarray:
    """A matplotlib figure as an (H, W, 3) uint8 picture."""
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    buffer.seek(0)
    with PILImage.open(buffer) as picture:
        return np.asarray(picture.convert("RGB"))


def _resize(image: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image as PILImage

    if image.shape[0] == side and image.shape[1] == side:
        return image
    return np.asarray(PILImage.fromarray(image).resize((side, side), PILImage.Resampling.BILINEAR))


def _annotate(
    out: np.ndarray,
    rows: list[Any],
    columns: list[int],
    state: AppState,
    *,
    header: int,
    label_w: int,
    cell: int,
) -> np.ndarray:
    """Row and column titles drawn with PIL's built-in font (no font file needed)."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    picture = PILImage.fromarray(out)
    draw = ImageDraw.Draw(picture)
    for j, feature in enumerate(columns):
        color = tuple(int(255 * v) for v in state.loaded.colors[feature])
        draw.text(
            (label_w + (1 + j) * cell + 4, 4), state.loaded.feature_labels[feature], fill=color
        )
    draw.text((label_w + 4, 4), "image", fill=(0, 0, 0))
    for r, (name, *_) in enumerate(rows):
        text = name if len(name) <= 22 else name[:21] + "…"
        draw.text((4, header + r * cell + cell // 2 - 6), text, fill=(0, 0, 0))
    return np.asarray(picture)


def _class_table_html(state: AppState, query: str) -> str:
    """The classes and their features as an HTML table, filtered by ``query`` (case-insensitive,
    on class names and feature labels), with links to the report's pages when present."""
    loaded = state.loaded
    report = (loaded.run_dir / "report").resolve()
    has_report = (report / "index.html").is_file()
    needle = query.strip().lower()
    rows = []
    for c, name in enumerate(loaded.class_names):
        features = loaded.class_features[c]
        labels = [loaded.feature_labels[f] for f in features]
        if needle and needle not in name.lower() and not any(needle in x.lower() for x in labels):
            continue
        class_cell = html.escape(name)
        page = report / "classes" / f"c{c:04d}.html"
        if has_report and page.is_file():
            class_cell = f'<a href="/gradio_api/file={page}" target="_blank">{class_cell}</a>'
        chips = []
        for f, label in zip(features, labels):
            color = "#" + "".join(f"{int(255 * v):02x}" for v in loaded.colors[f])
            text = (
                f'<span style="color:{color};font-weight:bold">&#9679;</span> {html.escape(label)}'
            )
            feature_page = report / "features" / f"f{f:04d}.html"
            if has_report and feature_page.is_file():
                text = f'<a href="/gradio_api/file={feature_page}" target="_blank">{text}</a>'
            chips.append(text)
        rows.append(f"<tr><td>{c}</td><td>{class_cell}</td><td>{', '.join(chips)}</td></tr>")
    link = ""
    if has_report:
        link = (
            f'<p><a href="/gradio_api/file={report / "index.html"}" target="_blank">report</a></p>'
        )
    return (
        f"{link}<p>{len(rows)} of {len(loaded.class_names)} classes</p>"
        '<table class="openqpm-classes"><thead><tr><th>#</th><th>class</th><th>features</th>'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _tree_panel(
    gr: Any, loaded: LoadedRun, hierarchy: Any, image: Any, events: tuple[Any, Any]
) -> None:
    """The tree of the current image and, with a calibration, the target-coverage slider; the
    tree follows ``events`` (the explain click and image change), whose forward pass it reuses."""
    calibrated = loaded.calibration is not None
    with gr.Row():
        with gr.Column(scale=1):
            if calibrated:
                coverage = gr.Slider(
                    COVERAGE_MIN,
                    COVERAGE_MAX,
                    value=COVERAGE_DEFAULT,
                    step=0.01,
                    label="target coverage (1 - alpha) of the calibrated set",
                    elem_id="coverage",
                )
            else:
                gr.Markdown(f"*No coverage slider: {_note(loaded)}*", elem_id="no-calibration")
            sets = gr.Markdown(elem_id="sets")
        with gr.Column(scale=2):
            tree = gr.Image(
                label="hierarchical explanation (boxed: the calibrated set)",
                type="numpy",
                elem_id="tree",
            )
    tree_inputs = [image, coverage] if calibrated else [image]
    tree_outputs = [tree, sets]
    clicked, changed = events
    # after explain: its forward pass is cached, and the two never run at once
    clicked.then(hierarchy, inputs=tree_inputs, outputs=tree_outputs, api_name="hierarchy")
    changed.then(hierarchy, inputs=tree_inputs, outputs=tree_outputs, api_name=False)
    if calibrated:
        coverage.release(hierarchy, inputs=tree_inputs, outputs=tree_outputs, api_name=False)


def build_app(
    run_dir: str | os.PathLike[str], *, device: Any = None, method: str | None = None
) -> Any:
    """The gradio Blocks of a finished run (launch it with ``.launch()``).

    Args:
        run_dir: the run directory.
        device: where to run; default the run's ``config.device``.
        method: the method whose model to explore, in a run trained with several; default the
            config's ``sparsify.method``.

    Raises:
        GradioMissingError: gradio is not installed.
        PipelineError: not a run directory, its model is missing, or a broken calibration file.
    """
    gr = require_gradio()
    from PIL import Image as PILImage

    from openqpm.data._base import _to_rgb

    state = AppState(load_run(run_dir, device=device, method=method))
    loaded = state.loaded
    names = loaded.class_names
    n_classes = len(names)
    test_images = state.test_images()
    has_tree = loaded.has_hierarchy
    calibrated = has_tree and loaded.calibration is not None

    def analysed(image: Any) -> tuple[np.ndarray, LocalExplanation]:
        picture = image if isinstance(image, PILImage.Image) else PILImage.open(image)
        return state.analyse(_to_rgb(picture))

    def explain(image: Any, k: float, versus: str | None) -> tuple[Any, str, Any, str]:
        if image is None:
            return {}, "Upload an image or pick a test image.", None, ""
        display, local = analysed(image)
        top = state.top_k(local, int(k))
        logits = local.logits - local.logits.max()
        probabilities = np.exp(logits) / np.exp(logits).sum()
        label = {names[c]: float(probabilities[c]) for c in top}
        other = None if versus in (None, "", RUNNER_UP) else names.index(str(versus))
        grid = state.grid(display, local, top)
        return label, state.scores_markdown(local, int(k)), grid, state.contrast_text(local, other)

    def hierarchy(image: Any, coverage: float | None = None) -> tuple[Any, str]:
        """(tree picture, path and sets) of the image at target coverage ``coverage``."""
        if image is None:
            return None, ""
        _, local = analysed(image)  # cached: no second forward pass after explain
        return state.hierarchy_view(
            local, None if not calibrated else float(coverage or COVERAGE_DEFAULT)
        )

    def pick(path: str | None) -> Any:
        return None if not path else path

    with gr.Blocks(analytics_enabled=False, title=f"openqpm: {Path(run_dir).name}") as app:
        gr.Markdown(f"## openqpm: `{run_dir}` ({loaded.method})")
        with gr.Tab("Image"):
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(type="pil", label="image", sources=["upload", "clipboard"])
                    chosen = gr.Dropdown(
                        choices=[(Path(p).name, p) for p in test_images],
                        value=None,
                        label="or pick a test image",
                    )
                    k = gr.Slider(1, min(10, n_classes), value=min(3, n_classes), step=1, label="k")
                    versus = gr.Dropdown(
                        choices=[RUNNER_UP, *names], value=RUNNER_UP, label="compare with"
                    )
                    button = gr.Button("Explain", variant="primary")
                with gr.Column(scale=2):
                    top_k = gr.Label(label="prediction (softmax over the scores)")
                    scores = gr.Markdown()
                    contrast = gr.Textbox(label="why not the other class", lines=5)
            grid_label = "features of the top-k classes"
            if loaded.certainty_scale is not None:
                grid_label += " (brightness: strength relative to the feature's typical strength)"
            grid = gr.Image(label=grid_label, type="numpy", elem_id="grid")
            outputs = [top_k, scores, grid, contrast]
            inputs = [image, k, versus]
            chosen.change(pick, inputs=chosen, outputs=image, api_name=False)
            clicked = button.click(explain, inputs=inputs, outputs=outputs, api_name="explain")
            image.upload(explain, inputs=inputs, outputs=outputs, api_name=False)
            changed = image.change(explain, inputs=inputs, outputs=outputs, api_name=False)
            k.release(explain, inputs=inputs, outputs=outputs, api_name=False)
            versus.change(explain, inputs=inputs, outputs=outputs, api_name=False)
            if has_tree:
                _tree_panel(gr, loaded, hierarchy, image, (clicked, changed))
            else:
                gr.Markdown(
                    f"*The {loaded.method} model's head is not binary: no hierarchical "
                    "explanation.*"
                )
        with gr.Tab("Global"):
            search = gr.Textbox(label="search classes and features", placeholder="e.g. finch")
            table = gr.HTML(_class_table_html(state, ""))
            search.change(
                lambda q: _class_table_html(state, q or ""),
                inputs=search,
                outputs=table,
                api_name=False,
            )
    app.openqpm_state = state  # for tests and callers
    app.openqpm_hierarchy = hierarchy  # the tree handler: (image, target coverage) -> outputs
    return app


def launch(app: Any, *, host: str, port: int, run_dir: Path) -> None:
    """Serve ``app`` locally: no share link, no SSR server, no monitoring, no web fonts."""
    gr = require_gradio()
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "monospace"],
    )
    app.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        show_error=True,
        ssr_mode=False,
        mcp_server=False,
        enable_monitoring=False,
        theme=theme,
        allowed_paths=[str((run_dir / "report").resolve())],
    )
