"""Learning-rate schedules as a pure function of the optimiser step (exact on resume, DP-safe)."""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int | None, *, warmup_steps: int = 0, schedule: str = "constant",
              min_ratio: float = 0.1) -> float:
    """Multiplier of the base learning rate before optimiser step ``step`` (0-based).

    Linear warm-up from ``1 / warmup_steps`` to 1 over ``warmup_steps``, then ``constant`` or
    ``cosine`` decay to ``min_ratio`` at ``total_steps`` (cosine needs ``total_steps``).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or not total_steps:
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule '{schedule}': expected 'constant' or 'cosine'")
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
