"""Lazy re-exports for package ``__init__`` modules (PEP 562).

Importing ``openqpm`` or one of its packages must stay cheap: the data generator's worker
processes should not import torch, and the solver must work without it. A package lists its
public names and the module defining each; :func:`lazy_exports` returns the module-level
``__getattr__`` and ``__dir__`` that import a name on first access and cache it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(
    package: str, namespace: dict[str, Any], exports: Mapping[str, str], public: Sequence[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Build ``(__getattr__, __dir__)`` for ``package``.

    Args:
        package: the package's dotted name, for error messages.
        namespace: the package's ``globals()``; resolved names are cached there.
        exports: public name -> dotted name of the module that defines it.
        public: the package's ``__all__``.

    Returns:
        The two functions to assign to ``__getattr__`` and ``__dir__`` at module level.
    """

    def __getattr__(name: str) -> Any:
        module_name = exports.get(name)
        if module_name is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module_name), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(public))

    return __getattr__, __dir__
