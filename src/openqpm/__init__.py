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
    "QPMModel",
    "__version__",
    "load",
    "solve",
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
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from openqpm.models.model import QPMModel, load
    from openqpm.solver import solve
    from openqpm.solver.problem import Assignment, AssignmentProblem, validate_assignment


__getattr__, __dir__ = lazy_exports("openqpm", globals(), _LAZY, __all__)
