"""Sparse linear layers of the paper's baselines (glm-saga5, SLDD-Model, Q-SENN).

``glm`` fits glm-saga's elastic-net and group-sparse regularisation paths and selects feature
columns; ``quantise`` chooses a path entry and compresses its weights. Submodules are imported on
first use so that ``import openqpm.sparsify`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from openqpm._lazy import lazy_exports

__all__ = [
    "PathEntry",
    "fit_path",
    "keep_largest",
    "max_lambda",
    "objective",
    "qsenn_bias",
    "qsenn_entry",
    "select_features",
    "sldd_entry",
    "standardise",
    "ternary",
]

_LAZY = {
    "PathEntry": "openqpm.sparsify.glm",
    "fit_path": "openqpm.sparsify.glm",
    "max_lambda": "openqpm.sparsify.glm",
    "objective": "openqpm.sparsify.glm",
    "select_features": "openqpm.sparsify.glm",
    "standardise": "openqpm.sparsify.glm",
    "keep_largest": "openqpm.sparsify.quantise",
    "qsenn_bias": "openqpm.sparsify.quantise",
    "qsenn_entry": "openqpm.sparsify.quantise",
    "sldd_entry": "openqpm.sparsify.quantise",
    "ternary": "openqpm.sparsify.quantise",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from openqpm.sparsify.glm import (
        PathEntry,
        fit_path,
        max_lambda,
        objective,
        select_features,
        standardise,
    )
    from openqpm.sparsify.quantise import (
        keep_largest,
        qsenn_bias,
        qsenn_entry,
        sldd_entry,
        ternary,
    )


__getattr__, __dir__ = lazy_exports("openqpm.sparsify", globals(), _LAZY, __all__)
