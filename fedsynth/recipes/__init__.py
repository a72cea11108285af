"""Training recipes that make small medical data sets learnable, used by the one engine loop:
EMA of the generating groups, learning-rate warm-up/schedules, differentiable augmentation (GAN)
and the R1 penalty (GAN)."""

from fedsynth.recipes.augment import diff_augment
from fedsynth.recipes.ema import WeightAverage
from fedsynth.recipes.regularizers import r1_penalty
from fedsynth.recipes.schedule import lr_factor

__all__ = ["WeightAverage", "diff_augment", "lr_factor", "r1_penalty"]
