"""What a training run will do, said before it starts, and the one progress display per stage.

:func:`plan_training` turns a config and the number of training images into its stages
(latent diffusion: the first-stage autoencoder, then the UNet), each with its steps, epochs and
batches; ``fedsynth train`` prints it before training and ``fedsynth validate`` prints it instead
of training. The engine labels its progress bar with :func:`network_label`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedsynth.families import first_stage

if TYPE_CHECKING:
    from fedsynth.config import ExperimentConfig

#: what users call the network a family trains, where it is not the family's name
_NETWORKS = {"diffusion": "UNet"}


def network_label(family: str) -> str:
    """The name a stage's progress bar shows (``diffusion`` -> ``UNet``, else the family's name)."""
    return _NETWORKS.get(family, family)


def first_stage_label(family: str) -> str:
    """The progress label of a first stage (``first stage (autoencoder)``)."""
    return f"first stage ({network_label(family)})"


@dataclass(frozen=True)
class StagePlan:
    """One stage of a training run: what it trains and for how long."""

    label: str
    steps: int  # optimiser steps of the whole stage
    epochs: int  # epochs those steps span (the last one may be partial)
    batches_per_epoch: int
    batch_size: int
    images: int  # training images

    def describe(self) -> str:
        return (f"{self.label}: {self.steps} steps = {self.epochs} epoch(s) of {self.batches_per_epoch} batch(es) of "
                f"{self.batch_size} ({self.images} images)")


def _stage(label: str, config: ExperimentConfig, images: int, world_size: int) -> StagePlan:
    t = config.training
    per_rank = math.ceil(images / world_size)  # DistributedSampler pads every rank to the same count
    batches = max(1, math.ceil(per_rank / t.batch_size))
    steps = t.epochs * batches if t.max_steps is None else min(t.max_steps, t.epochs * batches)
    return StagePlan(label, steps, math.ceil(steps / batches), batches, t.batch_size, images)


def plan_training(config: ExperimentConfig, images: int, world_size: int = 1) -> list[StagePlan]:
    """The stages ``fedsynth train`` runs for ``config`` on ``images`` training images (after any
    validation split): a first stage to train first (latent diffusion's autoencoder), then the model."""
    stages = []
    stage = first_stage(config)
    if stage is not None and stage.to_train:
        stage_config = stage.experiment()
        stages.append(_stage(first_stage_label(stage_config.family), stage_config, images, world_size))
    stages.append(_stage(network_label(config.family), config, images, world_size))
    return stages


def format_plan(stages: list[StagePlan]) -> str:
    """One line per stage: ``stage 1/2 first stage (autoencoder): 600 steps = ...``."""
    return "\n".join(f"stage {i}/{len(stages)} {s.describe()}" for i, s in enumerate(stages, 1))


def announce(message: str) -> None:
    """A line above any progress bar (tqdm keeps the bar intact)."""
    from tqdm.auto import tqdm

    for line in message.splitlines():
        tqdm.write(f"[fedsynth] {line}")


def bar(total: int, desc: str, *, initial: int = 0, unit: str = "step", enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar with elapsed time and ETA (``None`` when disabled)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # block characters only where the terminal takes UTF-8 (an ASCII locale or a log reader gets '#')
    encoding = (getattr(sys.stderr, "encoding", None) or "").lower().replace("-", "")
    kwargs.setdefault("ascii", not encoding.startswith("utf"))
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, **kwargs)
