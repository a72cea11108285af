"""Flower ClientApp: one hospital's side, a thin adapter over :class:`fedsynth.federated.site.Site`.

Flower starts a fresh ``flwr-clientapp`` process for every message, so nothing lives in
memory between rounds: the experiment config arrives with each message (the server's), the
site's data and state folder come from its *data config* (``--node-config
'data-config="/abs/site.yaml"'`` on the SuperNode), and everything that must survive between
rounds (local groups, optimizers, RNG, privacy ledger) is kept by ``Site`` in ``state_dir``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from pydantic import BaseModel, ConfigDict, Field

from fedsynth.config import ExperimentConfig, config_from_dict, read_yaml, validate_model
from fedsynth.errors import ConfigError
from fedsynth.federated.aggregation import from_transport
from fedsynth.federated.flower.records import encode, metrics_record, record_to_weights

log = logging.getLogger("fedsynth.flower.client")

DATA_CONFIG_KEY = "data-config"


class SiteDataConfig(BaseModel):
    """A site's data config (``data.yaml``): which CSVs it trains on and where it keeps its state."""

    model_config = ConfigDict(extra="forbid")
    site_id: str = Field(min_length=1, description="name of this site in the server's logs")
    train_csv: Path = Field(description="training CSV (relative paths: relative to this file)")
    val_csv: Path | None = Field(None, description="optional validation CSV")
    state_dir: Path = Field(description="site-private state: local groups, optimizers, privacy ledger")


def load_site_config(path: str | Path) -> SiteDataConfig:
    """Read and validate a site data config; relative paths resolve against its folder."""
    path = Path(path)
    raw = read_yaml(path, "site data config", " (pass --node-config 'data-config=\"/abs/site.yaml\"')")
    cfg = validate_model(SiteDataConfig, raw, f"site data config {path}")
    base = path.parent.resolve()
    updates = {k: (base / getattr(cfg, k)) for k in ("train_csv", "val_csv", "state_dir")
               if getattr(cfg, k) is not None and not getattr(cfg, k).is_absolute()}
    return cfg.model_copy(update=updates)


def write_site_config(path: str | Path, cfg: SiteDataConfig) -> Path:
    """Write a site data config as YAML (atomically)."""
    from fedsynth.io import atomic_write_text

    data = {k: (str(v) if v is not None else None) for k, v in cfg.model_dump().items()}
    atomic_write_text(Path(path), yaml.safe_dump(data, sort_keys=False))
    return Path(path)


def _experiment(msg: Message) -> ExperimentConfig:
    return config_from_dict(json.loads(str(msg.content["config"]["experiment"])), "config sent by the server")


def _site(msg: Message, context: Context):  # type: ignore[no-untyped-def]
    from fedsynth.federated.site import Site

    if DATA_CONFIG_KEY not in context.node_config:
        raise ConfigError(f"this SuperNode has no '{DATA_CONFIG_KEY}' in --node-config; start it with "
                          f"--node-config '{DATA_CONFIG_KEY}=\"/abs/path/site.yaml\"'")
    data = load_site_config(str(context.node_config[DATA_CONFIG_KEY]))
    site = Site(_experiment(msg), data.train_csv, data.state_dir, site_id=data.site_id, val_csv=data.val_csv)
    return site, data


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Apply the global shared groups, train one round with the engine, return the shared groups."""
    site, data = _site(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    reference = site.shared_weights()
    received = from_transport(record_to_weights(msg.content["arrays"]), reference)
    result = site.train_round(received, server_round)
    dtype = site.config.federation.transport_dtype
    content = RecordDict({
        "arrays": encode(result.weights, dtype),
        "metrics": metrics_record(result.metrics, num_samples=int(result.num_samples)),
        "site": ConfigRecord({"site-id": data.site_id}),
    })
    log.info("site %s: round %s trained on %s samples", data.site_id, server_round, result.num_samples)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Validation loss of the global model on this site's data (never changes the site's state)."""
    site, data = _site(msg, context)
    reference = site.shared_weights()
    received = from_transport(record_to_weights(msg.content["arrays"]), reference)
    loss, n, metrics = site.evaluate(received)
    content = RecordDict({
        "metrics": metrics_record({k: v for k, v in metrics.items() if k != "loss"}, loss=loss, num_samples=int(n)),
        "site": ConfigRecord({"site-id": data.site_id}),
    })
    return Message(content, reply_to=msg)
