"""Evaluating synthetic images against real ones (``fedsynth evaluate``); see docs/evaluation.md."""

from fedsynth.metrics.evaluate import EvaluationOptions, evaluate, evaluate_sets, write_report
from fedsynth.metrics.images import ImageSet, infer_config, load_real, load_synthetic

__all__ = ["EvaluationOptions", "ImageSet", "evaluate", "evaluate_sets", "infer_config", "load_real",
           "load_synthetic", "write_report"]
