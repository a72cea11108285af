"""Exponential moving average (EMA) of a model's generating groups.

The average is kept group-keyed, exactly like :meth:`SynthesisModel.get_weights`
(``"generator/<name>"``), so it is stored in checkpoints, sent by a federation's server and
loaded for sampling with the same weight contract as everything else. Floating-point tensors
are averaged with ``decay_t = min(decay, (1 + n) / (10 + n))`` (warm-up, so an early average is not
dominated by the random initialisation); integer buffers (e.g. BatchNorm's counters) are copied.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fedsynth.models.base import SynthesisModel

GROUP_SEP = "/"  # the group/parameter separator of fedsynth.models.base (imported lazily there: no cycle)


class WeightAverage:
    """EMA of ``groups`` of a :class:`SynthesisModel` (the generating network: generator/UNet/codec)."""

    def __init__(self, model: SynthesisModel, groups: list[str], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.groups = [g for g in groups if g in model.groups()]
        self.decay = float(decay)
        self.num_updates = 0
        self.weights: dict[str, torch.Tensor] = self._current(model)

    def _current(self, model: SynthesisModel) -> dict[str, torch.Tensor]:
        """A copy of the model's current weights of the averaged groups."""
        return {k: v.clone() for k, v in self._current_views(model).items()}

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self, model: SynthesisModel) -> None:
        """Fold the model's current weights into the average (call after each optimiser step)."""
        decay = self.current_decay()
        current = self._current_views(model)
        floats = [k for k, v in self.weights.items() if v.is_floating_point()]
        if floats:
            torch._foreach_lerp_([self.weights[k] for k in floats], [current[k].to(self.weights[k].device) for k in floats],
                                 1.0 - decay)
        for k, v in self.weights.items():
            if not v.is_floating_point():
                v.copy_(current[k])
        self.num_updates += 1

    def _current_views(self, model: SynthesisModel) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for group in self.groups:
            for key, tensor in model.group_module(group).state_dict().items():
                out[f"{group}{GROUP_SEP}{key}"] = tensor.detach()
        return out

    def reset(self, model: SynthesisModel) -> None:
        """Restart the average from the model's current weights."""
        self.weights = self._current(model)
        self.num_updates = 0

    @contextmanager
    def applied(self, model: SynthesisModel) -> Iterator[None]:
        """Temporarily load the averaged weights into ``model`` (e.g. to sample a grid)."""
        saved = self._current(model)
        model.set_weights(self.weights, strict=True)
        try:
            yield
        finally:
            model.set_weights(saved, strict=True)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "groups": list(self.groups), "weights": {k: v.detach().cpu().clone() for k, v in self.weights.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        weights = dict(state["weights"])
        if set(weights) != set(self.weights):
            missing = sorted(set(self.weights) - set(weights))[:1] or sorted(set(weights) - set(self.weights))[:1]
            raise ValueError(f"EMA state does not match the model (first differing key: {missing[0]})")
        self.weights = {k: weights[k].to(self.weights[k].device, self.weights[k].dtype) for k in self.weights}
        self.num_updates = int(state["num_updates"])
