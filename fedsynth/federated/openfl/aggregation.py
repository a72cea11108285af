"""OpenFL's per-tensor ``aggregation_type`` routed to fedsynth's one aggregation policy.

OpenFL calls the task's aggregation function once per tensor, with the tensor's name. Tensor
names are core group keys (``generator/...``), so the function routes by group prefix:

- ``shared`` groups: on the first call of a round it reads every site's full update for that
  round from the aggregator's tensor DB and folds them through the core
  :class:`~fedsynth.federated.aggregation.FedAvg` (sample-weighted, rejects unknown/missing keys,
  wrong shapes and NaN/Inf, optional ``clip_update_norm``), exactly as the Flower driver does;
  each per-tensor call then returns that round's result for the tensor.
- ``local`` groups must never arrive: a tensor of a local group is an error naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
from openfl.interface.aggregation_functions import AggregationFunction

from fedsynth.engine import seed_everything
from fedsynth.errors import FedsynthError
from fedsynth.federated.aggregation import SHARED, SiteUpdate, group_of, make_aggregator, resolve_group_policy
from fedsynth.federated.openfl.common import CONFIG_IN_WORKSPACE, load_pinned_config
from fedsynth.models import build_model

log = logging.getLogger("fedsynth.openfl")


class GroupRoutedFedAvg(AggregationFunction):
    """``aggregation_type.template`` of every task in plan.yaml."""

    def __init__(self, config_path: str = CONFIG_IN_WORKSPACE, config_sha256: str | None = None) -> None:
        super().__init__()
        self.config = load_pinned_config(config_path, config_sha256)
        seed_everything(self.config.seed)
        self.policy = resolve_group_policy(build_model(self.config), self.config.federation)
        self._rounds: dict[tuple[int, tuple[str, ...]], dict[str, np.ndarray]] = {}

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
            self._rounds = {key: self._aggregate_round(local_tensors, db_iterator, fl_round)}
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
        for row in db_iterator:
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
        fedavg = make_aggregator(reference, self.config, fl_round + 1)  # OpenFL rounds count from 0
        for site, weight in sites.items():
            # OpenFL passes normalised sample weights (n_i / sum n); FedAvg only needs proportions
            fedavg.add(SiteUpdate(site, updates[site], num_samples=weight))  # type: ignore[arg-type]
        if not fedavg.accepted:
            log.error("round %d: every update was rejected (%s); the global model is unchanged", fl_round, fedavg.rejected)
            return reference
        log.info("round %d: aggregated %s (rejected %s, clipped %s)", fl_round, fedavg.accepted,
                 [s for s, _ in fedavg.rejected], fedavg.clipped)
        return {k: np.asarray(v, dtype=np.float32) for k, v in fedavg.result().items()}
