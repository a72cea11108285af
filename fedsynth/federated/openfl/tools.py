"""Workspace-side tools run inside an OpenFL workspace (cwd = workspace):

- :func:`start_aggregator`: what ``fx aggregator start`` does, but with the gRPC server bound to
  one address (OpenFL 1.9 always listens on ``[::]``); ``--bind 127.0.0.1`` for one-machine
  trials, the aggregator's own interface address in a real deployment.
- :func:`export_checkpoint`: an aggregated OpenFL model (``save/last.pbuf`` / ``save/best.pbuf``)
  as a core fedsynth checkpoint (``fedsynth info`` / ``fedsynth generate --checkpoint``).
- :func:`pin_config`: write the hash of ``plan/fedsynth.yaml`` and its round count into plan.yaml.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fedsynth.errors import CheckpointError, ConfigError
from fedsynth.families import first_stage
from fedsynth.federated.compat import (
    openfl_bind,
    openfl_check_collaborators,
    openfl_let_recovery_end_a_round,
    openfl_set_idle_poll,
)
from fedsynth.federated.openfl.common import CONFIG_IN_WORKSPACE, file_sha256, load_pinned_config
from fedsynth.io import atomic_path, atomic_write_text

log = logging.getLogger("fedsynth.openfl")


def _plan_settings(plan: dict[str, Any]) -> dict[str, Any]:
    return plan.setdefault("task_runner", {}).setdefault("settings", {})


STRAGGLER_TEMPLATE = "fedsynth.federated.openfl.stragglers.RoundTimeoutPolicy"
STRAGGLER_POLICY = f"""straggler_handling_policy:        # fedsynth's round policy (values set by pin-config)
  template: {STRAGGLER_TEMPLATE}
  settings:
    round_timeout_s: 3600.0       # = federation.round_timeout_s
    min_sites: 2                  # = federation.min_sites
"""


def pin_config(plan_path: str | Path = "plan/plan.yaml") -> str:
    """Pin ``plan/fedsynth.yaml`` in plan.yaml (every ``config_sha256``, ``rounds_to_train`` and the
    straggler policy's ``round_timeout_s`` / ``min_sites``, see :mod:`fedsynth.federated.openfl.stragglers`).

    Edits the values in place so the plan's comments survive; returns the hash.
    """
    import re


    plan_path = Path(plan_path)
    text = plan_path.read_text(encoding="utf-8")
    plan = yaml.safe_load(text)
    config_path = Path(_plan_settings(plan).get("config_path", CONFIG_IN_WORKSPACE))
    config = ship_first_stage(config_path, load_pinned_config(config_path))
    digest = file_sha256(config_path)
    text = re.sub(r"(?m)^(\s*config_sha256:)[ \t]*[^\s#]*", rf"\g<1> {digest}", text)
    text = re.sub(r"(?m)^(\s*rounds_to_train:)[ \t]*[^\s#]*", rf"\g<1> {config.federation.rounds}", text)
    if "straggler_handling_policy" not in plan:  # a plan from before the round policy: add it
        text = text.rstrip("\n") + "\n" + STRAGGLER_POLICY
    fed = config.federation
    text = re.sub(r"(?m)^(\s*round_timeout_s:)[ \t]*[^\s#]*", rf"\g<1> {float(fed.round_timeout_s)}", text)
    text = re.sub(r"(?m)^(\s*min_sites:)[ \t]*[^\s#]*", rf"\g<1> {int(fed.min_sites)}", text)
    pinned = yaml.safe_load(text)
    straggler = pinned.get("straggler_handling_policy") or {}
    if straggler.get("template") != STRAGGLER_TEMPLATE or straggler.get("settings") != {
            "round_timeout_s": float(fed.round_timeout_s), "min_sites": int(fed.min_sites)}:
        raise ConfigError(f"{plan_path}: straggler_handling_policy must be {STRAGGLER_TEMPLATE} with settings "
                          "round_timeout_s and min_sites (fedsynth's round policy; pin-config sets the values)")
    tasks = [t.get("aggregation_type", {}).get("settings", {}) for t in pinned.get("tasks", {}).values()
             if isinstance(t, dict) and isinstance(t.get("aggregation_type"), dict)]
    if _plan_settings(pinned).get("config_sha256") != digest or any(t.get("config_sha256") != digest for t in tasks):
        raise ConfigError(f"{plan_path}: add 'config_sha256: null' to task_runner.settings and to every "
                          "aggregation_type.settings so the config can be pinned")
    atomic_write_text(plan_path, text)
    return digest


#: where a federation on a first stage (latent diffusion) keeps it in the workspace (travels with plan/)
FIRST_STAGE_IN_WORKSPACE = "plan/first_stage.ckpt"


def ship_first_stage(config_path: Path, config: Any) -> Any:
    """A model on a first stage (latent diffusion): copy the first stage's checkpoint into the
    workspace and pin its hash.

    ``plan/fedsynth.yaml`` then names the workspace copy (a path relative to the workspace, never
    one on the authoring host) with the first stage's architecture and hash (latent diffusion:
    ``model.first_stage`` and ``first_stage_sha256``); the aggregator builds the initial model from
    it and every collaborator checks the first stage it receives against the hash (a collaborator
    without the copy builds the architecture only).
    """
    import shutil

    from fedsynth.config import save_config
    from fedsynth.federated.aggregation import resolve_group_policy
    from fedsynth.federated.server import shipped_config
    from fedsynth.models import build_model

    stage = first_stage(config)
    source = stage.checkpoint if stage is not None else None
    if not source or source == FIRST_STAGE_IN_WORKSPACE:  # no trained first stage, or shipped already
        return config
    model = build_model(config)
    shipped = first_stage(shipped_config(config, model, resolve_group_policy(model, config.federation)))
    assert shipped is not None, "a shipped config describes its first stage"
    with atomic_path(Path(FIRST_STAGE_IN_WORKSPACE), durable=True) as tmp:
        shutil.copyfile(source, tmp)
    out = shipped.trained_at(FIRST_STAGE_IN_WORKSPACE)
    save_config(out, config_path)
    return out


#: seconds an idle collaborator waits before asking the aggregator again (OpenFL's own: 10)
IDLE_POLL_S = 1


def start_aggregator(bind: str, plan: str = "plan/plan.yaml", cols: str = "plan/cols.yaml") -> None:
    """Start the aggregator like ``fx aggregator start``, listening on ``bind`` only; a round with too
    few valid updates ends it, and idle collaborators poll every ``IDLE_POLL_S`` s (not OpenFL's 10 s)."""
    from openfl.federated import Plan
    from openfl.utilities.logging import setup_logger

    from fedsynth.federated.openfl import aggregation

    aggregation.EXIT_ON_ROUND_FAILURE = True  # a round with too few valid updates ends the federation
    openfl_set_idle_poll(IDLE_POLL_S)
    openfl_let_recovery_end_a_round()
    setup_logger("info")
    parsed = Plan.parse(plan_config_path=Path(plan).absolute(), cols_config_path=Path(cols).absolute())
    if not parsed.authorized_cols:
        raise ConfigError(f"{cols} lists no collaborators: certify them first (`fx collaborator certify`)")
    server = parsed.get_server()
    log_refusals(server.aggregator, cols)
    port = parsed.config["network"]["settings"]["agg_port"]
    openfl_bind(server, bind, port)
    log.info("fedsynth: aggregator listening on %s only", server.uri)
    server.serve()


def log_refusals(aggregator: Any, cols: str = "plan/cols.yaml", every_s: float = 60.0) -> None:
    """Log every refused collaborator on the aggregator with its name, certificate CN and the reason
    (OpenFL only answers it UNAUTHENTICATED); repeats of the same refusal at most every ``every_s``.

    A collaborator whose certificate is not signed by the federation's CA never gets this far:
    the TLS handshake refuses it inside gRPC, before its name is known.
    """
    import time as _time

    last: dict[tuple[str, str, str], float] = {}
    cols_path = Path(cols)
    seen_mtime = [cols_path.stat().st_mtime_ns if cols_path.is_file() else 0]

    def apply_revocations() -> None:
        """Names removed from cols.yaml (``revoke``) are refused from the next request on."""
        mtime = cols_path.stat().st_mtime_ns if cols_path.is_file() else 0
        if mtime == seen_mtime[0]:
            return
        seen_mtime[0] = mtime
        listed = set(_cols(cols_path))
        for name in [n for n in aggregator.authorized_cols if n not in listed]:
            aggregator.authorized_cols.remove(name)
            log.warning("revoked collaborator '%s': removed from %s, refused from now on", name, cols)

    def checked(check: Callable[[str, str], bool], cert_common_name: str, collaborator_common_name: str) -> bool:
        apply_revocations()
        allowed = bool(check(cert_common_name, collaborator_common_name))
        if not allowed:
            reasons = []
            if collaborator_common_name not in aggregator.authorized_cols:
                reasons.append("not in cols.yaml")
            if cert_common_name != collaborator_common_name:
                reasons.append(f"certificate CN is not '{collaborator_common_name}'")
            reason = "; ".join(reasons) or "not authorized"
            key, now = (collaborator_common_name, cert_common_name, reason), _time.monotonic()
            if now - last.get(key, -every_s) >= every_s:
                last[key] = now
                log.warning("refused collaborator '%s' (CN '%s'): %s",
                            collaborator_common_name, cert_common_name, reason)
        return allowed

    openfl_check_collaborators(aggregator, checked)


def _cols(path: Path) -> list[str]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    names = (data or {}).get("collaborators") or []
    if not isinstance(names, list):
        raise ConfigError(f"{path}: 'collaborators' must be a list of names")
    return [str(n) for n in names]


def revoke_collaborator(name: str, cols: str | Path = "plan/cols.yaml") -> list[str]:
    """Remove ``name`` from ``cols.yaml`` (atomically); returns the collaborators left.

    A running fedsynth aggregator (:func:`start_aggregator`) refuses it from its next request;
    ``fx aggregator start`` only on its next start.
    """

    path = Path(cols)
    names = _cols(path)
    if name not in names:
        raise ConfigError(f"{path}: no collaborator '{name}' to revoke (listed: {names})")
    left = [n for n in names if n != name]
    atomic_write_text(path, yaml.safe_dump({"collaborators": left}, sort_keys=False))
    return left


def read_pbuf(path: str | Path, plan: str = "plan/plan.yaml") -> tuple[dict[str, Any], int]:
    """Tensors and round of an OpenFL model file, decoded with the plan's compression pipeline."""
    from openfl.federated import Plan
    from openfl.protocols import utils

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no aggregated model at {path}: has the federation run a round?")
    parsed = Plan.parse(plan_config_path=Path(plan).absolute(), resolve=False)
    tensors, round_number = utils.deconstruct_model_proto(utils.load_proto(str(path)), parsed.get_tensor_pipe())
    return tensors, int(round_number)


def read_final_model(db_path: str | Path = "local_state/tensor.db") -> tuple[dict[str, Any], int, float | None]:
    """The last *aggregated* model, its round count and OpenFL's best score, from the aggregator's DB.

    OpenFL's ``save/last.pbuf`` holds the model that *entered* the last round (the one it
    validated); the result of the last aggregation is kept only as the DB's next-round tensors.
    """
    from openfl.databases.persistent_db import PersistentTensorDB

    db_path = Path(db_path)
    if not db_path.is_file():
        raise CheckpointError(f"no aggregator state at {db_path}: has the federation run a round?")
    db = PersistentTensorDB(str(db_path))
    try:
        tensors = db.load_tensors(db.get_next_round_tensors_table_name())
        committed, best = db.get_round_and_best_score()
    finally:
        db.close()
    model = {k: v for k, v in tensors.items() if tuple(k.tags) == ("model",)}
    if not model:
        raise CheckpointError(f"{db_path} holds no aggregated model yet")
    last_round = max(k.round_number for k in model)
    weights = {k.tensor_name: v for k, v in model.items() if k.round_number == last_round}
    # no score yet is stored as -inf (see compat.openfl_persist_rounds_without_a_score)
    return weights, int(last_round), (float(best) if committed >= 0 and math.isfinite(float(best)) else None)


def export_checkpoint(which: str, output: str | Path, plan: str = "plan/plan.yaml",
                      extra: dict[str, Any] | None = None) -> Path:
    """Write OpenFL's ``last`` (final aggregated) or ``best`` model as a core checkpoint at ``output``.

    ``last`` = the result of the last aggregation (from ``local_state/tensor.db``); ``best`` =
    ``save/best.pbuf``, the model with the highest aggregated score (= lowest validation loss).
    The file holds the shared groups from OpenFL; ``local`` groups never reach the aggregator,
    so they keep their seeded initial values (generation from a GAN needs only the generator).
    """
    from fedsynth.checkpoint import TrainingState, save_checkpoint
    from fedsynth.engine import seed_everything
    from fedsynth.federated.aggregation import from_transport, resolve_group_policy, shared_groups
    from fedsynth.models import build_model

    plan_cfg = yaml.safe_load(Path(plan).read_text(encoding="utf-8"))
    settings = _plan_settings(plan_cfg)
    config = load_pinned_config(settings.get("config_path", CONFIG_IN_WORKSPACE), settings.get("config_sha256"))
    agg = plan_cfg["aggregator"]["settings"]
    db_path = agg.get("persistent_db_path", "local_state/tensor.db")
    if which == "last":
        tensors, round_number, best_score = read_final_model(db_path)
        source = f"{db_path} (next-round model)"
        metrics: dict[str, float] = {}
    elif which == "best":
        source = agg.get("best_state_path", "save/best.pbuf")
        if not Path(source).is_file() and Path(db_path).is_file():
            raise CheckpointError(f"no best model ({source}): no site has shared a validation loss (a site shares it "
                                  "with 'share_metrics: [loss]' in its data config); export --which last instead")
        tensors, round_number = read_pbuf(source, plan)
        best_score = read_final_model(db_path)[2] if Path(db_path).is_file() else None
        metrics = {"val_loss": -best_score} if best_score is not None else {}
    else:
        raise ValueError(f"which must be 'last' or 'best', got {which!r}")
    seed_everything(config.seed)
    model = build_model(config)
    policy = resolve_group_policy(model, config.federation)
    reference = model.get_weights(shared_groups(policy))
    missing = sorted(set(reference) - set(tensors))
    if missing:
        raise CheckpointError(f"{source} lacks '{missing[0]}' ({len(missing)} missing): was it written for this plan?")
    model.set_weights(from_transport({k: tensors[k] for k in reference}, reference), strict=True)
    local = [g for g, p in policy.items() if p != "shared"]
    info = {"backend": "openfl", "which": which, "source": source, "local_groups_initial": local,
            "openfl_best_score": best_score, **(extra or {})}
    state = TrainingState(round=round_number, metrics=metrics,
                          best_metric=-best_score if (which == "best" and best_score is not None) else None)
    return save_checkpoint(output, model, state, rng=False, extra={"federation": info})
