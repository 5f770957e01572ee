"""The stages' functions and what they share: the context, progress reporting, data and models.

The table that says what each stage reads, writes and depends on is :mod:`openqpm.stages`; this
module holds the code each entry runs. A stage function takes a :class:`StageContext` and returns
its summary (recorded in ``stages.json``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from openqpm._io import atomic_write_text, is_main_process, to_jsonable
from openqpm.config import (
    DenseConfig,
    FinetuneConfig,
    RunConfig,
    resolved_reduced_strides,
)

if TYPE_CHECKING:  # pragma: no cover - annotations only (these import torch)
    import torch

    from openqpm.features import FeaturePassProgress
    from openqpm.models.model import QPMModel
    from openqpm.solver.problem import SolverProgress
    from openqpm.training import TrainingProgress

__all__ = ["METHOD_LABELS", "PipelineError", "Reporter", "StageContext"]

_logger = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """A stage cannot run: its input is missing or invalid. The message says which and why."""


class Reporter:
    """What a pipeline run tells its caller; subclass it and override what you want to see.

    The default methods log at INFO level and ignore fine-grained progress.
    """

    def stage_started(self, stage: str, description: str) -> None:
        """A stage begins (``description`` is its entry's text)."""
        _logger.info("stage %s: %s", stage, description)

    def stage_skipped(self, stage: str, reason: str) -> None:
        """A stage is reused: its recorded hash matches and its files exist."""
        _logger.info("stage %s skipped: %s", stage, reason)

    def stage_finished(self, stage: str, summary: dict[str, Any]) -> None:
        """A stage ended; ``summary`` is what ``stages.json`` records for it."""
        _logger.info("stage %s finished: %s", stage, summary)

    def training_progress(self, stage: str, event: TrainingProgress) -> None:
        """After every optimisation step of ``dense`` or ``finetune`` (rank 0 only)."""

    def solver_progress(self, event: SolverProgress) -> None:
        """Whenever the solver's incumbent or bound improves, and at phase changes."""

    def pass_progress(self, stage: str, done: int, total: int) -> None:
        """After every batch of a pass over the images (``features``)."""


@dataclass
class StageContext:
    """What the stages of one pipeline call share; data sets are built once, on first use."""

    config: RunConfig
    run_dir: Path
    device: torch.device
    reporter: Reporter
    resume: bool
    cache: dict[str, Any] = field(default_factory=dict)
    stage: str = ""  # the stage running now (set by the pipeline) ...
    digest: str = ""  # ... its configuration hash ...
    outputs: tuple[str, ...] = ()  # ... the paths it writes, for this run's method ...
    # ... and the paths of what it reads, by the name its entry's `needs` gives (e.g. "model")
    inputs: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        """A path inside the run directory."""
        return self.run_dir / name

    @property
    def method(self) -> str:
        """The sparsification method of this run (``sparsify.method``)."""
        return self.config.sparsify.method


# ----------------------------------------------------------------------------- inputs


def _datasets(ctx: StageContext) -> dict[str, Any]:
    """The data sets the stages read, built once.

    ``train`` (train transforms) and ``train_fit`` (test transforms) are the training images
    that train and fit models; ``calibration`` (test transforms, None when
    ``data.calibration_fraction`` is 0) the held-out rest of the training split, which trains
    nothing; ``train_eval`` the whole training split (test transforms, for metrics); ``test``
    the test split.
    """
    if "datasets" in ctx.cache:
        return dict(ctx.cache["datasets"])
    from openqpm.data import build_transforms, create_dataset, resize_squashes
    from openqpm.data._registry import resolved_crop

    data = ctx.config.data
    if not data.root:
        raise PipelineError("data.root is empty: pass --data-root PATH (the data set folder)")
    crop = resolved_crop(data.dataset, data.crop)
    train = create_dataset(data.dataset, data.root, "train", crop=crop)
    train_eval = create_dataset(data.dataset, data.root, "train", crop=crop)
    test = create_dataset(data.dataset, data.root, "test", crop=crop)
    if train.n_classes != test.n_classes:
        raise PipelineError(
            f"{data.root}: the train split has {train.n_classes} classes, "
            f"the test split {test.n_classes}"
        )
    mean, std = train.mean_std
    squash = resize_squashes(data.dataset, bool(getattr(train, "crop", crop)))
    options: dict[str, Any] = {
        "image_size_px": data.image_size_px,
        "mean": mean,
        "std": std,
        "squash": squash,
        "augment": data.augment,  # also picks the test transform (imagenet: resize 256/224)
    }
    train.transform = build_transforms(train=True, **options)
    test_transform = build_transforms(train=False, **options)
    train_eval.transform = test_transform
    test.transform = test_transform
    ctx.cache["datasets"] = {
        "train_eval": train_eval,
        "test": test,
        **_held_out(train, train_eval, data.calibration_fraction, data.calibration_seed),
    }
    return dict(ctx.cache["datasets"])


def _held_out(train: Any, train_eval: Any, fraction: float, seed: int) -> dict[str, Any]:
    """``train``, ``train_fit`` and ``calibration``: the training split less a seeded held-out
    share (per class, so every class keeps training images), and that share."""
    if fraction <= 0:
        return {"train": train, "train_fit": train_eval, "calibration": None}
    from torch.utils.data import Subset

    labels = np.asarray(train_eval.labels)
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for class_index in np.unique(labels):
        members = np.flatnonzero(labels == class_index)
        count = min(round(fraction * len(members)), len(members) - 1)  # one image always trains
        held.extend(rng.permutation(members)[:count].tolist())
    if not held:
        raise PipelineError(
            f"data.calibration_fraction={fraction} holds out no training image: raise it"
        )
    held_set = set(held)
    kept = [i for i in range(len(labels)) if i not in held_set]
    return {
        "train": Subset(train, kept),
        "train_fit": Subset(train_eval, kept),
        "calibration": Subset(train_eval, sorted(held)),
    }


def _loader(ctx: StageContext, split: str, *, train: bool, distributed: bool | None = None) -> Any:
    from openqpm.training import make_loader

    return make_loader(
        _datasets(ctx)[split],
        batch_size=ctx.config.data.batch_size,
        train=train,
        seed=ctx.config.seed,
        num_workers=ctx.config.data.num_workers,
        distributed=distributed,
    )


def _load_model(ctx: StageContext, name: str) -> QPMModel:
    from openqpm.models import load

    path = ctx.path(name)
    if not path.is_file():
        raise PipelineError(f"{path} is missing: run the stage that writes it first")
    return load(path).to(ctx.device)


def _barrier() -> None:
    from openqpm import distributed

    distributed.barrier()


# ----------------------------------------------------------------------------- training stages


def _diversity_beta(config: RunConfig) -> float:
    from openqpm.losses import resolve_diversity_beta

    return resolve_diversity_beta(
        config.model.arch,
        override=config.model.diversity_beta,
        reduced_strides=resolved_reduced_strides(config.model),
        image_size_px=config.data.image_size_px,
    )


def _schedule(ctx: StageContext, values: DenseConfig | FinetuneConfig, **changes: Any) -> Any:
    from openqpm.training import TrainingSchedule

    fields = {
        "epochs": values.epochs,
        "lr_backbone": values.lr_backbone,
        "lr_head": values.lr_head,
        "momentum": values.momentum,
        "weight_decay": values.weight_decay,
        "step_size_epochs": values.step_size_epochs,
        "gamma": values.gamma,
        "diversity_beta": _diversity_beta(ctx.config),
        "amp": ctx.config.amp,
        "seed": ctx.config.seed,
    }
    return TrainingSchedule(**{**fields, **changes})


def _train(ctx: StageContext, model: QPMModel, schedule: Any, *, part: str = "") -> None:
    """Train ``model`` in place (resumable: the checkpoint is keyed by the stage hash)."""
    from openqpm.training import train_model

    if schedule.epochs == 0:
        return
    name = f"{ctx.stage}{part}-{ctx.digest}.safetensors"
    train_model(
        model,
        _loader(ctx, "train", train=True),
        schedule,
        device=ctx.device,
        checkpoint_path=ctx.path("checkpoints") / name,
        resume=ctx.resume,
        progress=lambda event: ctx.reporter.training_progress(ctx.stage, event),
    )


def _save_model(ctx: StageContext, model: QPMModel) -> dict[str, Any]:
    """Save the stage's model as its first output and report its test accuracy."""
    from openqpm.training import evaluate_accuracy

    accuracy = evaluate_accuracy(model, _loader(ctx, "test", train=False), device=ctx.device)
    if is_main_process():
        model.save(ctx.path(ctx.outputs[0]), extra_metadata={"config_hash": ctx.digest})
    _barrier()
    return {"test_accuracy_percent": round(100.0 * accuracy, 2)}


def stage_dense(ctx: StageContext) -> dict[str, Any]:
    """Train the dense model (or take the pretrained one as it is with ``dense.skip``).

    With ``dense.skip`` the pretrained classifier of ``model.weights`` is the dense head; a file
    without one that fits the data set's classes stops the stage before any work. After
    training, the backbone changes as the paper prescribes for its architecture
    (:meth:`~openqpm.models.backbones.Backbone.after_dense_training`: Swin drops its final
    LayerNorm); the saved dense model, which every later stage reads, is the changed one, and
    the summary then also gives the test accuracy before the change.
    """
    import torch

    from openqpm.models.build import PretrainedHeadError, dense_model_for

    config = ctx.config
    train_set = _datasets(ctx)["train_eval"]  # the whole split: classes, names, statistics
    # the initial weights are a function of the seed (the caller's random state is left as it was)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            model = dense_model_for(
                config.model, config.data, train_set, require_pretrained_head=config.dense.skip
            )
        except PretrainedHeadError as error:
            raise PipelineError(str(error)) from None
    model = model.to(ctx.device)
    if not config.dense.skip:
        _train(ctx, model, _schedule(ctx, config.dense))
    summary: dict[str, Any] = {}
    if model.backbone.dense_training_changes():
        from openqpm.training import evaluate_accuracy

        before = evaluate_accuracy(model, _loader(ctx, "test", train=False), device=ctx.device)
        summary["backbone_changed"] = model.backbone.after_dense_training()
        summary["test_accuracy_before_change_percent"] = round(100.0 * before, 2)
    return {**summary, **_save_model(ctx, model)}


def stage_finetune(ctx: StageContext) -> dict[str, Any]:
    """Fine-tune the dense backbone under the solver's binary assignment."""
    from openqpm.features import load_feature_pass
    from openqpm.models import qpm_from_dense
    from openqpm.solver.problem import Assignment

    stats = load_feature_pass(ctx.path("features")).feature_stats
    model = qpm_from_dense(
        _load_model(ctx, "dense.safetensors"),
        Assignment.load(ctx.path("assignment.json")),
        np.asarray(stats.mean, dtype=np.float64),
        np.asarray(stats.std, dtype=np.float64),
        dropout=ctx.config.model.qpm_dropout,
    ).to(ctx.device)
    _train(ctx, model, _schedule(ctx, ctx.config.finetune))
    return _save_model(ctx, model)


# ----------------------------------------------------------------------------- features, solver


def stage_features(ctx: StageContext) -> dict[str, Any]:
    from openqpm.features import extract_features, save_feature_pass

    def progress(event: FeaturePassProgress) -> None:
        ctx.reporter.pass_progress("features", int(event.step), int(event.n_steps))

    result = extract_features(
        _load_model(ctx, "dense.safetensors"),
        _loader(ctx, "train_fit", train=False),
        device=ctx.device,
        keep_pooled=False,
        progress=progress,
    )
    if is_main_process():
        save_feature_pass(ctx.path("features"), result)
    _barrier()
    dead = int(np.sum(np.asarray(result.feature_stats.std) <= 0))
    return {"n_images": int(result.feature_stats.count), "n_constant_features": dead}


def stage_problem(ctx: StageContext) -> dict[str, Any]:
    """A, R, b and eps from the features pass (and pooled features, for A from AUROC)."""
    from openqpm.constants import build_problem
    from openqpm.features import load_feature_pass

    solver = ctx.config.solver
    feature_pass = load_feature_pass(ctx.path("features"))
    pooled = labels = None
    if solver.class_measure == "auroc":
        pooled, labels = _pooled_train_features(ctx, _load_model(ctx, "dense.safetensors"))
    problem, report = build_problem(
        feature_pass.feature_stats,
        feature_pass.map_stats,
        n_features=solver.n_features,
        n_per_class=solver.n_per_class,
        bias=solver.bias,
        bias_strength=solver.bias_strength,
        r_scaling=solver.r_scaling,
        use_similarity=solver.use_similarity,
        class_measure=solver.class_measure,
        pooled=pooled,
        labels=labels,
    )
    if is_main_process():
        problem.save(ctx.path("problem.npz"))
        text = json.dumps(to_jsonable(report), indent=2, sort_keys=True)
        atomic_write_text(ctx.path("problem_report.json"), text)
    _barrier()
    return {"eps": to_jsonable(report.eps), "n_dead_features": len(report.dead_features)}


def stage_assignment(ctx: StageContext) -> dict[str, Any]:
    from openqpm.solver import AssignmentProblem

    return _solve_to(ctx, AssignmentProblem.load(ctx.path("problem.npz")), ctx.path(ctx.outputs[0]))


def _solve_to(ctx: StageContext, problem: Any, path: Path) -> dict[str, Any]:
    """Solve ``problem`` with the run's solver settings and save the assignment at ``path``."""
    from openqpm.solver import SolveInterrupted, solve
    from openqpm.solver.problem import Assignment

    config = ctx.config
    if is_main_process():
        try:
            assignment = solve(
                problem,
                method=config.solver.method,
                time_limit_s=config.solver.time_limit_s,
                seed=config.seed,
                progress=ctx.reporter.solver_progress,
            )
        except SolveInterrupted as interrupted:
            # keep the best solution found (the stage is not recorded: a rerun solves anew)
            interrupted.assignment.save(path)
            interrupted.path = path
            raise
        assignment.save(path)
    _barrier()
    assignment = Assignment.load(path)
    return {
        "objective": assignment.objective,
        "bound": assignment.bound,
        "gap": assignment.gap,
        "method": assignment.method,
        "time_s": round(float(assignment.time_s), 2),
    }


def stage_chiqpm_assignment(ctx: StageContext) -> dict[str, Any]:
    """The assignment with CHiQPM's forced near-equal pairs (closest dense weight rows)."""
    from openqpm.constants import closest_class_pairs
    from openqpm.solver import AssignmentProblem

    problem = AssignmentProblem.load(ctx.path("problem.npz"))
    dense = _load_model(ctx, "dense.safetensors")
    weights = dense.class_weights().cpu().double().numpy()
    try:
        pairs = closest_class_pairs(weights, ctx.config.sparsify.chiqpm_rho)
    except ValueError as error:
        raise PipelineError(f"sparsify.chiqpm_rho: {error}") from None
    paired = AssignmentProblem(
        problem.A,
        problem.R,
        problem.b,
        problem.n_features,
        problem.n_per_class,
        eps=problem.eps,
        metadata=problem.metadata,
        forced_pairs=pairs,
    )
    summary = _solve_to(ctx, paired, ctx.path(ctx.outputs[0]))
    return {**summary, "n_forced_pairs": len(pairs)}


def stage_chiqpm(ctx: StageContext) -> dict[str, Any]:
    """CHiQPM fine-tuning: ReLU on the selected normalised features, feature grounding loss."""
    from openqpm.features import load_feature_pass
    from openqpm.models import qpm_from_dense
    from openqpm.solver.problem import Assignment

    sparsify, finetune = ctx.config.sparsify, ctx.config.finetune
    stats = load_feature_pass(ctx.path("features")).feature_stats
    model = qpm_from_dense(
        _load_model(ctx, "dense.safetensors"),
        Assignment.load(ctx.path(ctx.inputs["chiqpm-assignment"][0])),
        np.asarray(stats.mean, dtype=np.float64),
        np.asarray(stats.std, dtype=np.float64),
        dropout=ctx.config.model.qpm_dropout,
        relu=True,
    ).to(ctx.device)
    grounding_epochs = sparsify.chiqpm_grounding_epochs
    if grounding_epochs is None:
        grounding_epochs = round(0.75 * finetune.epochs)
    schedule = _schedule(
        ctx,
        finetune,
        grounding_weight=sparsify.chiqpm_grounding_weight,
        grounding_epochs=grounding_epochs,
        grounding_remaining_factor=sparsify.chiqpm_remaining_factor,
    )
    _train(ctx, model, schedule)
    return {**_save_model(ctx, model), "grounding_epochs": grounding_epochs}


# ----------------------------------------------------------------------------- evaluation, report


def _evaluate(ctx: StageContext, model_file: str) -> dict[str, Any]:
    from openqpm.metrics import evaluate_model

    datasets = _datasets(ctx)
    started = time.perf_counter()
    results = evaluate_model(
        _load_model(ctx, model_file),
        _loader(ctx, "test", train=False, distributed=False),
        _loader(ctx, "train_eval", train=False, distributed=False),
        device=ctx.device,
        class_attributes=datasets["test"].class_attributes,
        image_attributes=datasets["train_eval"].image_attributes,
        part_locations=datasets["test"].part_locations,
        seed=ctx.config.seed,
    )
    results["evaluation_time_s"] = round(time.perf_counter() - started, 2)
    return results


def _top_weights_baseline(ctx: StageContext) -> dict[str, Any]:
    from openqpm.metrics import top_weight_baseline_accuracy

    n_features, n_per_class = ctx.config.solver.n_features, ctx.config.solver.n_per_class
    accuracy = top_weight_baseline_accuracy(
        _load_model(ctx, "dense.safetensors"),
        _loader(ctx, "test", train=False, distributed=False),
        n_features=n_features,
        n_per_class=n_per_class,
        device=ctx.device,
    )
    return {
        "accuracy": round(100.0 * accuracy, 2),
        "description": (
            f"dense model, each class keeps its {n_per_class} largest weights on the "
            f"{n_features} features with the largest total |weight|, no fine-tuning"
        ),
    }


def stage_evaluate(ctx: StageContext) -> dict[str, Any]:
    """Every metric of the dense model and of this run's method's model, on the test split;
    with held-out calibration images, the calibrated prediction sets of a QPM-type model."""
    if is_main_process():
        # Metrics need every image in order: rank 0 evaluates alone, the others wait.
        results = {
            "dense": _evaluate(ctx, "dense.safetensors"),
            ctx.method: _evaluate(ctx, ctx.inputs["model"][0]),
            "baseline_top_weights": _top_weights_baseline(ctx),
        }
        calibration = _calibrate(ctx, _load_model(ctx, ctx.inputs["model"][0]), results[ctx.method])
        text = json.dumps(to_jsonable(results), indent=2, sort_keys=True)
        atomic_write_text(ctx.path(ctx.outputs[1]), json.dumps(to_jsonable(calibration)))
        atomic_write_text(ctx.path(ctx.outputs[0]), text)
    _barrier()
    results = json.loads(ctx.path(ctx.outputs[0]).read_text(encoding="utf-8"))
    summary = {
        "dense_accuracy": results["dense"].get("accuracy"),
        f"{ctx.method}_accuracy": results[ctx.method].get("accuracy"),
        "baseline_accuracy": results["baseline_top_weights"]["accuracy"],
    }
    conformal = results[ctx.method].get("conformal")
    if conformal:
        summary["coverage_at_0.1"] = {
            row["score"]: row["coverage"] for row in conformal["results"] if row["alpha"] == 0.1
        }
    return summary


def _head_outputs(ctx: StageContext, model: QPMModel, split: str) -> dict[str, np.ndarray]:
    """Logits, head inputs ("activations") and labels of a data set, in order."""
    import torch

    from openqpm._io import eval_mode, unpack_batch

    logits, activations, labels = [], [], []
    with eval_mode(model), torch.no_grad():
        for batch in _loader(ctx, split, train=False, distributed=False):
            images, targets = unpack_batch(batch)
            maps = model.forward_features(images.to(ctx.device))
            inputs = model.forward_head(maps, pre_logits=True)
            activations.append(inputs.float().cpu().numpy())
            logits.append(model.forward_head(maps).float().cpu().numpy())
            labels.append(targets.cpu().numpy())
    return {
        "logits": np.concatenate(logits),
        "activations": np.concatenate(activations),
        "labels": np.concatenate(labels).astype(np.int64),
    }


def _calibrate(ctx: StageContext, model: QPMModel, results: dict[str, Any]) -> dict[str, Any]:
    """Calibrate the prediction sets of a QPM-type model on the held-out training images.

    Adds ``conformal`` (coverage, set size and Set Coherence on the test split at the default
    alphas, for the hierarchical, APS and THR scores) and ``one_feature_apart_pairs`` to
    ``results``; returns the calibration file's contents.
    """
    from openqpm.conformal import Calibration, conformal_metrics
    from openqpm.explain.heatmaps import active_means

    if not model.is_qpm:
        return {"available": False, "reason": f"{ctx.method}: not a binary (QPM-type) head"}
    weights = model.class_weights().cpu().numpy()
    shared = weights @ weights.T
    results["one_feature_apart_pairs"] = int(np.triu(shared == weights.sum(axis=1)[0] - 1, 1).sum())
    datasets = _datasets(ctx)
    if datasets["calibration"] is None:
        reason = "data.calibration_fraction is 0: no training images were held out to calibrate on"
        return {"available": False, "reason": reason}
    held = _head_outputs(ctx, model, "calibration")
    calibration = Calibration.fit(held["logits"], held["activations"], held["labels"], weights)
    test = _head_outputs(ctx, model, "test")
    results["conformal"] = conformal_metrics(
        calibration,
        test["logits"],
        test["activations"],
        test["labels"],
        class_attributes=datasets["test"].class_attributes,
    )
    return {
        "available": True,
        "calibration": calibration.to_json_dict(),
        "active_means": active_means(held["activations"]).tolist(),
        "n_calibration": calibration.n_calibration,
        "fraction": ctx.config.data.calibration_fraction,
    }


# how each method's model is called on its report's pages
METHOD_LABELS = {
    "qpm": "QPM",
    "chiqpm": "CHiQPM",
    "glm-saga5": "glm-saga5",
    "sldd": "SLDD-Model",
    "qsenn": "Q-SENN",
}


def stage_report(ctx: StageContext) -> dict[str, Any]:
    """The HTML report of this run's method's model."""
    from openqpm.explain.report import write_report

    metrics_file, calibration_file = ctx.inputs["evaluate"]
    metrics = json.loads(ctx.path(metrics_file).read_text(encoding="utf-8"))
    index = ctx.path(ctx.outputs[0])
    if is_main_process():
        model = _load_model(ctx, ctx.inputs["model"][0])
        write_report(
            index.parent,
            model=model,
            dataset=_datasets(ctx)["test"],
            metrics=metrics.get(ctx.method),
            dense_metrics=metrics.get("dense"),
            device=ctx.device,
            max_classes=ctx.config.report_max_classes,
            model_label=METHOD_LABELS.get(ctx.method, ctx.method),
            **_hierarchy_options(model, ctx.path(calibration_file)),
        )
        _logger.info("report written to %s", index)
    _barrier()
    return {"index": str(index)}


def _hierarchy_options(model: QPMModel, calibration_file: Path) -> dict[str, Any]:
    """The report's trees for a QPM-type model; with a calibration, its sets at alpha 0.1 and,
    for a ReLU head (CHiQPM), heatmaps scaled by each feature's typical strength."""
    if not model.is_qpm:
        return {}
    from openqpm.conformal import Calibration

    stored = json.loads(calibration_file.read_text(encoding="utf-8"))
    if not stored.get("available"):
        return {"hierarchy": True}
    calibration = Calibration.from_json_dict(stored["calibration"])

    def prediction_set(logits: np.ndarray, activations: np.ndarray) -> np.ndarray:
        sets = calibration.prediction_sets("hierarchical", logits[None], activations[None], 0.1)
        return sets[0]

    options: dict[str, Any] = {"hierarchy": True, "prediction_set_fn": prediction_set}
    if getattr(model.head, "relu", False) and stored.get("active_means") is not None:
        options["certainty_scale"] = np.asarray(stored["active_means"], dtype=np.float64)
    return options


# ----------------------------------------------------------------------------- baselines


def _pooled_train_features(ctx: StageContext, model: QPMModel) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features of the training images (test transform), a seeded sample beyond the cap."""
    from torch.utils.data import Subset

    from openqpm.features import extract_features
    from openqpm.training import make_loader

    dataset: Any = _datasets(ctx)["train_fit"]
    limit = ctx.config.sparsify.max_images
    if len(dataset) > limit:
        rng = np.random.default_rng(ctx.config.seed)
        dataset = Subset(dataset, np.sort(rng.choice(len(dataset), limit, replace=False)).tolist())
    loader = make_loader(
        dataset,
        batch_size=ctx.config.data.batch_size,
        train=False,
        seed=ctx.config.seed,
        num_workers=ctx.config.data.num_workers,
    )
    result = extract_features(model, loader, device=ctx.device, keep_pooled=True)
    assert result.pooled is not None and result.labels is not None
    return result.pooled, result.labels


def _sparse_model(ctx: StageContext, dense: QPMModel, layer: Any, *, train: str) -> QPMModel:
    """The dense backbone under a fitted sparse layer; ``train`` names what fine-tuning moves."""
    from openqpm.models import sparse_from_dense

    return sparse_from_dense(
        dense,
        layer.selected,
        layer.mean,
        layer.std,
        layer.weight,
        layer.bias,
        dropout=ctx.config.model.qpm_dropout,
        train_normalisation="normalisation" in train,
        train_weights="weights" in train,
        train_bias="bias" in train,
    ).to(ctx.device)


def _layer_summary(layer: Any) -> dict[str, Any]:
    nonzero = np.abs(layer.weight) > 0
    return {
        "n_features_used": int(np.sum(nonzero.any(axis=0))),
        "n_nonzero": int(np.sum(nonzero)),
        "lambda": layer.lam,
    }


def _fit_layer(
    ctx: StageContext, method: str, pooled: np.ndarray, labels: np.ndarray, **options: Any
) -> Any:
    from openqpm.sparsify.baselines import fit_sparse_layer

    return fit_sparse_layer(
        method,
        pooled,
        labels,
        n_per_class=ctx.config.solver.n_per_class,
        config=ctx.config.sparsify,
        **options,
    )


def _selected_from_dense(ctx: StageContext) -> tuple[QPMModel, np.ndarray, np.ndarray, np.ndarray]:
    """The dense model, its pooled training features and labels, and the selected channels."""
    from openqpm.sparsify.baselines import select_columns

    dense = _load_model(ctx, "dense.safetensors")
    pooled, labels = _pooled_train_features(ctx, dense)
    selected = select_columns(
        pooled,
        labels,
        n_classes=dense.n_classes,
        n_features=ctx.config.solver.n_features,
        config=ctx.config.sparsify,
    )
    return dense, pooled, labels, selected


def stage_glm_saga5(ctx: StageContext) -> dict[str, Any]:
    """glm-saga5: a sparse layer on all features of the dense model; no fine-tuning."""
    dense = _load_model(ctx, "dense.safetensors")
    pooled, labels = _pooled_train_features(ctx, dense)
    layer = _fit_layer(ctx, "glm-saga5", pooled, labels, selected=None, n_classes=dense.n_classes)
    model = _sparse_model(ctx, dense, layer, train="")
    return {**_layer_summary(layer), **_save_model(ctx, model)}


def stage_sldd(ctx: StageContext) -> dict[str, Any]:
    """SLDD-Model: select, fit the sparse layer, fine-tune with its sparsity pattern fixed."""
    dense, pooled, labels, selected = _selected_from_dense(ctx)
    layer = _fit_layer(ctx, "sldd", pooled, labels, selected=selected, n_classes=dense.n_classes)
    model = _sparse_model(ctx, dense, layer, train="normalisation weights bias")
    _train(ctx, model, _schedule(ctx, ctx.config.finetune))
    return {**_layer_summary(layer), **_save_model(ctx, model)}


def stage_qsenn(ctx: StageContext) -> dict[str, Any]:
    """Q-SENN: rounds of fit, ternary quantisation and fine-tuning on re-extracted features."""
    config, sparsify = ctx.config, ctx.config.sparsify
    model, pooled, labels, selected = _selected_from_dense(ctx)
    for round_index in range(sparsify.qsenn_rounds):
        if round_index > 0:
            pooled, labels = _pooled_train_features(ctx, model)
        layer = _fit_layer(
            ctx, "qsenn", pooled, labels, selected=selected, n_classes=model.n_classes
        )
        # the quantised layer is frozen; the normalisation is re-estimated and trained each round
        model = _sparse_model(ctx, model, layer, train="normalisation")
        last = round_index == sparsify.qsenn_rounds - 1
        schedule = _schedule(
            ctx,
            config.finetune,
            epochs=config.finetune.epochs if last else sparsify.qsenn_round_epochs,
            lr_backbone=config.finetune.lr_backbone * sparsify.qsenn_lr_decay**round_index,
        )
        _train(ctx, model, schedule, part=f"-round{round_index}")
    return {**_layer_summary(layer), **_save_model(ctx, model)}
