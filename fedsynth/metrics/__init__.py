"""Evaluating synthetic images against real ones (``fedsynth evaluate``); see docs/evaluation.md.

The names below load on first use: ``fedsynth.metrics.cli`` (imported by ``fedsynth --help``)
must not pull in torch and MONAI through this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvaluationOptions": "fedsynth.metrics.evaluate", "evaluate": "fedsynth.metrics.evaluate",
    "evaluate_sets": "fedsynth.metrics.evaluate", "write_report": "fedsynth.metrics.evaluate",
    "ImageSet": "fedsynth.metrics.images", "infer_config": "fedsynth.metrics.images",
    "load_real": "fedsynth.metrics.images", "load_synthetic": "fedsynth.metrics.images",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
