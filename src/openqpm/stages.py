"""The one table of stages: what each reads and writes, the config fields it depends on, its function.

Every fact about a stage is written once, in its :class:`Stage` entry of :data:`STAGES`;
the pipeline's loop, the stage hashes, the skip rule, the ``openqpm <stage>`` commands and their
help texts are derived from it. A stage's hash covers its own config fields and the hashes of the
stages it reads, so the hash graph and the dependency graph are one object.

Adding a stage means adding one function ``_stage_x(ctx) -> summary`` and one entry::

    Stage(
        name="x",
        description="what it does, in a few words",
        needs=("assignment",),           # stages whose outputs it reads
        writes=("x.json",),               # paths in the run directory
        fields=("solver.n_features",),    # config fields its result depends on
        run=_stage_x,
    )
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from openqpm._io import atomic_write_text, is_main_process, to_jsonable
from openqpm.config import (
    DenseConfig,
    FinetuneConfig,
    RunConfig,
    field_value,
    resolved_reduced_strides,
)

if TYPE_CHECKING:  # pragma: no cover - annotations only (these import torch)
    import torch

    from openqpm.data._base import ImageDataset
    from openqpm.features import FeaturePassProgress
    from openqpm.models.model import QPMModel
    from openqpm.solver.problem import SolverProgress
    from openqpm.training import TrainingProgress

__all__ = [
    "STAGES",
    "PipelineError",
    "Reporter",
    "Stage",
    "StageContext",
    "downstream_of",
    "get_stage",
    "stage_hash",
    "stage_names",
]

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

    def path(self, name: str) -> Path:
        """A path inside the run directory."""
        return self.run_dir / name


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
        name: the stage's name (also its ``openqpm`` subcommand where it has one).
        description: a few words, shown when it starts and in the command's help.
        needs: the stages whose outputs it reads; they must be current before it runs.
        writes: the paths it writes in the run directory; it is current only while they exist.
        fields: dotted config fields (or whole sections) its result depends on.
        run: the function that runs it and returns its summary.
        reads_images: it needs the data set (checked before any work starts).
        command: exposed as ``openqpm <name> --run-dir ...``.
    """

    name: str
    description: str
    needs: tuple[str, ...]
    writes: tuple[str, ...]
    fields: tuple[str, ...]
    run: Callable[[StageContext], dict[str, Any]]
    reads_images: bool = False
    command: bool = True


# ----------------------------------------------------------------------------- inputs


def _datasets(ctx: StageContext) -> dict[str, ImageDataset]:
    """The train split with train and test transforms, and the test split with test transforms."""
    if "datasets" in ctx.cache:
        return dict(ctx.cache["datasets"])
    from openqpm.data import build_transforms, create_dataset, resize_squashes

    data = ctx.config.data
    if not data.root:
        raise PipelineError("data.root is empty: pass --data-root PATH (the data set folder)")
    train = create_dataset(data.dataset, data.root, "train", crop=data.crop)
    train_eval = create_dataset(data.dataset, data.root, "train", crop=data.crop)
    test = create_dataset(data.dataset, data.root, "test", crop=data.crop)
    if train.n_classes != test.n_classes:
        raise PipelineError(
            f"{data.root}: the train split has {train.n_classes} classes, "
            f"the test split {test.n_classes}"
        )
    mean, std = train.mean_std
    squash = resize_squashes(data.dataset, bool(getattr(train, "crop", data.crop)))
    size = data.image_size_px
    train.transform = build_transforms(
        train=True, image_size_px=size, mean=mean, std=std, squash=squash, augment=data.augment
    )
    test_transform = build_transforms(
        train=False, image_size_px=size, mean=mean, std=std, squash=squash
    )
    train_eval.transform = test_transform
    test.transform = test_transform
    ctx.cache["datasets"] = {"train": train, "train_eval": train_eval, "test": test}
    return dict(ctx.cache["datasets"])


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


def _train_and_save(
    ctx: StageContext, model: QPMModel, values: DenseConfig | FinetuneConfig, stage: str
) -> dict[str, Any]:
    """Train ``model`` with the section's schedule (resumable), save it, report test accuracy."""
    from openqpm.training import TrainingSchedule, evaluate_accuracy, train_model

    config = ctx.config
    digest = stage_hash(config, stage)
    skip = isinstance(values, DenseConfig) and values.skip
    if values.epochs > 0 and not skip:
        schedule = TrainingSchedule(
            epochs=values.epochs,
            lr_backbone=values.lr_backbone,
            lr_head=values.lr_head,
            momentum=values.momentum,
            weight_decay=values.weight_decay,
            step_size_epochs=values.step_size_epochs,
            gamma=values.gamma,
            diversity_beta=_diversity_beta(config),
            amp=config.amp,
            seed=config.seed,
        )
        train_model(
            model,
            _loader(ctx, "train", train=True),
            schedule,
            device=ctx.device,
            # keyed by the stage hash: a checkpoint of another configuration is never resumed
            checkpoint_path=ctx.path("checkpoints") / f"{stage}-{digest}.safetensors",
            resume=ctx.resume,
            progress=lambda event: ctx.reporter.training_progress(stage, event),
        )
    accuracy = evaluate_accuracy(model, _loader(ctx, "test", train=False), device=ctx.device)
    if is_main_process():
        model.save(ctx.path(get_stage(stage).writes[0]), extra_metadata={"config_hash": digest})
    _barrier()
    return {"test_accuracy_percent": round(100.0 * accuracy, 2)}


def _stage_dense(ctx: StageContext) -> dict[str, Any]:
    from openqpm.models.build import dense_model_for

    config = ctx.config
    train = _datasets(ctx)["train"]
    model = dense_model_for(config.model, config.data, train)
    return _train_and_save(ctx, model.to(ctx.device), config.dense, "dense")


def _stage_finetune(ctx: StageContext) -> dict[str, Any]:
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
    )
    return _train_and_save(ctx, model.to(ctx.device), ctx.config.finetune, "finetune")


# ----------------------------------------------------------------------------- features, solver


def _stage_features(ctx: StageContext) -> dict[str, Any]:
    from openqpm.features import extract_features, save_feature_pass

    def progress(event: FeaturePassProgress) -> None:
        ctx.reporter.pass_progress("features", int(event.step), int(event.n_steps))

    result = extract_features(
        _load_model(ctx, "dense.safetensors"),
        _loader(ctx, "train_eval", train=False),
        device=ctx.device,
        keep_pooled=False,
        progress=progress,
    )
    if is_main_process():
        save_feature_pass(ctx.path("features"), result)
    _barrier()
    dead = int(np.sum(np.asarray(result.feature_stats.std) <= 0))
    return {"n_images": int(result.feature_stats.count), "n_constant_features": dead}


def _stage_problem(ctx: StageContext) -> dict[str, Any]:
    from openqpm.constants import build_problem
    from openqpm.features import load_feature_pass

    solver = ctx.config.solver
    feature_pass = load_feature_pass(ctx.path("features"))
    problem, report = build_problem(
        feature_pass.feature_stats,
        feature_pass.map_stats,
        n_features=solver.n_features,
        n_per_class=solver.n_per_class,
        bias=solver.bias,
        bias_strength=solver.bias_strength,
        r_scaling=solver.r_scaling,
    )
    if is_main_process():
        problem.save(ctx.path("problem.npz"))
        text = json.dumps(to_jsonable(report), indent=2, sort_keys=True)
        atomic_write_text(ctx.path("problem_report.json"), text)
    _barrier()
    return {"eps": to_jsonable(report.eps), "n_dead_features": len(report.dead_features)}


def _stage_assignment(ctx: StageContext) -> dict[str, Any]:
    from openqpm.solver import AssignmentProblem, solve
    from openqpm.solver.problem import Assignment

    config = ctx.config
    if is_main_process():
        assignment = solve(
            AssignmentProblem.load(ctx.path("problem.npz")),
            method=config.solver.method,
            time_limit_s=config.solver.time_limit_s,
            seed=config.seed,
            progress=ctx.reporter.solver_progress,
        )
        assignment.save(ctx.path("assignment.json"))
    _barrier()
    assignment = Assignment.load(ctx.path("assignment.json"))
    return {
        "objective": assignment.objective,
        "bound": assignment.bound,
        "gap": assignment.gap,
        "method": assignment.method,
        "time_s": round(float(assignment.time_s), 2),
    }


# ----------------------------------------------------------------------------- evaluation, report


def _stage_evaluate(ctx: StageContext) -> dict[str, Any]:
    from openqpm.metrics import evaluate_model, top_weight_baseline_accuracy

    config = ctx.config
    if is_main_process():
        # Metrics need every image in order: rank 0 evaluates alone, the others wait.
        datasets = _datasets(ctx)
        test_loader = _loader(ctx, "test", train=False, distributed=False)
        train_loader = _loader(ctx, "train_eval", train=False, distributed=False)
        results: dict[str, Any] = {}
        for name in ("dense", "qpm"):
            started = time.perf_counter()
            results[name] = evaluate_model(
                _load_model(ctx, f"{name}.safetensors"),
                test_loader,
                train_loader,
                device=ctx.device,
                class_attributes=datasets["test"].class_attributes,
                image_attributes=datasets["train_eval"].image_attributes,
                part_locations=datasets["test"].part_locations,
                seed=config.seed,
            )
            results[name]["evaluation_time_s"] = round(time.perf_counter() - started, 2)
        n_features, n_per_class = config.solver.n_features, config.solver.n_per_class
        accuracy = top_weight_baseline_accuracy(
            _load_model(ctx, "dense.safetensors"),
            test_loader,
            n_features=n_features,
            n_per_class=n_per_class,
            device=ctx.device,
        )
        results["baseline_top_weights"] = {
            "accuracy": round(100.0 * accuracy, 2),
            "description": (
                f"dense model, each class keeps its {n_per_class} largest weights on the "
                f"{n_features} features with the largest total |weight|, no fine-tuning"
            ),
        }
        text = json.dumps(to_jsonable(results), indent=2, sort_keys=True)
        atomic_write_text(ctx.path("metrics.json"), text)
    _barrier()
    results = json.loads(ctx.path("metrics.json").read_text(encoding="utf-8"))
    return {
        "dense_accuracy": results["dense"].get("accuracy"),
        "qpm_accuracy": results["qpm"].get("accuracy"),
        "baseline_accuracy": results["baseline_top_weights"]["accuracy"],
    }


def _stage_report(ctx: StageContext) -> dict[str, Any]:
    from openqpm.explain.report import write_report

    metrics = json.loads(ctx.path("metrics.json").read_text(encoding="utf-8"))
    if is_main_process():
        index = write_report(
            ctx.path("report"),
            model=_load_model(ctx, "qpm.safetensors"),
            dataset=_datasets(ctx)["test"],
            metrics=metrics.get("qpm"),
            dense_metrics=metrics.get("dense"),
            device=ctx.device,
            max_classes=ctx.config.report_max_classes,
        )
        _logger.info("report written to %s", index)
    _barrier()
    return {"index": str(ctx.path("report/index.html"))}


# ----------------------------------------------------------------------------- the table

# Fields that only change speed (num_workers, device, amp) are left out on purpose: changing them
# must not invalidate finished work.
STAGES: tuple[Stage, ...] = (
    Stage(
        name="dense",
        description="training the dense model with the feature diversity loss",
        needs=(),
        writes=("dense.safetensors",),
        fields=(
            "data.dataset",
            "data.root",
            "data.crop",
            "data.image_size_px",
            "data.augment",
            "data.batch_size",
            "model.arch",
            "model.weights",
            "model.reduced_strides",
            "model.dense_dropout",
            "model.diversity_beta",
            "dense",
            "seed",
        ),
        run=_stage_dense,
        reads_images=True,
    ),
    Stage(
        name="features",
        description="one pass of the dense model over the training images",
        needs=("dense",),
        writes=("features",),
        fields=(),
        run=_stage_features,
        reads_images=True,
    ),
    Stage(
        name="problem",
        description="computing A, R, b and eps from the feature statistics",
        needs=("features",),
        writes=("problem.npz",),
        fields=(
            "solver.n_features",
            "solver.n_per_class",
            "solver.bias",
            "solver.bias_strength",
            "solver.r_scaling",
        ),
        run=_stage_problem,
        command=False,
    ),
    Stage(
        name="assignment",
        description="solving the assignment problem",
        needs=("problem",),
        writes=("assignment.json",),
        fields=("solver.method", "solver.time_limit_s", "seed"),
        run=_stage_assignment,
        command=False,
    ),
    Stage(
        name="finetune",
        description="fine-tuning with the assignment fixed",
        needs=("dense", "features", "assignment"),
        writes=("qpm.safetensors",),
        fields=("model.qpm_dropout", "finetune"),
        run=_stage_finetune,
        reads_images=True,
    ),
    Stage(
        name="evaluate",
        description="evaluating the dense and the QPM model",
        needs=("dense", "finetune"),
        writes=("metrics.json",),
        fields=(),
        run=_stage_evaluate,
        reads_images=True,
    ),
    Stage(
        name="report",
        description="writing the HTML report",
        needs=("finetune", "evaluate"),
        writes=("report/index.html",),
        fields=("report_max_classes",),
        run=_stage_report,
        reads_images=True,
    ),
)

_BY_NAME = {stage.name: stage for stage in STAGES}


def stage_names() -> tuple[str, ...]:
    """The stages' names, in the order they run."""
    return tuple(_BY_NAME)


def get_stage(name: str) -> Stage:
    """The table entry of ``name``.

    Raises:
        PipelineError: no such stage; the message lists the valid names.
    """
    if name not in _BY_NAME:
        raise PipelineError(f"unknown stage {name!r}; stages: {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def downstream_of(name: str) -> tuple[str, ...]:
    """The stages made (directly or through others) from ``name``'s outputs, in run order."""
    made_from = {name}
    for stage in STAGES:
        if made_from & set(stage.needs):
            made_from.add(stage.name)
    return tuple(stage.name for stage in STAGES if stage.name in made_from - {name})


def stage_hash(config: RunConfig, name: str) -> str:
    """A short hash of every configuration field ``name`` depends on, through the stages it needs.

    Two configurations give the same hash for a stage exactly when that stage would compute the
    same result, so a finished stage is reused only when its hash matches.

    Raises:
        PipelineError: ``name`` is not a stage.
    """
    hashes: dict[str, str] = {}
    for stage in STAGES[: stage_names().index(get_stage(name).name) + 1]:
        parts: dict[str, Any] = {"stage": stage.name}
        parts.update({f"stage:{need}": hashes[need] for need in stage.needs})
        parts.update({item: field_value(config, item) for item in stage.fields})
        text = json.dumps(parts, sort_keys=True)
        hashes[stage.name] = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return hashes[name]


def run_stage(ctx: StageContext, stage: Stage) -> dict[str, Any]:
    """Run one stage and add its wall time to its summary."""
    ctx.reporter.stage_started(stage.name, stage.description)
    started = time.perf_counter()
    summary = stage.run(ctx)
    summary["time_s"] = round(time.perf_counter() - started, 2)
    return summary
