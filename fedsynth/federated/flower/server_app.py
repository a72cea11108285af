"""Flower ServerApp: the federation's round loop, a thin adapter over :class:`GlobalModel`.

Each round: wait for ``min_sites`` connected SuperNodes, sample ``fraction_fit`` of them, send
the shared groups (transport dtype) and the experiment config, fold the replies into the
streaming FedAvg *as they arrive* (the server never holds all sites' updates at once),
optionally ask the same sites to evaluate the new global model, then write the global
checkpoint (core format, ``round`` set). A restarted server resumes from ``global/last.ckpt``.

Run config (``[tool.flwr.app.config]`` of the app, or ``flwr run --run-config``):
``config-path`` and ``run-dir`` (absolute: the ServerApp runs in the SuperLink's working
directory), ``rounds`` (0 = ``federation.rounds``), ``evaluate`` (bool).

The server appends one JSON line per event to ``RUN_DIR/server/progress.jsonl`` and one per
received reply to ``RUN_DIR/server/received.jsonl`` (site, groups, bytes): what the server
actually got, for audits and tests.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedsynth.config import ExperimentConfig, load_config
from fedsynth.errors import ConfigError, FedsynthError
from fedsynth.federated.aggregation import SiteUpdate, mean_metrics
from fedsynth.federated.flower.records import VERDICT_KEY, encode, record_groups, record_nbytes, record_to_weights
from fedsynth.federated.server import GlobalModel

POLL_S = 0.25  # seconds between pulls of replies from the SuperLink (127.0.0.1, cheap)


def verdicts(server_round: int, summary: dict[str, Any]) -> dict[str, str]:
    """Each site's outcome of ``server_round`` as sent back to it: ``accepted`` or ``rejected: <reason>``
    (the server's own reason, e.g. NaN or a wrong shape; it names only the site and the weight key)."""
    out = {site: f"round {server_round}: accepted" for site in summary["accepted"]}
    out.update({site: f"round {server_round}: rejected: {reason}" for site, reason in summary["rejected"]})
    return out


class FlowerFederation:
    """Drive ``config.federation.rounds`` rounds over a Flower :class:`Grid`."""

    def __init__(self, grid: Grid, config: ExperimentConfig, run_dir: Path, *, evaluate: bool = True) -> None:
        if not run_dir.is_absolute():
            raise ConfigError(f"run-dir must be an absolute path (the ServerApp runs in the SuperLink's folder), got {run_dir}")
        self.grid, self.config, self.run_dir, self.evaluate = grid, config, run_dir, evaluate
        self.fed = config.federation
        self.global_model = GlobalModel(config, run_dir)
        self.server_dir = run_dir / "server"
        self.server_dir.mkdir(parents=True, exist_ok=True)
        self._experiment = json.dumps(self.global_model.site_config.to_dict())  # no server paths
        self._failures: list[str] = []
        self._node_site: dict[int, str] = {}  # node id -> site id, from the sites' replies
        self._verdicts: dict[str, str] = {}  # site id -> what became of its last update (sent with the next message)

    # ------------------------------------------------------------------ logs

    def _append(self, name: str, record: dict[str, Any]) -> None:
        with open(self.server_dir / name, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": round(time.time(), 3), **record}, default=float) + "\n")

    def event(self, kind: str, **fields: Any) -> None:
        """Log an event to the Flower log and ``server/progress.jsonl``."""
        log(INFO, "[fedsynth] %s %s", kind, json.dumps(fields, default=float))
        self._append("progress.jsonl", {"event": kind, **fields})

    # ------------------------------------------------------------------ rounds

    def run(self) -> Path | None:
        """Run the remaining rounds; returns the last global checkpoint."""
        gm = self.global_model
        start = gm.round + 1
        self.event("start", rounds=self.fed.rounds, start_round=start, policy=gm.policy,
                   family=self.config.family, transport_dtype=self.fed.transport_dtype)
        last: Path | None = None
        for server_round in range(start, self.fed.rounds + 1):
            last = self.run_round(server_round)
        self.event("done", round=gm.round, checkpoint=str(gm.dir / "last.ckpt"))
        return last

    def run_round(self, server_round: int) -> Path:
        """One round: sample, train (streaming FedAvg), evaluate, checkpoint."""
        t0 = time.monotonic()
        nodes = self._sample(server_round)
        record = encode(self.global_model.shared_weights(), self.fed.transport_dtype, self.global_model.frozen)
        self.event("round_start", round=server_round, sites=len(nodes), sent_bytes_per_site=record_nbytes(record),
                   sent_groups=record_groups(record))
        self._failures = []
        # the round policy (min_sites, no valid update) lives in GlobalModel.aggregate (both backends)
        summary = self.global_model.aggregate(server_round, self._train_updates(server_round, nodes, record), self._failures)
        self._verdicts = verdicts(server_round, summary)
        val: dict[str, float] = {}
        if self.evaluate:
            val = self._evaluate(server_round, nodes)
            if "loss" in val:
                self.global_model.record_evaluation(val.pop("loss"), val)
        path = self.global_model.save()
        self.event("round_end", round=server_round, accepted=summary["accepted"], rejected=summary["rejected"],
                   clipped=summary["clipped"], metrics=self.global_model.state.metrics,
                   site_metrics=summary["site_metrics"], seconds=round(time.monotonic() - t0, 2), checkpoint=str(path),
                   site_nodes={site: node for node, site in self._node_site.items()})  # for `flwr supernode unregister`
        return path

    def _sample(self, server_round: int) -> list[int]:
        deadline = time.monotonic() + self.fed.round_timeout_s
        while len(nodes := sorted(self.grid.get_node_ids())) < self.fed.min_sites:
            if time.monotonic() > deadline:
                raise FedsynthError(f"round {server_round}: only {len(nodes)} site(s) connected after "
                                    f"{self.fed.round_timeout_s:.0f} s; federation.min_sites is {self.fed.min_sites}")
            time.sleep(POLL_S)
        size = min(len(nodes), max(self.fed.min_sites, math.ceil(self.fed.fraction_fit * len(nodes))))
        return sorted(random.Random(self.config.seed * 100_003 + server_round).sample(nodes, size))

    def _exchange(self, server_round: int, nodes: list[int], message_type: str,
                  arrays: ArrayRecord) -> Iterator[tuple[int, Message]]:
        """Send one message per node; yield ``(node, reply)`` as replies arrive, until the round timeout.

        A node that goes offline (the SuperLink stops seeing its heartbeats) is given up on.
        """
        ttl = max(self.fed.round_timeout_s + 60.0, 120.0)

        def config(node: int) -> ConfigRecord:
            site = self._node_site.get(node)
            verdict = {VERDICT_KEY: self._verdicts[site]} if site in self._verdicts else {}
            return ConfigRecord({"server-round": server_round, "experiment": self._experiment, **verdict})

        messages = [Message(RecordDict({"arrays": arrays, "config": config(node)}), dst_node_id=node,
                            message_type=message_type, ttl=ttl) for node in nodes]
        pending = dict(zip(self.grid.push_messages(messages), nodes))
        deadline = time.monotonic() + self.fed.round_timeout_s
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    yield node, reply
            if pending:
                online = set(self.grid.get_node_ids())
                for message_id, node in list(pending.items()):
                    if node not in online:
                        log(WARNING, "[fedsynth] round %s: node %s went offline; continuing without it", server_round, node)
                        pending.pop(message_id)
                time.sleep(POLL_S)
        for node in pending.values():
            self._failures.append(f"node {node} did not answer within {self.fed.round_timeout_s:.0f} s")
            log(WARNING, "[fedsynth] round %s: node %s did not answer within %.0f s; continuing without it",
                server_round, node, self.fed.round_timeout_s)

    def _train_updates(self, server_round: int, nodes: list[int], arrays: ArrayRecord) -> Iterator[SiteUpdate]:
        for node, reply in self._exchange(server_round, nodes, MessageType.TRAIN, arrays):
            if reply.has_error():
                log(WARNING, "[fedsynth] round %s: node %s failed: %s", server_round, node, reply.error.reason)
                self._failures.append(f"node {node} failed: {reply.error.reason}")
                self._append("received.jsonl", {"round": server_round, "phase": "train", "node": node,
                                                 "error": reply.error.reason})
                continue
            content = reply.content
            site = str(content["site"]["site-id"]) if "site" in content else f"node-{node}"
            self._node_site[node] = site
            record = content["arrays"]
            metrics = {k: float(v) for k, v in content["metrics"].items()}  # type: ignore[arg-type]
            num_samples = int(metrics.pop("num_samples", 0))
            self._append("received.jsonl", {"round": server_round, "phase": "train", "node": node, "site": site,
                                             "groups": record_groups(record), "keys": len(record),
                                             "bytes": record_nbytes(record),
                                             "dtypes": sorted({a.dtype for a in record.values()})})
            yield SiteUpdate(site, record_to_weights(record), num_samples, metrics)

    def _evaluate(self, server_round: int, nodes: list[int]) -> dict[str, float]:
        """Sample-weighted validation metrics of the new global model over the sites that answer
        (each metric over the sites that reported it finite: :func:`mean_metrics`)."""
        arrays = encode(self.global_model.shared_weights(), self.fed.transport_dtype, self.global_model.frozen)
        reports: list[tuple[float, dict[str, float]]] = []
        for node, reply in self._exchange(server_round, nodes, MessageType.EVALUATE, arrays):
            if reply.has_error():
                log(WARNING, "[fedsynth] round %s: node %s failed to evaluate: %s", server_round, node, reply.error.reason)
                continue
            metrics = {k: float(v) for k, v in reply.content["metrics"].items()}  # type: ignore[arg-type]
            reports.append((metrics.pop("num_samples", 0.0), metrics))
        return mean_metrics(reports)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point: read the run config, then run (or resume) the federation."""
    rc = context.run_config
    config_path = Path(str(rc.get("config-path", "")))
    if not config_path.is_absolute():
        raise ConfigError(f"run config 'config-path' must be an absolute path to the experiment YAML, got '{config_path}'")
    config = load_config(config_path)
    rounds = int(rc.get("rounds", 0) or 0)
    if rounds > 0:
        config.federation.rounds = rounds
    federation = FlowerFederation(grid, config, Path(str(rc.get("run-dir", ""))), evaluate=bool(rc.get("evaluate", True)))
    try:
        federation.run()
    except BaseException as err:
        federation.event("error", error=f"{type(err).__name__}: {err}")
        raise
