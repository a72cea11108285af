"""Start and stop a real Flower federation on one machine (127.0.0.1 only).

Used by ``fedsynth federate flower``, the tests and the benchmark. Every process is started
in its own session (process group) and :meth:`Processes.stop_all` kills each whole group
(SIGTERM, then SIGKILL), so the ``flwr-serverapp``/``flwr-clientapp`` children go too.
Every wait is bounded. ``FLWR_TELEMETRY_ENABLED=0`` and a private ``FLWR_HOME`` for all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fedsynth.errors import FedsynthError

HOST = "127.0.0.1"


class FederationError(FedsynthError):
    """A federation process failed to start, died, or the run did not finish in time."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Wait until something listens on 127.0.0.1:``port`` (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise FederationError(f"process died before listening on {HOST}:{port}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise FederationError(f"nothing listening on {HOST}:{port} after {timeout:.0f} s")


def _bin(name: str) -> str:
    """A console script of this Python environment (works without an activated venv)."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.is_file() else shutil.which(name)
    if not found:
        raise FederationError(f"'{name}' not found: install the flower extra (pip install 'fedsynth[flower]')")
    return found


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for every Flower process fedsynth starts."""
    env = dict(os.environ)
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_HOME=str(flwr_home), PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def _own_group_dies_with_parent() -> None:
    """In the child before exec: own process group, and SIGTERM when fedsynth dies (Linux).

    If the driver itself is SIGKILLed (no ``finally`` runs), the SuperLink/SuperNode still get
    SIGTERM and stop; Flower's own helper processes exit with their parent.
    """
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def group_exists(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` is still there."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Processes:
    """Named child processes, each in its own process group; a context manager that stops them all."""

    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    stopped: set[str] = field(default_factory=set)  # names stopped on purpose (not a crash)
    _files: list[IO[bytes]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], log_path: Path, env: Mapping[str, str], cwd: Path) -> subprocess.Popen[bytes]:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cwd.mkdir(parents=True, exist_ok=True)
        fh = open(log_path, "ab")
        self._files.append(fh)
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(env), cwd=cwd, preexec_fn=_own_group_dies_with_parent)
        self.procs[name], self.logs[name] = proc, log_path
        return proc

    def alive(self, name: str) -> bool:
        return name in self.procs and self.procs[name].poll() is None

    def crashed(self, name: str) -> bool:
        """Exited although nobody asked it to stop."""
        return name in self.procs and name not in self.stopped and self.procs[name].poll() is not None

    def stop(self, name: str, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        """Signal the whole process group of ``name``; SIGKILL it if it is still there after ``grace`` s."""
        proc = self.procs.get(name)
        if proc is None:
            return
        self.stopped.add(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        try:  # the group may outlive its leader (e.g. a clientapp child): always finish it off
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10.0  # children re-parented to init disappear a moment later
        while time.monotonic() < deadline and group_exists(proc.pid):
            time.sleep(0.1)

    def stop_all(self, grace: float = 10.0) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name, grace=grace)
        for fh in self._files:
            fh.close()
        self._files.clear()

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.logs.get(name)
        if not path or not path.is_file():
            return ""
        return "\n".join(path.read_text(errors="replace", encoding="utf-8").splitlines()[-lines:])

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


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
    argv = [_bin("flower-superlink"),
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
    argv = [_bin("fedsynth-supernode"), "--superlink", f"{HOST}:{fleet_port}",
            "--clientappio-api-address", f"{HOST}:{clientappio_port}", "--flwr-dir", str(flwr_dir)]
    if isolation != "subprocess":
        argv += ["--isolation", isolation]
    argv += ["--root-certificates", str(root_cert)] if root_cert is not None else ["--insecure"]
    if data_config is not None:
        argv += ["--node-config", f'data-config="{data_config}"']
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
        res = subprocess.run([_bin("flwr"), *args, "--format", "json"], env=dict(env), cwd=cwd, capture_output=True,
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
