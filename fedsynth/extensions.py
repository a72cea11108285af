"""Engine extensions: training behaviour the one loop runs through declared hooks.

The engine (:mod:`fedsynth.engine`) knows nothing about differential privacy or weight averages;
it calls each extension's hooks at fixed points of the loop, in the order the extensions were
given. An extension that has nothing to do at a point inherits the no-op below.

Built-in extensions: :class:`fedsynth.privacy.plugin.OpacusPrivacy` (example-level DP: private
optimizers and a Poisson loader, per-batch accounting, a stop reason when the budget is spent)
and :class:`EmaExtension` (an EMA of the generating groups, used for sample grids and generation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from fedsynth.models.base import Batch, SynthesisModel
    from fedsynth.recipes.ema import WeightAverage

Optimizers = dict[str, torch.optim.Optimizer]
TrainingStep = Callable[["Batch", Mapping[str, torch.optim.Optimizer]], dict[str, float]]


class Extension:
    """Hooks of the engine's loop; every one is a no-op unless overridden.

    ``state_key`` names the extension's state in checkpoints (``None``: it keeps no state).
    """

    state_key: str | None = None

    def prepare_loader(self, model: SynthesisModel, optimizers: Optimizers,
                       loader: DataLoader) -> tuple[Optimizers, DataLoader]:
        """Before training on ``loader``: may replace the optimizers and the loader."""
        return optimizers, loader

    def wrap_training_step(self, model: SynthesisModel, step: TrainingStep) -> TrainingStep:
        """The training step to call (``step`` with this extension's bookkeeping around it)."""
        return step

    def before_fit(self, data: Mapping[str, Any] | None, steps: int) -> None:
        """Once the loader and the training set's fingerprint (``data``) are known, before ``steps``
        planned steps: may refuse to train (raise)."""

    def after_fit(self) -> None:
        """When a fit ends, normally or by an error."""

    def before_save(self) -> None:
        """Before a checkpoint is written (what the checkpoint releases is recorded first)."""

    def stop_reason(self) -> str | None:
        """Checked before every step: a reason to stop training now, or ``None``."""
        return None

    def after_step(self, model: SynthesisModel) -> None:
        """After every optimisation step."""

    def report(self) -> dict[str, float]:
        """Metrics for the progress bar, ``metrics.csv`` and checkpoints."""
        return {}

    def sampling_weights(self, model: SynthesisModel) -> contextlib.AbstractContextManager[None]:
        """Context in which the model holds the weights to sample with (sample grids, generation)."""
        return contextlib.nullcontext()

    def state_dict(self) -> Any:
        """State to store in checkpoints under ``state_key``."""
        return None

    def load_state_dict(self, state: Any, model: SynthesisModel) -> None:
        """Restore from a checkpoint's ``state_key`` entry (``None`` when the checkpoint has none)."""


class EmaExtension(Extension):
    """``training.ema_decay``: an exponential moving average of the generating groups."""

    state_key = "ema"

    def __init__(self, average: WeightAverage) -> None:
        self.average = average

    def after_step(self, model: SynthesisModel) -> None:
        self.average.update(model)

    def sampling_weights(self, model: SynthesisModel) -> contextlib.AbstractContextManager[None]:
        return self.average.applied(model)

    def state_dict(self) -> Any:
        return self.average.state_dict()

    def load_state_dict(self, state: Any, model: SynthesisModel) -> None:
        if state:
            self.average.load_state_dict(state)
        else:  # a checkpoint from before EMA was on: start the average at the loaded weights
            self.average.reset(model)


@contextlib.contextmanager
def sampling_weights(extensions: list[Extension], model: SynthesisModel) -> Iterator[None]:
    """Every extension's sampling context at once (e.g. the EMA weights applied)."""
    with contextlib.ExitStack() as stack:
        for ext in extensions:
            stack.enter_context(ext.sampling_weights(model))
        yield
