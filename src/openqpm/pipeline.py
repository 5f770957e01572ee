"""The QPM stages over a run directory, each artifact keyed by the configuration that made it.

Stages, in order (see ``docs/internals.md`` and ``DESIGN.md``):

========== ================================ =====================================================
stage      writes                           from
========== ================================ =====================================================
dense      ``dense.safetensors``            images; the dense model trained with the diversity loss
features   ``features/``                    one pass of the dense model over the training images
problem    ``problem.npz``                  A, R, b and eps from the feature statistics
assignment ``assignment.json``              the solver
finetune   ``qpm.safetensors``              the dense backbone fine-tuned with the assignment fixed
evaluate   ``metrics.json``                 both models on the test split
report     ``report/index.html``            explanations of the QPM
========== ================================ =====================================================

``stages.json`` records, for every finished stage, the hash of the configuration fields it depends
on (:func:`openqpm.config.stage_hash`, upstream stages included). A stage is reused only when that
hash matches and its files exist; otherwise it and everything after it is recomputed. Interrupted
training resumes from its last epoch checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from openqpm.config import (
    ConfigError,
    DenseConfig,
    FinetuneConfig,
    RunConfig,
    atomic_write_text,
    config_to_dict,
    resolved_reduced_strides,
    save_config,
    stage_hash,
)

_logger = logging.getLogger(__name__)

STAGES: tuple[str, ...] = (
    "dense",
    "features",
    "problem",
    "assignment",
    "finetune",
    "evaluate",
    "report",
)

_STAGE_FILES: dict[str, tuple[str, ...]] = {
    "dense": ("dense.safetensors",),
    "features": ("features",),
    "problem": ("problem.npz",),
    "assignment": ("assignment.json",),
    "finetune": ("qpm.safetensors",),
    "evaluate": ("metrics.json",),
    "report": ("report/index.html",),
}


class PipelineError(RuntimeError):
    """A stage cannot run: its input is missing or invalid. The message says which and why."""


class Reporter(Protocol):
    """What the pipeline tells its caller (the CLI draws progress bars from it)."""

    def stage_started(self, stage: str, description: str) -> None: ...

    def stage_skipped(self, stage: str, reason: str) -> None: ...

    def stage_finished(self, stage: str, summary: dict[str, Any]) -> None: ...

    def training_progress(self, stage: str, event: Any) -> None: ...

    def solver_progress(self, event: Any) -> None: ...

    def pass_progress(self, stage: str, done: int, total: int) -> None: ...


class _SilentReporter:
    def stage_started(self, stage: str, description: str) -> None:
        _logger.info("stage %s: %s", stage, description)

    def stage_skipped(self, stage: str, reason: str) -> None:
        _logger.info("stage %s skipped: %s", stage, reason)

    def stage_finished(self, stage: str, summary: dict[str, Any]) -> None:
        _logger.info("stage %s finished: %s", stage, summary)

    def training_progress(self, stage: str, event: Any) -> None:
        pass

    def solver_progress(self, event: Any) -> None:
        pass

    def pass_progress(self, stage: str, done: int, total: int) -> None:
        pass


@dataclass
class _Context:
    """Objects shared by the stages of one pipeline call (built lazily)."""

    config: RunConfig
    run_dir: Path
    device: Any
    reporter: Reporter
    resume: bool
    cache: dict[str, Any] = field(default_factory=dict)


def read_stage_state(run_dir: str | Path) -> dict[str, Any]:
    """The recorded hashes and summaries of the finished stages (empty for a new run)."""
    path = Path(run_dir) / "stages.json"
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PipelineError(f"{path} is not valid JSON ({error}); delete it to recompute") from None
    if not isinstance(state, dict):
        raise PipelineError(f"{path}: expected a JSON object")
    return state


def _write_stage_state(run_dir: Path, state: dict[str, Any]) -> None:
    atomic_write_text(run_dir / "stages.json", json.dumps(state, indent=2, sort_keys=True))


def stage_is_current(config: RunConfig, run_dir: str | Path, stage: str) -> bool:
    """True when ``stage`` finished with the same configuration hash and its files still exist."""
    run_dir = Path(run_dir)
    entry = read_stage_state(run_dir).get(stage)
    if not isinstance(entry, dict) or entry.get("hash") != stage_hash(config, stage):
        return False
    return all((run_dir / name).exists() for name in _STAGE_FILES[stage])


# ----------------------------------------------------------------------------- inputs


def _is_main_process() -> bool:
    from openqpm import distributed

    return distributed.rank() == 0


def _barrier() -> None:
    from openqpm import distributed

    if distributed.is_distributed():
        import torch.distributed as dist

        dist.barrier()


def _datasets(ctx: _Context) -> dict[str, Any]:
    """The train split with train and test transforms, and the test split with test transforms."""
    if "datasets" in ctx.cache:
        return ctx.cache["datasets"]
    from openqpm.data import build_transforms, create_dataset

    data = ctx.config.data
    if not data.root:
        raise PipelineError("data.root is empty: pass --data-root PATH (the data set folder)")
    train = create_dataset(data.dataset, data.root, "train", crop=data.crop)
    train_eval = create_dataset(data.dataset, data.root, "train", crop=data.crop)
    test = create_dataset(data.dataset, data.root, "test", crop=data.crop)
    mean, std = train.mean_std
    # Cropped CUB-layout images are squashed to a square as the reference code does.
    squash = bool(getattr(train, "crop", data.crop)) and data.dataset in {
        "cub",
        "travelingbirds",
        "synthetic",
    }
    train.transform = build_transforms(
        train=True,
        image_size_px=data.image_size_px,
        mean=mean,
        std=std,
        squash=squash,
        augment=data.augment,
    )
    test_transform = build_transforms(
        train=False, image_size_px=data.image_size_px, mean=mean, std=std, squash=squash
    )
    train_eval.transform = test_transform
    test.transform = test_transform
    if train.n_classes != test.n_classes:
        raise PipelineError(
            f"{data.root}: the train split has {train.n_classes} classes, "
            f"the test split {test.n_classes}"
        )
    ctx.cache["datasets"] = {"train": train, "train_eval": train_eval, "test": test}
    return ctx.cache["datasets"]


def _loader(ctx: _Context, split: str, *, train: bool, distributed: bool | None = None) -> Any:
    from openqpm.training import make_loader

    return make_loader(
        _datasets(ctx)[split],
        batch_size=ctx.config.data.batch_size,
        train=train,
        seed=ctx.config.seed,
        num_workers=ctx.config.data.num_workers,
        distributed=distributed,
    )


def check_inputs(config: RunConfig) -> None:
    """Everything that can be checked before hours of training, with a clear error each.

    Raises:
        PipelineError: the data set folder is unusable, the backbone is unknown, the image size is
            one the backbone cannot take, or more features are requested than the backbone has.
    """
    from openqpm.data import check_dataset
    from openqpm.models import backbone_names, create_backbone

    data = config.data
    if not data.root:
        raise PipelineError("data.root is empty: pass --data-root PATH (the data set folder)")
    if not Path(data.root).exists():
        raise PipelineError(f"data set folder {data.root} does not exist")
    # A decoded sample is enough here: `openqpm data check` does the full pass on request.
    problems = check_dataset(data.root, data.dataset, image_check="sample")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise PipelineError(
            f"data set {data.root} ({data.dataset}) is not usable:\n  {shown}{more}"
        )
    if config.model.arch not in backbone_names() and not config.model.arch.startswith("timm:"):
        raise PipelineError(
            f"unknown backbone {config.model.arch!r}; valid: {', '.join(backbone_names())}"
        )
    try:
        backbone = create_backbone(
            config.model.arch, reduced_strides=resolved_reduced_strides(config.model)
        )
    except (KeyError, ValueError, ImportError) as error:
        raise PipelineError(str(error)) from None
    check_size = getattr(backbone, "check_image_size", None)
    if callable(check_size):
        try:
            check_size(data.image_size_px)
        except ValueError as error:
            raise PipelineError(f"data.image_size_px={data.image_size_px}: {error}") from None
    elif data.image_size_px < getattr(backbone, "min_image_size_px", 0):
        raise PipelineError(
            f"data.image_size_px={data.image_size_px} is below the smallest input "
            f"{backbone.min_image_size_px} px that {config.model.arch} can take"
        )
    n_f = int(backbone.n_features)
    if config.solver.n_features > n_f:
        raise PipelineError(
            f"solver.n_features={config.solver.n_features} is larger than the "
            f"{n_f} features of {config.model.arch}"
        )
    if config.model.weights and not Path(config.model.weights).is_file():
        raise PipelineError(f"model.weights: file {config.model.weights} does not exist")


# ----------------------------------------------------------------------------- stages


def _beta(config: RunConfig) -> float:
    from openqpm.losses import DIVERSITY_BETA, default_diversity_beta
    from openqpm.models import create_backbone

    if config.model.diversity_beta is not None:
        return config.model.diversity_beta
    if config.model.arch in DIVERSITY_BETA:
        return float(DIVERSITY_BETA[config.model.arch])
    # No tabulated value (timm models): scale the ResNet value to this backbone's map size.
    backbone = create_backbone(
        config.model.arch, reduced_strides=resolved_reduced_strides(config.model)
    )
    height, width = backbone.feature_map_size(config.data.image_size_px)
    return float(default_diversity_beta(config.model.arch, map_height=height, map_width=width))


def _new_dense_model(ctx: _Context) -> Any:
    from openqpm.models import DenseHead, QPMModel, create_backbone

    config = ctx.config
    datasets = _datasets(ctx)
    train = datasets["train"]
    backbone = create_backbone(
        config.model.arch,
        weights_path=config.model.weights,
        reduced_strides=resolved_reduced_strides(config.model),
    )
    head = DenseHead(backbone.n_features, train.n_classes, dropout=config.model.dense_dropout)
    mean, std = train.mean_std
    metadata = {
        "dataset": config.data.dataset,
        "image_size_px": config.data.image_size_px,
        "crop": config.data.crop,
        "data_mean": list(mean),
        "data_std": list(std),
    }
    return QPMModel(backbone, head, class_names=list(train.class_names), metadata=metadata)


def _load_model(path: Path, device: Any) -> Any:
    from openqpm.models import load

    if not path.is_file():
        raise PipelineError(f"{path} is missing: run the stage that writes it first")
    return load(path).to(device)


def _training_callback(ctx: _Context, stage: str) -> Callable[[Any], None]:
    def callback(event: Any) -> None:
        ctx.reporter.training_progress(stage, event)

    return callback


def _train_and_save(
    ctx: _Context, model: Any, schedule: DenseConfig | FinetuneConfig, stage: str, file: str
) -> dict[str, Any]:
    """Train ``model`` with ``schedule`` (resumable), save it as ``file``, report test accuracy."""
    from openqpm.training import evaluate_accuracy, train_model

    config = ctx.config
    digest = stage_hash(config, stage)
    if schedule.epochs > 0 and not (isinstance(schedule, DenseConfig) and schedule.skip):
        train_model(
            model,
            _loader(ctx, "train", train=True),
            epochs=schedule.epochs,
            lr_backbone=schedule.lr_backbone,
            lr_head=schedule.lr_head,
            momentum=schedule.momentum,
            weight_decay=schedule.weight_decay,
            step_size_epochs=schedule.step_size_epochs,
            gamma=schedule.gamma,
            diversity_beta=_beta(config),
            device=ctx.device,
            # keyed by the stage hash: a checkpoint of another configuration is never resumed
            checkpoint_path=ctx.run_dir / "checkpoints" / f"{stage}-{digest}.safetensors",
            resume=ctx.resume,
            amp=config.amp,
            progress=_training_callback(ctx, stage),
            seed=config.seed,
        )
    accuracy = evaluate_accuracy(model, _loader(ctx, "test", train=False), device=ctx.device)
    if _is_main_process():
        model.save(ctx.run_dir / file, extra_metadata={"config_hash": digest})
    _barrier()
    return {"test_accuracy_percent": round(100.0 * accuracy, 2)}


def _stage_dense(ctx: _Context) -> dict[str, Any]:
    model = _new_dense_model(ctx).to(ctx.device)
    return _train_and_save(ctx, model, ctx.config.dense, "dense", "dense.safetensors")


def _stage_features(ctx: _Context) -> dict[str, Any]:
    from openqpm.features import extract_features, save_feature_pass

    model = _load_model(ctx.run_dir / "dense.safetensors", ctx.device)
    loader = _loader(ctx, "train_eval", train=False)

    def progress(event: Any) -> None:
        ctx.reporter.pass_progress("features", int(event.step), int(event.n_steps))

    result = extract_features(
        model, loader, device=ctx.device, keep_pooled=False, progress=progress
    )
    if _is_main_process():
        save_feature_pass(ctx.run_dir / "features", result)
    _barrier()
    dead = int(np.sum(np.asarray(result.feature_stats.std) <= 0))
    return {"n_images": int(result.feature_stats.count), "n_constant_features": dead}


def _stage_problem(ctx: _Context) -> dict[str, Any]:
    from openqpm.constants import build_problem
    from openqpm.features import load_feature_pass

    config = ctx.config
    fp = load_feature_pass(ctx.run_dir / "features")
    problem, report = build_problem(
        fp.feature_stats,
        fp.map_stats,
        n_features=config.solver.n_features,
        n_per_class=config.solver.n_per_class,
        bias=config.solver.bias,
        bias_strength=config.solver.bias_strength,
        r_scaling=config.solver.r_scaling,
    )
    if _is_main_process():
        problem.save(ctx.run_dir / "problem.npz")
        atomic_write_text(
            ctx.run_dir / "problem_report.json",
            json.dumps(_jsonable(report), indent=2, sort_keys=True),
        )
    _barrier()
    summary: dict[str, Any] = {"eps": _jsonable(getattr(report, "eps", None))}
    dead = getattr(report, "dead_features", None)
    if dead is not None:
        summary["n_dead_features"] = len(dead)
    return summary


def _stage_assignment(ctx: _Context) -> dict[str, Any]:
    from openqpm.solver import AssignmentProblem, solve
    from openqpm.solver.problem import Assignment

    config = ctx.config
    path = ctx.run_dir / "assignment.json"
    if _is_main_process():
        problem = AssignmentProblem.load(ctx.run_dir / "problem.npz")
        assignment = solve(
            problem,
            method=config.solver.method,
            time_limit_s=config.solver.time_limit_s,
            seed=config.seed,
            progress=ctx.reporter.solver_progress,
        )
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


def _stage_finetune(ctx: _Context) -> dict[str, Any]:
    from openqpm.features import load_feature_pass
    from openqpm.solver.problem import Assignment

    config = ctx.config
    model = _load_model(ctx.run_dir / "dense.safetensors", ctx.device)
    assignment = Assignment.load(ctx.run_dir / "assignment.json")
    stats = load_feature_pass(ctx.run_dir / "features").feature_stats
    selected = np.asarray(assignment.selected_features, dtype=np.int64)
    # the QPM head's fixed normalisation: training-set statistics of the selected features
    mean = np.asarray(stats.mean, dtype=np.float64)[selected]
    std = np.asarray(stats.std, dtype=np.float64)[selected]
    model = model.to_qpm(
        selected, mean, std, assignment.class_feature_matrix(), dropout=config.model.qpm_dropout
    ).to(ctx.device)
    return _train_and_save(ctx, model, config.finetune, "finetune", "qpm.safetensors")


def _stage_evaluate(ctx: _Context) -> dict[str, Any]:
    from openqpm.metrics import evaluate_model

    config = ctx.config
    datasets = _datasets(ctx)
    if not _is_main_process():
        # Metrics need every image in order: rank 0 evaluates alone, the others wait.
        _barrier()
        return {}
    test_loader = _loader(ctx, "test", train=False, distributed=False)
    train_loader = _loader(ctx, "train_eval", train=False, distributed=False)
    results: dict[str, Any] = {}
    for name, file in (("dense", "dense.safetensors"), ("qpm", "qpm.safetensors")):
        model = _load_model(ctx.run_dir / file, ctx.device)
        started = time.perf_counter()
        results[name] = evaluate_model(
            model,
            test_loader,
            train_loader,
            device=ctx.device,
            class_attributes=datasets["test"].class_attributes,
            image_attributes=datasets["train_eval"].image_attributes,
            part_locations=datasets["test"].part_locations,
            seed=config.seed,
        )
        results[name]["evaluation_time_s"] = round(time.perf_counter() - started, 2)
    dense_model = _load_model(ctx.run_dir / "dense.safetensors", ctx.device)
    results["baseline_top_weights"] = {
        "accuracy": round(
            100.0
            * top_weight_baseline_accuracy(
                dense_model,
                test_loader,
                n_features=config.solver.n_features,
                n_per_class=config.solver.n_per_class,
                device=ctx.device,
            ),
            2,
        ),
        "description": (
            f"dense model, each class keeps its {config.solver.n_per_class} largest weights on "
            f"the {config.solver.n_features} features with the largest total |weight|, no "
            "fine-tuning"
        ),
    }
    atomic_write_text(
        ctx.run_dir / "metrics.json", json.dumps(_jsonable(results), indent=2, sort_keys=True)
    )
    _barrier()
    return {
        "dense_accuracy": results["dense"].get("accuracy"),
        "qpm_accuracy": results["qpm"].get("accuracy"),
        "baseline_accuracy": results["baseline_top_weights"]["accuracy"],
    }


def _stage_report(ctx: _Context) -> dict[str, Any]:
    from openqpm.explain.report import write_report

    metrics_path = ctx.run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    if _is_main_process():
        model = _load_model(ctx.run_dir / "qpm.safetensors", ctx.device)
        index = write_report(
            ctx.run_dir / "report",
            model=model,
            dataset=_datasets(ctx)["test"],
            metrics=metrics.get("qpm"),
            dense_metrics=metrics.get("dense"),
            device=ctx.device,
            max_classes=ctx.config.report_max_classes,
        )
        _logger.info("report written to %s", index)
    _barrier()
    return {"index": str(ctx.run_dir / "report" / "index.html")}


_STAGE_FUNCTIONS: dict[str, Callable[[_Context], dict[str, Any]]] = {
    "dense": _stage_dense,
    "features": _stage_features,
    "problem": _stage_problem,
    "assignment": _stage_assignment,
    "finetune": _stage_finetune,
    "evaluate": _stage_evaluate,
    "report": _stage_report,
}

_DESCRIPTIONS = {
    "dense": "training the dense model with the feature diversity loss",
    "features": "one pass of the dense model over the training images",
    "problem": "computing A, R, b and eps",
    "assignment": "solving the assignment problem",
    "finetune": "fine-tuning with the assignment fixed",
    "evaluate": "evaluating the dense and the QPM model",
    "report": "writing the HTML report",
}


def top_weight_baseline_accuracy(
    model: Any, loader: Any, *, n_features: int, n_per_class: int, device: Any
) -> float:
    """Accuracy of the dense model pruned to the QPM's size without any optimisation.

    The ``n_features`` features with the largest total absolute dense weight are kept, and each
    class keeps its ``n_per_class`` largest weights on them (values and bias unchanged). This is
    the naive baseline a QPM of the same size must beat.
    """
    import torch

    weight = model.class_weights().to(device)  # (n_c, n_f)
    keep_features = torch.topk(weight.abs().sum(dim=0), n_features).indices
    pruned = torch.zeros_like(weight)
    sub = weight[:, keep_features]  # (n_c, n_features)
    top = torch.topk(sub, n_per_class, dim=1).indices  # (n_c, n_per_class)
    rows = torch.arange(weight.shape[0], device=device)[:, None]
    pruned[rows, keep_features[top]] = sub[rows, top]
    bias = getattr(getattr(model.head, "linear", None), "bias", None)
    correct = 0
    total = 0
    model.eval()
    with torch.no_grad():
        for images, labels in loader:
            images = images.to(device)
            labels = labels.to(device)
            pooled = model.forward_features(images).mean(dim=(2, 3))  # (B, n_f)
            logits = pooled @ pruned.T
            if bias is not None:
                logits = logits + bias
            correct += int((logits.argmax(dim=1) == labels).sum())
            total += int(labels.numel())
    return correct / max(total, 1)


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays and dataclasses to JSON-friendly values."""
    if hasattr(value, "__dataclass_fields__"):
        return {k: _jsonable(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def run_pipeline(
    config: RunConfig,
    run_dir: str | Path,
    *,
    device: Any,
    stages: Sequence[str] = STAGES,
    resume: bool = True,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Run the requested stages over ``run_dir``, reusing every stage whose inputs are unchanged.

    Args:
        config: the resolved run configuration (saved as ``config.yaml``).
        run_dir: the run directory; created if missing.
        device: a ``torch.device`` (the CLI picks it).
        stages: which stages to run, a subset of :data:`STAGES`; earlier stages they need must
            already be current in ``run_dir``.
        resume: continue interrupted training from its last checkpoint.
        reporter: receives progress; default logs only.

    Returns:
        ``{stage: summary}`` for every requested stage (reused ones included).

    Raises:
        PipelineError: an input is missing or invalid; the message names it.
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise PipelineError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = _Context(
        config=config,
        run_dir=run_dir,
        device=device,
        reporter=reporter if reporter is not None else _SilentReporter(),
        resume=resume,
    )
    if "dense" in stages or "features" in stages or "finetune" in stages:
        check_inputs(config)
    if _is_main_process():
        save_config(config, run_dir / "config.yaml")
    summaries: dict[str, Any] = {}
    ordered = [s for s in STAGES if s in stages]
    recompute_rest = False
    for stage in ordered:
        state = read_stage_state(run_dir)
        if not recompute_rest and stage_is_current(config, run_dir, stage):
            summaries[stage] = state[stage].get("summary", {})
            ctx.reporter.stage_skipped(stage, "up to date (same configuration hash)")
            continue
        # A stage whose upstream is not current cannot run: say which one is needed.
        index = STAGES.index(stage)
        for upstream in STAGES[:index]:
            if upstream in ordered:
                continue
            if stage == "report" and upstream == "evaluate":
                continue
            if not stage_is_current(config, run_dir, upstream) and _needs(stage, upstream):
                raise PipelineError(
                    f"stage {stage} needs stage {upstream}, which is missing or was made with "
                    f"another configuration in {run_dir}; run `openqpm train` or that stage first"
                )
        ctx.reporter.stage_started(stage, _DESCRIPTIONS[stage])
        started = time.perf_counter()
        summary = _STAGE_FUNCTIONS[stage](ctx)
        summary["time_s"] = round(time.perf_counter() - started, 2)
        summaries[stage] = summary
        if _is_main_process():
            state = read_stage_state(run_dir)
            state[stage] = {
                "hash": stage_hash(config, stage),
                "summary": _jsonable(summary),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            # Everything downstream was made from the old result: forget it.
            for later in STAGES[index + 1 :]:
                state.pop(later, None)
            _write_stage_state(run_dir, state)
        _barrier()
        recompute_rest = True
        ctx.reporter.stage_finished(stage, summary)
    return summaries


_NEEDS: dict[str, tuple[str, ...]] = {
    "dense": (),
    "features": ("dense",),
    "problem": ("features",),
    "assignment": ("problem",),
    "finetune": ("dense", "features", "assignment"),
    "evaluate": ("dense", "finetune"),
    "report": ("finetune",),
}


def _needs(stage: str, upstream: str) -> bool:
    return upstream in _NEEDS[stage]


def resolved_config_dict(config: RunConfig) -> dict[str, Any]:
    """The configuration as plain data, with each stage's hash (for summaries and tests)."""
    data = config_to_dict(config)
    data["stage_hashes"] = {stage: stage_hash(config, stage) for stage in STAGES}
    return data


__all__ = [
    "STAGES",
    "ConfigError",
    "PipelineError",
    "Reporter",
    "check_inputs",
    "read_stage_state",
    "run_pipeline",
    "stage_is_current",
    "top_weight_baseline_accuracy",
]
