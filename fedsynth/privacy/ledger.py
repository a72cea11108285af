"""The privacy ledger: one Opacus accountant, its history, the budget, and a checkpointable state.

The ledger records one entry per *batch* (one Poisson-sampled mechanism), whatever the number
of groups the batch updated (see :mod:`fedsynth.privacy.plugin` for how several groups share
one batch's noise). Its history is exactly Opacus' ``[(noise_multiplier, sample_rate, steps)]``,
so ``epsilon`` is what Opacus' own accountant reports for the same steps, and a resumed or
federated run continues it instead of starting again at zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fedsynth.errors import CheckpointError, ConfigError

_MAX_STEPS = 10**8


class PrivacyLedger:
    """(ε, δ) accounting for one site's data, across epochs, rounds and restarts."""

    def __init__(self, accountant: str, delta: float, target_epsilon: float | None = None) -> None:
        self.accountant = accountant
        self.delta = delta
        self.target_epsilon = target_epsilon
        self.history: list[tuple[float, float, int]] = []
        self._eps_cache: tuple[tuple[tuple[float, float, int], ...], float] | None = None
        self._budget: tuple[float, float, int, int] | None = None  # (sigma, q, base steps, allowed steps)
        self._rdp_cache: dict[tuple[float, float], np.ndarray] = {}

    # ------------------------------------------------------------------ recording

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        """Record one batch (merges with the previous entry like Opacus' accountants do)."""
        if self._budget is not None and self._budget[:2] != (noise_multiplier, sample_rate):
            self._budget = None  # the remaining budget was computed for another (σ, q)
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, n = self.history[-1]
            self.history[-1] = (sigma, q, n + 1)
        else:
            self.history.append((noise_multiplier, sample_rate, 1))

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    # ------------------------------------------------------------------ epsilon

    def epsilon_of(self, history: list[tuple[float, float, int]]) -> float:
        """ε at ``self.delta`` for an arbitrary history (0 for no steps).

        RDP: the same arithmetic as Opacus' ``RDPAccountant`` (per-entry ``rdp(σ, q) * steps``,
        summed), with each entry's one-step RDP curve cached, so ε is cheap to ask every step.
        """
        if not history:
            return 0.0
        if self.accountant == "rdp":
            rdp = sum([self._rdp_one_step(s, q) * n for s, q, n in history])
            eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=self.delta)
            return float(eps)
        acc = create_accountant(mechanism=self.accountant)
        acc.history = list(history)
        return float(acc.get_epsilon(delta=self.delta))

    def _rdp_one_step(self, sigma: float, q: float) -> np.ndarray:
        key = (sigma, q)
        if key not in self._rdp_cache:
            self._rdp_cache[key] = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1,
                                                            orders=RDPAccountant.DEFAULT_ALPHAS)
        return self._rdp_cache[key]

    @property
    def epsilon(self) -> float:
        key = tuple(self.history)
        if self._eps_cache is None or self._eps_cache[0] != key:
            self._eps_cache = (key, self.epsilon_of(self.history))
        return self._eps_cache[1]

    def steps_allowed(self, noise_multiplier: float, sample_rate: float) -> int | None:
        """How many more batches at (σ, q) stay within ``target_epsilon`` (``None``: no budget)."""
        if self.target_epsilon is None:
            return None
        key = (noise_multiplier, sample_rate)
        if self._budget is None or self._budget[:2] != key:
            self._budget = (*key, self.steps, self._search(noise_multiplier, sample_rate))
        return self._budget[3] - (self.steps - self._budget[2])

    def _search(self, sigma: float, q: float) -> int:
        def fits(extra: int) -> bool:
            return self.epsilon_of(self.history + [(sigma, q, extra)]) <= self.target_epsilon  # type: ignore[operator]

        if not fits(1):
            return 0
        lo, hi = 1, 2
        while fits(hi):
            lo, hi = hi, hi * 2
            if hi > _MAX_STEPS:
                return _MAX_STEPS
        while hi - lo > 1:  # fits(lo) and not fits(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def calibrate(self, sample_rate: float, steps: int, tolerance: float = 0.01) -> float:
        """The smallest noise multiplier (within ``tolerance`` in ε) for which ``steps`` more batches
        at ``sample_rate`` end at ε ≤ ``target_epsilon``, counting what the history already spent."""
        if self.target_epsilon is None:
            raise ConfigError("privacy: calibrating the noise needs target_epsilon")
        target = self.target_epsilon

        def eps(sigma: float) -> float:
            return self.epsilon_of(self.history + [(sigma, sample_rate, steps)])

        lo, hi = 0.0, 0.5
        while (e_hi := eps(hi)) > target:
            lo, hi = hi, hi * 2
            if hi > 1e6:
                raise ConfigError(f"privacy.target_epsilon={target} cannot be reached in {steps} steps "
                                  f"(already spent: epsilon={self.epsilon:.4g}); raise it or train less")
        while target - e_hi > tolerance and hi - lo > 1e-4:
            mid = (lo + hi) / 2
            e_mid = eps(mid)
            if e_mid <= target:
                hi, e_hi = mid, e_mid
            else:
                lo = mid
        for key in [k for k in self._rdp_cache if k[1] == sample_rate and k[0] != hi]:
            del self._rdp_cache[key]  # keep the cache to the curves in use
        return hi

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (``torch.load(weights_only=True)`` safe) with ``epsilon`` and ``delta``."""
        return {
            "accountant": self.accountant,
            "history": [[float(s), float(q), int(n)] for s, q, n in self.history],
            "steps": self.steps,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        accountant = state.get("accountant", self.accountant)
        if accountant != self.accountant:
            raise CheckpointError(
                f"the checkpoint's privacy ledger was kept with the '{accountant}' accountant but "
                f"privacy.accountant is '{self.accountant}': keep the accountant of the run you resume"
            )
        try:
            self.history = [(float(s), float(q), int(n)) for s, q, n in state.get("history", [])]
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"the checkpoint's privacy ledger is malformed: {err}") from None
        self._eps_cache = None
        self._budget = None
