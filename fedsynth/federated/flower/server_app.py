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

import dataclasses
import json
import math
import random
import re
import time
from collections.abc import Iterator
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, TypeVar

from flwr.app import ArrayRecord, Context, Message, MessageType
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedsynth.config import ExperimentConfig, load_config
from fedsynth.errors import REFUSAL, ConfigError, FedsynthError
from fedsynth.federated.aggregation import SiteUpdate, mean_metrics
from fedsynth.federated.compat import INCOMPLETE_REPLY, bound_reply_downloads
from fedsynth.federated.flower.messages import (
    LOSS,
    RUN_CONFIG_PATH,
    RUN_DIR,
    RUN_EVALUATE,
    RUN_ROUNDS,
    EvaluateReply,
    MessageError,
    RoundInstruction,
    TrainReply,
    Verdict,
)
from fedsynth.federated.flower.records import encode, record_groups, record_nbytes, record_to_weights
from fedsynth.federated.flower.roster import Roster
from fedsynth.federated.server import GlobalModel, RoundSummary

#: a site's refusal as it reaches the server (:meth:`fedsynth.errors.PolicyRefused.public`)
REFUSED = re.compile(r"site '(?P<site>[^']*)': " + re.escape(REFUSAL) + r" \((?P<fields>[^)]*)\)")
POLL_S = 0.25  # seconds between pulls of replies from the SuperLink (127.0.0.1, cheap)

#: times one round sends a node its message again after the SuperLink lost it (:func:`lost_before_delivery`)
MAX_RESENDS = 3

_Reply = TypeVar("_Reply", TrainReply, EvaluateReply)


def lost_before_delivery(reply: Message) -> bool:
    """Whether ``reply`` is the SuperLink saying it no longer has the message it answers.

    flwr 1.23's SuperLink stores a pushed message before it registers the message's objects; a
    SuperNode that pulls in between gets nothing, and the SuperLink deletes the message. The site
    never saw it, so sending it again is safe (at worst a site trains twice in a round, which only
    spends more of its own privacy budget: its accountant counts every step it takes).
    """
    return (reply.has_error() and reply.error.code == ErrorCode.MESSAGE_UNAVAILABLE
            and reply.error.reason != INCOMPLETE_REPLY)  # a reply cut off mid-upload: the site did run


def verdicts(server_round: int, summary: RoundSummary) -> dict[str, Verdict]:
    """Each site's outcome of ``server_round`` as sent back to it: accepted, or rejected with the
    server's own reason (e.g. NaN or a wrong shape; it names only the site and the weight key)."""
    out = {site: Verdict(server_round, True) for site in summary["accepted"]}
    out.update({site: Verdict(server_round, False, reason) for site, reason in summary["rejected"]})
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
        self._refused: list[tuple[str, str]] = []  # (site, fields) of sites that refused this round by their policy
        self._node_site: dict[int, str] = {}  # node id -> site id, from the sites' replies
        self._verdicts: dict[str, Verdict] = {}  # site id -> what became of its last update (sent with the next message)
        self.roster = Roster(run_dir)  # node id -> site name, bound to the keys the operator registered
        self._warned_no_roster = False
        self._deadline = math.inf  # of the exchange under way: downloading replies never outlasts it
        self._round_seconds: list[float] = []  # for the federation's ETA
        bound_reply_downloads(lambda: self._deadline - time.monotonic())

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
        self._failures, self._refused = [], []
        # the round policy (min_sites, no valid update) lives in GlobalModel.aggregate (both backends)
        summary = self.global_model.aggregate(server_round, self._train_updates(server_round, nodes, record),
                                              self._failures, self._refused)
        self._verdicts = verdicts(server_round, summary)
        val: dict[str, float] = {}
        if self.evaluate:
            val = self._evaluate(server_round, nodes)
            if LOSS in val:
                self.global_model.record_evaluation(val.pop(LOSS), val)
        path = self.global_model.save()
        seconds = time.monotonic() - t0
        self._round_seconds.append(seconds)
        recent = self._round_seconds[-5:]
        eta = sum(recent) / len(recent) * (self.fed.rounds - server_round)
        self.event("round_end", round=server_round, rounds=self.fed.rounds, eta_s=round(eta, 1),
                   accepted=summary["accepted"], rejected=summary["rejected"],
                   clipped=summary["clipped"], metrics=self.global_model.state.metrics,
                   site_metrics=summary["site_metrics"], seconds=round(seconds, 2), checkpoint=str(path),
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

        def instruction(node: int) -> RoundInstruction:
            site = self._node_site.get(node)
            verdict = self._verdicts.get(site) if site is not None else None
            return RoundInstruction(server_round, self._experiment, arrays, verdict)

        pending: dict[str, int] = {}  # message id -> node

        def send(to: list[int]) -> None:
            messages = [Message(instruction(node).to_record(), dst_node_id=node, message_type=message_type, ttl=ttl)
                        for node in to]
            pending.update(zip(self.grid.push_messages(messages), to, strict=False))

        send(nodes)
        resent: dict[int, int] = {}
        deadline = self._deadline = time.monotonic() + self.fed.round_timeout_s
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                if lost_before_delivery(reply) and resent.get(node, 0) < MAX_RESENDS:
                    resent[node] = resent.get(node, 0) + 1
                    log(WARNING, "[fedsynth] round %s: the SuperLink lost the message to node %s (%s); sending it "
                        "again (%s of %s)", server_round, node, reply.error.reason, resent[node], MAX_RESENDS)
                    send([node])
                    continue
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

    def _replies(self, server_round: int, nodes: list[int], message_type: str, arrays: ArrayRecord,
                 kind: type[_Reply]) -> Iterator[tuple[int, _Reply]]:
        """The decoded replies of ``_exchange``; a failed or malformed one is logged (train: also a
        round failure and a line in ``received.jsonl``) and skipped."""
        phase = "train" if message_type == MessageType.TRAIN else "evaluate"
        for node, reply in self._exchange(server_round, nodes, message_type, arrays):
            problem = f"node {node} failed: {reply.error.reason}" if reply.has_error() else None
            if problem is None:
                try:
                    decoded = kind.from_record(reply.content, f"the {phase} reply of node {node}")
                except MessageError as err:
                    problem = str(err)
                else:
                    site, impostor = self._identify(node, decoded.site_id)
                    if impostor is not None:
                        log(WARNING, "[fedsynth] round %s (%s): %s: rejected", server_round, phase, impostor)
                        if phase == "train":
                            self._refused.append((site, impostor))
                            self._append("received.jsonl", {"round": server_round, "phase": phase, "node": node,
                                                            "site": site, "error": impostor})
                        continue
                    decoded = dataclasses.replace(decoded, site_id=site)
            if problem is not None:
                log(WARNING, "[fedsynth] round %s (%s): %s", server_round, phase, problem)
                refusal = REFUSED.search(problem)
                if phase == "train" and refusal:  # a site's own policy: a rejected site, named as it names itself
                    site = self._node_site.get(node, refusal["site"])
                    self._refused.append((site, f"{REFUSAL} ({refusal['fields']})"))
                    self._append("received.jsonl", {"round": server_round, "phase": phase, "node": node, "site": site,
                                                    "refused": refusal["fields"]})
                elif phase == "train":
                    self._failures.append(problem)
                    self._append("received.jsonl", {"round": server_round, "phase": phase, "node": node, "error": problem})
                continue
            yield node, decoded

    def _identify(self, node: int, claimed: str) -> tuple[str, str | None]:
        """The site a node is, by its registered key (the roster), and why its reply is refused, if it is."""
        if not self.roster.exists():
            if not self._warned_no_roster:
                self._warned_no_roster = True
                log(WARNING, "[fedsynth] no roster (%s): sites are named as they name themselves; register their keys "
                    "with fedsynth federate flower-register to tie names to keys", self.roster.path)
            return claimed, None
        bound = self.roster.name(node)
        if bound is None:
            return f"node {node}", f"node {node} is not in the roster (its key was never bound to a site, or was revoked)"
        if claimed != bound:
            return bound, f"node {node} is registered as site '{bound}' but says it is '{claimed}'"
        return bound, None

    def _train_updates(self, server_round: int, nodes: list[int], arrays: ArrayRecord) -> Iterator[SiteUpdate]:
        for node, reply in self._replies(server_round, nodes, MessageType.TRAIN, arrays, TrainReply):
            self._node_site[node] = reply.site_id
            record = reply.arrays
            self._append("received.jsonl", {"round": server_round, "phase": "train", "node": node, "site": reply.site_id,
                                             "groups": record_groups(record), "keys": len(record),
                                             "bytes": record_nbytes(record),
                                             "dtypes": sorted({a.dtype for a in record.values()})})
            yield SiteUpdate(reply.site_id, record_to_weights(record), reply.num_samples, dict(reply.metrics))

    def _evaluate(self, server_round: int, nodes: list[int]) -> dict[str, float]:
        """Sample-weighted validation metrics of the new global model over the sites that answer
        (each metric over the sites that reported it finite: :func:`mean_metrics`)."""
        arrays = encode(self.global_model.shared_weights(), self.fed.transport_dtype, self.global_model.frozen)
        return mean_metrics([(float(reply.num_samples), reply.report()) for _, reply in
                             self._replies(server_round, nodes, MessageType.EVALUATE, arrays, EvaluateReply)])


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point: read the run config, then run (or resume) the federation."""
    rc = context.run_config
    config_path = Path(str(rc.get(RUN_CONFIG_PATH, "")))
    if not config_path.is_absolute():
        raise ConfigError(f"run config '{RUN_CONFIG_PATH}' must be an absolute path to the experiment YAML, got '{config_path}'")
    config = load_config(config_path)
    rounds = int(rc.get(RUN_ROUNDS, 0) or 0)
    if rounds > 0:
        config.federation.rounds = rounds
    federation = FlowerFederation(grid, config, Path(str(rc.get(RUN_DIR, ""))), evaluate=bool(rc.get(RUN_EVALUATE, True)))
    try:
        federation.run()
    except BaseException as err:
        federation.event("error", error=f"{type(err).__name__}: {err}")
        raise
