"""The Python API of the whole method: configure, run the stages, load, predict and explain.

Everything ``openqpm train`` does is available here, with typed results::

    import openqpm

    config = openqpm.load_config("demo", overrides={"data.root": "data/synthetic"})
    result = openqpm.run(config, "runs/demo")            # every stage; reuses finished ones
    result.metrics["qpm"]["accuracy"], result.assignment.gap
    model = result.load_model()                         # the QPM (or the method's model)
    openqpm.predict(model, ["bird.jpg"], top_k=3)
    openqpm.explain_prediction(model, "bird.jpg").text()

For a QPM or CHiQPM model (a binary head) the explanation of an image also holds its
hierarchical explanation (the predicted class's features, strongest first, and the classes
that share each prefix) and, given the run's calibration (made by the evaluate stage when the run
held out ``data.calibration_fraction`` of the training images), its calibrated prediction sets::

    from openqpm.app import load_run

    loaded = load_run("runs/demo", method="chiqpm")   # the model and its calibration, if any
    openqpm.explain_prediction(loaded.model, "bird.jpg", calibration=loaded.calibration).text()

The CLI is a thin layer over these functions: the same configuration gives the same stage hashes
and the same artifacts whichever is used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from openqpm.config import ConfigError, RunConfig, load_config
from openqpm.stages import Reporter, outputs_of, stage_hash, stages_for

if TYPE_CHECKING:  # pragma: no cover - annotations only (these import torch)
    import torch

    from openqpm.conformal import Calibration
    from openqpm.explain.figures import LocalExplanation
    from openqpm.explain.hierarchy import HierarchicalExplanation
    from openqpm.models.model import QPMModel
    from openqpm.solver.problem import Assignment

__all__ = [
    "ClassScore",
    "FeatureContribution",
    "ImageExplanation",
    "Prediction",
    "PredictionSet",
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
class PredictionSet:
    """A calibrated prediction set of one image.

    Attributes:
        score: the non-conformity score it was calibrated with (``hierarchical``, ``aps`` or
            ``thr``, :data:`openqpm.conformal.SCORES`).
        alpha: the miscoverage level: on images exchangeable with the calibration images the
            set holds the true class at least ``1 - alpha`` of the time.
        classes: the classes, ascending index (may be empty for ``hierarchical``).
        class_names: their names, same order.
        level: for ``hierarchical``, the level of the image's hierarchy the threshold was
            calibrated at (0 = every class); None for the other scores.
    """

    score: str
    alpha: float
    classes: list[int]
    class_names: list[str]
    level: int | None = None


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
        class_names: every class's name (for the hierarchy's classes).
        hierarchy: for a binary head (QPM, CHiQPM) the hierarchical explanation: ``path``, the
            predicted class's features strongest first, and ``levels[j]``, the classes whose
            ``j`` strongest features are the path's first ``j``; None for other heads.
        alpha: the miscoverage level of ``prediction_sets`` (None without a calibration).
        prediction_sets: ``{score: set}`` for every score of :data:`openqpm.conformal.SCORES`
            when a calibration was given; empty otherwise.
    """

    predicted: ClassScore
    versus: ClassScore
    predicted_features: list[FeatureContribution]
    versus_features: list[FeatureContribution]
    shared: list[int]
    predicted_only: list[int]
    versus_only: list[int]
    feature_maps: np.ndarray
    class_names: list[str] = field(default_factory=list)
    hierarchy: HierarchicalExplanation | None = None
    alpha: float | None = None
    prediction_sets: dict[str, PredictionSet] = field(default_factory=dict)

    @property
    def calibrated_set(self) -> PredictionSet | None:
        """The CHiQPM (``hierarchical``) prediction set, or None without a calibration."""
        return self.prediction_sets.get("hierarchical")

    def text(self) -> str:
        """The explanation in a few lines of plain text (with the hierarchy's path and the
        calibrated set when there are)."""

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
        if self.hierarchy is not None:
            lines.append(_path_text(self.hierarchy, self.class_names))
        chosen = self.calibrated_set
        if chosen is not None:
            lines.append(
                f"calibrated set (alpha={chosen.alpha:g}, {chosen.score}): "
                f"{_names(chosen.class_names, _MAX_SET_NAMES) or 'empty'} "
                f"(calibrated at tree level {chosen.level})"
            )
        return "\n".join(lines)


_MAX_SET_NAMES = 25  # class names written out per calibrated set in text
_MAX_LEAVING_NAMES = 6  # class names written out per level of the path


def _names(names: Sequence[str], limit: int) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" +{len(names) - limit} more" if len(names) > limit else "")


def _path_text(
    hierarchy: HierarchicalExplanation,
    class_names: Sequence[str],
    feature_labels: Sequence[str] | None = None,
) -> str:
    """The hierarchy in one line: the path, how many classes share each prefix of it, and the
    classes that leave it after each feature (``feature_labels``: names instead of ``f<d>``).

    ``path: f12 (4 classes) > f7 (2) > f3 (1); leave after f12: B, C; after f7: D`` reads: 4
    classes have f12 as their strongest feature, 2 of them f7 next; B and C leave after f12
    (their second strongest feature is another), D after f7; the prediction has the whole path.
    """

    def name(feature: int) -> str:
        return f"f{feature}" if feature_labels is None else feature_labels[feature]

    steps = [f"{name(d)} ({len(hierarchy.levels[j])})" for j, d in enumerate(hierarchy.path, 1)]
    if steps:
        first = len(hierarchy.levels[1])
        steps[0] = f"{name(hierarchy.path[0])} ({first} {'class' if first == 1 else 'classes'})"
    leaving: list[str] = []
    for j in range(1, hierarchy.k):
        later = set(hierarchy.levels[j + 1])
        gone = [class_names[c] for c in hierarchy.levels[j] if c not in later]
        if gone:
            where = "leave after" if not leaving else "after"
            leaving.append(
                f"{where} {name(hierarchy.path[j - 1])}: {_names(gone, _MAX_LEAVING_NAMES)}"
            )
    return "path: " + " > ".join(steps) + "".join(f"; {part}" for part in leaving)


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
    import torch

    from openqpm.explain import explain_image

    # a transformed tensor needs no transform (nor the metadata it is built from)
    transform = None if isinstance(image, torch.Tensor) else _input_transform(model)
    tensor = _as_tensor(image, transform)
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
    calibration: Calibration | None = None,
    alpha: float = 0.1,
) -> ImageExplanation:
    """Explain one image: its class's features, their activations, and why not ``versus``.

    For a binary head (QPM, CHiQPM) the explanation also holds the image's hierarchy
    (``hierarchy``: the path of the predicted class's features, strongest first, and the
    classes sharing each prefix) and, given ``calibration``, the prediction sets at ``alpha`` of
    every score (``prediction_sets``; ``calibrated_set`` is CHiQPM's). Dense and sparse heads
    have neither (no error without a calibration).

    (Not named ``explain``: ``openqpm.explain`` is the package of global explanations and figures.)

    Args:
        model: a loaded model.
        image: a path, a PIL image or a transformed (3, H, W) tensor.
        versus: the class to contrast with (index or name); default the runner-up.
        device: where to run (default: the model's device).
        calibration: the model's calibration (``openqpm.app.load_run(run_dir).calibration``),
            for the prediction sets.
        alpha: the miscoverage level of the sets, in (0, 1): they hold the true class for at
            least ``1 - alpha`` of the images exchangeable with the calibration images.

    Raises:
        ValueError: ``versus`` names no class of the model, ``alpha`` is not in (0, 1), or
            ``calibration`` is not one of this model (another class-feature matrix, or a head
            that is not binary).
    """
    _check_alpha(alpha)
    if calibration is not None:
        _check_calibration(model, calibration)
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
        class_names=list(model.class_names),
        hierarchy=_hierarchy(local),
        alpha=None if calibration is None else float(alpha),
        prediction_sets=(
            {}
            if calibration is None
            else _prediction_sets(model.class_names, local, calibration, alpha)
        ),
    )


def _check_alpha(alpha: float) -> None:
    """ValueError naming ``alpha`` unless it is a number in (0, 1)."""
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float, np.floating, np.integer))
        or not 0.0 < float(alpha) < 1.0  # False for NaN too
    ):
        raise ValueError(f"alpha must be in (0, 1) (e.g. 0.1 for 90% coverage), got {alpha!r}")


def _is_binary(weights: np.ndarray) -> bool:
    """Whether ``weights`` is a QPM class-feature matrix: 0/1, the same k > 0 ones per row."""
    if weights.ndim != 2 or weights.size == 0 or not np.isin(weights, (0, 1)).all():
        return False
    sums = weights.sum(axis=1)
    return bool(sums[0] > 0 and (sums == sums[0]).all())


def _check_calibration(model: QPMModel, calibration: Calibration) -> None:
    weights = model.class_weights().detach().float().cpu().numpy()
    if not _is_binary(weights):
        raise ValueError(
            "calibration: prediction sets need a binary head (QPM, CHiQPM); this model's "
            "class weights are not 0/1 with k per class"
        )
    if calibration.weights.shape != weights.shape or not np.array_equal(
        calibration.weights, weights
    ):
        raise ValueError(
            "calibration: it was fit for another model (its class-feature matrix "
            f"{tuple(calibration.weights.shape)} differs from this model's {weights.shape})"
        )


def _hierarchy(local: LocalExplanation) -> HierarchicalExplanation | None:
    """The hierarchical explanation of a forward pass, or None when the head is not binary."""
    if not _is_binary(local.class_weights):
        return None
    from openqpm.explain.hierarchy import hierarchical_explanation

    return hierarchical_explanation(
        local.features, local.class_weights, prediction=int(local.predicted_class)
    )


def _prediction_sets(
    class_names: Sequence[str], local: LocalExplanation, calibration: Calibration, alpha: float
) -> dict[str, PredictionSet]:
    """``{score: set}`` at ``alpha`` of one forward pass, for every score of SCORES."""
    from openqpm.conformal import SCORES

    _check_alpha(alpha)
    logits, activations = local.logits[None, :], local.features[None, :]
    sets = {}
    for score in SCORES:
        (classes,) = calibration.prediction_sets(score, logits, activations, alpha)
        members = [int(c) for c in classes]
        sets[score] = PredictionSet(
            score=score,
            alpha=float(alpha),
            classes=members,
            class_names=[class_names[c] for c in members],
            level=calibration.threshold(score, alpha)[1],
        )
    return sets


def _class_index(model: QPMModel, value: int | str) -> int:
    if isinstance(value, str):
        if value not in model.class_names:
            raise ValueError(f"versus={value!r} is not a class of the model")
        return model.class_names.index(value)
    if not 0 <= int(value) < len(model.class_names):
        raise ValueError(f"versus={value} is out of range 0..{len(model.class_names) - 1}")
    return int(value)
