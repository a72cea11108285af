"""The one-machine trial: certificates, a real SuperLink and one SuperNode per site on
127.0.0.1 with TLS (and SuperNode authentication), ``flwr run``, progress, clean shutdown.

Layout of ``RUN_DIR``::

    config.yaml            the experiment config the server reads (rounds override applied)
    certs/                 CA, server certificate, one client key pair per site (0600 keys)
    app/                   the thin Flower app ``flwr run`` ships
    sites/<id>/data.yaml   each site's data config; sites/<id>/state/ its private state
    global/                global checkpoints (last/best/round_NNNN.ckpt, history.json)
    server/                progress.jsonl (events), received.jsonl (what the server got)
    logs/                  superlink.log, <site>.log, flwr-run.log
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsynth import pki
from fedsynth.config import save_config
from fedsynth.errors import ConfigError
from fedsynth.federated.flower.bundle import FEDERATION, AppSpec, write_app
from fedsynth.federated.flower.launcher import (
    FederationError,
    SuperLinkPorts,
    TLSFiles,
    flower_env,
    flwr_cli,
    follow,
    site_worker_argv,
    superlink_argv,
    supernode_argv,
)
from fedsynth.federated.flower.roster import register_site
from fedsynth.federated.site_config import write_trial_site_config
from fedsynth.federated.trial_common import (
    SITE_SYNTAX,
    TrialRequest,
    TrialResult,
    check_site_id,
    check_trial,
    read_result,
    threads_per_site,
)
from fedsynth.processes import ProcessGroup, free_port, sigterm_raises

EventHook = Callable[[dict[str, Any], "LocalFederation"], None]


class LocalFederation:
    """A Flower federation of real processes on this machine; use as a context manager."""

    def __init__(self, request: TrialRequest) -> None:
        self.request = request
        self.run_dir = Path(request.run_dir).resolve()
        if not request.sites:
            raise ConfigError(f"give at least one --site {SITE_SYNTAX}")
        for site_id in request.sites:
            check_site_id(site_id)
        self.processes = ProcessGroup()
        self.ports = SuperLinkPorts.pick()
        self.env = flower_env(self.run_dir / "flwr-home")
        self.certs = self.run_dir / "certs"
        self.app_dir = self.run_dir / "app"
        self.run_id: int | None = None
        self.min_sites = 1

    # ------------------------------------------------------------------ setup

    def prepare(self) -> None:
        """Write config, certificates, site data configs and the app (idempotent: a restart reuses them)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = self.request.load_config()
        check_trial(config, self.request.sites, "flower")
        save_config(config, self.run_dir / "config.yaml")
        self.min_sites = config.federation.min_sites
        if self.request.tls:
            if not (self.certs / pki.CA_CERT).is_file():
                pki.create_ca(self.certs, "fedsynth trial CA")
            pki.issue_server_cert(self.certs, self.certs, "server", ["127.0.0.1", "localhost"])
        for site_id, (train_csv, val) in self.request.site_csvs.items():
            for path in (train_csv, val):
                if path is not None and not Path(path).is_file():
                    raise ConfigError(f"--site {site_id}: file not found: {path}")
            write_trial_site_config(self.run_dir / "sites" / site_id, site_id, Path(train_csv).resolve(),
                                    Path(val).resolve() if val else None, self.request.site_policies.get(site_id))
            if self.request.tls and not (self.certs / f"{site_id}.auth").is_file():
                pki.issue_client_cert(self.certs, self.certs, site_id)
        write_app(self.app_dir, AppSpec(config_path=self.run_dir / "config.yaml", run_dir=self.run_dir,
                                        control_address=f"127.0.0.1:{self.ports.control}",
                                        root_certificates=self.certs / pki.CA_CERT if self.request.tls else None,
                                        evaluate=self.request.evaluate))

    @property
    def tls_files(self) -> TLSFiles | None:
        if not self.request.tls:
            return None
        return TLSFiles(self.certs / pki.CA_CERT, self.certs / "server.crt", self.certs / "server.key")

    @property
    def node_auth(self) -> bool:
        return self.request.tls and self.request.node_auth

    def start_superlink(self, timeout: float = 60.0, *, database: Path | None = None, register: bool = True) -> None:
        """Start the SuperLink (``database``: keep its state on disk, as a real deployment does, so a
        restarted SuperLink still knows the sites; ``register=False`` on such a restart)."""
        argv = superlink_argv(self.ports, self.tls_files, node_auth=self.node_auth, database=database)
        self.processes.start("superlink", argv, self.run_dir / "superlink", self.run_dir / "logs" / "superlink.log", self.env)
        for port in (self.ports.fleet, self.ports.control):
            self.processes.wait_for_port("superlink", port, timeout)
        if self.node_auth and register:
            for site_id in self.request.sites:
                self.register(self.certs / f"{site_id}.auth.pub")

    def register(self, public_key: Path, site_id: str | None = None) -> int:
        """Register a SuperNode's public key with the SuperLink (node authentication) and bind it to
        ``site_id`` (default: the key's name, ``<site>.auth.pub``) in the run's roster."""
        site = site_id or Path(public_key).name.removesuffix(".auth.pub")
        return register_site(self.app_dir, site, public_key, self.env)

    def start_supernode(self, site_id: str, *, root_cert: Path | None | str = "default", auth_key: Path | None | str = "default",
                        data_config: Path | None | str = "default", max_wait_s: float | None = None, name: str | None = None) -> str:
        """Start one site's SuperNode (the keyword arguments let tests start misconfigured ones)."""
        site_dir = self.run_dir / "sites" / site_id
        ca = self.certs / pki.CA_CERT if self.request.tls else None
        key = self.certs / f"{site_id}.auth" if self.node_auth else None
        appio_port, flwr_dir = free_port(), site_dir / "flwr"
        long_lived = self.request.long_lived_sites
        argv = supernode_argv(
            self.ports.fleet, appio_port, site_dir / "data.yaml" if data_config == "default" else data_config,  # type: ignore[arg-type]
            flwr_dir, root_cert=ca if root_cert == "default" else root_cert,  # type: ignore[arg-type]
            auth_key=key if auth_key == "default" else auth_key, max_wait_s=max_wait_s,  # type: ignore[arg-type]
            isolation="process" if long_lived else "subprocess")
        name = name or site_id
        # sites train at the same time on one machine: share the cores out (as the OpenFL trial does)
        env = {**self.env, "OMP_NUM_THREADS": threads_per_site(len(self.request.sites))}
        supernode = self.processes.start(name, argv, site_dir, self.run_dir / "logs" / f"{name}.log", env)
        if long_lived:  # the site's ClientApp process, alive across rounds; it exits with its SuperNode
            self.processes.start(f"{name}.worker", site_worker_argv(appio_port, flwr_dir, supernode.pid), site_dir,
                                 self.run_dir / "logs" / f"{name}.log", env)
        return name

    def submit(self) -> int:
        """``flwr run`` the app on the federation; returns the run id."""
        data = flwr_cli(["run", str(self.app_dir), FEDERATION], self.env, self.app_dir)
        self.run_id = int(data["run-id"])
        return self.run_id

    def run_status(self) -> str:
        """The run's status as the SuperLink reports it (e.g. ``running``, ``finished:completed``)."""
        data = flwr_cli(["ls", str(self.app_dir), FEDERATION, "--run-id", str(self.run_id)], self.env, self.app_dir, 60)
        runs = data.get("runs") or []
        return str(runs[0].get("status", "")) if runs else ""

    # ------------------------------------------------------------------ run

    def wait(self, on_event: EventHook | None = None, timeout: float | None = None, offset: int = 0) -> dict[str, Any]:
        """Follow ``server/progress.jsonl`` until ``done`` (returned) or ``error``/a dead SuperLink (raised)."""
        finished: dict[str, Any] = {}
        last_status_check = time.monotonic()

        def stop() -> bool:
            nonlocal last_status_check
            if finished:
                return True
            if not self.processes.alive("superlink"):
                raise FederationError(f"the SuperLink exited:\n{self.processes.tail('superlink')}")
            crashed = [s for s in self.request.sites if self.processes.crashed(s)
                       or (self.processes.crashed(f"{s}.worker") and s not in self.processes.stopped)]
            if len(self.request.sites) - len(crashed) < self.min_sites:
                raise FederationError(f"SuperNode of site '{crashed[0]}' exited; fewer than federation.min_sites="
                                      f"{self.min_sites} sites left:\n{self.processes.tail(crashed[0])}")
            if self.run_id is not None and time.monotonic() - last_status_check > 20:
                last_status_check = time.monotonic()
                status = self.run_status()
                if status.startswith("finished") and status != "finished:completed":
                    time.sleep(1.0)  # let a last 'error' event land first
                    if not finished:
                        raise FederationError(f"run {self.run_id} ended as {status}:\n{self.processes.tail('superlink')}")
            return False

        for event in follow(self.run_dir / "server" / "progress.jsonl", stop, timeout or self.request.timeout_s or 24 * 3600.0,
                            offset=offset):
            if on_event is not None:
                on_event(event, self)
            if event["event"] == "done":
                finished = event
            elif event["event"] == "error":
                raise FederationError(f"the federation failed: {event.get('error')}\n(see {self.run_dir / 'logs'})")
        return finished

    def run(self, on_event: EventHook | None = None) -> dict[str, Any]:
        """Prepare, start everything, run the federation to the end; always stops every process
        (also on SIGTERM, which ends the run with exit status 143)."""
        with sigterm_raises(), self.processes:
            self.prepare()
            progress = self.run_dir / "server" / "progress.jsonl"
            offset = progress.stat().st_size if progress.is_file() else 0
            self.start_superlink()
            for site_id in self.request.sites:
                self.start_supernode(site_id)
            self.submit()
            return self.wait(on_event, offset=offset)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.processes.stop_all()


def run_trial(request: TrialRequest, on_event: EventHook | None = None) -> TrialResult:
    """Run the one-machine trial; returns the shared :class:`TrialResult` (``RUN/global``)."""
    t0 = time.monotonic()
    fed = LocalFederation(request)
    fed.run(on_event)
    return read_result("flower", fed.run_dir, timings={"federation_s": time.monotonic() - t0})
