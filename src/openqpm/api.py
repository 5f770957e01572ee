"""The Python API of the whole method: configure, run the stages, load, predict and explain.

Everything ``openqpm train`` does is available here, with typed results::

    import openqpm

    config = openqpm.load_config("demo", overrides={"data.root": "data/synthetic"})
    result = openqpm.run(config, "runs/demo")            # every stage; reuses finished ones
    result.metrics["qpm"]["accuracy"], result.assignment.gap
    model = result.load_model()                         # the QPM (or the method's model)
    openqpm.predict(model, ["bird.jpg"], top_k=3)
    openqpm.explain_prediction(model, "bird.jpg").text()

The CLI is a thin layer over these functions: the same configuration gives the same stage hashes
and the same artifacts whichever is used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from openqpm.config import ConfigError, RunConfig, load_config
from openqpm.stages import Reporter, outputs_of, stage_hash, stages_for

if TYPE_CHECKING:  # pragma: no cover - annotations only (these import torch)
    import torch

    from openqpm.models.model import QPMModel
    from openqpm.solver.problem import Assignment

__all__ = [
    "ClassScore",
    "FeatureContribution",
    "ImageExplanation",
    "Prediction",
    "RunResult",
    "explain_prediction",
    "load_config",
    "predict",
    "resolve_device",
    "run",
]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """A ``torch.device`` from a name: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda:N``.

    Under ``torchrun``, ``auto`` and ``cuda`` mean this process's GPU (``LOCAL_RANK``).

    Raises:
        ConfigError: an unknown name, or CUDA asked for where there is none.
    """
    import torch

    if isinstance(name, torch.device):
        return name
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        return (
            torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        )
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"device={name!r} is not a device; choose auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


@dataclass(frozen=True)
class RunResult:
    """What a run directory holds after :func:`run`.

    Attributes:
        run_dir: the run directory.
        config: the configuration the stages ran with.
        summaries: ``{stage: summary}`` of the requested stages, in run order.
        stage_hashes: ``{stage: hash}`` of every stage for this configuration.
    """

    run_dir: Path
    config: RunConfig
    summaries: dict[str, dict[str, Any]]
    stage_hashes: dict[str, str]

    def paths(self, stage: str) -> list[Path]:
        """The files and folders ``stage`` writes (for this run's method), in the run directory."""
        return [self.run_dir / name for name in outputs_of(stage, self.config)]

    @property
    def method(self) -> str:
        """The sparsification method (``qpm``, ``glm-saga5``, ``sldd`` or ``qsenn``)."""
        return self.config.sparsify.method

    @property
    def metrics(self) -> dict[str, Any] | None:
        """The evaluation (``dense``, the method's name, ``baseline_top_weights``), or None."""
        path = self.paths("evaluate")[0]
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    @property
    def assignment(self) -> Assignment | None:
        """The solver's assignment, or None before the ``assignment`` stage."""
        from openqpm.solver.problem import Assignment

        path = self.run_dir / "assignment.json"
        return Assignment.load(path) if path.is_file() else None

    def load_model(self, which: str = "model") -> QPMModel:
        """The method's saved ``model`` (the QPM for ``qpm``) or the ``dense`` one, on the CPU."""
        from openqpm.models import load
        from openqpm.stages import model_stage

        if which not in {"model", "dense"}:
            raise ValueError(f"which={which!r}: choose model or dense")
        stage = "dense" if which == "dense" else model_stage(self.method).name
        return load(self.paths(stage)[0])


def run(
    config: RunConfig | str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    stages: Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    resume: bool = True,
    reporter: Reporter | None = None,
) -> RunResult:
    """Run the QPM stages over ``run_dir``, reusing and resuming exactly as ``openqpm train``.

    Args:
        config: a :class:`RunConfig`, a shipped configuration's name or a YAML path.
        run_dir: the run directory (created when missing).
        stages: stage names (:func:`openqpm.stages.stage_names`); default every stage of the
            configuration's method (``sparsify.method``).
        overrides: dotted field -> value, applied to ``config`` (``{"solver.n_features": 40}``).
        device: default ``config.device``; see :func:`resolve_device`.
        resume: continue interrupted training from its last epoch checkpoint.
        reporter: receives stage, training and solver progress (subclass :class:`Reporter`).

    Returns:
        A :class:`RunResult`.

    Raises:
        ConfigError: a bad configuration field (named).
        PipelineError: a missing or invalid input (named), found before any training.
    """
    from openqpm.pipeline import run_pipeline

    if not isinstance(config, RunConfig):
        config = load_config(config)
    if overrides:
        config = load_config(None, base=config, overrides=overrides)
    torch_device = resolve_device(device if device is not None else config.device)
    summaries = run_pipeline(
        config, Path(run_dir), device=torch_device, stages=stages, resume=resume, reporter=reporter
    )
    return RunResult(
        run_dir=Path(run_dir),
        config=config,
        summaries=summaries,
        stage_hashes={name: stage_hash(config, name) for name in stages_for(config)},
    )


# ----------------------------------------------------------------------------- new images


def _input_transform(model: QPMModel) -> Any:
    """The run's test transform, from the facts the model's metadata records."""
    from openqpm.data import build_transforms, resize_squashes

    metadata = model.metadata
    missing = [k for k in ("image_size_px", "data_mean", "data_std") if k not in metadata]
    if missing:
        raise ValueError(f"the model's metadata lacks {', '.join(missing)}: save it with a run")
    squash = resize_squashes(str(metadata.get("dataset", "")), bool(metadata.get("crop", False)))
    return build_transforms(
        train=False,
        image_size_px=int(metadata["image_size_px"]),
        mean=metadata["data_mean"],
        std=metadata["data_std"],
        squash=squash,
        # the test transform follows the recipe (ImageNet: resize to 256/224 of the side, crop)
        augment=str(metadata.get("augment", "paper")),
    )


def _as_tensor(image: Any, transform: Any) -> torch.Tensor:
    """One (3, H, W) model input from a path, a PIL image or an already transformed tensor."""
    import torch
    from PIL import Image

    from openqpm.data._base import _to_rgb, open_rgb

    if isinstance(image, torch.Tensor):
        return image
    # open_rgb/_to_rgb: 16-bit greyscale scaled (not clipped), transparency composed over white
    if isinstance(image, (str, os.PathLike)):
        image = open_rgb(image)  # DatasetError naming the file when it cannot be read
    elif isinstance(image, Image.Image):
        image = _to_rgb(image)
    else:
        raise TypeError(f"expected an image path, a PIL image or a tensor, got {type(image)}")
    return transform(image)


@dataclass(frozen=True)
class ClassScore:
    """One class and its score (logit)."""

    class_index: int
    class_name: str
    score: float


@dataclass(frozen=True)
class FeatureContribution:
    """One feature of a class on one image.

    Attributes:
        feature: the head's feature index (0 .. K-1).
        channel: the backbone channel it reads.
        activation: the feature's value the head multiplies (QPM: normalised).
        contribution: weight x activation; a QPM class's score is the sum over its features.
    """

    feature: int
    channel: int
    activation: float
    contribution: float


@dataclass(frozen=True)
class Prediction:
    """The top classes of one image and, for the first, its features (their sum is its score)."""

    top_classes: list[ClassScore]
    features: list[FeatureContribution]


@dataclass(frozen=True)
class ImageExplanation:
    """Why one image got its class, and not another.

    Attributes:
        predicted: the predicted class.
        versus: the compared class (the runner-up unless one was asked for).
        predicted_features: the predicted class's features, largest contribution first.
        versus_features: the compared class's features.
        shared: features both classes use (their contributions cancel in the difference).
        predicted_only: features only the predicted class uses.
        versus_only: features only the compared class uses.
        feature_maps: (K, h, w) the maps the head reads, for heatmaps.
    """

    predicted: ClassScore
    versus: ClassScore
    predicted_features: list[FeatureContribution]
    versus_features: list[FeatureContribution]
    shared: list[int]
    predicted_only: list[int]
    versus_only: list[int]
    feature_maps: np.ndarray

    def text(self) -> str:
        """The explanation in a few lines of plain text."""

        def listed(items: list[FeatureContribution]) -> str:
            return ", ".join(f"f{item.feature} {item.contribution:+.2f}" for item in items)

        first, second = self.predicted, self.versus
        contrast = (
            f"{first.class_name}, not {second.class_name} (margin "
            f"{first.score - second.score:.2f}): only {first.class_name} has "
            f"{_feature_list(self.predicted_only)}; only {second.class_name} has "
            f"{_feature_list(self.versus_only)}; shared {_feature_list(self.shared)}"
        )
        lines = [
            f"{first.class_name} (score {first.score:.2f}): {listed(self.predicted_features)}",
            f"{second.class_name} (score {second.score:.2f}): {listed(self.versus_features)}",
            contrast,
        ]
        return "\n".join(lines)


def _feature_list(features: list[int]) -> str:
    return ", ".join(f"f{feature}" for feature in features) or "none"


def _channels(model: QPMModel) -> list[int]:
    selected = getattr(model.head, "selected_features", None)
    if selected is None:  # a dense head reads every channel in order
        return list(range(int(model.class_weights().shape[1])))
    return [int(channel) for channel in selected.tolist()]


def _contributions(model: QPMModel, local: Any, class_index: int) -> list[FeatureContribution]:
    channels = _channels(model)
    return [
        FeatureContribution(
            feature=feature,
            channel=channels[feature],
            activation=float(local.features[feature]),
            contribution=value,
        )
        for feature, value in local.contributions(class_index)
    ]


def _score(model: QPMModel, logits: np.ndarray, class_index: int) -> ClassScore:
    return ClassScore(class_index, model.class_names[class_index], float(logits[class_index]))


def _local(model: QPMModel, image: Any, device: str | torch.device | None) -> Any:
    from openqpm.explain import explain_image

    tensor = _as_tensor(image, _input_transform(model))
    target = device if device is not None else next(model.parameters()).device
    return explain_image(model, tensor, device=target)


def predict(
    model: QPMModel,
    images: Sequence[Any],
    *,
    top_k: int = 5,
    device: str | torch.device | None = None,
    batch_size: int = 32,
) -> list[Prediction]:
    """The ``top_k`` classes of each image, and the features behind the first.

    Images are transformed with the run's test transform and classified ``batch_size`` at a time
    (one forward pass per batch).

    Args:
        model: a loaded model (:func:`openqpm.load` or :meth:`RunResult.load_model`).
        images: paths, PIL images, or (3, H, W) tensors already transformed.
        top_k: how many classes to return per image.
        device: where to run (default: the model's device).
        batch_size: images per forward pass.

    Returns:
        One :class:`Prediction` per image, in order.

    Raises:
        DatasetError: an image file cannot be read (the message names it).
    """
    import torch

    from openqpm._io import eval_mode

    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    images = list(images)
    if not images:
        return []
    qpm: Any = model
    transform = None
    if not all(isinstance(image, torch.Tensor) for image in images):
        transform = _input_transform(model)
    target = device if device is not None else next(model.parameters()).device
    weights = qpm.class_weights().detach().float().cpu().numpy()  # (n_c, K)
    predictions = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack(
            [_as_tensor(image, transform) for image in images[start : start + batch_size]]
        )
        with torch.no_grad(), eval_mode(model):
            maps = qpm.forward_features(batch.to(target))
            logits = qpm.forward_head(maps).float().cpu().numpy()  # (b, n_c)
            features = qpm.forward_head(maps, pre_logits=True).float().cpu().numpy()  # (b, K)
        for row_logits, row_features in zip(logits, features):
            order = np.argsort(-row_logits, kind="stable")
            local = _BatchRow(row_features, weights)
            predictions.append(
                Prediction(
                    top_classes=[_score(model, row_logits, int(c)) for c in order[:top_k]],
                    features=_contributions(model, local, int(order[0])),
                )
            )
    return predictions


@dataclass(frozen=True)
class _BatchRow:
    """One image of a batch: what :func:`_contributions` reads (features, contributions)."""

    features: np.ndarray
    class_weights: np.ndarray

    def contributions(self, class_index: int) -> list[tuple[int, float]]:
        # the same order and values as LocalExplanation.contributions
        row = self.class_weights[class_index]
        used = np.flatnonzero(row)
        values = row[used] * self.features[used]
        order = np.argsort(-values, kind="stable")
        return [(int(used[i]), float(values[i])) for i in order]


def explain_prediction(
    model: QPMModel,
    image: Any,
    *,
    versus: int | str | None = None,
    device: str | torch.device | None = None,
) -> ImageExplanation:
    """Explain one image: its class's features, their activations, and why not ``versus``.

    (Not named ``explain``: ``openqpm.explain`` is the package of global explanations and figures.)

    Args:
        model: a loaded model.
        image: a path, a PIL image or a transformed (3, H, W) tensor.
        versus: the class to contrast with (index or name); default the runner-up.
        device: where to run (default: the model's device).

    Raises:
        ValueError: ``versus`` names no class of the model.
    """
    local = _local(model, image, device)
    predicted = int(local.predicted_class)
    other = local.runner_up_class if versus is None else _class_index(model, versus)
    weights = local.class_weights
    used_predicted = set(np.flatnonzero(weights[predicted]).tolist())
    used_other = set(np.flatnonzero(weights[other]).tolist())
    return ImageExplanation(
        predicted=_score(model, local.logits, predicted),
        versus=_score(model, local.logits, int(other)),
        predicted_features=_contributions(model, local, predicted),
        versus_features=_contributions(model, local, int(other)),
        shared=sorted(used_predicted & used_other),
        predicted_only=sorted(used_predicted - used_other),
        versus_only=sorted(used_other - used_predicted),
        feature_maps=local.feature_maps,
    )


def _class_index(model: QPMModel, value: int | str) -> int:
    if isinstance(value, str):
        if value not in model.class_names:
            raise ValueError(f"versus={value!r} is not a class of the model")
        return model.class_names.index(value)
    if not 0 <= int(value) < len(model.class_names):
        raise ValueError(f"versus={value} is out of range 0..{len(model.class_names) - 1}")
    return int(value)
