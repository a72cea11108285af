"""Which site each registered SuperNode key belongs to: the server names sites by their keys.

Flower's SuperLink authenticates a SuperNode by the public key the operator registered
(``flwr supernode register``), and hands the ServerApp only the node id it gave that key. What
a site *says* it is (``site_id`` in its own data.yaml) is not evidence. The operator binds a
name to each key when registering it (``fedsynth federate flower-register --site NAME=KEY.pub``),
and that binding, ``RUN_DIR/server/roster.json``, is how the ServerApp names a node in its logs,
round records and checkpoints. A node whose reply claims another site's name, or a node the
roster does not know, is rejected; revoking a site (``fedsynth federate flower-revoke --site
NAME``) unregisters its key and marks it revoked under the same name.

No roster (a run whose keys were registered with ``flwr`` directly, or no node authentication):
the ServerApp falls back to the names sites report, and says so once.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

from fedsynth.errors import ConfigError
from fedsynth.federated.flower.bundle import FEDERATION
from fedsynth.federated.flower.launcher import flwr_cli
from fedsynth.federated.flower.messages import RUN_DIR
from fedsynth.io import atomic_write_text

ROSTER = "roster.json"


class Roster:
    """``RUN_DIR/server/roster.json``: node id -> ``{"site": name, "revoked": bool}``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "server" / ROSTER

    def exists(self) -> bool:
        return self.path.is_file()

    def entries(self) -> dict[int, dict[str, Any]]:
        if not self.path.is_file():
            return {}
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            return {int(node): dict(entry) for node, entry in raw.items()}
        except (OSError, ValueError, TypeError, AttributeError) as err:
            raise ConfigError(f"{self.path} is not a fedsynth roster ({err}); rewrite it with "
                              "fedsynth federate flower-register") from None

    def _write(self, entries: dict[int, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({str(k): v for k, v in sorted(entries.items())}, indent=2))

    def bind(self, node_id: int, site: str) -> None:
        """Name the node registered for ``site``'s key. A name has one active key: a node bound to
        it before (a key registered again after a SuperLink reset) no longer answers for it."""
        entries = self.entries()
        for node, entry in entries.items():
            if entry["site"] == site and node != node_id and not entry.get("revoked"):
                entry.update(revoked=True, superseded_by=node_id)
        entries[node_id] = {"site": site, "revoked": False}
        self._write(entries)

    def active_node(self, site: str) -> int:
        for node, entry in self.entries().items():
            if entry["site"] == site and not entry.get("revoked"):
                return node
        raise ConfigError(f"no active node is bound to site '{site}' in {self.path}")

    def revoke(self, site: str) -> int:
        node = self.active_node(site)
        entries = self.entries()
        entries[node]["revoked"] = True
        self._write(entries)
        return node

    def name(self, node_id: int) -> str | None:
        """The site bound to ``node_id`` (``None``: not in the roster, or revoked)."""
        entry = self.entries().get(int(node_id))
        return None if entry is None or entry.get("revoked") else str(entry["site"])


def app_run_dir(app_dir: str | Path) -> Path:
    """The run folder a Flower app written by ``fedsynth federate flower-app`` names."""
    path = Path(app_dir) / "pyproject.toml"
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
        return Path(config[RUN_DIR])
    except (OSError, KeyError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: not a Flower app written by fedsynth federate flower-app ({err})") from None


def register_site(app_dir: str | Path, site: str, public_key: str | Path, env: dict[str, str] | None = None,
                  federation: str = FEDERATION) -> int:
    """Register ``site``'s SuperNode key with the SuperLink and bind the node id to its name."""
    key = Path(public_key)
    if not key.is_file():
        raise ConfigError(f"--site {site}={key}: no such public key file")
    roster = Roster(app_run_dir(app_dir))
    out = flwr_cli(["supernode", "register", str(key), str(app_dir), federation], env or dict(os.environ), Path(app_dir))
    node = int(out["node-id"])
    roster.bind(node, site)
    return node


def revoke_site(app_dir: str | Path, site: str, env: dict[str, str] | None = None, federation: str = FEDERATION) -> int:
    """Unregister the key bound to ``site`` and mark it revoked in the roster."""
    roster = Roster(app_run_dir(app_dir))
    node = roster.active_node(site)
    flwr_cli(["supernode", "unregister", str(node), str(app_dir), federation], env or dict(os.environ), Path(app_dir))
    roster.revoke(site)
    return node
