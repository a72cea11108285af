"""The commands of a real Flower federation on one machine (127.0.0.1 only).

Used by ``fedsynth federate flower``, the tests and the benchmark, which start them through
:class:`fedsynth.processes.ProcessGroup` (each in its own process group, the whole group
stopped, so the ``flwr-serverapp``/``flwr-clientapp`` children go too). Every wait is bounded.
``FLWR_TELEMETRY_ENABLED=0`` and a private ``FLWR_HOME`` for all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsynth.errors import FedsynthError
from fedsynth.federated.flower.messages import DATA_CONFIG
from fedsynth.processes import HOST, console_script, free_port


class FederationError(FedsynthError):
    """A federation process failed to start, died, or the run did not finish in time."""


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for every Flower process fedsynth starts."""
    env = dict(os.environ)
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_HOME=str(flwr_home), PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class SuperLinkPorts:
    fleet: int
    serverappio: int
    control: int

    @classmethod
    def pick(cls) -> SuperLinkPorts:
        return cls(free_port(), free_port(), free_port())


@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def superlink_argv(ports: SuperLinkPorts, tls: TLSFiles | None, *, database: Path | None = None,
                   node_auth: bool = False) -> list[str]:
    """``flower-superlink`` bound to 127.0.0.1 only."""
    argv = [console_script("flower-superlink"),
            "--fleet-api-address", f"{HOST}:{ports.fleet}",
            "--serverappio-api-address", f"{HOST}:{ports.serverappio}",
            "--control-api-address", f"{HOST}:{ports.control}"]
    if tls is None:
        argv.append("--insecure")
    else:
        argv += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                 "--ssl-keyfile", str(tls.server_key)]
    if database is not None:
        argv += ["--database", str(database)]
    if node_auth:
        argv.append("--enable-supernode-auth")
    return argv


def supernode_argv(fleet_port: int, clientappio_port: int, data_config: Path | None, flwr_dir: Path, *,
                   root_cert: Path | None, auth_key: Path | None = None, max_wait_s: float | None = None,
                   isolation: str = "subprocess") -> list[str]:
    """``flower-supernode`` for one site (fedsynth's entry, :mod:`fedsynth.federated.flower.supernode`:
    the same SuperNode with a short idle poll), bound to 127.0.0.1 only.

    ``isolation="process"``: the SuperNode runs no ClientApp itself; a :func:`site_worker_argv`
    process serves its ClientAppIo port.
    """
    argv = [console_script("fedsynth-supernode"), "--superlink", f"{HOST}:{fleet_port}",
            "--clientappio-api-address", f"{HOST}:{clientappio_port}", "--flwr-dir", str(flwr_dir)]
    if isolation != "subprocess":
        argv += ["--isolation", isolation]
    argv += ["--root-certificates", str(root_cert)] if root_cert is not None else ["--insecure"]
    if data_config is not None:
        argv += ["--node-config", f'{DATA_CONFIG}="{data_config}"']
    if auth_key is not None:
        argv += ["--auth-supernode-private-key", str(auth_key)]
    if max_wait_s is not None:
        argv += ["--max-wait-time", str(max_wait_s)]
    return argv


def site_worker_argv(clientappio_port: int, flwr_dir: Path, supernode_pid: int) -> list[str]:
    """The long-lived ClientApp process of one site (:mod:`fedsynth.federated.flower.worker`)."""
    return [sys.executable, "-m", "fedsynth.federated.flower.worker",
            "--clientappio-api-address", f"{HOST}:{clientappio_port}", "--flwr-dir", str(flwr_dir),
            "--supernode-pid", str(supernode_pid)]


def flwr_cli(args: list[str], env: Mapping[str, str], cwd: Path, timeout: float = 120.0) -> dict[str, Any]:
    """Run one ``flwr`` CLI command with ``--format json``; returns the parsed JSON (bounded)."""
    try:
        res = subprocess.run([console_script("flwr"), *args, "--format", "json"], env=dict(env), cwd=cwd, capture_output=True,
                             text=True, timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired:
        raise FederationError(f"'flwr {' '.join(args)}' did not finish within {timeout:.0f} s") from None
    out = res.stdout.strip()
    try:
        data = json.loads(out[out.index("{"):]) if "{" in out else {}
    except ValueError:
        data = {}
    if res.returncode != 0 or not data.get("success", False):
        raise FederationError(f"'flwr {' '.join(args)}' failed (exit {res.returncode}): "
                              f"{data.get('error-message') or (res.stdout + res.stderr)[-2000:]}")
    return data


def follow(path: Path, stop: Callable[[], bool], timeout: float, poll: float = 0.5,
           offset: int = 0) -> Iterator[dict[str, Any]]:
    """Yield JSON lines appended to ``path`` after byte ``offset`` until ``stop()`` or ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if path.is_file():
            with open(path, encoding="utf-8") as fh:
                fh.seek(offset)
                while (line := fh.readline()).endswith("\n"):
                    offset = fh.tell()
                    yield json.loads(line)
        if stop():
            return
        if time.monotonic() > deadline:
            raise FederationError(f"the federation did not finish within {timeout:.0f} s (see {path})")
        time.sleep(poll)
