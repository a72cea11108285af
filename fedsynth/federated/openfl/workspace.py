"""Build an OpenFL workspace from ``plans/<family>`` and run the standard ``fx`` set-up flow.

OpenFL 1.9's ``fx workspace create --template`` only accepts its built-in templates (a click
``Choice``), so each ``plans/<family>`` folder is itself a complete workspace: copying it is the
``workspace create`` step; everything after that is plain ``fx``.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedsynth.config import ExperimentConfig, save_config
from fedsynth.errors import ConfigError, FedsynthError
from fedsynth.federated.openfl.common import CONFIG_IN_WORKSPACE
from fedsynth.federated.openfl.processes import run_checked, run_parallel
from fedsynth.federated.openfl.tools import pin_config
from fedsynth.io import atomic_write_text

#: name the aggregator's certificate is issued for, and that collaborators dial, in one-machine runs
LOCAL_AGGREGATOR_NAME = "localhost"
WORKSPACE_DIRS = ("cert", "data", "logs", "save", "local_state", "src")


def plans_dir() -> Path:
    """The OpenFL templates, ``plans/`` (the package ``fedsynth.plans`` once installed from a wheel)."""
    from fedsynth.resources import resource_dir

    return resource_dir("plans")


def template_dir(family: str, plans: Path | None = None) -> Path:
    path = (plans or plans_dir()) / family
    if not (path / "plan" / "plan.yaml").is_file():
        raise ConfigError(f"no OpenFL template for family '{family}' at {path}")
    return path


def fx() -> str:
    """The ``fx`` next to this Python (the venv's), else whatever is on PATH."""
    candidate = Path(sys.executable).with_name("fx")
    return str(candidate) if candidate.is_file() else "fx"


@dataclass(frozen=True)
class Workspace:
    path: Path
    collaborators: tuple[str, ...]

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def fx(self, *args: str, timeout: float = 180, log_name: str | None = None) -> None:
        """Run one ``fx`` command in the workspace; raise naming it (with its log) on failure."""
        name = log_name or ("fx_" + "_".join(a for a in args if not a.startswith("-"))[:60])
        run_checked([fx(), *args], self.path, self.logs / f"{name}.log", timeout)


def create_workspace(prefix: Path, config: ExperimentConfig, sites: Mapping[str, tuple[Path, Path | None]], *,
                     agg_port: int, agg_addr: str = LOCAL_AGGREGATOR_NAME, plans: Path | None = None,
                     site_configs: Mapping[str, Path] | None = None, run_dir: Path | None = None) -> Workspace:
    """Copy the family's template to ``prefix`` and fill in config, data.yaml and network settings.

    ``run_dir`` is where the aggregator's :class:`~fedsynth.federated.server.GlobalModel` writes
    ``global/`` (every task's ``aggregation_type.settings.run_dir``; default: the workspace).

    ``site_configs`` (collaborator -> its site data config) makes ``plan/data.yaml`` name each
    site's own ``data.yaml`` (privacy floor, metric policy) instead of its bare CSVs.
    """
    prefix = Path(prefix)
    if prefix.exists() and any(prefix.iterdir()):
        raise FedsynthError(f"workspace folder {prefix} already exists and is not empty: choose a new run folder")
    for name in sites:
        if name != name.lower() or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"collaborator name '{name}': use lower-case letters, digits, '-' or '_' (it is a certificate name)")
    shutil.copytree(template_dir(config.family, plans), prefix, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.crt", "*.key", "*.csr", "*.pbuf", "*.db"))
    for d in WORKSPACE_DIRS:
        (prefix / d).mkdir(parents=True, exist_ok=True)
    save_config(config, prefix / CONFIG_IN_WORKSPACE)
    lines = ["# collaborator_name,SITE_DATA_YAML  or  collaborator_name,TRAIN_CSV[,VAL_CSV]"]
    for name, (train, val) in sites.items():
        if site_configs and name in site_configs:
            lines.append(f"{name},{Path(site_configs[name]).resolve()}")
            continue
        lines.append(",".join([name, str(Path(train).resolve())] + ([str(Path(val).resolve())] if val else [])))
    atomic_write_text(prefix / "plan" / "data.yaml", "\n".join(lines) + "\n")
    atomic_write_text(prefix / "plan" / "cols.yaml", "collaborators: []\n")  # `fx collaborator certify` registers
    plan_path = prefix / "plan" / "plan.yaml"
    plan = yaml.safe_load(plan_path.read_text(encoding="utf-8"))
    plan["network"]["settings"].update(agg_addr=agg_addr, agg_port=int(agg_port))
    if run_dir is not None:
        for task in plan.get("tasks", {}).values():
            if isinstance(task, dict) and isinstance(task.get("aggregation_type"), dict):
                task["aggregation_type"].setdefault("settings", {})["run_dir"] = str(Path(run_dir).resolve())
    atomic_write_text(plan_path, yaml.safe_dump(plan, sort_keys=False))
    pin_config_in(prefix)
    return Workspace(prefix, tuple(sites))


def pin_config_in(workspace: Path) -> str:
    import os

    cwd = os.getcwd()
    os.chdir(workspace)
    try:
        return pin_config("plan/plan.yaml")
    finally:
        os.chdir(cwd)


def set_up_pki_and_plan(ws: Workspace, agg_addr: str = LOCAL_AGGREGATOR_NAME, timeout: float = 300) -> None:
    """The standard flow, as an operator types it (all in one workspace for a one-machine run).

    Commands that touch different files run at once: ``plan initialize``, ``workspace certify``
    and every certificate request; then the signing, one ``certify`` at a time (each appends to
    ``plan/cols.yaml``).
    """
    run_parallel({
        "fx_plan_initialize": [fx(), "plan", "initialize", "-a", agg_addr],
        "fx_workspace_certify": [fx(), "workspace", "certify"],
        "fx_aggregator_csr": [fx(), "aggregator", "generate-cert-request", "--fqdn", agg_addr],
        **{f"fx_csr_{n}": [fx(), "collaborator", "generate-cert-request", "-n", n, "--silent", "--skip-package"]
           for n in ws.collaborators},
    }, ws.path, ws.logs, timeout)
    ws.fx("aggregator", "certify", "--fqdn", agg_addr, "--silent", log_name="fx_aggregator_certify")
    for name in ws.collaborators:
        ws.fx("collaborator", "certify", "-n", name, "--silent", log_name=f"fx_certify_{name}")


def certify_collaborator(ws: Workspace, name: str) -> None:
    """Key pair + CSR for ``name``, signed by the federation CA (also registers it in cols.yaml)."""
    ws.fx("collaborator", "generate-cert-request", "-n", name, "--silent", "--skip-package", log_name=f"fx_csr_{name}")
    ws.fx("collaborator", "certify", "-n", name, "--silent", log_name=f"fx_certify_{name}")
