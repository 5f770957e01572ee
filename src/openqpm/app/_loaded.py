"""A finished run loaded for inference: its model, test transform, feature colours and images.

Shared by ``openqpm predict``, ``openqpm explain`` and the app; imports no web framework.
"""

from __future__ import annotations

import dataclasses
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

    from openqpm.config import RunConfig
    from openqpm.explain.figures import LocalExplanation
    from openqpm.models.model import QPMModel

__all__ = ["LoadedRun", "image_files", "load_run"]

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
    """

    run_dir: Path
    config: RunConfig
    model: QPMModel
    which: str
    device: torch.device
    class_features: list[list[int]]
    colors: np.ndarray
    feature_labels: list[str]

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
        """The picture as the network sees it (centre square or squashed), for drawing on."""
        from PIL import Image as PILImage

        steps = getattr(self.transform(), "transforms", []) or []
        if any(type(step).__name__ == "CenterCrop" for step in steps):
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
        side = max(self.image_size_px, DISPLAY_MIN_PX)
        return np.asarray(image.resize((side, side), PILImage.Resampling.BICUBIC))

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
        runner-up), in the report's feature colours."""
        from openqpm.explain.figures import local_explanation_figure

        local = self.local(image)
        if versus is not None:
            local = dataclasses.replace(local, runner_up_class=self.class_index(versus))
        figure = local_explanation_figure(
            self.display(image),
            local,
            class_names=self.class_names,
            colors=self.colors,
            feature_labels=self.feature_labels,
        )
        return figure, local


def load_run(
    run_dir: str | os.PathLike[str], *, which: str = "model", device: Any = None
) -> LoadedRun:
    """Load a finished run's ``which`` model (``model``: the method's; ``dense``).

    Raises:
        PipelineError: not a run directory, or the model is not trained yet.
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
    stage = "dense" if which == "dense" else model_stage(config.sparsify.method).name
    path = run_dir / outputs_of(stage, config)[0]
    if not path.is_file():
        raise PipelineError(
            f"{path} is missing: run `openqpm {stage} {run_dir}` (or `openqpm train`) first"
        )
    torch_device = resolve_device(device if device is not None else config.device)
    model = load(path).to(torch_device).eval()
    if which == "dense":  # every class reads every channel: no assignment to colour by
        n_features = int(model.class_weights().shape[1])
        class_features: list[list[int]] = [[] for _ in model.class_names]
        colors = feature_palette(n_features)
        labels = [f"Feature {channel}" for channel in range(n_features)]
    else:
        explanation = GlobalExplanation.from_model(model)
        class_features = [list(f) for f in explanation.class_features]
        colors = assign_feature_colors(explanation.class_features, explanation.n_features)
        labels = [f"Feature {channel}" for channel in explanation.channel_ids]
    return LoadedRun(
        run_dir=run_dir,
        config=config,
        model=model,
        which=which,
        device=torch_device,
        class_features=class_features,
        colors=colors,
        feature_labels=labels,
    )


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
