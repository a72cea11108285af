"""What the Flower server and a site say to each other: every record name and key, in one place.

Server -> site (a training round or an evaluation, :class:`RoundInstruction`)::

    arrays  ArrayRecord   the shared groups of the global model ("<group>/<name>", transport dtype)
    config  ConfigRecord  server-round (int), experiment (the config as JSON, no server paths),
                          last-update (optional: what became of this site's previous update)

Site -> server, after training (:class:`TrainReply`)::

    arrays   ArrayRecord   the site's shared groups after the round
    metrics  MetricRecord  num_samples (int) and the metrics the site's policy lets out (e.g. epsilon)
    site     ConfigRecord  site-id

Site -> server, after an evaluation (:class:`EvaluateReply`)::

    metrics  MetricRecord  num_samples, loss (unless the site keeps it in) and the other allowed metrics
    site     ConfigRecord  site-id

A failed round travels as the reply's Flower error (:class:`~fedsynth.errors.SiteFailure`), not in
its content. ``from_record`` refuses a malformed message with a :class:`MessageError` naming the
record and key. Also here: the run config keys of the app (``pyproject.toml``) and the SuperNode's
node config key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsynth.config import ExperimentConfig, config_from_dict
from fedsynth.errors import FedsynthError
from fedsynth.federated.flower.records import metrics_record

# records of a message's content
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
# keys inside them
SERVER_ROUND = "server-round"
EXPERIMENT = "experiment"
VERDICT = "last-update"
SITE_ID = "site-id"
NUM_SAMPLES = "num_samples"
LOSS = "loss"

#: the SuperNode's ``--node-config`` key naming the site's data config
DATA_CONFIG = "data-config"
#: the app's run config (``[tool.flwr.app.config]``, ``flwr run --run-config``)
RUN_CONFIG_PATH = "config-path"
RUN_DIR = "run-dir"
RUN_ROUNDS = "rounds"
RUN_EVALUATE = "evaluate"


class MessageError(FedsynthError):
    """A Flower message lacks a record or key fedsynth needs, or holds a value of the wrong type."""


_R = TypeVar("_R", ArrayRecord, ConfigRecord, MetricRecord)


def _record(content: RecordDict, name: str, kind: type[_R], source: str) -> _R:
    if name not in content:
        raise MessageError(f"{source}: no '{name}' record (it has {sorted(content.keys())})")
    record = content[name]
    if not isinstance(record, kind):
        raise MessageError(f"{source}: record '{name}' is a {type(record).__name__}, expected a {kind.__name__}")
    return record


def _value(record: Mapping[str, Any], name: str, key: str, kind: type | tuple[type, ...], source: str) -> Any:
    if key not in record:
        raise MessageError(f"{source}: record '{name}' has no '{key}' (it has {sorted(record.keys())})")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MessageError(f"{source}: '{name}.{key}' is {value!r}, expected {getattr(kind, '__name__', kind)}")
    return value


def _count(record: Mapping[str, Any], source: str) -> int:
    value = _value(record, METRICS, NUM_SAMPLES, (int, float), source)
    if value < 0 or value != int(value):
        raise MessageError(f"{source}: '{METRICS}.{NUM_SAMPLES}' is {value!r}, expected a count >= 0")
    return int(value)


def _metrics(record: Mapping[str, Any], source: str, skip: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for key, value in record.items():
        if key in skip:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise MessageError(f"{source}: metric '{METRICS}.{key}' is {value!r}, expected a number")
        out[key] = float(value)
    return out


def _site_id(content: RecordDict, source: str) -> str:
    site_id = _value(_record(content, SITE, ConfigRecord, source), SITE, SITE_ID, str, source)
    if not site_id:
        raise MessageError(f"{source}: '{SITE}.{SITE_ID}' is empty")
    return str(site_id)


@dataclass(frozen=True)
class Verdict:
    """What the server did with a site's update of ``server_round`` (sent to it with the next message)."""

    server_round: int
    accepted: bool
    reason: str = ""  # why it was rejected (names only the site and the weight key)

    def __str__(self) -> str:
        return f"round {self.server_round}: " + ("accepted" if self.accepted else f"rejected: {self.reason}")

    @classmethod
    def parse(cls, text: str, source: str = "verdict") -> Verdict:
        """The inverse of ``str(verdict)``: ``round N: accepted`` or ``round N: rejected: REASON``."""
        head, sep, outcome = text.partition(": ")
        number = head.removeprefix("round ")
        if not sep or not head.startswith("round ") or not number.isdigit():
            raise MessageError(f"{source}: '{text}' is not 'round N: accepted' or 'round N: rejected: REASON'")
        if outcome == "accepted":
            return cls(int(number), True)
        if outcome.startswith("rejected: "):
            return cls(int(number), False, outcome.removeprefix("rejected: "))
        raise MessageError(f"{source}: '{text}' is not 'round N: accepted' or 'round N: rejected: REASON'")


@dataclass(frozen=True)
class RoundInstruction:
    """What the server sends a site for one training round or evaluation."""

    server_round: int
    experiment: str  # the experiment config as JSON (the server's, without its paths)
    arrays: ArrayRecord  # the global model's shared groups, in the transport dtype
    verdict: Verdict | None = None  # what became of this site's previous update

    def to_record(self) -> RecordDict:
        config = ConfigRecord({SERVER_ROUND: int(self.server_round), EXPERIMENT: self.experiment})
        if self.verdict is not None:
            config[VERDICT] = str(self.verdict)
        return RecordDict({ARRAYS: self.arrays, CONFIG: config})

    @classmethod
    def from_record(cls, content: RecordDict, source: str = "the server's message") -> RoundInstruction:
        config = _record(content, CONFIG, ConfigRecord, source)
        server_round = _value(config, CONFIG, SERVER_ROUND, int, source)
        if server_round < 1:
            raise MessageError(f"{source}: '{CONFIG}.{SERVER_ROUND}' is {server_round}, expected a round >= 1")
        experiment = _value(config, CONFIG, EXPERIMENT, str, source)
        try:
            if not isinstance(json.loads(experiment), dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            raise MessageError(f"{source}: '{CONFIG}.{EXPERIMENT}' is not the experiment config as a JSON object ({err})") from None
        verdict = (Verdict.parse(_value(config, CONFIG, VERDICT, str, source), f"{source}: '{CONFIG}.{VERDICT}'")
                   if VERDICT in config else None)
        return cls(server_round, experiment, _record(content, ARRAYS, ArrayRecord, source), verdict)

    def config(self) -> ExperimentConfig:
        """The experiment config the server sent (validated like a YAML)."""
        return config_from_dict(json.loads(self.experiment), "config sent by the server")


@dataclass(frozen=True)
class TrainReply:
    """What a site sends back after training a round."""

    site_id: str
    arrays: ArrayRecord  # the site's shared groups after the round
    num_samples: int  # training samples behind the update (its FedAvg weight)
    metrics: Mapping[str, float] = field(default_factory=dict)  # those the site's policy lets out

    def to_record(self) -> RecordDict:
        return RecordDict({ARRAYS: self.arrays, METRICS: metrics_record(self.metrics, **{NUM_SAMPLES: int(self.num_samples)}),
                           SITE: ConfigRecord({SITE_ID: self.site_id})})

    @classmethod
    def from_record(cls, content: RecordDict, source: str = "a site's reply") -> TrainReply:
        metrics = _record(content, METRICS, MetricRecord, source)
        return cls(_site_id(content, source), _record(content, ARRAYS, ArrayRecord, source), _count(metrics, source),
                   _metrics(metrics, source, skip=(NUM_SAMPLES,)))


@dataclass(frozen=True)
class EvaluateReply:
    """What a site sends back after evaluating the global model on its data."""

    site_id: str
    num_samples: int  # validation samples (the weight of its metrics)
    loss: float | None = None  # None: the site keeps its loss in
    metrics: Mapping[str, float] = field(default_factory=dict)  # the other metrics it lets out

    def to_record(self) -> RecordDict:
        loss = {LOSS: self.loss} if self.loss is not None else {}  # a non-finite one is not sent
        metrics = {k: v for k, v in self.metrics.items() if k != LOSS}
        return RecordDict({METRICS: metrics_record(metrics, **loss, **{NUM_SAMPLES: int(self.num_samples)}),
                           SITE: ConfigRecord({SITE_ID: self.site_id})})

    @classmethod
    def from_record(cls, content: RecordDict, source: str = "a site's reply") -> EvaluateReply:
        metrics = _record(content, METRICS, MetricRecord, source)
        loss = float(_value(metrics, METRICS, LOSS, (int, float), source)) if LOSS in metrics else None
        return cls(_site_id(content, source), _count(metrics, source), loss,
                   _metrics(metrics, source, skip=(NUM_SAMPLES, LOSS)))

    def report(self) -> dict[str, float]:
        """The metrics with the loss under ``loss`` (what the server averages over sites)."""
        return {**self.metrics, **({LOSS: self.loss} if self.loss is not None else {})}
