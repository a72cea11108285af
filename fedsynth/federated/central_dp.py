"""Client-level differential privacy on the server (both backends), with a per-round accountant.

The scheme of Flower's ``DifferentialPrivacyServerSideFixedClipping``, and like it a wrapper
around an aggregation (:class:`~fedsynth.federated.aggregation.Aggregator`) rather than one:
every site's update (its shared weights minus the round's global weights) is clipped to L2
norm ``federation.clip_update_norm`` = C before the inner aggregation sees it, the inner one
averages the clipped updates of the m accepted sites, and Gaussian noise of standard deviation
``privacy.client_noise_multiplier * C / m`` is added to its mean. That noise covers a mean with
*equal* weights (a sample-weighted mean would let one large site move it by more than C/m), so
the server composes this wrapper with an equal-weight FedAvg. Integer buffers (step counters)
are not averaged under client-level DP: they would reveal how much data a site has.

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
from fedsynth.federated.aggregation import Aggregator, FedAvg, SiteUpdate, UpdateRejected, update_norm, validate_update

log = logging.getLogger("fedsynth.central_dp")


def client_level_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Federation-level ε after ``rounds`` noised aggregations (RDP, sampling rate 1)."""
    if rounds <= 0:
        return 0.0
    from fedsynth.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger("rdp", delta)
    ledger.history = [(float(noise_multiplier), 1.0, int(rounds))]
    return ledger.epsilon


class ClientLevelDP:
    """Client-level DP around the aggregation ``inner``: clip each update to C, let ``inner``
    aggregate, add Gaussian noise to its mean, and account the round.

    ``inner`` must average the updates it accepts with equal weights (see the module's
    docstring); a :class:`FedAvg` that weights by sample counts is refused. Everything else
    (validation, rejections, site metrics) is the inner aggregation's.
    """

    def __init__(self, inner: Aggregator, *, clip_update_norm: float | None, noise_multiplier: float, delta: float,
                 server_round: int, rng: np.random.Generator | None = None) -> None:
        if clip_update_norm is None:
            raise ConfigError("privacy.client_noise_multiplier needs federation.clip_update_norm (the clipping bound C)")
        if isinstance(inner, FedAvg) and inner.weighting != "equal":
            raise ValueError("client-level DP needs an equal-weight mean of the clipped updates (FedAvg weighting='equal')")
        self.inner = inner
        self.clip_update_norm = float(clip_update_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.server_round = int(server_round)
        self.rng = rng if rng is not None else np.random.default_rng()  # fresh OS entropy: noise must not be predictable
        self._clipped: list[str] = []

    # what the inner aggregation keeps
    @property
    def reference(self) -> Mapping[str, np.ndarray]:
        return self.inner.reference

    @property
    def accepted(self) -> list[str]:
        return self.inner.accepted

    @property
    def rejected(self) -> list[tuple[str, str]]:
        return self.inner.rejected

    @property
    def site_metrics(self) -> dict[str, dict[str, float]]:
        return self.inner.site_metrics

    @property
    def clipped(self) -> list[str]:
        """Sites whose update this wrapper scaled down to C (the inner one clips nothing more)."""
        return [*self._clipped, *(s for s in self.inner.clipped if s not in self._clipped)]

    def add(self, update: SiteUpdate) -> bool:
        """Clip ``update`` to C and hand it to the inner aggregation (which validates it again and may refuse it)."""
        try:
            validate_update(update, self.reference)
        except UpdateRejected:
            return self.inner.add(update)  # the norm of a broken update means nothing: the inner one rejects it
        norm = update_norm(update.weights, self.reference)
        if norm <= self.clip_update_norm:
            return self.inner.add(update)
        scale = self.clip_update_norm / norm
        clipped = dict(update.weights)
        for key, ref in self.reference.items():
            if np.issubdtype(ref.dtype, np.floating):  # as update_norm measures it; integer buffers pass unscaled
                ref64 = ref.astype(np.float64)
                clipped[key] = ref64 + scale * (np.asarray(update.weights[key], dtype=np.float64) - ref64)
        accepted = self.inner.add(SiteUpdate(update.site_id, clipped, update.num_samples, update.metrics))
        if accepted:
            self._clipped.append(update.site_id)
        return accepted

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to each coordinate of the mean update."""
        return self.noise_multiplier * self.clip_update_norm / max(len(self.accepted), 1)

    def mean_delta(self) -> dict[str, np.ndarray]:
        """The inner mean of the clipped updates plus Gaussian noise (integer buffers: unchanged)."""
        mean = self.inner.mean_delta()
        std = self.noise_std
        out: dict[str, np.ndarray] = {}
        for key, value in mean.items():
            if np.issubdtype(self.reference[key].dtype, np.floating):
                out[key] = value + self.rng.normal(0.0, std, size=value.shape)
            else:
                out[key] = np.zeros_like(value)
        return out

    def result(self, mean_delta: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """New global weights from the noised mean (or from ``mean_delta``, already post-processed)."""
        out = self.inner.result(mean_delta if mean_delta is not None else self.mean_delta())
        log.info("round %d: client-level DP over %d site(s), noise std %.3g, epsilon %.4g at delta %g",
                 self.server_round, len(self.accepted), self.noise_std, self.epsilon, self.delta)
        return out

    @property
    def epsilon(self) -> float:
        return client_level_epsilon(self.noise_multiplier, self.server_round, self.delta)

    def privacy_state(self) -> dict[str, float | str]:
        """What a global checkpoint stores (``fedsynth info`` shows ``epsilon``/``delta``)."""
        return {"level": "client", "epsilon": self.epsilon, "delta": self.delta, "rounds": self.server_round,
                "noise_multiplier": self.noise_multiplier, "clip_update_norm": self.clip_update_norm}

    def metrics(self) -> dict[str, float]:
        out = self.inner.metrics()
        out.update(client_epsilon=self.epsilon, client_delta=self.delta)
        return out
