"""A site's own data config and privacy policy, read from the site's disk by both backends.

A hospital writes one ``data.yaml`` (Flower: ``--node-config 'data-config="/abs/data.yaml"'``;
OpenFL: the collaborator's line in ``plan/data.yaml`` names it). Besides the CSVs and the state
folder it declares the site's **privacy floor** and which **metrics may leave the site**. The
experiment config arrives from the coordinator; the site checks it against its floor before it
builds anything and refuses a config that is weaker, naming the field and both values. The
coordinator may only tighten. The site's privacy ledger lives in its own ``state_dir``.

Metric names leaving a site are filtered here, for both backends: by default only the sample
count and DP accounting (``epsilon``) leave; losses leave only when the site lists them in
``share_metrics`` (``"*"`` lets every metric out).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml
from pydantic import Field

from fedsynth.config import ExperimentConfig, read_yaml, validate_model
from fedsynth.config_base import Strict as _Strict
from fedsynth.errors import PolicyRefused
from fedsynth.io import atomic_write_text
from fedsynth.privacy.lifetime import Budget, DatasetLedger, default_ledger_dir

#: a site's metric saying it kept a group at home this round (``kept_local:<group>`` = 1): the
#: weights it sent for that group are the ones it received
KEPT_LOCAL = "kept_local:"

#: a site's metric saying it refused the round by its own policy (``refused:<field>`` = 1); the
#: weights it sent are the ones it received (OpenFL: a task result must come back)
REFUSED = "refused:"

#: metrics that reveal nothing beyond the DP guarantee itself (always allowed to leave)
DP_SAFE_METRICS = ("epsilon",)


class SitePrivacyFloor(_Strict):
    """The weakest privacy a site accepts; a coordinator's config may only be stricter."""

    require_dp: bool = Field(True, description="refuse to train unless privacy.enabled (default true: a site "
                                               "that trains without DP says so)")
    max_epsilon: float | None = Field(None, gt=0, description="the coordinator's privacy.target_epsilon must be <= this")
    max_delta: float | None = Field(None, gt=0, lt=1, description="privacy.delta must be <= this")
    min_noise_multiplier: float | None = Field(None, gt=0, description="noise multiplier used (given or calibrated) must be >= this")
    max_grad_norm: float | None = Field(None, gt=0, description="privacy.max_grad_norm (clip bound) must be <= this")
    lifetime_epsilon: float | None = Field(None, gt=0, description="epsilon no image of this site's data may pass over "
                                                                   "every run, local and federated (the ledger's budget)")
    lifetime_delta: float = Field(1e-5, gt=0, lt=1, description="the delta of the lifetime guarantee (below 1/N)")
    max_epsilon_per_round: float | None = Field(None, gt=0, description="what one round may spend on its own")
    allow_non_private: bool = Field(False, description="with a lifetime budget: accept runs without DP (they void it)")

    def budget(self) -> Budget | None:
        """The lifetime budget this floor declares (recorded in the site's ledger), if any."""
        if self.lifetime_epsilon is None:
            return None
        return Budget(self.lifetime_epsilon, self.lifetime_delta, "rdp", self.max_epsilon_per_round, self.allow_non_private)


class SiteDataConfig(_Strict):
    """A site's data config (``data.yaml``): its CSVs, its state folder, its privacy floor."""

    site_id: str = Field(min_length=1, description="name of this site in the coordinator's logs")
    train_csv: Path = Field(description="training CSV (relative paths: relative to this file)")
    val_csv: Path | None = Field(None, description="optional validation CSV")
    state_dir: Path | None = Field(None, description="site-private state: local groups, optimizers, privacy ledger "
                                                     "(default: Flower state/ next to this file; OpenFL the workspace's local_state/)")
    ledger_dir: Path | None = Field(None, description="the site's lifetime privacy ledger, shared by every run on its "
                                                      "data (default: $FEDSYNTH_LEDGER, else ledger/ next to this file)")
    privacy: SitePrivacyFloor = Field(default_factory=SitePrivacyFloor)
    keep_local: list[str] = Field(default_factory=list, description="groups that never leave this site, whatever the "
                                                                    "coordinator asks (e.g. [discriminator]): trained here, "
                                                                    "the received weights sent back unchanged")
    share_metrics: list[str] = Field(default_factory=list, description="metrics (besides num_samples and epsilon) "
                                                                      "that may leave the site, e.g. [loss, d_loss]; '*' = all")


def load_site_config(path: str | Path, hint: str = "") -> SiteDataConfig:
    """Read and validate a site data config; relative paths resolve against its folder."""
    path = Path(path)
    raw = read_yaml(path, "site data config", hint)
    cfg = validate_model(SiteDataConfig, raw, f"site data config {path}")
    base = path.parent.resolve()
    updates = {k: (base / getattr(cfg, k)) for k in ("train_csv", "val_csv", "state_dir", "ledger_dir")
               if getattr(cfg, k) is not None and not getattr(cfg, k).is_absolute()}
    if cfg.ledger_dir is None:
        updates["ledger_dir"] = default_ledger_dir() or base / "ledger"
    return cfg.model_copy(update=updates)


def open_site_ledger(data: SiteDataConfig | None) -> DatasetLedger | None:
    """The site's lifetime ledger with the budget its data config declares recorded (a changed
    budget is a new line); without a data config, ``$FEDSYNTH_LEDGER`` if set."""
    folder = data.ledger_dir if data is not None else default_ledger_dir()
    if folder is None:
        return None
    ledger = DatasetLedger(folder)
    budget = data.privacy.budget() if data is not None else None
    if budget is not None and ledger.budget() != budget:
        ledger.set_budget(budget)
    return ledger


def write_site_config(path: str | Path, cfg: SiteDataConfig) -> Path:
    """Write a site data config as YAML (atomically)."""

    data = cfg.model_dump(mode="json")
    atomic_write_text(Path(path), yaml.safe_dump(data, sort_keys=False))
    return Path(path)


def write_trial_site_config(site_dir: Path, site_id: str, train_csv: Path, val_csv: Path | None,
                            policy: Mapping[str, object] | None = None) -> Path:
    """``SITE_DIR/data.yaml`` of a one-machine trial (state in ``SITE_DIR/state``), checked like a site's own.

    ``policy`` holds the ``privacy`` floor, ``share_metrics`` and the other site fields; without
    them the trial's site takes whatever the experiment config says and shares every metric: one
    operator runs every site of a trial, and is the coordinator too.
    """
    raw: dict[str, object] = {"site_id": site_id, "train_csv": str(Path(train_csv).resolve()),
                              "val_csv": str(Path(val_csv).resolve()) if val_csv else None,
                              "state_dir": str(Path(site_dir).resolve() / "state"), "share_metrics": ["*"],
                              "privacy": {"require_dp": False}, **dict(policy or {})}
    cfg = validate_model(SiteDataConfig, raw, f"site policy of '{site_id}'")
    return write_site_config(Path(site_dir) / "data.yaml", cfg)


class SitePolicy:
    """The site's rules applied to what arrives (the coordinator's config) and what leaves (metrics)."""

    def __init__(self, floor: SitePrivacyFloor | None = None, share_metrics: Iterable[str] = ()) -> None:
        self.floor = floor or SitePrivacyFloor(require_dp=False)  # no floor given: none
        self.share = set(share_metrics)

    @classmethod
    def of(cls, data: SiteDataConfig) -> SitePolicy:
        return cls(data.privacy, data.share_metrics)

    @classmethod
    def default(cls) -> SitePolicy:
        """A site that declared nothing: DP required, only the sample count and epsilon leave it."""
        return cls(SitePrivacyFloor(), [])

    @classmethod
    def permissive(cls) -> SitePolicy:
        """No floor, every metric leaves (local experiments and the one-operator trials' default)."""
        return cls(None, ["*"])

    # ------------------------------------------------------------------ inbound

    def check(self, config: ExperimentConfig, site_id: str) -> None:
        """Refuse a coordinator config weaker than this site's floor (one error naming the field and both values)."""
        f, p = self.floor, config.privacy
        problems: dict[str, str] = {}
        dp_needed = f.require_dp or any(v is not None for v in (f.max_epsilon, f.min_noise_multiplier, f.lifetime_epsilon))
        if dp_needed and not p.enabled and not (f.lifetime_epsilon is not None and f.allow_non_private and not f.require_dp):
            problems["privacy.enabled"] = "the site requires true, the coordinator sent false"
        if p.enabled:
            if f.max_epsilon is not None and (p.target_epsilon is None or p.target_epsilon > f.max_epsilon):
                problems["privacy.target_epsilon"] = (f"the site allows at most {f.max_epsilon:g}, "
                                                      f"the coordinator sent {_show(p.target_epsilon)}")
            if f.max_delta is not None and p.delta > f.max_delta:
                problems["privacy.delta"] = f"the site allows at most {f.max_delta:g}, the coordinator sent {p.delta:g}"
            if f.max_grad_norm is not None and p.max_grad_norm > f.max_grad_norm:
                problems["privacy.max_grad_norm"] = (f"the site allows at most {f.max_grad_norm:g}, "
                                                     f"the coordinator sent {p.max_grad_norm:g}")
            if f.min_noise_multiplier is not None and p.noise_multiplier is not None \
                    and p.noise_multiplier < f.min_noise_multiplier:
                problems["privacy.noise_multiplier"] = (f"the site requires at least {f.min_noise_multiplier:g}, "
                                                        f"the coordinator sent {p.noise_multiplier:g}")
        if problems:
            raise PolicyRefused(f"site '{site_id}' refuses the coordinator's config, weaker than its privacy floor: "
                                + "; ".join(f"{k}: {v}" for k, v in problems.items()), tuple(problems), site_id)

    def check_noise(self, noise_multiplier: float | None, site_id: str) -> None:
        """The noise actually used (calibrated from target_epsilon when not given) against the floor."""
        floor = self.floor.min_noise_multiplier
        if floor is not None and noise_multiplier is not None and noise_multiplier < floor:
            raise PolicyRefused(f"site '{site_id}' refuses the coordinator's config: privacy.noise_multiplier "
                                f"(calibrated from target_epsilon) would be {noise_multiplier:.4g}, the site requires "
                                f"at least {floor:g}", ("privacy.noise_multiplier",), site_id)

    # ------------------------------------------------------------------ outbound

    def allows(self, name: str) -> bool:
        if name.startswith((KEPT_LOCAL, REFUSED)):
            return True  # which groups stayed home: the server must know not to average them
        base = name.removeprefix("val_").removeprefix("train_")
        return "*" in self.share or name in self.share or base in self.share or base in DP_SAFE_METRICS

    def outbound(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The finite metrics this site lets leave (sample counts are sent separately, always)."""
        return {k: float(v) for k, v in metrics.items() if self.allows(k) and math.isfinite(float(v))}


def _show(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"
