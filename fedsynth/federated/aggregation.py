"""Aggregation policy, in one backend-neutral place (used by the Flower and OpenFL drivers).

- Which groups leave a site: :func:`resolve_group_policy` (``shared`` or ``local`` per group).
- Sample-weighted FedAvg per group, streaming: :class:`FedAvg` keeps one running sum, so the
  server's memory does not grow with the number of sites.
- Robustness: an update with unknown or missing keys, wrong shapes, NaN/Inf or no samples is
  rejected (logged with the site's id) and the round goes on without it.
- Optional L2 clipping of each site's update (its difference to the current global weights).
- Transport dtype (float32/float16) casts that restore each array's own dtype on the way back.
- :class:`Aggregator`: what a round's aggregation offers the server, so that a wrapper (client-level
  DP, :class:`fedsynth.federated.central_dp.ClientLevelDP`) can stand around any aggregation; the
  server composes them (:func:`fedsynth.federated.server.make_aggregator`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fedsynth.config import FederationConfig
from fedsynth.errors import REFUSAL, ConfigError, FedsynthError
from fedsynth.federated.site_config import KEPT_LOCAL, REFUSED

log = logging.getLogger("fedsynth.aggregation")

SHARED = "shared"
LOCAL = "local"


class UpdateRejected(FedsynthError):
    """A site's update failed validation; the message names the site and the reason."""


class NoValidUpdates(FedsynthError):
    """Every update of a round was rejected (or none arrived)."""


# --------------------------------------------------------------------------- policy


def resolve_group_policy(model: object, federation: FederationConfig) -> dict[str, str]:
    """``{group: "shared"|"local"}`` for every group of ``model``: config first, then family default."""
    groups: list[str] = model.groups()  # type: ignore[attr-defined]
    unknown = sorted(set(federation.groups) - set(groups))
    if unknown:
        raise ConfigError(
            f"federation.groups: unknown group '{unknown[0]}' for a {model.family} model; its groups are {groups}"  # type: ignore[attr-defined]
        )
    defaults: Mapping[str, str] = getattr(model, "default_federation_policy", {})
    policy = {g: federation.groups.get(g, defaults.get(g, SHARED)) for g in groups}
    if not any(p == SHARED for p in policy.values()):
        raise ConfigError("federation.groups: every group is 'local', so nothing would be federated")
    return policy


def shared_groups(policy: Mapping[str, str]) -> list[str]:
    return [g for g, p in policy.items() if p == SHARED]


def frozen_groups(model: object, policy: Mapping[str, str]) -> list[str]:
    """Shared groups nobody trains (a latent-diffusion first stage): they travel in float32, unchanged."""
    specs = model.group_specs()  # type: ignore[attr-defined]
    return [g for g in shared_groups(policy) if not specs[g].trainable]


def group_of(key: str) -> str:
    """The group of a weight key ``"<group>/<name>"``."""
    return key.split("/", 1)[0]


def select_groups(weights: Mapping[str, np.ndarray], groups: Iterable[str]) -> dict[str, np.ndarray]:
    """The entries of ``weights`` that belong to ``groups``."""
    wanted = set(groups)
    return {k: v for k, v in weights.items() if group_of(k) in wanted}


# --------------------------------------------------------------------------- transport


def to_transport(weights: Mapping[str, np.ndarray], dtype: str = "float32",
                 exact_groups: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Cast floating arrays to the transport dtype; integer buffers and ``exact_groups``
    (frozen groups, whose bytes are checked by hash) travel unchanged."""
    target, exact = np.dtype(dtype), set(exact_groups)

    def cast(key: str, v: np.ndarray) -> np.ndarray:
        keep = group_of(key) in exact or not np.issubdtype(v.dtype, np.floating)
        # np.require keeps 0-d buffers 0-d (np.ascontiguousarray would make them shape (1,))
        return np.require(v, dtype=v.dtype if keep else target, requirements="C")

    return {k: cast(k, v) for k, v in weights.items()}


def from_transport(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cast arrays back to the reference's dtypes (integers rounded), keys checked by the caller."""
    out: dict[str, np.ndarray] = {}
    for k, v in weights.items():
        ref = reference.get(k)
        if ref is None:
            out[k] = np.asarray(v)
        elif np.issubdtype(ref.dtype, np.integer):
            out[k] = np.rint(np.asarray(v, dtype=np.float64)).astype(ref.dtype)
        else:
            out[k] = np.asarray(v, dtype=ref.dtype)
    return out


# --------------------------------------------------------------------------- validation


@dataclass
class SiteUpdate:
    """What one site sends after a round: its shared weights, sample count and metrics."""

    site_id: str
    weights: Mapping[str, np.ndarray]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


def validate_array(key: str, array: np.ndarray, expected_shape: tuple[int, ...], site_id: str) -> None:
    """Raise :class:`UpdateRejected` for a wrong shape or non-finite values."""
    if tuple(array.shape) != tuple(expected_shape):
        raise UpdateRejected(f"site '{site_id}': wrong shape for '{key}': expected {tuple(expected_shape)}, got {tuple(array.shape)}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise UpdateRejected(f"site '{site_id}': '{key}' contains NaN or Inf")


def kept_local(metrics: Mapping[str, float]) -> set[str]:
    """The groups a site's update says it kept at home."""
    return {k[len(KEPT_LOCAL):] for k, v in metrics.items() if k.startswith(KEPT_LOCAL) and v}


def validate_update(update: SiteUpdate, reference: Mapping[str, np.ndarray]) -> None:
    """Check an update against the global weights it should replace."""
    if update.num_samples <= 0:
        raise UpdateRejected(f"site '{update.site_id}': num_samples must be positive, got {update.num_samples}")
    unknown = sorted(set(update.weights) - set(reference))
    if unknown:
        raise UpdateRejected(f"site '{update.site_id}': unknown key '{unknown[0]}' ({len(unknown)} unknown; local groups must not be sent)")
    missing = sorted(set(reference) - set(update.weights))
    if missing:
        raise UpdateRejected(f"site '{update.site_id}': missing key '{missing[0]}' ({len(missing)} missing)")
    for key, ref in reference.items():
        validate_array(key, np.asarray(update.weights[key]), ref.shape, update.site_id)


def update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``update - reference`` over the floating-point arrays."""
    total = 0.0
    for key, ref in reference.items():
        if np.issubdtype(ref.dtype, np.floating):
            delta = np.asarray(update[key], dtype=np.float64) - ref.astype(np.float64)
            total += float(np.sum(delta * delta))
    return total**0.5


# --------------------------------------------------------------------------- aggregators


class Aggregator(Protocol):
    """One round's aggregation of site updates against the global weights ``reference``.

    ``add`` folds one update in (``False``, recorded in ``rejected``, when it is refused);
    ``mean_delta`` is the aggregate update, ``result`` the new global weights (from a
    post-processed delta when one is given). ``clipped`` lists the sites whose update was
    scaled down, ``privacy_state`` what a global checkpoint stores of the aggregation's
    privacy guarantee (``None``: it gives none).
    """

    @property
    def reference(self) -> Mapping[str, np.ndarray]: ...
    @property
    def accepted(self) -> list[str]: ...
    @property
    def rejected(self) -> list[tuple[str, str]]: ...
    @property
    def clipped(self) -> list[str]: ...
    @property
    def site_metrics(self) -> dict[str, dict[str, float]]: ...

    def add(self, update: SiteUpdate) -> bool: ...
    def mean_delta(self) -> dict[str, np.ndarray]: ...
    def result(self, mean_delta: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]: ...
    def metrics(self) -> dict[str, float]: ...
    def privacy_state(self) -> dict[str, float | str] | None: ...


class FedAvg:
    """Streaming, sample-weighted FedAvg of site updates against the current global weights.

    ``add`` validates, optionally clips, and folds one update into a running float64 sum of
    ``n_i * (w_i - w_global)``; ``result`` returns ``w_global + sum / sum(n_i)`` in the
    reference dtypes. Memory is one copy of the weights, whatever the number of sites.
    """

    def __init__(self, reference: Mapping[str, np.ndarray], *, clip_update_norm: float | None = None,
                 weighting: str = "samples", max_site_samples: int | None = None, honour_kept_local: bool = True) -> None:
        """``weighting``: ``samples`` (each site by its reported sample count, capped at
        ``max_site_samples`` when set) or ``equal`` (every accepted site counts once).
        ``honour_kept_local``: a group a site kept at home (it sends back what it received and says
        so, :func:`kept_local`) is averaged over the other sites only; without it (client-level DP,
        whose noise assumes every accepted site in every key) it counts as an unchanged update."""
        self.reference = {k: np.asarray(v) for k, v in reference.items()}
        self.clip_update_norm = clip_update_norm
        self.weighting = weighting
        self.max_site_samples = max_site_samples
        self._sum = {k: np.zeros(v.shape, dtype=np.float64) for k, v in self.reference.items()}
        self._total = 0  # sum of weights
        self._key_total = dict.fromkeys(self.reference, 0)  # sum of weights of the sites that sent each key
        self.honour_kept_local = honour_kept_local
        self._samples = 0  # sum of reported sample counts
        self.accepted: list[str] = []
        self.rejected: list[tuple[str, str]] = []
        self.site_metrics: dict[str, dict[str, float]] = {}
        self.clipped: list[str] = []

    def add(self, update: SiteUpdate) -> bool:
        """Fold one site's update in; returns ``False`` (and logs why) if it was rejected."""
        refused = sorted(k[len(REFUSED):] for k, v in update.metrics.items() if k.startswith(REFUSED) and v)
        if refused:  # the site refused the round by its own policy: a rejected site, nothing to average
            self.rejected.append((update.site_id, f"{REFUSAL} ({', '.join(refused)})"))
            return False
        try:
            validate_update(update, self.reference)
        except UpdateRejected as err:
            log.warning("rejected update: %s", err)
            self.rejected.append((update.site_id, str(err)))
            return False
        scale = 1.0
        if self.clip_update_norm is not None:
            norm = update_norm(update.weights, self.reference)
            if norm > self.clip_update_norm:
                scale = self.clip_update_norm / norm
                self.clipped.append(update.site_id)
        weight = self.site_weight(update.num_samples)
        kept = kept_local(update.metrics) if self.honour_kept_local else set()
        for key, ref in self.reference.items():
            if group_of(key) in kept:
                continue
            delta = np.asarray(update.weights[key], dtype=np.float64) - ref.astype(np.float64)
            self._sum[key] += weight * scale * delta
            self._key_total[key] += weight
        self._total += weight
        self._samples += update.num_samples
        self.accepted.append(update.site_id)
        self.site_metrics[update.site_id] = {**update.metrics, "num_samples": float(update.num_samples)}
        return True

    def site_weight(self, num_samples: int) -> int:
        """A site's weight in the average: sites report their own counts, so they can be capped or ignored."""
        if self.weighting == "equal":
            return 1
        return min(num_samples, self.max_site_samples) if self.max_site_samples is not None else num_samples

    @property
    def num_samples(self) -> int:
        """Sample count reported by the accepted sites (the weights may be capped or equal)."""
        return self._samples

    def mean_delta(self) -> dict[str, np.ndarray]:
        """Sample-weighted mean update (float64), before it is added to the global weights."""
        if not self.accepted:
            reasons = "; ".join(r for _, r in self.rejected) or "no site sent an update"
            raise NoValidUpdates(f"no valid update this round ({reasons})")
        return {k: s / self._key_total[k] if self._key_total[k] else s for k, s in self._sum.items()}

    def result(self, mean_delta: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """New global weights in the reference dtypes (optionally from a post-processed delta)."""
        delta = mean_delta if mean_delta is not None else self.mean_delta()
        out = {k: self.reference[k].astype(np.float64) + delta[k] for k in self.reference}
        return from_transport(out, self.reference)

    def metrics(self) -> dict[str, float]:
        """Sample-weighted mean of each metric over accepted sites (see :func:`mean_metrics`), plus counts."""
        out = mean_metrics([(m.get("num_samples", 0.0), m) for m in self.site_metrics.values()])
        out.update(sites_accepted=float(len(self.accepted)), sites_rejected=float(len(self.rejected)),
                   num_samples=float(self._samples))
        return out

    def privacy_state(self) -> dict[str, float | str] | None:
        """Plain FedAvg gives no privacy guarantee of its own."""
        return None


def weighted_mean(arrays: Iterable[np.ndarray], weights: Iterable[float]) -> np.ndarray:
    """Sample-weighted mean of same-shaped arrays, in the first array's dtype (per-tensor FedAvg)."""
    arrays, weights = list(arrays), [float(w) for w in weights]
    if not arrays or sum(weights) <= 0:
        raise NoValidUpdates("weighted_mean needs at least one array with a positive weight")
    acc = sum(w * np.asarray(a, dtype=np.float64) for a, w in zip(arrays, weights, strict=False))
    mean = np.asarray(acc / sum(weights))
    dtype = np.asarray(arrays[0]).dtype
    return np.rint(mean).astype(dtype) if np.issubdtype(dtype, np.integer) else mean.astype(dtype)


def mean_metrics(reports: Iterable[tuple[float, Mapping[str, float]]]) -> dict[str, float]:
    """Sample-weighted mean of each metric over the sites that reported it with a finite value.

    ``reports`` are ``(num_samples, metrics)`` per site. A site that did not report a metric, or
    reported NaN/Inf, counts in neither the sum nor the denominator of that metric, so one failed
    or secretive site cannot pull a mean (e.g. the global validation loss that picks ``best``) down.
    """
    total: dict[str, float] = {}
    weight: dict[str, float] = {}
    for n, metrics in reports:
        for k, v in metrics.items():
            if k == "num_samples" or v is None or not math.isfinite(float(v)) or n <= 0:
                continue
            total[k] = total.get(k, 0.0) + n * float(v)
            weight[k] = weight.get(k, 0.0) + n
    return {k: total[k] / weight[k] for k in total}
