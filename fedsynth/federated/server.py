"""The federation's global model, shared by the Flower and OpenFL drivers.

:class:`GlobalModel` holds the server's copy of the model, folds each round's site updates in
through :class:`fedsynth.federated.aggregation.FedAvg`, and writes a core checkpoint per round
(``global/last.ckpt``, ``global/best.ckpt`` by sample-weighted validation loss, and
``global/round_NNNN.ckpt``), so ``fedsynth info`` / ``generate --checkpoint`` work on it and a
restarted server resumes from its last round.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from fedsynth.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from fedsynth.config import ExperimentConfig
from fedsynth.engine import seed_everything
from fedsynth.errors import ConfigError
from fedsynth.families import first_stage
from fedsynth.federated.aggregation import (
    Aggregator,
    FedAvg,
    SiteUpdate,
    frozen_groups,
    resolve_group_policy,
    shared_groups,
)
from fedsynth.federated.central_dp import ClientLevelDP
from fedsynth.io import atomic_path, atomic_write_text
from fedsynth.models import SynthesisModel, build_model
from fedsynth.recipes import WeightAverage

log = logging.getLogger("fedsynth.server")


def make_aggregator(reference: Mapping[str, np.ndarray], config: ExperimentConfig, server_round: int) -> Aggregator:
    """The round's aggregator for both backends: FedAvg, wrapped in client-level DP when
    ``privacy.client_noise_multiplier`` is set (the wrapper clips, so the FedAvg inside weights
    sites equally and clips nothing). ``server_round`` counts from 1 (rounds aggregated so far,
    this one included)."""
    fed, privacy = config.federation, config.privacy
    if privacy.client_noise_multiplier is not None:
        return ClientLevelDP(FedAvg(reference, weighting="equal", honour_kept_local=False), clip_update_norm=fed.clip_update_norm,
                             noise_multiplier=privacy.client_noise_multiplier, delta=privacy.client_delta,
                             server_round=server_round)
    return FedAvg(reference, clip_update_norm=fed.clip_update_norm, weighting=fed.weighting,
                  max_site_samples=fed.max_site_samples)


class RoundSummary(TypedDict):
    """One aggregated round, as :meth:`GlobalModel.aggregate` returns it and ``global/history.json`` keeps it."""

    round: int
    accepted: list[str]
    rejected: list[tuple[str, str]]  # (site, reason)
    clipped: list[str]
    site_metrics: dict[str, dict[str, float]]
    metrics: dict[str, float]
    val_loss: float | None


def shipped_config(config: ExperimentConfig, model: SynthesisModel, policy: dict[str, str]) -> ExperimentConfig:
    """The experiment config sites build their model from.

    A first stage (:func:`fedsynth.families.first_stage`; latent diffusion's autoencoder) travels
    with the model, never as a path: the server loads the checkpoint the config names on its own
    disk, and sites get the first stage's architecture and hash (latent diffusion:
    ``model.first_stage`` and ``model.first_stage_sha256``); its weights are the frozen first-stage
    groups of the global weights, checked against the hash at every site.
    """
    stage = first_stage(config)
    trained = model.first_stage()
    if stage is None or trained is None or not stage.checkpoint:
        return config
    for group in stage.groups:
        if policy.get(group) != "shared":
            raise ConfigError(f"federation.groups.{group}: a {stage.kind} federation ships its first stage "
                              f"to every site, so the '{group}' group must be 'shared'")
    sha256 = model.first_stage_sha256()
    assert sha256 is not None, "a model with a first stage has its hash"
    return stage.shipped(trained.config, sha256)


class GlobalModel:
    """Server-side model state across rounds, checkpointed in ``run_dir/global``."""

    def __init__(self, config: ExperimentConfig, run_dir: str | Path) -> None:
        seed_everything(config.seed)
        self.config = config
        self.model = build_model(config)
        self.policy = resolve_group_policy(self.model, config.federation)
        self.shared = shared_groups(self.policy)
        self.frozen = frozen_groups(self.model, self.policy)  # sent unchanged (float32)
        #: what sites are sent and global checkpoints store: no server paths (first stage shipped)
        self.site_config = shipped_config(config, self.model, self.policy)
        self.model.config = self.site_config
        self.dir = Path(run_dir) / "global"
        self.state = TrainingState(round=0)
        self.history: list[RoundSummary] = []
        self.site_epsilon: dict[str, float] = {}  # each site's latest example-level epsilon in this federation
        self._last_aggregate: float | None = None  # when the last round was aggregated (the ETA's pace)
        self._round_seconds: list[float] = []
        # the server's EMA of the global generating groups across rounds (used by generate/evaluate)
        self.ema = (WeightAverage(self.model, [g for g in self.model.generating_groups() if g in self.shared],
                                  config.federation.ema_decay)
                    if config.federation.ema_decay > 0 else None)
        if self.ema is not None and not self.ema.groups:
            self.ema = None
        last = self.dir / "last.ckpt"
        if last.is_file():
            payload = load_checkpoint(last)
            self.model.set_weights(payload["weights"])
            if self.ema is not None and payload.get("ema"):
                self.ema.load_state_dict(payload["ema"])
            self.state = TrainingState(epoch=payload["epoch"], step=payload["step"], round=payload.get("round") or 0,
                                       best_metric=payload.get("best_metric"), metrics=dict(payload.get("metrics", {})),
                                       privacy=payload.get("privacy"))
            example = (payload.get("privacy") or {}).get("example_level") or {}
            self.site_epsilon = {str(k): float(v) for k, v in (example.get("sites") or {}).items()}
            if (self.dir / "history.json").is_file():
                self.history = json.loads((self.dir / "history.json").read_text(encoding="utf-8"))
            log.info("resuming federation from round %s (%s)", self.state.round, last)

    def guarantee(self, client_level: dict[str, Any] | None) -> dict[str, Any] | None:
        """What the global model's checkpoint claims: the example-level guarantee of the federation
        (the weakest site's: each patient's images are at one site, covered by that site's epsilon),
        each site's figure, and the client-level guarantee when the server adds it."""
        example = None
        if self.config.privacy.enabled and self.site_epsilon:
            worst = max(self.site_epsilon, key=lambda site: self.site_epsilon[site])
            example = {"epsilon": self.site_epsilon[worst], "delta": self.config.privacy.delta, "weakest_site": worst,
                       "sites": dict(sorted(self.site_epsilon.items()))}
        if example is None and client_level is None:
            return None
        top = example or client_level
        assert top is not None
        return {"level": "federation", "epsilon": top["epsilon"], "delta": top["delta"],
                "example_level": example, "client_level": client_level}

    @property
    def round(self) -> int:
        return int(self.state.round or 0)

    def shared_weights(self) -> dict[str, np.ndarray]:
        """The weights sent to sites: shared groups only."""
        return self.model.get_weights(self.shared)

    def aggregate(self, server_round: int, updates: Iterable[SiteUpdate], failures: Sequence[str] = (),
                  refused: Sequence[tuple[str, str]] = ()) -> RoundSummary:
        """FedAvg this round's updates into the global model; returns a summary for the logs.

        The round policy of both backends (:func:`~fedsynth.federated.trial_common.check_round`):
        fewer valid updates than ``federation.min_sites`` raises :class:`NoValidUpdates` naming the
        round and every rejected site (``failures``: extra reasons, read after ``updates`` is consumed);
        the global model is then unchanged. ``refused`` (also read then): sites that refused the round
        by their own policy, ``(site, fields)``; they count as rejected.
        """
        from fedsynth.federated.trial_common import check_round

        fedavg = make_aggregator(self.shared_weights(), self.config, server_round)
        for update in updates:
            fedavg.add(update)
        rejected = [*fedavg.rejected, *refused]
        check_round(server_round, fedavg.accepted, rejected, self.config.federation.min_sites, failures)
        self.model.set_weights(self._keep_frozen(fedavg.result()))
        if self.ema is not None:
            self.ema.update(self.model)
        self.state.round = server_round
        for site, site_metrics in fedavg.site_metrics.items():  # each site's epsilon so far (its whole ledger)
            if "epsilon" in site_metrics and math.isfinite(float(site_metrics["epsilon"])):
                self.site_epsilon[site] = float(site_metrics["epsilon"])
        self.state.privacy = self.guarantee(fedavg.privacy_state())
        metrics = {**fedavg.metrics(), "sites_rejected": float(len(rejected))}
        self.state.metrics = dict(metrics)  # site metrics are already train_*/val_* prefixed
        summary: RoundSummary = {
            "round": server_round, "accepted": fedavg.accepted, "rejected": rejected,
            "clipped": fedavg.clipped, "site_metrics": fedavg.site_metrics, "metrics": metrics,
            "val_loss": None,  # set by record_evaluation (the same keys every round, on both backends)
        }
        # a round aggregated again (OpenFL replays a round's stored results after a restart) replaces its record
        self.history = [h for h in self.history if h.get("round", 0) < server_round]
        self.history.append(summary)
        self._log_progress(server_round, summary)
        return summary

    def _log_progress(self, server_round: int, summary: RoundSummary) -> None:
        """One line per aggregated round, both backends: who was in, and the federation's ETA."""
        now = time.monotonic()
        if self._last_aggregate is not None:
            self._round_seconds = [*self._round_seconds[-4:], now - self._last_aggregate]
        self._last_aggregate = now
        rounds = self.config.federation.rounds
        eta = (f", ETA {sum(self._round_seconds) / len(self._round_seconds) * (rounds - server_round):.0f} s"
               if self._round_seconds and server_round < rounds else "")
        log.info("round %s/%s aggregated: %s site(s) accepted, %s rejected%s", server_round, rounds,
                 len(summary["accepted"]), len(summary["rejected"]), eta)

    def _keep_frozen(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Frozen groups are nobody's to change (client-level DP noise included); only what sites set
        from their own data (:meth:`SynthesisModel.averaged_frozen_keys`: the latent scale) is averaged."""
        if not self.frozen:
            return weights
        current = self.model.get_weights(self.frozen)
        averaged = self.model.averaged_frozen_keys()
        return {k: current[k] if k in current and k not in averaged else v for k, v in weights.items()}

    def record_evaluation(self, loss: float, metrics: dict[str, float] | None = None) -> None:
        """Store the sample-weighted validation loss of the current global model."""
        self.state.metrics["val_loss"] = float(loss)
        for k, v in (metrics or {}).items():
            self.state.metrics[f"val_{k}"] = float(v)
        if self.history:
            self.history[-1]["val_loss"] = float(loss)

    def record_past_evaluation(self, server_round: int, loss: float) -> None:
        """Validation loss of an earlier round's global model, known only later (OpenFL validates the
        model entering a round): set it in that round's history entry and make that round's
        checkpoint ``best`` if it improves on the best so far (saved with the next :meth:`save`)."""
        if not math.isfinite(loss):
            return
        for entry in self.history:
            if entry.get("round") == server_round:
                entry["val_loss"] = float(loss)
        if self.state.best_metric is None or loss < self.state.best_metric:
            source = self.dir / f"round_{server_round:04d}.ckpt"
            if source.is_file():
                import torch


                self.state.best_metric = float(loss)
                payload = load_checkpoint(source)
                payload["metrics"] = {**payload.get("metrics", {}), "val_loss": float(loss)}
                payload["best_metric"] = float(loss)
                with atomic_path(self.dir / "best.ckpt", durable=True) as tmp:
                    torch.save(payload, tmp)

    def save(self) -> Path:
        """Write ``last`` (+ ``best`` if improved, + a per-round copy) atomically."""
        val = self.state.metrics.get("val_loss")
        improved = val is not None and math.isfinite(val) and (self.state.best_metric is None or val < self.state.best_metric)
        if improved:
            self.state.best_metric = val
        ema = self.ema.state_dict() if self.ema is not None else None
        last = save_checkpoint(self.dir / "last.ckpt", self.model, self.state, rng=False, ema=ema)
        save_checkpoint(self.dir / f"round_{self.round:04d}.ckpt", self.model, self.state, rng=False, ema=ema)
        if improved:
            save_checkpoint(self.dir / "best.ckpt", self.model, self.state, rng=False, ema=ema)
        atomic_write_text(self.dir / "history.json", json.dumps(self.history, indent=2, default=float))
        return last
