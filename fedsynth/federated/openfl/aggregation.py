"""OpenFL's per-tensor ``aggregation_type`` routed to fedsynth's one aggregation policy.

OpenFL calls the task's aggregation function once per tensor, with the tensor's name. Tensor
names are core group keys (``generator/...``), so the function routes by group prefix:

- ``shared`` groups: on the first call of a round it reads every site's full update for that
  round from the aggregator's tensor DB and folds them through the core
  :class:`~fedsynth.federated.aggregation.FedAvg` (sample-weighted, rejects unknown/missing keys,
  wrong shapes and NaN/Inf, optional ``clip_update_norm``), exactly as the Flower driver does;
  each per-tensor call then returns that round's result for the tensor.
- ``local`` groups must never arrive: a tensor of a local group is an error naming it.

The round goes through the shared :class:`~fedsynth.federated.server.GlobalModel` (setting
``run_dir``, default the workspace): the same FedAvg / client-level DP, the same round policy
(fewer valid updates than ``federation.min_sites`` raises, naming the round and the rejected sites,
which stops the aggregator), and the same ``RUN/global/{last,best,round_NNNN}.ckpt`` +
``history.json`` as the Flower server. OpenFL validates the model that *enters* a round, so round
r's ``val_loss`` (and ``best``) is recorded when round r+1 is aggregated; the last round has none.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from openfl.interface.aggregation_functions import AggregationFunction

from fedsynth.engine import seed_everything
from fedsynth.errors import FedsynthError
from fedsynth.federated.aggregation import SHARED, NoValidUpdates, SiteUpdate, from_transport, group_of, resolve_group_policy
from fedsynth.federated.compat import (
    end_openfl_aggregator,
    openfl_average_metrics_over_senders,
    openfl_persist_rounds_without_a_score,
)
from fedsynth.federated.openfl.common import CONFIG_IN_WORKSPACE, load_pinned_config
from fedsynth.federated.server import GlobalModel
from fedsynth.models import build_model

log = logging.getLogger("fedsynth.openfl")

#: set by :func:`fedsynth.federated.openfl.tools.start_aggregator`: a failed round (too few valid
#: updates) stops the aggregator process with the error (OpenFL would otherwise only fail the RPC
#: and wait for the round forever), as the Flower server ends its run.
EXIT_ON_ROUND_FAILURE = False
ROUND_FAILURE_STATUS = 3


class GroupRoutedFedAvg(AggregationFunction):
    """``aggregation_type.template`` of every task in plan.yaml."""

    def __init__(self, config_path: str = CONFIG_IN_WORKSPACE, config_sha256: str | None = None,
                 run_dir: str = ".") -> None:
        super().__init__()
        openfl_persist_rounds_without_a_score()
        openfl_average_metrics_over_senders()
        self.config = load_pinned_config(config_path, config_sha256)
        seed_everything(self.config.seed)
        self.policy = resolve_group_policy(build_model(self.config), self.config.federation)
        self.run_dir = Path(run_dir)
        self._global: GlobalModel | None = None
        self._rounds: dict[tuple[int, tuple[str, ...]], dict[str, np.ndarray]] = {}

    @property
    def global_model(self) -> GlobalModel:
        """Built on first use: only the train task's instance, on the aggregator, writes checkpoints."""
        if self._global is None:
            self._global = GlobalModel(self.config, self.run_dir)
        return self._global

    def call(self, local_tensors: list[Any], db_iterator: Iterator[pd.Series], tensor_name: str,
             fl_round: int, tags: tuple[str, ...]) -> np.ndarray:
        group = group_of(tensor_name)
        if self.policy.get(group) != SHARED:
            raise FedsynthError(
                f"tensor '{tensor_name}' of group '{group}' reached the aggregator, but the group is "
                f"{self.policy.get(group, 'unknown')}: sites must send shared groups only {sorted(g for g, p in self.policy.items() if p == SHARED)}"
            )
        key = (fl_round, tuple(sorted(t.col_name for t in local_tensors)))
        if key not in self._rounds:
            try:
                self._rounds = {key: self._aggregate_round(local_tensors, db_iterator, fl_round)}
            except NoValidUpdates as err:
                if not EXIT_ON_ROUND_FAILURE:
                    raise
                log.error("the federation failed: %s", err)
                end_openfl_aggregator(ROUND_FAILURE_STATUS, f"NoValidUpdates: {err}")
        result = self._rounds[key]
        if tensor_name not in result:
            raise FedsynthError(f"tensor '{tensor_name}' is not part of round {fl_round}'s global model")
        return result[tensor_name]

    def _aggregate_round(self, local_tensors: list[Any], db_iterator: Iterator[pd.Series],
                         fl_round: int) -> dict[str, np.ndarray]:
        """FedAvg of every site's complete update of ``fl_round`` against that round's global model."""
        sites = {t.col_name: float(t.weight) for t in local_tensors}
        reference: dict[str, np.ndarray] = {}
        updates: dict[str, dict[str, np.ndarray]] = {s: {} for s in sites}
        rows = [row for row in db_iterator if int(row["round"]) == fl_round]
        for row in rows:
            if int(row["round"]) != fl_round:
                continue
            tags = tuple(row["tags"])
            if tags == ("model",):
                reference[row["tensor_name"]] = np.asarray(row["nparray"])
            elif "trained" in tags:
                for site in sites:
                    if site in tags:
                        updates[site][row["tensor_name"]] = np.asarray(row["nparray"])
        reference = {k: v for k, v in reference.items() if self.policy.get(group_of(k)) == SHARED}
        metrics, val_losses = self._site_metrics(rows, fl_round, sites)
        gm = self.global_model
        gm.model.set_weights(from_transport(reference, gm.shared_weights()))  # OpenFL holds the global weights
        if fl_round >= 1 and val_losses:  # validate_agg of this round = the previous round's global model
            gm.record_past_evaluation(fl_round, float(np.mean(val_losses)))
        # OpenFL passes normalised sample weights (n_i / sum n); FedAvg only needs proportions
        summary = gm.aggregate(fl_round + 1, [SiteUpdate(site, updates[site], num_samples=weight,  # type: ignore[arg-type]
                                                         metrics=metrics.get(site, {})) for site, weight in sites.items()])
        gm.save()
        log.info("round %d: aggregated %s (rejected %s, clipped %s)", fl_round, summary["accepted"],
                 [s for s, _ in summary["rejected"]], summary["clipped"])
        return {k: np.asarray(v, dtype=np.float32) for k, v in gm.shared_weights().items()}

    @staticmethod
    def _site_metrics(rows: list[Any], fl_round: int, sites: dict[str, float]) -> tuple[dict[str, dict[str, float]], list[float]]:
        """Each site's train metrics of ``fl_round`` and the validation losses of the model entering it."""
        metrics: dict[str, dict[str, float]] = {}
        val_losses: list[float] = []
        for row in rows:
            tags = tuple(row["tags"])
            if int(row["round"]) != fl_round or "metric" not in tags:
                continue
            site = next((s for s in sites if s in tags), None)
            if site is None:
                continue
            value = float(np.asarray(row["nparray"]).reshape(-1)[0])
            if "validate_agg" in tags and row["tensor_name"] == "score":
                val_losses.append(-value)
            elif len(tags) == 2:  # ("metric", site): the train task's metrics
                metrics.setdefault(site, {})[str(row["tensor_name"])] = value
        return metrics, val_losses
