"""The one table of stages: what each reads and writes, the config fields it depends on, its function.

Every fact about a stage is written once, in its :class:`Stage` entry of :data:`STAGES`; the
pipeline's loop, the stage hashes, the skip rule, the ``openqpm <stage>`` commands and their help
texts are derived from it. A stage's hash covers its own config fields and the hashes of the
stages it reads, so the hash graph and the dependency graph are one object.

The sparsification methods (QPM and the paper's baselines) share the dense model and the stages
after it: each method's chain ends in a *model* stage, and ``evaluate`` and ``report`` run per
method on that model (``needs=("model", ...)``), each with its own outputs and its own record, so
a second method on a finished run costs only its own stages.

Adding a stage means adding one function ``stage_x(ctx) -> summary`` (in :mod:`openqpm._runs`)
and one entry::

    Stage(
        name="x",
        description="what it does, in a few words",
        needs=("assignment",),            # stages whose outputs it reads
        writes=("x.json",),               # paths in the run directory
        fields=("solver.n_features",),    # config fields its result depends on
        run=stage_x,
    )
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from openqpm import _runs
from openqpm._runs import METHOD_LABELS, PipelineError, Reporter, StageContext
from openqpm.config import RunConfig, field_value

__all__ = [
    "METHODS",
    "METHOD_LABELS",
    "STAGES",
    "PipelineError",
    "Reporter",
    "Stage",
    "StageContext",
    "downstream_of",
    "get_stage",
    "inputs_of",
    "model_stage",
    "needs_of",
    "outputs_of",
    "stage_hash",
    "stage_key",
    "stage_names",
    "stages_for",
]


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
        method: the sparsification method whose chain it belongs to (None: every method's).
        model: it writes its method's final model (what ``evaluate`` and ``report`` read).
        per_method: it runs once per method (``evaluate``, ``report``): ``needs`` may name
            ``"model"`` (the method's model stage), ``{suffix}`` in ``writes`` is ``""`` for QPM
            and ``"_<method>"`` otherwise, and its record in ``stages.json`` is per method.
        shared_with: other methods whose chain also runs it (one result for all of them).
    """

    name: str
    description: str
    needs: tuple[str, ...]
    writes: tuple[str, ...]
    fields: tuple[str, ...]
    run: Callable[[StageContext], dict[str, Any]]
    reads_images: bool = False
    command: bool = True
    method: str | None = None
    model: bool = False
    per_method: bool = False
    shared_with: tuple[str, ...] = ()


# The fields of the glm path fits the three baselines share.
_GLM_FIELDS = (
    "sparsify.max_images",
    "sparsify.fit_alpha",
    "sparsify.n_lambdas",
    "sparsify.lambda_min_ratio",
    "solver.n_per_class",
    "seed",
)
_SELECTION_FIELDS = ("sparsify.selection_alpha", "solver.n_features")
_FINETUNE_FIELDS = ("model.qpm_dropout", "finetune")

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
            "data.calibration_fraction",  # the held-out images train nothing
            "data.calibration_seed",
            "model.arch",
            "model.weights",
            "model.reduced_strides",
            "model.dense_dropout",
            "model.diversity_beta",
            "dense",
            "seed",
        ),
        run=_runs.stage_dense,
        reads_images=True,
    ),
    Stage(
        name="features",
        description="one pass of the dense model over the training images",
        needs=("dense",),
        writes=("features",),
        fields=(),
        run=_runs.stage_features,
        reads_images=True,
        method="qpm",
        shared_with=("chiqpm",),
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
            "solver.use_similarity",
            "solver.class_measure",
            "sparsify.max_images",  # the images AUROC reads (class_measure: auroc)
        ),
        run=_runs.stage_problem,
        command=False,
        method="qpm",
        shared_with=("chiqpm",),
    ),
    Stage(
        name="assignment",
        description="solving the assignment problem",
        needs=("problem",),
        writes=("assignment.json",),
        fields=("solver.method", "solver.time_limit_s", "seed"),
        run=_runs.stage_assignment,
        command=False,
        method="qpm",
    ),
    Stage(
        name="finetune",
        description="fine-tuning with the assignment fixed",
        needs=("dense", "features", "assignment"),
        writes=("qpm.safetensors",),
        fields=_FINETUNE_FIELDS,
        run=_runs.stage_finetune,
        reads_images=True,
        method="qpm",
        model=True,
    ),
    Stage(
        name="chiqpm-assignment",
        description="solving the assignment problem with CHiQPM's near-equal class pairs",
        needs=("dense", "problem"),
        writes=("assignment_chiqpm.json",),
        fields=("solver.method", "solver.time_limit_s", "sparsify.chiqpm_rho", "seed"),
        run=_runs.stage_chiqpm_assignment,
        command=False,
        method="chiqpm",
    ),
    Stage(
        name="chiqpm",
        description="CHiQPM: fine-tuning with ReLU features and the feature grounding loss",
        needs=("dense", "features", "chiqpm-assignment"),
        writes=("chiqpm.safetensors",),
        fields=(
            *_FINETUNE_FIELDS,
            "sparsify.chiqpm_grounding_weight",
            "sparsify.chiqpm_grounding_epochs",
            "sparsify.chiqpm_remaining_factor",
        ),
        run=_runs.stage_chiqpm,
        reads_images=True,
        method="chiqpm",
        model=True,
    ),
    Stage(
        name="glm-saga5",
        description="fitting glm-saga5: a sparse layer on all features, no fine-tuning",
        needs=("dense",),
        writes=("glm-saga5.safetensors",),
        fields=(*_GLM_FIELDS, "model.qpm_dropout"),
        run=_runs.stage_glm_saga5,
        reads_images=True,
        method="glm-saga5",
        model=True,
    ),
    Stage(
        name="sldd",
        description="SLDD-Model: selecting features, fitting the sparse layer, fine-tuning",
        needs=("dense",),
        writes=("sldd.safetensors",),
        fields=(*_GLM_FIELDS, *_SELECTION_FIELDS, *_FINETUNE_FIELDS),
        run=_runs.stage_sldd,
        reads_images=True,
        method="sldd",
        model=True,
    ),
    Stage(
        name="qsenn",
        description="Q-SENN: selecting features, rounds of fit, quantisation and fine-tuning",
        needs=("dense",),
        writes=("qsenn.safetensors",),
        fields=(
            *_GLM_FIELDS,
            *_SELECTION_FIELDS,
            *_FINETUNE_FIELDS,
            "sparsify.qsenn_rounds",
            "sparsify.qsenn_round_epochs",
            "sparsify.qsenn_lr_decay",
        ),
        run=_runs.stage_qsenn,
        reads_images=True,
        method="qsenn",
        model=True,
    ),
    Stage(
        name="evaluate",
        description="evaluating the dense model and the sparse model",
        needs=("dense", "model"),
        writes=("metrics{suffix}.json", "calibration{suffix}.json"),
        fields=(),
        run=_runs.stage_evaluate,
        reads_images=True,
        per_method=True,
    ),
    Stage(
        name="report",
        description="writing the HTML report",
        needs=("model", "evaluate"),
        writes=("report{suffix}/index.html",),
        fields=("report_max_classes",),
        run=_runs.stage_report,
        reads_images=True,
        per_method=True,
    ),
)

_BY_NAME = {stage.name: stage for stage in STAGES}

# the sparsification methods, each named by its model stage's `method`
METHODS: tuple[str, ...] = tuple(stage.method for stage in STAGES if stage.model and stage.method)


def stage_names() -> tuple[str, ...]:
    """Every stage's name, in the order they run."""
    return tuple(_BY_NAME)


def get_stage(name: str) -> Stage:
    """The table entry of ``name``.

    Raises:
        PipelineError: no such stage; the message lists the valid names.
    """
    if name not in _BY_NAME:
        raise PipelineError(f"unknown stage {name!r}; stages: {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def _method(config: RunConfig) -> str:
    method = config.sparsify.method
    if method not in METHODS:
        raise PipelineError(f"sparsify.method={method!r} is not valid; choose {', '.join(METHODS)}")
    return method


def model_stage(method: str) -> Stage:
    """The stage that writes ``method``'s final model."""
    for stage in STAGES:
        if stage.model and stage.method == method:
            return stage
    raise PipelineError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")


def stages_for(config: RunConfig) -> tuple[str, ...]:
    """The stages of a full run of the configuration's method, in run order."""
    method = _method(config)
    return tuple(s.name for s in STAGES if s.method in (None, method) or method in s.shared_with)


def _resolved_needs(stage: Stage, config: RunConfig) -> dict[str, str]:
    """``{need as written: stage name}``; ``"model"`` is the method's model stage."""
    model = model_stage(_method(config)).name
    return {need: model if need == "model" else need for need in stage.needs}


def needs_of(name: str, config: RunConfig) -> tuple[str, ...]:
    """The stages ``name`` reads, for this configuration's method."""
    return tuple(_resolved_needs(get_stage(name), config).values())


def _suffix(stage: Stage, config: RunConfig) -> str:
    method = _method(config)
    return "" if not stage.per_method or method == "qpm" else f"_{method}"


def stage_key(name: str, config: RunConfig) -> str:
    """The stage's key in ``stages.json``: per-method stages get one record per method."""
    stage = get_stage(name)
    suffix = _suffix(stage, config)
    return f"{name}@{suffix[1:]}" if suffix else name


def outputs_of(name: str, config: RunConfig) -> tuple[str, ...]:
    """The paths ``name`` writes for this configuration's method."""
    stage = get_stage(name)
    suffix = _suffix(stage, config)
    return tuple(path.format(suffix=suffix) for path in stage.writes)


def inputs_of(name: str, config: RunConfig) -> dict[str, tuple[str, ...]]:
    """The paths ``name`` reads, by the need its entry names."""
    needs = _resolved_needs(get_stage(name), config)
    return {need: outputs_of(resolved, config) for need, resolved in needs.items()}


def downstream_of(name: str, config: RunConfig) -> tuple[str, ...]:
    """The stages made (directly or through others) from ``name``'s outputs, in run order."""
    made_from = {name}
    for stage in STAGES:
        if made_from & set(_resolved_needs(stage, config).values()):
            made_from.add(stage.name)
    return tuple(stage.name for stage in STAGES if stage.name in made_from - {name})


def stage_hash(config: RunConfig, name: str) -> str:
    """A short hash of every configuration field ``name`` depends on, through the stages it needs.

    Two configurations give the same hash for a stage exactly when that stage would compute the
    same result, so a finished stage is reused only when its hash matches.

    Raises:
        PipelineError: ``name`` is not a stage.
    """
    stage = get_stage(name)
    parts: dict[str, Any] = {"stage": stage.name}
    for need in _resolved_needs(stage, config).values():
        parts[f"stage:{need}"] = stage_hash(config, need)
    parts.update({item: field_value(config, item) for item in stage.fields})
    if stage.per_method:
        parts["sparsify.method"] = config.sparsify.method
    text = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def run_stage(ctx: StageContext, name: str) -> dict[str, Any]:
    """Run one stage with its paths and hash in the context; add its wall time to the summary."""
    stage = get_stage(name)
    config = ctx.config
    ctx = replace(
        ctx,
        stage=name,
        digest=stage_hash(config, name),
        outputs=outputs_of(name, config),
        inputs=inputs_of(name, config),
    )
    ctx.reporter.stage_started(name, stage.description)
    started = time.perf_counter()
    summary = stage.run(ctx)
    summary["time_s"] = round(time.perf_counter() - started, 2)
    return summary
