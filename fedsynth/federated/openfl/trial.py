"""One-machine OpenFL trial (``fedsynth federate openfl``): workspace from ``plans/``, the whole
``fx`` flow with certificates and mTLS on 127.0.0.1, one aggregator and one collaborator process
per site, the federation's global model in ``RUN/global`` (written by the aggregator through
:class:`~fedsynth.federated.server.GlobalModel`, the Flower trial's layout), and every process stopped at the end,
also on failure or timeout (the error names the process that failed and shows its log).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from fedsynth.engine import BEST, LAST
from fedsynth.errors import ConfigError, DataError
from fedsynth.federated.openfl.workspace import Workspace, create_workspace, set_up_pki_and_plan
from fedsynth.federated.site_config import write_trial_site_config
from fedsynth.federated.trial_common import TrialRequest, TrialResult, check_trial, read_result, threads_per_site
from fedsynth.processes import HOST, ProcessGroup, free_port, sigterm_raises


def run_federation(ws: Workspace, *, timeout: float, collaborators: tuple[str, ...] | None = None,
                   extra: Mapping[str, tuple[list[str], Path]] | None = None,
                   extra_ready: Callable[[], bool] | None = None) -> dict[str, float]:
    """Start the 127.0.0.1-bound aggregator and one ``fx collaborator start`` per site; wait for all.

    ``extra`` names additional processes (command, cwd) that are started with the aggregator and
    stopped at the end whatever they do (tests use it for collaborators that must be refused);
    with ``extra_ready`` the sites start only once it returns True (at most 120 s later).
    """
    names = collaborators or ws.collaborators
    env = {"OMP_NUM_THREADS": threads_per_site(len(names)), "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    with sigterm_raises(), ProcessGroup(grace=5.0) as group:
        agg = group.start("aggregator", [sys.executable, "-m", "fedsynth.federated.openfl", "aggregator", "--bind", HOST],
                          ws.path, ws.logs / "aggregator.log", env)
        for name, (cmd, cwd) in (extra or {}).items():
            group.start(name, cmd, cwd, ws.logs / f"{name}.log", env)
        ready_by = time.monotonic() + 120
        while extra_ready is not None and not extra_ready() and time.monotonic() < ready_by and agg.alive():
            time.sleep(0.5)
        cols = [group.start(f"collaborator {n}", [_fx(), "collaborator", "start", "-n", n], ws.path,
                            ws.logs / f"collaborator_{n}.log", env) for n in names]
        group.wait_all([agg, *cols], deadline=start + timeout)
    return {"federation_s": time.monotonic() - start}


def _fx() -> str:
    from fedsynth.federated.openfl.workspace import fx

    return fx()


def export_run(ws: Workspace, run_dir: Path) -> dict[str, Path]:
    """OpenFL's own models (``save/best.pbuf``, the tensor DB's last aggregate) as core checkpoints in
    ``run_dir/openfl/`` (``last.ckpt``, ``best.ckpt``); the federation's checkpoints are ``RUN/global``."""
    from fedsynth.federated.openfl.tools import export_checkpoint

    with contextlib.chdir(ws.path):
        out = {"last": export_checkpoint("last", run_dir / "openfl" / LAST)}
        if (ws.path / "save" / "best.pbuf").is_file():
            out["best"] = export_checkpoint("best", run_dir / "openfl" / BEST)
        return out


def run_trial(request: TrialRequest) -> TrialResult:
    """The whole one-machine federation; see the module docstring.

    Each site gets ``RUN_DIR/sites/<name>/data.yaml`` (its CSVs, its state in ``state/``, and the
    privacy floor / metric policy of ``request.site_policies[name]``; without one every metric is
    shared). The aggregator writes ``RUN_DIR/global`` through ``GlobalModel``, as the Flower server does.
    """
    config = request.load_config()
    sites = request.site_csvs
    check_trial(config, sites, "openfl")
    if not request.tls or not request.node_auth:
        raise ConfigError("the OpenFL trial always runs mTLS: tls/node_auth cannot be turned off")
    if not request.evaluate:
        raise ConfigError("the OpenFL plans always validate the global model: evaluate=False is not supported by the openfl backend")
    for name, (train, val) in sites.items():
        for p in (train, val):
            if p is not None and not Path(p).is_file():
                raise DataError(f"--site {name}: CSV not found: {p}")
    run_dir = Path(request.run_dir).resolve()
    t0 = time.monotonic()
    site_configs = {name: write_trial_site_config(run_dir / "sites" / name, name, Path(train).resolve(),
                                                  Path(val).resolve() if val else None,
                                                  request.site_policies.get(name))
                    for name, (train, val) in sites.items()}
    ws = create_workspace(run_dir / "workspace", config, sites, agg_port=free_port(), site_configs=site_configs,
                          run_dir=run_dir)
    set_up_pki_and_plan(ws)
    timings = {"setup_s": time.monotonic() - t0}
    budget = request.timeout_s if request.timeout_s is not None else config.federation.round_timeout_s * config.federation.rounds + 300
    timings.update(run_federation(ws, timeout=budget))
    return read_result("openfl", run_dir, timings=timings, workspace=ws.path)
