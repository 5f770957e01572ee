"""The tiny run the end-to-end tests share: 4 generated classes of 32 px images, a tiny CNN."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openqpm
from openqpm.config import RunConfig, load_config
from openqpm.stages import Reporter

# the demo configuration cut down to seconds: every stage runs, nothing is learnt well
TINY_OVERRIDES: dict[str, Any] = {
    "data.image_size_px": 32,
    "data.batch_size": 8,
    "model.arch": "tiny_cnn",
    "dense.epochs": 1,
    "dense.step_size_epochs": 1,
    "finetune.epochs": 1,
    "finetune.step_size_epochs": 1,
    "solver.n_features": 5,
    "solver.n_per_class": 2,
    "solver.method": "search",
    "solver.time_limit_s": 3.0,
    "report_max_classes": 2,
    "device": "cpu",
}


def tiny_data(folder: Path, *, n_classes: int = 4) -> Path:
    """The embedded data set, tiny: ``n_classes`` classes of 14 images of 32 px (seed 5)."""
    from openqpm.data.synthetic import make_synthetic

    return make_synthetic(
        folder, n_classes=n_classes, n_images_per_class=14, image_size_px=32, seed=5
    )


def tiny_config(root: Path, **overrides: Any) -> RunConfig:
    """The tiny run's configuration on the data set at ``root``; ``overrides`` by dotted key."""
    return load_config("demo", overrides={**TINY_OVERRIDES, "data.root": str(root), **overrides})


def tiny_run_dir(base: Path) -> Path:
    """A finished tiny run (every stage) in ``base / "run"``, its data in ``base / "synthetic"``."""
    openqpm.run(tiny_config(tiny_data(base / "synthetic")), base / "run", device="cpu")
    return base / "run"


class StartedStages(Reporter):
    """Records the stages that ran (not the skipped ones), in order."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def stage_started(self, stage: str, description: str) -> None:
        self.started.append(stage)
