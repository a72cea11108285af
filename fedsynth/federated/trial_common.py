"""What the two one-machine trials (``fedsynth federate flower`` / ``federate openfl``) share.

- :func:`parse_sites`: the one ``--site ID=TRAIN_CSV[,VAL_CSV]`` syntax of both commands.
- :class:`TrialRequest` / :class:`TrialResult`: what a trial is asked to do and what it returns.
- :func:`check_trial`: refuse, at trial start, what the federation cannot do (too few sites for
  ``federation.min_sites``, a config field the backend cannot honour), naming the field.
- :func:`check_round`: the round policy both servers apply after aggregating (see
  :meth:`fedsynth.federated.server.GlobalModel.aggregate`).

Both trials write the same layout: ``RUN/global/{last,best,round_NNNN}.ckpt`` and
``RUN/global/history.json`` through :class:`~fedsynth.federated.server.GlobalModel`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsynth.config import ExperimentConfig
from fedsynth.errors import CheckpointError, ConfigError
from fedsynth.federated.aggregation import NoValidUpdates

#: a site's CSVs: (training CSV, optional validation CSV)
SiteCSVs = tuple[Path, "Path | None"]

SITE_SYNTAX = "ID=TRAIN_CSV or ID=TRAIN_CSV,VAL_CSV"


def parse_sites(values: Sequence[str] | None, flag: str = "--site") -> dict[str, SiteCSVs]:
    """``["site1=a.csv", "site2=b.csv,bv.csv"]`` -> ``{site: (train, val | None)}``; ConfigError if malformed."""
    sites: dict[str, SiteCSVs] = {}
    for value in values or []:
        name, sep, paths = value.partition("=")
        name = name.strip()
        parts = [p.strip() for p in paths.split(",")]
        if not sep or not name or not 1 <= len(parts) <= 2 or not all(parts):
            raise ConfigError(f"{flag} '{value}': expected {SITE_SYNTAX}")
        check_site_id(name, flag)
        if name in sites:
            raise ConfigError(f"{flag}: site '{name}' given twice")
        sites[name] = (Path(parts[0]), Path(parts[1]) if len(parts) == 2 else None)
    return sites


def check_site_id(name: str, flag: str = "--site") -> None:
    """A site id is also a certificate / collaborator name: lower-case letters, digits, '-' or '_'."""
    if name != name.lower() or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"{flag}: invalid site id '{name}': use lower-case letters, digits, '-' or '_' (e.g. site1)")


def _as_csvs(value: Any) -> SiteCSVs:
    if isinstance(value, (tuple, list)):
        train, val = (list(value) + [None])[:2]
        return Path(train), Path(val) if val else None
    return Path(value), None


@dataclass
class TrialRequest:
    """What a one-machine trial was asked to do (both backends).

    ``sites`` maps a site id to its training CSV or to ``(train_csv, val_csv | None)``;
    it is normalised to the tuple form. ``tls``/``node_auth`` apply to Flower (OpenFL always
    runs mTLS: ``tls=False`` is refused there).
    """

    config_path: str | Path | ExperimentConfig  # a YAML, or a config object (tests/benchmarks)
    sites: Mapping[str, Any]
    run_dir: str | Path
    rounds: int | None = None
    val_sites: Mapping[str, str | Path] = field(default_factory=dict)  # deprecated: use sites' (train, val)
    tls: bool = True
    node_auth: bool = True
    evaluate: bool = True
    timeout_s: float | None = 3600.0
    #: Flower: one long-lived site worker per SuperNode (``--isolation process``) keeps each site's
    #: engine, data and state in memory across rounds; False: a fresh ClientApp process per message
    long_lived_sites: bool = True
    overrides: Callable[[Any], None] | None = None  # edit the loaded config (tests/benchmarks)
    #: site id -> {privacy: <floor>, share_metrics: [...]} written into that site's data.yaml;
    #: a site not named lets every metric out (one operator runs every site of a trial)
    site_policies: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sites = {str(k): _as_csvs(v) for k, v in self.sites.items()}
        unknown = sorted(set(self.val_sites) - set(sites))
        if unknown:
            raise ConfigError(f"--val-site {unknown[0]}: no --site with that id (sites: {sorted(sites)})")
        for site, val in self.val_sites.items():
            sites[site] = (sites[site][0], Path(val))
        self.sites = sites
        self.val_sites = {}

    @property
    def site_csvs(self) -> dict[str, SiteCSVs]:
        return dict(self.sites)

    def load_config(self) -> ExperimentConfig:
        """The experiment config with ``rounds`` and ``overrides`` applied."""
        from fedsynth.config import config_from_dict, load_config

        if isinstance(self.config_path, ExperimentConfig):
            config = config_from_dict(self.config_path.to_dict(), "TrialRequest.config_path")
        else:
            config = load_config(self.config_path)
        if self.rounds is not None:
            config.federation.rounds = self.rounds
        if self.overrides is not None:
            self.overrides(config)
        return config


@dataclass
class TrialResult:
    """What a finished trial returns (both backends)."""

    backend: str
    run_dir: Path
    round: int
    checkpoint: Path  # RUN/global/last.ckpt
    history: list[dict[str, Any]] = field(default_factory=list)  # RUN/global/history.json
    timings: dict[str, float] = field(default_factory=dict)
    workspace: Path | None = None  # OpenFL: the fx workspace

    @property
    def global_dir(self) -> Path:
        return self.run_dir / "global"

    @property
    def best(self) -> Path | None:
        best = self.global_dir / "best.ckpt"
        return best if best.is_file() else None


def read_result(backend: str, run_dir: Path, **kwargs: Any) -> TrialResult:
    """The :class:`TrialResult` of a run folder written through ``GlobalModel``."""
    import json


    gdir = Path(run_dir) / "global"
    history_path = gdir / "history.json"
    if not (gdir / "last.ckpt").is_file():
        raise CheckpointError(f"the federation wrote no global model ({gdir / 'last.ckpt'} is missing)")
    history = json.loads(history_path.read_text(encoding="utf-8")) if history_path.is_file() else []
    rounds = int(history[-1]["round"]) if history else 0
    return TrialResult(backend, Path(run_dir), rounds, gdir / "last.ckpt", history, **kwargs)


#: config fields a backend cannot honour: backend -> [(field, predicate on config -> bad?, what it supports)]
_UNSUPPORTED: dict[str, list[tuple[str, Callable[[ExperimentConfig], bool], str]]] = {
    "openfl": [
        ("federation.fraction_fit", lambda c: c.federation.fraction_fit < 1.0,
         "OpenFL's assigner sends every round to every collaborator; use 1.0"),
        ("federation.transport_dtype", lambda c: c.federation.transport_dtype != "float32",
         "the OpenFL wire format (plan compression_pipeline) is float32"),
    ],
    "flower": [],
}


def check_trial(config: ExperimentConfig, sites: Mapping[str, object], backend: str) -> None:
    """Refuse, before anything starts, a trial the backend cannot run as configured."""
    n = len(sites)
    if n < 1:
        raise ConfigError(f"give at least one --site {SITE_SYNTAX}")
    if config.federation.min_sites > n:
        raise ConfigError(f"federation.min_sites is {config.federation.min_sites} but the trial has only {n} site(s)")
    for name, bad, why in _UNSUPPORTED.get(backend, []):
        if bad(config):
            value = eval_field(config, name)
            raise ConfigError(f"{name}={value!r} is not supported by the {backend} backend: {why}")


def eval_field(config: ExperimentConfig, dotted: str) -> object:
    obj: object = config
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def check_round(server_round: int, accepted: Sequence[str], rejected: Sequence[tuple[str, str]], min_sites: int,
                failures: Sequence[str] = ()) -> None:
    """The round policy: fewer valid updates than ``min_sites`` (or none) fails the round, naming who was rejected."""
    if len(accepted) >= max(1, min_sites):
        return
    why = "; ".join(reason for _, reason in rejected) or "no site sent an update"
    why += "".join(f"; {f}" for f in failures)
    raise NoValidUpdates(f"round {server_round}: {len(accepted)} valid update(s), fewer than federation.min_sites="
                         f"{min_sites} (rejected: {why})")


def threads_per_site(n_sites: int) -> str:
    """``OMP_NUM_THREADS`` for each site process of a one-machine trial: the cores shared out, so
    sites training at the same time do not oversubscribe them."""
    return str(max(1, (os.cpu_count() or 1) // max(1, n_sites)))
