"""Flower ClientApp: one hospital's side, a thin adapter over :class:`fedsynth.federated.site.Site`.

The experiment config arrives with each message (the server's); the site's data, state
folder, privacy floor and metric policy come from its own *data config*
(``--node-config 'data-config="/abs/site.yaml"'`` on the SuperNode; see
:mod:`fedsynth.federated.site_config`): a server config weaker than the site's floor is
refused before anything is trained, and only the metrics the site allows are sent. Everything
that must survive between rounds (local groups, optimizers, RNG, privacy ledger) is kept by
``Site`` in ``state_dir``.

With Flower's default isolation a fresh ``flwr-clientapp`` process runs every message and
the ``Site`` is rebuilt from disk each time. In a long-lived ClientApp process
(:mod:`fedsynth.federated.flower.worker`) the ``Site`` of the last message is kept in memory
and reused while the server's config and the site's data config are unchanged; a message
that fails drops it, so the next one starts again from the state on disk.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedsynth.errors import ConfigError, PolicyRefused, SiteFailure
from fedsynth.federated.aggregation import from_transport
from fedsynth.federated.flower.messages import DATA_CONFIG, EvaluateReply, RoundInstruction, TrainReply, Verdict
from fedsynth.federated.flower.records import encode, record_to_weights
from fedsynth.federated.site_config import SiteDataConfig, SitePolicy, open_site_ledger, write_site_config
from fedsynth.federated.site_config import load_site_config as _load

__all__ = ["SiteDataConfig", "app", "load_site_config", "write_site_config"]

log = logging.getLogger("fedsynth.flower.client")


def load_site_config(path: str | Path) -> SiteDataConfig:
    """Read and validate a site data config (see :mod:`fedsynth.federated.site_config`)."""
    return _load(path, f" (pass --node-config '{DATA_CONFIG}=\"/abs/site.yaml\"')")


#: the site of the last message, for a long-lived ClientApp process: (key, site, data config)
_cached: tuple[tuple[str, int, str], Any, SiteDataConfig] | None = None


def _site(instruction: RoundInstruction, context: Context):  # noqa: ANN202 (Site is imported lazily)
    """This message's ``Site``: the cached one when the server config and data config are unchanged."""
    global _cached
    from fedsynth.federated.site import Site

    if DATA_CONFIG not in context.node_config:
        raise ConfigError(f"this SuperNode has no '{DATA_CONFIG}' in --node-config; start it with "
                          f"--node-config '{DATA_CONFIG}=\"/abs/path/site.yaml\"'")
    path = Path(str(context.node_config[DATA_CONFIG]))
    key = (str(path.resolve()), path.stat().st_mtime_ns if path.is_file() else -1, instruction.experiment)
    if _cached is not None and _cached[0] == key:
        log.info("site %s: engine, data and state reused from memory", _cached[2].site_id)
        return _cached[1], _cached[2]
    _cached = None
    data = load_site_config(path)
    state_dir = data.state_dir or path.parent.resolve() / "state"
    site = Site(instruction.config(), data.train_csv, state_dir, site_id=data.site_id, val_csv=data.val_csv,
                policy=SitePolicy.of(data), ledger=open_site_ledger(data), driver="flower", keep_local=data.keep_local)
    _cached = (key, site, data)
    log.info("site %s: engine built, state from %s", data.site_id, site.state_dir)
    return site, data


def report_verdict(verdict: Verdict | None, site_id: str) -> Verdict | None:
    """Log what the server did with this site's previous update (sent with the next message);
    a rejection is a warning in the site's own log. Returns the verdict, if any."""
    if verdict is not None and not verdict.accepted:
        log.warning("site %s: the server rejected this site's update of round %s: %s", site_id, verdict.server_round,
                    verdict.reason)
    return verdict


def _forget_site() -> None:
    global _cached
    _cached = None


def _site_id(context: Context) -> str:
    try:
        return load_site_config(str(context.node_config.get(DATA_CONFIG, ""))).site_id
    except Exception:
        return "?"


def _guarded(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Errors leave the site as their type only (a refusal by the site's policy: that it refused, and
    which fields); the full message, which may name files, subjects or the floor's values, stays in
    the site's own log."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except PolicyRefused as err:
            _forget_site()
            log.warning("%s", err)  # the floor's values stay in the site's own log
            refusal = PolicyRefused(str(err), err.fields, err.site or _site_id(context))
            raise PolicyRefused(refusal.public(), err.fields, refusal.site) from None
        except Exception as err:
            _forget_site()  # its in-memory state may be half-updated: the next message reloads from disk
            log.exception("site round failed")
            raise SiteFailure(f"site '{_site_id(context)}': {type(err).__name__} during {handler.__name__} "
                              "(details in the site's own log)") from None

    return run


app = ClientApp()


def _open(msg: Message, context: Context):  # noqa: ANN202 (Site is imported lazily)
    """A server message's instruction, this site (cached), its data config and the received weights."""
    instruction = RoundInstruction.from_record(msg.content)
    site, data = _site(instruction, context)
    report_verdict(instruction.verdict, data.site_id)
    return instruction, site, data, from_transport(record_to_weights(instruction.arrays), site.shared_weights())


@app.train()
@_guarded
def train(msg: Message, context: Context) -> Message:
    """Apply the global shared groups, train one round with the engine, return the shared groups."""
    instruction, site, data, received = _open(msg, context)
    result = site.train_round(received, instruction.server_round)
    reply = TrainReply(data.site_id, encode(result.weights, site.config.federation.transport_dtype, site.frozen),
                       int(result.num_samples), result.metrics)
    log.info("site %s: round %s trained on %s samples", data.site_id, instruction.server_round, result.num_samples)
    return Message(reply.to_record(), reply_to=msg)


@app.evaluate()
@_guarded
def evaluate(msg: Message, context: Context) -> Message:
    """Validation loss of the global model on this site's data (never changes the site's state)."""
    _, site, data, received = _open(msg, context)
    loss, n, metrics = site.evaluate(received)
    return Message(EvaluateReply(data.site_id, int(n), loss, metrics).to_record(), reply_to=msg)
