"""Package namespaces whose names load on first use.

A package's ``__init__`` that re-exported its torch-backed modules eagerly would make every
import of a light sibling (``fedsynth.data.manifest``, ``fedsynth.metrics.cli``) load torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """``(__getattr__, __all__)`` for ``package``: each name of ``exports`` is read from its module on first use."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(exports)
