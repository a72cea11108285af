"""Evaluating synthetic images against real ones (``fedsynth evaluate``); see docs/evaluation.md.

Names load on first use (:mod:`fedsynth.lazy`): ``fedsynth --help`` imports ``fedsynth.metrics.cli``.
"""

from fedsynth.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    **dict.fromkeys(["EvaluationOptions", "evaluate", "evaluate_sets", "write_report"], "fedsynth.metrics.evaluate"),
    **dict.fromkeys(["ImageSet", "infer_config", "load_real", "load_synthetic"], "fedsynth.metrics.images"),
})
