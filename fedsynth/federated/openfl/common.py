"""Small helpers shared by the OpenFL runner, aggregation function and tools: the pinned config."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fedsynth.config import ExperimentConfig, load_config
from fedsynth.errors import ConfigError

#: where the fedsynth config sits in an OpenFL workspace (travels with ``plan/`` on export)
CONFIG_IN_WORKSPACE = "plan/fedsynth.yaml"


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_pinned_config(config_path: str | Path, config_sha256: str | None = None) -> ExperimentConfig:
    """Load the workspace's fedsynth config, checking it against the hash pinned in plan.yaml.

    The federation id is a hash of plan.yaml only; pinning the config's hash there makes a
    site with a different ``fedsynth.yaml`` fail at start instead of training another model.
    """
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"fedsynth config not found: {path} (task_runner.settings.config_path in plan.yaml)")
    if config_sha256:
        actual = file_sha256(path)
        if actual != config_sha256:
            raise ConfigError(
                f"{path} does not match the federation's plan: its sha256 is {actual}, plan.yaml pins "
                f"{config_sha256}. Every participant needs the identical fedsynth config "
                f"(run `python -m fedsynth.federated.openfl pin-config` where the plan is authored)"
            )
    return load_config(path)
