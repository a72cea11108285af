"""One hospital's side of a federation, shared by the Flower and OpenFL drivers.

A :class:`Site` keeps everything that must survive between rounds on the site's own disk
(``state_dir/<federation id>/last.ckpt``: local groups, per-group optimizer states,
step/epoch counters, RNG, the privacy ledger), because a federation may run each round in a
fresh process. The state is keyed by :func:`federation_key`, so a new federation never
continues another one's local discriminator or optimizers.
Each round it applies the global shared weights, trains with the one :class:`Engine` for
``local_epochs`` (or ``local_steps``) and returns only the shared groups.

The site's :class:`~fedsynth.federated.site_config.SitePolicy` is applied here, for both
backends: the coordinator's config is checked against the site's privacy floor before the
engine is built (and the noise actually used, once known), and only the metrics the site
allows leave it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsynth.config import ExperimentConfig
from fedsynth.data.dataset import ImageDataset, load_datasets
from fedsynth.engine import LAST, Engine, build_engine
from fedsynth.errors import ConfigError, TrainingDiverged, WeightsError
from fedsynth.federated.aggregation import (
    frozen_groups,
    group_of,
    resolve_group_policy,
    select_groups,
    shared_groups,
)
from fedsynth.federated.site_config import KEPT_LOCAL, SitePolicy
from fedsynth.io import FolderLock
from fedsynth.privacy.lifetime import DatasetLedger


@dataclass
class RoundResult:
    """What a site reports after training a round (only shared groups in ``weights``)."""

    weights: dict[str, np.ndarray]
    num_samples: int
    metrics: dict[str, float]


def federation_key(config: ExperimentConfig) -> str:
    """The folder a site keeps one federation's state in: ``federation.federation_id``, else a hash
    of the experiment config without what a resumed federation may change (rounds, timeouts)."""
    if config.federation.federation_id:
        return config.federation.federation_id
    data = config.to_dict()
    for key in ("rounds", "round_timeout_s", "federation_id"):
        data["federation"].pop(key, None)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode("utf-8")).hexdigest()
    return f"fed-{digest[:12]}"

log = logging.getLogger("fedsynth.site")

#: how long a site waits for another process to give its state folder up: with Flower's default
#: isolation each message runs in a fresh process, and the previous one may still be exiting
LOCK_WAIT_S = 60.0


class Site:
    """Train and evaluate one site's model for a federation, state kept in ``state_dir``."""

    def __init__(self, config: ExperimentConfig, train_csv: str | Path, state_dir: str | Path, *,
                 site_id: str = "site", val_csv: str | Path | None = None, policy: SitePolicy | None = None,
                 ledger: DatasetLedger | None = None, driver: str = "site", keep_local: Sequence[str] = ()) -> None:
        self.policy_rules = policy or SitePolicy.permissive()
        self.policy_rules.check(config, site_id)  # before anything is built from the coordinator's config
        self.config = config
        self.site_id = site_id
        self.train_csv, self.val_csv = str(train_csv), (str(val_csv) if val_csv else None)
        self.state_dir = Path(state_dir) / federation_key(config)
        # one process writes a site's state: a second site process on the same folder is refused
        self._lock = FolderLock(self.state_dir, f"site '{site_id}'").acquire(wait_s=LOCK_WAIT_S)
        weakref.finalize(self, self._lock.release)
        self.ledger, self.driver = ledger, driver  # the site's lifetime privacy ledger, shared by all its runs
        self.engine: Engine = build_engine(config, self.state_dir, ledger=ledger, driver=driver)
        self.policy = resolve_group_policy(self.engine.model, config.federation)
        self.shared = shared_groups(self.policy)
        self.frozen = frozen_groups(self.engine.model, self.policy)  # sent unchanged (float32)
        unknown = sorted(set(keep_local) - set(self.engine.model.groups()))
        if unknown:
            raise ConfigError(f"site '{site_id}': keep_local names group '{unknown[0]}', which a "
                              f"{config.family} model does not have; its groups are {self.engine.model.groups()}")
        # the site's own choice, whatever the coordinator's policy: these groups never leave it; the
        # site trains them as its own and answers with what it received (which tells nothing of its data)
        self.kept = [g for g in keep_local if g in self.shared and g not in self.frozen]
        self._data: tuple[ImageDataset, ImageDataset | None] | None = None
        self._seconds_per_step: float | None = None  # of the last round: the next round's ETA
        if (self.state_dir / LAST).is_file():
            self.engine.resume(self.state_dir / LAST)

    @property
    def data(self) -> tuple[ImageDataset, ImageDataset | None]:
        if self._data is None:
            self._data = load_datasets(self.config, self.train_csv, self.val_csv)
        return self._data

    @property
    def num_samples(self) -> int:
        return len(self.data[0])

    def shared_weights(self) -> dict[str, np.ndarray]:
        return self.engine.model.get_weights(self.shared)

    def apply_global(self, weights: Mapping[str, np.ndarray]) -> None:
        """Load the server's weights for the shared groups; local groups must never arrive."""
        local = sorted({group_of(k) for k in weights} - set(self.shared))
        if local:
            raise WeightsError(f"site '{self.site_id}': received weights for non-shared group(s) {local}")
        self.engine.model.check_received(weights, f"site '{self.site_id}'")  # e.g. a shipped first stage's hash
        self.engine.model.set_weights({k: v for k, v in weights.items() if group_of(k) not in self.kept}, strict=True)

    def train_round(self, global_weights: Mapping[str, np.ndarray], server_round: int) -> RoundResult:
        """Apply global weights, train locally for one round, persist state, return shared weights."""
        self.apply_global(global_weights)
        fed = self.config.federation
        state = self.engine.state
        state.round = server_round
        max_steps = state.step + fed.local_steps if fed.local_steps else None
        train, val = self.data
        privacy = self.engine.privacy
        if privacy is not None and hasattr(privacy, "planned_noise_multiplier"):
            self.policy_rules.check_noise(privacy.planned_noise_multiplier(len(train)), self.site_id)
        partial = 1 if fed.local_steps and state.batch_in_epoch else 0
        per_round = fed.local_steps or fed.local_epochs * math.ceil(len(train) / self.config.training.batch_size)
        first, started = state.step, time.monotonic()
        eta = f", about {per_round * self._seconds_per_step:.0f} s" if self._seconds_per_step else ""
        log.info("site %s: round %s/%s: %s local step(s) from step %s%s", self.site_id, server_round, fed.rounds,
                 per_round, first, eta)
        try:
            self.engine.fit(train, val, epochs=state.epoch + fed.local_epochs + partial, max_steps=max_steps,
                            planned_steps=fed.rounds * per_round)
            self.engine.check_finite()
        except TrainingDiverged:
            self._restore_last_good()
            raise
        self.engine.save(self.state_dir / LAST)
        took, steps = time.monotonic() - started, self.engine.state.step - first
        if steps:
            self._seconds_per_step = took / steps
        log.info("site %s: round %s/%s: steps %s..%s in %.1f s", self.site_id, server_round, fed.rounds, first,
                 self.engine.state.step, took)
        metrics = self.policy_rules.outbound(self.engine.state.metrics)
        weights = select_groups(self.engine.model.get_weights(), self.shared)
        for key in [k for k in weights if group_of(k) in self.kept]:
            weights[key] = np.asarray(global_weights[key])  # what it received: the site's own stays home
        metrics.update({f"{KEPT_LOCAL}{g}": 1.0 for g in self.kept})
        return RoundResult(weights, len(train), metrics)

    def _restore_last_good(self) -> None:
        """After a diverged round: rebuild the engine from the site's last good state (or its
        initial state), so the site is not poisoned in later rounds; nothing non-finite was saved."""
        self.engine = build_engine(self.config, self.state_dir, ledger=self.ledger, driver=self.driver)
        if (self.state_dir / LAST).is_file():
            self.engine.resume(self.state_dir / LAST)

    def evaluate(self, global_weights: Mapping[str, np.ndarray]) -> tuple[float | None, int, dict[str, float]]:
        """Validation loss of the global model on this site's validation data (else its training data).

        The loss is ``None`` and the metrics are filtered when the site's policy keeps them in.
        """
        self.apply_global(global_weights)
        train, val = self.data
        dataset = val if val is not None else train
        metrics = self.engine.validate(dataset)
        loss = float(metrics["loss"]) if self.policy_rules.allows("loss") else None
        return loss, len(dataset), self.policy_rules.outbound(metrics)
