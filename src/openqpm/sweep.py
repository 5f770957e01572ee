"""Sweeps over one setting (paper Fig. 7: compactness; Fig. 9: the bias strength), per method.

Each point of a sweep is a run directory ``RUN_DIR/sweep/<field>=<value>`` that starts from the
parent run's dense model and features pass (hard links, or copies where links cannot be made, with
their records in ``stages.json``), so only the stages the swept field changes are computed. The
points are ordinary runs: ``openqpm compare`` reads them, and rerunning a sweep reuses them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openqpm._io import atomic_write_text
from openqpm.config import RunConfig, apply_overrides

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from matplotlib.figure import Figure

    from openqpm.stages import Reporter

__all__ = ["SWEEPABLE", "SweepPoint", "plot_sweep", "run_sweep"]

# the fields a sweep may vary (CLI flag -> config field)
SWEEPABLE = {"n_features": "solver.n_features", "bias_strength": "solver.bias_strength"}
_SHARED_STAGES = ("dense", "features")
_PLOTTED = ("accuracy", "sid_at_5", "class_independence", "contrastiveness", "correlation")


@dataclass(frozen=True)
class SweepPoint:
    """One method at one value of the swept field."""

    method: str
    value: float
    run_dir: Path
    metrics: dict[str, Any]


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link ``source`` (a file or a folder) to ``target``; copy where linking fails."""
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        for child in source.iterdir():
            _link_tree(child, target / child.name)
        return
    if target.exists():
        return
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def _seed_point(parent: Path, point: Path, config: RunConfig) -> None:
    """Give a point the parent's finished dense model and features pass, with their records."""
    from openqpm.pipeline import read_stage_state, stage_is_current
    from openqpm.stages import outputs_of, stage_key

    parent_state = read_stage_state(parent)
    state = read_stage_state(point)
    for stage in _SHARED_STAGES:
        if not stage_is_current(config, parent, stage):
            continue
        for name in outputs_of(stage, config):
            _link_tree(parent / name, point / name)
        state[stage_key(stage, config)] = parent_state[stage_key(stage, config)]
    atomic_write_text(point / "stages.json", json.dumps(state, indent=2, sort_keys=True))


def run_sweep(
    config: RunConfig,
    run_dir: str | Path,
    *,
    field: str,
    values: Sequence[float],
    methods: Sequence[str],
    device: torch.device,
    reporter: Reporter | None = None,
) -> list[SweepPoint]:
    """Solve (or fit) and fine-tune every method at every value, from the run's dense model.

    Args:
        config: the run's configuration (``run_dir/config.yaml``).
        run_dir: a run whose dense model (and, for QPM, features pass) is finished.
        field: a key of :data:`SWEEPABLE` (``n_features`` or ``bias_strength``).
        values: the values to try.
        methods: sparsification methods (``qpm``, ``sldd``, ...).
        device: where models run.
        reporter: progress of every point's stages.

    Returns:
        One :class:`SweepPoint` per method and value, in that order.

    Raises:
        ValueError: an unknown field.
    """
    from openqpm.pipeline import run_pipeline
    from openqpm.stages import outputs_of

    if field not in SWEEPABLE:
        raise ValueError(f"cannot sweep {field!r}; sweepable: {', '.join(SWEEPABLE)}")
    parent = Path(run_dir)
    points: list[SweepPoint] = []
    for method in methods:
        for value in values:
            point_config = apply_overrides(
                config, {SWEEPABLE[field]: value, "sparsify.method": method}
            )
            point = parent / "sweep" / f"{field}={value:g}"
            point.mkdir(parents=True, exist_ok=True)
            _seed_point(parent, point, point_config)
            run_pipeline(point_config, point, device=device, reporter=reporter)
            metrics_file = point / outputs_of("evaluate", point_config)[0]
            metrics = json.loads(metrics_file.read_text(encoding="utf-8"))[method]
            points.append(SweepPoint(method, float(value), point, metrics))
    return points


def plot_sweep(points: Sequence[SweepPoint], *, field: str) -> Figure:
    """Accuracy and the interpretability metrics against the swept value, one line per method."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.2 * len(_PLOTTED), 3.0), layout="constrained")
    axes = figure.subplots(1, len(_PLOTTED))
    for axis, metric in zip(axes, _PLOTTED):
        for method in dict.fromkeys(p.method for p in points):
            rows = sorted((p.value, p.metrics.get(metric)) for p in points if p.method == method)
            xs = [x for x, y in rows if y is not None]
            ys = [y if metric == "accuracy" else 100 * y for x, y in rows if y is not None]
            axis.plot(xs, ys, marker="o", label=method)
        axis.set_xlabel(field.replace("_", " "))
        axis.set_title(metric.replace("_", " "))
    axes[0].set_ylabel("percent")
    axes[0].legend()
    return figure
