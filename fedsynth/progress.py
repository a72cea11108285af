"""What a training run will do, said before it starts, and the one progress display per stage.

:func:`plan_training` turns a config and the number of training images into its stages
(latent diffusion: the first-stage autoencoder, then the UNet), each with its steps, epochs and
batches; ``fedsynth train`` prints it before training and ``fedsynth validate`` prints it instead
of training. The engine labels its progress bar with :func:`network_label`. A command of several different
stages (``fedsynth evaluate``) shows them with :class:`Stages`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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


def announce(message: str, *, stderr: bool = False) -> None:
    """A line above any progress bar (tqdm keeps the bar intact), on stdout or ``stderr``."""
    from tqdm.auto import tqdm

    for line in message.splitlines():
        tqdm.write(f"[fedsynth] {line}", file=sys.stderr if stderr else None)


def bar(total: int, desc: str, *, initial: int = 0, unit: str = "step", enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar with elapsed time and ETA (``None`` when disabled)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # block characters only where the terminal takes UTF-8 (an ASCII locale or a log reader gets '#')
    encoding = (getattr(sys.stderr, "encoding", None) or "").lower().replace("-", "")
    kwargs.setdefault("ascii", not encoding.startswith("utf"))
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, **kwargs)


#: what a stage calls as its work advances: ``tick(n)`` = ``n`` more units done
Tick = Callable[[int], None]


def _no_tick(n: int = 1) -> None:
    """The tick of a stage shown nowhere."""


class Stages:
    """One progress display for a command made of named stages of different kinds of work.

    The plan (every stage, in order) is said first; then each stage gets its own bar,
    ``evaluate 3/7 encoder features``, with its total (in the stage's own unit: images,
    replicates, steps), elapsed time and ETA, left on screen when the stage ends. A disabled
    display shows nothing and its ticks cost nothing. The command's wall time is printed by the
    CLI (:data:`fedsynth.cli.LONG_COMMANDS`).
    """

    def __init__(self, command: str, names: Sequence[str], *, enabled: bool = True) -> None:
        self.command = command
        self.names = list(names)
        self.enabled = enabled
        if enabled:
            announce(f"{command}: {len(self.names)} stages: " + ", ".join(self.names), stderr=True)  # with the bars

    @contextmanager
    def stage(self, name: str, total: int, unit: str = "img") -> Iterator[Tick]:
        """Show stage ``name`` (one of the plan's) for ``total`` units of work; yields its tick."""
        if name not in self.names:
            raise ValueError(f"stage {name!r} is not in the plan of {self.command}: {self.names}")
        shown = bar(max(int(total), 0), f"{self.command} {self.names.index(name) + 1}/{len(self.names)} {name}",
                    unit=unit, enabled=self.enabled)
        if shown is None:
            yield _no_tick
            return
        try:
            yield shown.update
        finally:
            shown.close()
