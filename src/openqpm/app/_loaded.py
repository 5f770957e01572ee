"""A finished run loaded for inference: its model, test transform, feature colours and images.

A run directory can hold several methods' models (``openqpm train --method qpm,chiqpm``);
:func:`load_run` loads one of them and, when the method's evaluate stage calibrated prediction
sets (``data.calibration_fraction`` > 0), its :class:`~openqpm.conformal.Calibration` from
``calibration.json`` (QPM) or ``calibration_<method>.json``.

Shared by ``openqpm predict``, ``openqpm explain`` and the app; imports no web framework.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from openqpm.stages import PipelineError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from matplotlib.figure import Figure
    from PIL import Image

    from openqpm.api import PredictionSet
    from openqpm.config import RunConfig
    from openqpm.conformal import Calibration
    from openqpm.explain.figures import LocalExplanation
    from openqpm.explain.hierarchy import HierarchicalExplanation
    from openqpm.models.model import QPMModel

__all__ = ["LoadedRun", "calibration_path", "image_files", "load_run", "method_config"]

# the side of the pictures heatmaps are drawn on (small inputs are enlarged so maps read well)
DISPLAY_MIN_PX = 224


@dataclass
class LoadedRun:
    """A run directory's model, ready to classify and explain new images.

    Attributes:
        run_dir: the run directory.
        config: its ``config.yaml``.
        model: the method's model (or the dense one), in eval mode on ``device``.
        which: ``model`` or ``dense``.
        device: where forward passes run.
        class_features: per class, its features (head indices) by decreasing weight.
        colors: (K, 3) one colour per feature, as the report assigns them.
        feature_labels: K labels, ``Feature <channel>`` as in the report.
        method: the method whose model this is (also for ``which="dense"``: the run's method).
        calibration: the method's calibrated prediction sets, or None (no calibration file,
            calibration not available, or the dense model); ``calibration_note`` says why.
        certainty_scale: (K,) each feature's typical strength on the held-out training images
            (the calibration file's ``active_means``), for certainty-carrying heatmaps
            (:meth:`head_units`); None without a calibration or for a head without ReLU (as in
            the report: only CHiQPM's heatmaps are drawn so).
        calibration_note: why there is no calibration (None when there is one).
    """

    run_dir: Path
    config: RunConfig
    model: QPMModel
    which: str
    device: torch.device
    class_features: list[list[int]]
    colors: np.ndarray
    feature_labels: list[str]
    method: str = "qpm"
    calibration: Calibration | None = None
    certainty_scale: np.ndarray | None = None
    calibration_note: str | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.model.class_names)

    @property
    def image_size_px(self) -> int:
        return int(self.model.metadata["image_size_px"])

    def transform(self) -> Any:
        from openqpm.api import _input_transform

        return _input_transform(self.model)

    def display(self, image: Image.Image) -> np.ndarray:
        """The picture as the network sees it (see ``heatmaps.network_view``), for drawing on."""
        from openqpm.explain.heatmaps import network_view

        side = max(self.image_size_px, DISPLAY_MIN_PX)
        return network_view(image, self.transform(), size_px=side)

    def local(self, image: Image.Image) -> LocalExplanation:
        """The forward pass of one RGB image: logits, features and feature maps."""
        from openqpm.explain.figures import explain_image

        tensor = self.transform()(image)
        return explain_image(self.model, tensor, device=self.device)

    def class_index(self, value: int | str) -> int:
        """A class from its name or index (a string of digits that is no class name: an index)."""
        from openqpm.api import _class_index

        if isinstance(value, str) and value not in self.class_names and value.isdigit():
            value = int(value)
        return _class_index(self.model, value)

    def explanation_figure(
        self, image: Image.Image, *, versus: int | str | None = None
    ) -> tuple[Figure, LocalExplanation]:
        """The local explanation figure of one image, contrasted with ``versus`` (default: the
        runner-up), in the report's feature colours (with certainty-carrying heatmaps when the
        run is calibrated)."""
        from openqpm.explain.figures import local_explanation_figure

        local = self.local(image)
        if versus is not None:
            local = dataclasses.replace(local, runner_up_class=self.class_index(versus))
        certainty: dict[str, Any] = {}
        if self.certainty_scale is not None:  # brightness = certainty, as in the report
            certainty = {
                "strength_scales": self.certainty_scale,
                "head_maps": self.head_units(local.feature_maps),
            }
        figure = local_explanation_figure(
            self.display(image),
            local,
            class_names=self.class_names,
            colors=self.colors,
            feature_labels=self.feature_labels,
            **certainty,
        )
        return figure, local

    def head_units(self, feature_maps: np.ndarray) -> np.ndarray:
        """(K, h, w) head feature maps in the units of the head's input (for heatmaps drawn with
        ``strength_scale=certainty_scale[j]``).

        Raises:
            ValueError: the head has no normalisation (not a QPM head).
        """
        from openqpm.explain.heatmaps import to_head_units
        from openqpm.models.head import _MIN_STD

        head: Any = self.model.head
        if not hasattr(head, "mean") or not hasattr(head, "std"):
            raise ValueError(f"the {type(head).__name__} has no normalisation to put maps in")
        return to_head_units(
            feature_maps,
            head.mean.detach().float().cpu().numpy(),
            head.std.detach().float().clamp(min=_MIN_STD).cpu().numpy(),
        )

    @property
    def has_hierarchy(self) -> bool:
        """Whether the head is binary (QPM, CHiQPM): its images have a hierarchical explanation."""
        from openqpm.api import _is_binary

        return _is_binary(self.model.class_weights().detach().float().cpu().numpy())

    def hierarchy(self, local: LocalExplanation) -> HierarchicalExplanation | None:
        """The hierarchical explanation of a forward pass (None when the head is not binary)."""
        from openqpm.api import _hierarchy

        return _hierarchy(local)

    def prediction_sets(self, local: LocalExplanation, alpha: float) -> dict[str, PredictionSet]:
        """``{score: set}`` at ``alpha`` of a forward pass; empty without a calibration.

        Raises:
            ValueError: ``alpha`` is not in (0, 1).
        """
        from openqpm.api import _check_alpha, _prediction_sets

        _check_alpha(alpha)
        if self.calibration is None:
            return {}
        return _prediction_sets(self.class_names, local, self.calibration, alpha)

    def tree_figure(
        self, hierarchy: HierarchicalExplanation, *, calibrated_set: Iterable[int] | None = None
    ) -> Figure:
        """The hierarchy as a tree in the report's feature colours, ``calibrated_set`` boxed."""
        from openqpm.explain.hierarchy import hierarchy_figure

        return hierarchy_figure(
            hierarchy,
            class_names=self.class_names,
            feature_colors=self.colors,
            calibrated_set=None if calibrated_set is None else list(calibrated_set),
            feature_labels=self.feature_labels,
        )


def method_config(config: RunConfig, method: str) -> RunConfig:
    """``config`` with ``sparsify.method`` set to ``method`` (the paths of that method's stages).

    Raises:
        PipelineError: ``method`` is not a method (the message lists them).
    """
    from openqpm.stages import model_stage

    model_stage(method)  # PipelineError naming the methods
    return dataclasses.replace(config, sparsify=dataclasses.replace(config.sparsify, method=method))


def calibration_path(run_dir: str | os.PathLike[str], config: RunConfig) -> Path:
    """Where the evaluate stage of ``config``'s method writes its calibration file."""
    from openqpm.stages import outputs_of

    return Path(run_dir) / outputs_of("evaluate", config)[1]


def load_run(
    run_dir: str | os.PathLike[str],
    *,
    which: str = "model",
    device: Any = None,
    method: str | None = None,
) -> LoadedRun:
    """Load a finished run's ``which`` model (``model``: the method's; ``dense``).

    Args:
        run_dir: the run directory.
        which: ``model`` (the method's) or ``dense``.
        device: where to run; default the run's ``config.device``.
        method: the method whose model to load, in a run trained with several
            (``openqpm train --method qpm,chiqpm``); default the config's ``sparsify.method``.

    Raises:
        PipelineError: not a run directory, an unknown method, the model is not trained yet
            (the message names the file and the command), or a calibration file that cannot
            be read or does not belong to the model (the message names it).
    """
    from openqpm.api import resolve_device
    from openqpm.config import load_config
    from openqpm.explain.global_ import GlobalExplanation
    from openqpm.explain.heatmaps import assign_feature_colors, feature_palette
    from openqpm.models import load
    from openqpm.stages import model_stage, outputs_of

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise PipelineError(f"{run_dir} is not a run directory (no config.yaml): train it first")
    if which not in {"model", "dense"}:
        raise PipelineError(f"model {which!r}: choose model or dense")
    config = load_config(run_dir / "config.yaml")
    if method is not None and method != config.sparsify.method:
        config = method_config(config, method)
    chosen = config.sparsify.method
    stage = "dense" if which == "dense" else model_stage(chosen).name
    path = run_dir / outputs_of(stage, config)[0]
    if not path.is_file():
        if which == "model" and method is not None:
            command = f"`openqpm train --run-dir {run_dir} --method {chosen}`"
        else:
            command = f"`openqpm {stage} {run_dir}` (or `openqpm train`)"
        raise PipelineError(f"{path} is missing: run {command} first")
    torch_device = resolve_device(device if device is not None else config.device)
    model = load(path).to(torch_device).eval()
    if which == "dense":  # every class reads every channel: no assignment to colour by
        n_features = int(model.class_weights().shape[1])
        class_features: list[list[int]] = [[] for _ in model.class_names]
        colors = feature_palette(n_features)
        labels = [f"Feature {channel}" for channel in range(n_features)]
        calibration, scale = None, None
        note: str | None = "the dense model has no calibrated prediction sets"
    else:
        explanation = GlobalExplanation.from_model(model)
        class_features = [list(f) for f in explanation.class_features]
        colors = assign_feature_colors(explanation.class_features, explanation.n_features)
        labels = [f"Feature {channel}" for channel in explanation.channel_ids]
        calibration, scale, note = _read_calibration(
            calibration_path(run_dir, config), model, run_dir=run_dir, method=chosen
        )
    return LoadedRun(
        run_dir=run_dir,
        config=config,
        model=model,
        which=which,
        device=torch_device,
        class_features=class_features,
        colors=colors,
        feature_labels=labels,
        method=chosen,
        calibration=calibration,
        certainty_scale=scale,
        calibration_note=note,
    )


def _read_calibration(
    path: Path, model: QPMModel, *, run_dir: Path, method: str
) -> tuple[Calibration | None, np.ndarray | None, str | None]:
    """(calibration, certainty scale, note) of a calibration file the evaluate stage wrote.

    A missing file or ``"available": false`` is no calibration (the note says why); anything
    else that is not a calibration of ``model`` is a PipelineError naming the file.
    """
    from openqpm.conformal import Calibration

    command = f"`openqpm evaluate {run_dir} --method {method}`"
    if not path.is_file():
        return None, None, f"{path.name} is missing: run {command} to make it"
    redo = f"run {command} to rewrite it"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PipelineError(f"{path} is not a valid calibration file ({error}); {redo}") from None
    if not isinstance(document, dict) or not isinstance(document.get("available"), bool):
        raise PipelineError(
            f'{path} is not a valid calibration file (no "available": true or false); {redo}'
        )
    if not document["available"]:
        reason = str(document.get("reason") or "the run holds out no calibration images")
        return None, None, reason
    try:
        calibration = Calibration.from_json_dict(document.get("calibration", {}))
    except (ValueError, TypeError, KeyError) as error:
        raise PipelineError(f"{path} is not a valid calibration file ({error}); {redo}") from None
    weights = model.class_weights().detach().float().cpu().numpy()
    if calibration.weights.shape != weights.shape or not np.array_equal(
        calibration.weights, weights
    ):
        raise PipelineError(
            f"{path} was calibrated for another model than {method}'s "
            f"(its class-feature matrix differs); {redo}"
        )
    scale = _certainty_scale(document.get("active_means"), weights.shape[1], path, redo)
    # as in the report: certainty-carrying heatmaps for a ReLU (CHiQPM) head only
    return calibration, scale if getattr(model.head, "relu", False) else None, None


def _certainty_scale(values: Any, n_features: int, path: Path, redo: str) -> np.ndarray | None:
    """The ``active_means`` of a calibration file as a (K,) array of finite values > 0."""
    if values is None:
        return None
    problem = f'{path} is not a valid calibration file ("active_means" must be null or '
    if not isinstance(values, list) or len(values) != n_features:
        raise PipelineError(f"{problem}a list of {n_features} numbers); {redo}")
    if not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in values
    ):
        raise PipelineError(f"{problem}finite numbers > 0); {redo}")
    scale = np.asarray(values, dtype=np.float64)
    scale.setflags(write=False)
    return scale


def image_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The files named, with folders walked (sorted; hidden files and folders skipped)."""
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            for root, folders, names in os.walk(path):
                folders[:] = sorted(f for f in folders if not f.startswith("."))
                files.extend(Path(root) / n for n in sorted(names) if not n.startswith("."))
        else:
            files.append(path)
    return files
