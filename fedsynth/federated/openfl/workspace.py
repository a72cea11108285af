"""Build an OpenFL workspace from ``plans/workspace`` and run the standard ``fx`` set-up flow.

OpenFL 1.9's ``fx workspace create --template`` only accepts its built-in templates (a click
``Choice``), so fedsynth writes the workspace itself: ``plans/workspace`` is one template for
every family; :func:`write_template` fills in a registered family (the plan's family line,
``plan/fedsynth.yaml`` and the ``config_sha256`` pins), which is the ``workspace create`` step;
everything after that is plain ``fx``.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedsynth.config import ExperimentConfig, default_config, render_yaml, save_config
from fedsynth.errors import ConfigError, FedsynthError
from fedsynth.families import family
from fedsynth.federated.openfl.common import CONFIG_IN_WORKSPACE
from fedsynth.federated.openfl.tools import pin_config
from fedsynth.federated.site_config import write_trial_site_config
from fedsynth.io import atomic_write_text
from fedsynth.processes import run_checked, run_parallel
from fedsynth.resources import resource_dir

#: name the aggregator's certificate is issued for, and that collaborators dial, in one-machine runs
LOCAL_AGGREGATOR_NAME = "localhost"
WORKSPACE_DIRS = ("cert", "data", "logs", "save", "local_state", "src")


def plans_dir() -> Path:
    """The OpenFL templates, ``plans/`` (the package ``fedsynth.plans`` once installed from a wheel)."""
    return resource_dir("plans")


#: the one OpenFL workspace template, a folder of ``plans/``
TEMPLATE = "workspace"
#: the geometry of the example ``plan/fedsynth.yaml`` of :func:`write_template`: 2D, 64x64, 1 channel
TEMPLATE_IMAGE_SIZE = 64


def template_dir(plans: Path | None = None) -> Path:
    """``plans/workspace``: the OpenFL workspace template every family's workspace is written from."""
    path = (plans or plans_dir()) / TEMPLATE
    if not (path / "plan" / "plan.yaml").is_file():
        raise ConfigError(f"no OpenFL workspace template at {path} (plan/plan.yaml is missing)")
    return path


def _copy_template(out: Path, family_name: str, plans: Path | None = None) -> None:
    """The template in ``out``, its plan naming ``family_name`` (a registered family)."""
    family(family_name)  # a ConfigError lists the registered families
    shutil.copytree(template_dir(plans), out, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "__init__.py", "*.crt", "*.key", "*.csr", "*.pbuf", "*.db"))
    plan_path = out / "plan" / "plan.yaml"
    atomic_write_text(plan_path, plan_path.read_text(encoding="utf-8").replace("{family}", family_name))


def write_template(family_name: str, out: Path, plans: Path | None = None) -> Path:
    """A ready OpenFL workspace for a registered family in ``out`` (new or empty): the template, the
    family's default config (2D, :data:`TEMPLATE_IMAGE_SIZE` pixels) as ``plan/fedsynth.yaml`` and
    plan.yaml pinned to it. What ``fedsynth templates openfl-<family>`` writes."""
    out = Path(out)
    _copy_template(out, family_name, plans)
    config = default_config(family_name, 2, TEMPLATE_IMAGE_SIZE)
    atomic_write_text(out / CONFIG_IN_WORKSPACE, render_yaml(config))
    pin_config_in(out)
    return out


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
    """Write the family's workspace to ``prefix`` with ``config``, data.yaml and the network settings.

    ``run_dir`` is where the aggregator's :class:`~fedsynth.federated.server.GlobalModel` writes
    ``global/`` (every task's ``aggregation_type.settings.run_dir``; default: the workspace).

    ``site_configs`` (collaborator -> its site data config) makes ``plan/data.yaml`` name each
    site's own ``data.yaml`` (privacy floor, metric policy). A site without one in this
    one-operator workspace gets a trial data config in ``data/<name>/`` (no floor, every metric
    shared, state in ``local_state/fedsynth/<name>``): a collaborator line naming bare CSVs gets a
    hospital's safe default instead (DP required, losses kept home).
    """
    prefix = Path(prefix)
    if prefix.exists() and any(prefix.iterdir()):
        raise FedsynthError(f"workspace folder {prefix} already exists and is not empty: choose a new run folder")
    for name in sites:
        if name != name.lower() or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"collaborator name '{name}': use lower-case letters, digits, '-' or '_' (it is a certificate name)")
    _copy_template(prefix, config.family, plans)
    for d in WORKSPACE_DIRS:
        (prefix / d).mkdir(parents=True, exist_ok=True)
    save_config(config, prefix / CONFIG_IN_WORKSPACE)
    site_configs = {**{name: write_trial_site_config(prefix / "data" / name, name, Path(train).resolve(),
                                                     Path(val).resolve() if val else None,
                                                     {"state_dir": str((prefix / "local_state" / "fedsynth" / name).resolve())})
                       for name, (train, val) in sites.items() if name not in (site_configs or {})},
                    **(site_configs or {})}
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
    with contextlib.chdir(workspace):
        return pin_config("plan/plan.yaml")


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
