"""openqpm: globally interpretable image classifiers with QPM, license-free.

The public API is listed in ``__all__``. Heavy submodules (torch models, the solver backends)
are imported lazily on first attribute access, so ``import openqpm`` stays fast and the
solver can be used on machines where only numpy/scipy are wanted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from openqpm._lazy import lazy_exports

__version__ = "0.1.0"

# Kept explicit: every name here is part of the stable public surface.
__all__ = [
    "Assignment",
    "AssignmentProblem",
    "ClassScore",
    "ConfigError",
    "FeatureContribution",
    "ImageExplanation",
    "PipelineError",
    "Prediction",
    "PredictionSet",
    "QPMModel",
    "Reporter",
    "RunConfig",
    "RunResult",
    "__version__",
    "config_names",
    "explain_prediction",
    "load",
    "load_config",
    "predict",
    "resolve_device",
    "run",
    "solve",
    "stage_names",
    "validate_assignment",
]

# public name -> module that defines it
_LAZY = {
    "Assignment": "openqpm.solver.problem",
    "AssignmentProblem": "openqpm.solver.problem",
    "validate_assignment": "openqpm.solver.problem",
    "solve": "openqpm.solver",
    "QPMModel": "openqpm.models.model",
    "load": "openqpm.models.model",
    "ConfigError": "openqpm.config",
    "RunConfig": "openqpm.config",
    "config_names": "openqpm.config",
    "load_config": "openqpm.config",
    "PipelineError": "openqpm.stages",
    "Reporter": "openqpm.stages",
    "stage_names": "openqpm.stages",
    "ClassScore": "openqpm.api",
    "FeatureContribution": "openqpm.api",
    "ImageExplanation": "openqpm.api",
    "Prediction": "openqpm.api",
    "PredictionSet": "openqpm.api",
    "RunResult": "openqpm.api",
    "explain_prediction": "openqpm.api",
    "predict": "openqpm.api",
    "resolve_device": "openqpm.api",
    "run": "openqpm.api",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from openqpm.api import (
        ClassScore,
        FeatureContribution,
        ImageExplanation,
        Prediction,
        PredictionSet,
        RunResult,
        explain_prediction,
        predict,
        resolve_device,
        run,
    )
    from openqpm.config import ConfigError, RunConfig, config_names, load_config
    from openqpm.models.model import QPMModel, load
    from openqpm.solver import solve
    from openqpm.solver.problem import Assignment, AssignmentProblem, validate_assignment
    from openqpm.stages import PipelineError, Reporter, stage_names


__getattr__, __dir__ = lazy_exports("openqpm", globals(), _LAZY, __all__)
