"""Runs the stage table over a run directory; each artifact is keyed by the config that made it.

The stages and every fact about them live in :mod:`openqpm.stages`. ``stages.json`` records, for
every finished stage, the hash of the configuration fields it depends on
(:func:`openqpm.stages.stage_hash`, upstream stages included). A stage is reused only when that
hash matches and its files exist; otherwise it and everything made from it is recomputed.
Interrupted training resumes from its last epoch checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openqpm import distributed
from openqpm._io import atomic_write_text, is_main_process, to_jsonable
from openqpm.config import RunConfig, field_value, resolved_reduced_strides, save_config
from openqpm.stages import (
    METHODS,
    STAGES,
    PipelineError,
    Reporter,
    StageContext,
    downstream_of,
    get_stage,
    needs_of,
    outputs_of,
    run_stage,
    stage_hash,
    stage_key,
    stages_for,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "PipelineError",
    "Reporter",
    "check_choices",
    "check_inputs",
    "read_stage_state",
    "run_pipeline",
    "stage_is_current",
]


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


def stage_is_current(config: RunConfig, run_dir: str | Path, stage: str) -> bool:
    """True when ``stage`` finished with the same configuration hash and its files still exist."""
    run_dir = Path(run_dir)
    entry = read_stage_state(run_dir).get(stage_key(stage, config))
    if not isinstance(entry, dict) or entry.get("hash") != stage_hash(config, stage):
        return False
    return all((run_dir / name).exists() for name in outputs_of(stage, config))


# ----------------------------------------------------------------------------- checks


def _choice_lists() -> list[tuple[str, Sequence[str]]]:
    """``(field, valid names)`` for every field chosen from a list; each list lives in its module."""
    from openqpm.constants import BIAS_NAMES, CLASS_MEASURES, R_SCALINGS
    from openqpm.data import dataset_names
    from openqpm.data.transforms import AUGMENTATIONS
    from openqpm.solver import solver_methods

    return [
        ("sparsify.method", METHODS),
        ("data.dataset", dataset_names()),
        ("data.augment", AUGMENTATIONS),
        ("solver.method", solver_methods()),
        ("solver.bias", BIAS_NAMES),
        ("solver.r_scaling", R_SCALINGS),
        ("solver.class_measure", CLASS_MEASURES),
    ]


def check_choices(config: RunConfig) -> None:
    """Every name chosen from a list is valid; takes well under a second.

    Raises:
        PipelineError: naming the field, its value and the valid names.
    """
    for name, valid in _choice_lists():
        value = field_value(config, name)
        if value not in valid:
            raise PipelineError(f"{name}={value!r} is not valid; choose {', '.join(valid)}")
    if config.model.weights and not Path(config.model.weights).is_file():
        raise PipelineError(f"model.weights: file {config.model.weights} does not exist")


def _check_backbone(config: RunConfig) -> None:
    from openqpm.models import backbone_names, create_backbone

    model, size = config.model, config.data.image_size_px
    if model.arch not in backbone_names() and not model.arch.startswith("timm:"):
        raise PipelineError(
            f"model.arch: unknown backbone {model.arch!r}; valid: {', '.join(backbone_names())}"
        )
    try:
        backbone = create_backbone(model.arch, reduced_strides=resolved_reduced_strides(model))
        backbone.check_image_size(size)
    except ValueError as error:
        raise PipelineError(f"data.image_size_px={size}: {error}") from None
    except (KeyError, ImportError) as error:
        raise PipelineError(str(error)) from None
    if config.solver.n_features > int(backbone.n_features):
        raise PipelineError(
            f"solver.n_features={config.solver.n_features} is larger than the "
            f"{backbone.n_features} features of {model.arch}"
        )


def _check_data(config: RunConfig) -> None:
    from openqpm.data import check_dataset

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


def check_inputs(config: RunConfig, *, images: bool = True) -> None:
    """Everything that can be checked before hours of training, with a clear error each.

    Args:
        config: the run's configuration.
        images: also check the backbone and the data set folder (the stages that read images).

    Raises:
        PipelineError: a name not in its list, a missing weights file, an unknown backbone, an
            image size the backbone cannot take, more features than the backbone has, or a data
            set folder that is missing or unusable.
    """
    check_choices(config)
    if images:
        _check_backbone(config)
        _check_data(config)


# ----------------------------------------------------------------------------- the loop


def _check_upstream(config: RunConfig, run_dir: Path, name: str, requested: Sequence[str]) -> None:
    """A stage whose inputs are neither current nor about to be made cannot run: say which."""
    for upstream in needs_of(name, config):
        if upstream not in requested and not stage_is_current(config, run_dir, upstream):
            raise PipelineError(
                f"stage {name} needs stage {upstream}, which is missing or was made with "
                f"another configuration in {run_dir}; run `openqpm train` or that stage first"
            )


def _record(config: RunConfig, run_dir: Path, name: str, summary: dict[str, Any]) -> None:
    """Record a finished stage and forget everything that was made from its old result."""
    state = read_stage_state(run_dir)
    state[stage_key(name, config)] = {
        "hash": stage_hash(config, name),
        "summary": to_jsonable(summary),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    for later in downstream_of(name, config):
        state.pop(stage_key(later, config), None)
    atomic_write_text(run_dir / "stages.json", json.dumps(state, indent=2, sort_keys=True))


def run_pipeline(
    config: RunConfig,
    run_dir: str | Path,
    *,
    device: torch.device,
    stages: Sequence[str] | None = None,
    resume: bool = True,
    reporter: Reporter | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the requested stages over ``run_dir``, reusing every stage whose inputs are unchanged.

    Args:
        config: the resolved run configuration (saved as ``config.yaml``).
        run_dir: the run directory; created if missing.
        device: where models run (the CLI and :func:`openqpm.api.resolve_device` pick it).
        stages: names from :func:`openqpm.stages.stage_names` (default: every stage of the
            configuration's method, :func:`openqpm.stages.stages_for`); the stages they need
            must be current in ``run_dir`` or requested too.
        resume: continue interrupted training from its last checkpoint.
        reporter: receives progress; default logs only.

    Returns:
        ``{stage: summary}`` for every requested stage (reused ones included), in run order.

    Raises:
        PipelineError: an input is missing or invalid; the message names it.
    """
    check_choices(config)
    requested = [get_stage(name).name for name in (stages or stages_for(config))]
    run_dir = Path(run_dir)
    pending = [s.name for s in STAGES if s.name in requested]
    stale: set[str] = set()
    for name in pending:
        if name in stale or not stage_is_current(config, run_dir, name):
            stale.update((name, *downstream_of(name, config)))
    check_inputs(config, images=any(get_stage(name).reads_images for name in stale & set(pending)))
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        save_config(config, run_dir / "config.yaml")
    ctx = StageContext(config, run_dir, device, reporter or Reporter(), resume)
    summaries: dict[str, dict[str, Any]] = {}
    recomputing: set[str] = set()
    for name in pending:
        if name not in recomputing and stage_is_current(config, run_dir, name):
            summaries[name] = read_stage_state(run_dir)[stage_key(name, config)].get("summary", {})
            ctx.reporter.stage_skipped(name, "up to date (same configuration hash)")
            continue
        _check_upstream(config, run_dir, name, pending)
        summaries[name] = run_stage(ctx, name)
        if is_main_process():
            _record(config, run_dir, name, summaries[name])
        distributed.barrier()
        ctx.reporter.stage_finished(name, summaries[name])
        recomputing.update(downstream_of(name, config))
    return summaries
