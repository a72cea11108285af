"""Client-level differential privacy on the server (both backends), with a per-round accountant.

The scheme of Flower's ``DifferentialPrivacyServerSideFixedClipping``: every site's update
(its shared weights minus the round's global weights) is clipped to L2 norm
``federation.clip_update_norm`` = C, the clipped updates are averaged with *equal* weights over
the m accepted sites (a sample-weighted mean would let one large site move it by more than
C/m), and Gaussian noise of standard deviation ``privacy.client_noise_multiplier * C / m`` is
added to the mean. Integer buffers (step counters) are not averaged under client-level DP:
they would reveal how much data a site has.

Unlike Flower's wrapper, this one keeps the budget: each round is one Gaussian mechanism over
the sites, accounted with Opacus' RDP accountant at sampling rate 1 (no amplification is
claimed for site sampling), so the federation-level ε after r rounds is a function of
(noise multiplier, r, δ) alone, which lets stateless aggregators (OpenFL's per-tensor
function) report it as well as the Flower server.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from fedsynth.errors import ConfigError
from fedsynth.federated.aggregation import FedAvg

log = logging.getLogger("fedsynth.central_dp")


def client_level_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Federation-level ε after ``rounds`` noised aggregations (RDP, sampling rate 1)."""
    if rounds <= 0:
        return 0.0
    from fedsynth.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger("rdp", delta)
    ledger.history = [(float(noise_multiplier), 1.0, int(rounds))]
    return ledger.epsilon


class ClientDPFedAvg(FedAvg):
    """:class:`FedAvg` with client-level DP: clip each update to C, equal weights, Gaussian noise."""

    def __init__(self, reference: Mapping[str, np.ndarray], *, clip_update_norm: float | None,
                 noise_multiplier: float, delta: float, server_round: int,
                 rng: np.random.Generator | None = None) -> None:
        if clip_update_norm is None:
            raise ConfigError("privacy.client_noise_multiplier needs federation.clip_update_norm (the clipping bound C)")
        super().__init__(reference, clip_update_norm=clip_update_norm, weighting="equal")  # each site's clipped update once
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.server_round = int(server_round)
        self.rng = rng if rng is not None else np.random.default_rng()  # fresh OS entropy: noise must not be predictable

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to each coordinate of the mean update."""
        assert self.clip_update_norm is not None
        return self.noise_multiplier * self.clip_update_norm / max(len(self.accepted), 1)

    def mean_delta(self) -> dict[str, np.ndarray]:
        """Equal-weight mean of the clipped updates plus Gaussian noise (integer buffers: unchanged)."""
        mean = super().mean_delta()
        std = self.noise_std
        out: dict[str, np.ndarray] = {}
        for key, value in mean.items():
            if np.issubdtype(self.reference[key].dtype, np.floating):
                out[key] = value + self.rng.normal(0.0, std, size=value.shape)
            else:
                out[key] = np.zeros_like(value)
        return out

    def result(self, mean_delta: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        out = super().result(mean_delta)  # FedAvg.result takes the noised mean_delta() by default
        log.info("round %d: client-level DP over %d site(s), noise std %.3g, epsilon %.4g at delta %g",
                 self.server_round, len(self.accepted), self.noise_std, self.epsilon, self.delta)
        return out

    @property
    def epsilon(self) -> float:
        return client_level_epsilon(self.noise_multiplier, self.server_round, self.delta)

    def privacy_state(self) -> dict[str, float | str]:
        """What a global checkpoint stores (``fedsynth info`` shows ``epsilon``/``delta``)."""
        return {"level": "client", "epsilon": self.epsilon, "delta": self.delta, "rounds": self.server_round,
                "noise_multiplier": self.noise_multiplier, "clip_update_norm": float(self.clip_update_norm or 0.0)}

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        out.update(client_epsilon=self.epsilon, client_delta=self.delta)
        return out
