"""Write the Flower app folder that ``flwr run`` bundles and ships to the SuperLink and SuperNodes.

Flower keeps only ``*.py``/``*.toml``/``*.md`` of an app, so the app is thin: two one-line
modules that import the installed ``fedsynth`` package (every host has it installed), and a
``pyproject.toml`` with the run config (absolute paths on the aggregator host) and the
federation (the SuperLink's Control API address and the CA to trust).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedsynth.io import atomic_write_text

APP_PACKAGE = "fedsynth_flower_app"
FEDERATION = "fedsynth"


@dataclass(frozen=True)
class AppSpec:
    """What the app's ``pyproject.toml`` says."""

    config_path: Path  # experiment YAML on the aggregator host (absolute)
    run_dir: Path  # where the ServerApp writes global checkpoints (absolute)
    control_address: str  # SuperLink Control API, host:port (``flwr run`` talks to it)
    root_certificates: Path | None  # CA certificate; None = insecure (no TLS)
    rounds: int = 0  # 0 = federation.rounds from the YAML
    evaluate: bool = True


def _toml_str(value: object) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_app(app_dir: str | Path, spec: AppSpec) -> Path:
    """Create (or refresh) the app folder; returns it."""
    app_dir = Path(app_dir)
    for path, name in ((spec.config_path, "config_path"), (spec.run_dir, "run_dir")):
        if not Path(path).is_absolute():
            raise ValueError(f"{name} must be absolute (the ServerApp runs in the SuperLink's folder): {path}")
    tls = (f"root-certificates = {_toml_str(Path(spec.root_certificates).resolve())}" if spec.root_certificates
           else "insecure = true  # no TLS: only for a quick test on one machine")
    pyproject = f"""# Written by fedsynth: the Flower app that drives fedsynth's engine. Run with: flwr run . {FEDERATION}
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedsynth-flower-app"
version = "1.0.0"
description = "fedsynth federated synthesis (thin Flower app; needs fedsynth installed on every host)"
license = "Apache-2.0"
dependencies = ["fedsynth"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedsynth"

[tool.flwr.app.components]
serverapp = "{APP_PACKAGE}.server_app:app"
clientapp = "{APP_PACKAGE}.client_app:app"

[tool.flwr.app.config]
config-path = {_toml_str(spec.config_path)}
run-dir = {_toml_str(spec.run_dir)}
rounds = {int(spec.rounds)}
evaluate = {"true" if spec.evaluate else "false"}

[tool.flwr.federations]
default = "{FEDERATION}"

[tool.flwr.federations.{FEDERATION}]
address = {_toml_str(spec.control_address)}
{tls}
"""
    atomic_write_text(app_dir / "pyproject.toml", pyproject)
    pkg = app_dir / APP_PACKAGE
    atomic_write_text(pkg / "__init__.py", '"""Thin Flower app: the code lives in the installed fedsynth package."""\n')
    atomic_write_text(pkg / "server_app.py", "from fedsynth.federated.flower import server_app\n\napp = server_app.app\n")
    atomic_write_text(pkg / "client_app.py", "from fedsynth.federated.flower import client_app\n\napp = client_app.app\n")
    return app_dir
