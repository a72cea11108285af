"""Checkpoints: one self-describing file per snapshot, written atomically.

A checkpoint holds the experiment config, group-keyed weights (the same keys as
:meth:`SynthesisModel.get_weights`), per-group optimizer states, epoch/step/round, RNG states,
the privacy ledger (if any), metrics and the fedsynth version. It loads with
``torch.load(weights_only=True)``: only tensors and plain Python values are stored.
"""

from __future__ import annotations

import datetime as _dt
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsynth import __version__
from fedsynth.errors import CheckpointError, ConfigError
from fedsynth.io import atomic_path

FORMAT = "fedsynth-checkpoint"
FORMAT_VERSION = 1
#: the ``extra`` entry that holds the experiment config of a model's trained first stage
#: (:meth:`SynthesisModel.first_stage`), so the checkpoint rebuilds without the first stage's own
#: file; named after latent diffusion's autoencoder, the first one, as in the files already written
FIRST_STAGE_EXTRA = "autoencoder_config"


@dataclass
class TrainingState:
    """Where a run stands: what the engine needs to continue exactly."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimiser steps (all groups count as one step)
    round: int | None = None  # federated round, when driven by a federation
    best_metric: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None  # privacy ledger state (accountant history, epsilon)
    batch_in_epoch: int = 0  # batches of epoch ``epoch`` already trained (0: at an epoch boundary)
    epoch_sums: dict[str, float] = field(default_factory=dict)  # loss sums of those batches (epoch metrics)
    data_rng: list[Any] | None = None  # random states of the train-time augmentations


# --------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """All RNG states the engine depends on, in a ``weights_only``-loadable form."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple), "numpy's global RandomState is MT19937, whose legacy state is a tuple"
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (validation, sample grids) without changing the RNG states training draws from."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


def _randomizables(transform: Any) -> list[Any]:
    """Every object with its own RandomState inside a MONAI transform (depth-first, stable order)."""
    from monai.transforms import Randomizable

    found: list[Any] = []

    def visit(obj: Any, depth: int) -> None:
        if depth > 4 or any(obj is f for f in found):
            return
        if isinstance(obj, Randomizable):
            found.append(obj)
        children = getattr(obj, "transforms", None)
        for child in list(children) if isinstance(children, (list, tuple)) else []:
            visit(child, depth + 1)
        for value in vars(obj).values() if hasattr(obj, "__dict__") else []:
            if isinstance(value, Randomizable):
                visit(value, depth + 1)

    if transform is not None:
        visit(transform, 0)
    return found


def capture_augmentation_state(transform: Any) -> list[Any] | None:
    """The augmentations' random states (``weights_only``-loadable), or ``None`` without augmentation."""
    if transform is None:
        return None
    states = []
    for obj in _randomizables(transform):
        _, key, pos, has_gauss, cached = obj.R.get_state()
        states.append({"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)})
    return states


def restore_augmentation_state(transform: Any, states: list[Any] | None) -> None:
    """Inverse of :func:`capture_augmentation_state` (a changed augmentation list is refused at resume)."""
    objs = _randomizables(transform)
    if not states or len(objs) != len(states):
        return
    for obj, st in zip(objs, states, strict=False):
        obj.R.set_state(("MT19937", st["key"].numpy().astype(np.uint32), st["pos"], st["has_gauss"], st["cached_gaussian"]))


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save / load


def save_checkpoint(
    path: str | Path,
    model: Any,
    state: TrainingState,
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    *,
    rng: bool = True,
    extra: Mapping[str, Any] | None = None,
    ema: Mapping[str, Any] | None = None,
    rank_rng: list[Any] | None = None,
    extension_states: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (all groups) and ``state`` to ``path`` atomically; returns the path.

    ``rank_rng``: under DDP, every rank's RNG and augmentation states (rank order), so each rank
    of a resumed run draws exactly what it would have drawn. ``extension_states``: the engine
    extensions' states by their ``state_key`` (``privacy``, ``ema``), stored under those keys.
    ``data``: the training set's fingerprint (:func:`fedsynth.data.manifest.fingerprint`): a resume
    on other images is refused."""
    path = Path(path)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fedsynth_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "family": model.family,
        "spatial_dims": model.spatial_dims,
        "groups": model.groups(),
        "config": model.config.to_dict(),
        "weights": {k: torch.from_numpy(v) for k, v in model.get_weights().items()},
        "optimizers": {g: opt.state_dict() for g, opt in (optimizers or {}).items()},
        "epoch": state.epoch,
        "step": state.step,
        "round": state.round,
        "best_metric": state.best_metric,
        "metrics": {k: float(v) for k, v in state.metrics.items()},
        "privacy": state.privacy,
        "batch_in_epoch": state.batch_in_epoch,
        "epoch_sums": {k: float(v) for k, v in state.epoch_sums.items()},
        "data_rng": state.data_rng,
        "rng": capture_rng() if rng else None,
        "rank_rng": rank_rng,
        "extra": dict(extra or {}),
        "ema": dict(ema) if ema else None,
        "data": dict(data) if data else None,
    }
    payload.update(extension_states or {})
    first_stage = model.first_stage()
    if first_stage is not None:
        payload["extra"][FIRST_STAGE_EXTRA] = first_stage.config.to_dict()
    with atomic_path(path, durable=True) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and sanity-check a checkpoint file; raises :class:`CheckpointError` with the reason."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; a run folder holds last.ckpt "
                              f"(e.g. {path / 'last.ckpt'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated/corrupt files
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"checkpoint {path} is truncated, corrupt or not a fedsynth checkpoint "
                              f"({type(err).__name__}: {first[:160]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fedsynth checkpoint (no '{FORMAT}' header)")
    for key in ("config", "weights", "epoch", "step"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {path} is incomplete: missing '{key}'")
    for key, kind in _HEADER_TYPES.items():
        value = payload.get(key)
        if key in payload and not (isinstance(value, kind) and not isinstance(value, bool) or value is None and key in _NULLABLE):
            raise CheckpointError(f"checkpoint {path} is damaged: its '{key}' is {value!r} ({type(value).__name__}), "
                                  f"expected {kind.__name__ if isinstance(kind, type) else ' or '.join(k.__name__ for k in kind)}")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {payload['format_version']}; this fedsynth reads <= {FORMAT_VERSION}")
    bad = [k for k, v in payload["weights"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path} is damaged: weight '{bad[0]}' is not a tensor")
    return payload


#: the types a checkpoint's header fields must have (a damaged or hand-edited file says so, not a traceback)
_HEADER_TYPES: dict[str, type | tuple[type, ...]] = {
    "format_version": int, "fedsynth_version": str, "family": str, "config": dict, "weights": dict,
    "epoch": int, "step": int, "round": int, "groups": list, "metrics": dict, "extra": dict,
    "best_metric": (int, float), "privacy": dict, "data": dict,
}
_NULLABLE = frozenset({"round", "best_metric", "privacy", "data"})


def check_finite_weights(payload: Mapping[str, Any], source: str | Path) -> None:
    """Refuse a checkpoint whose weights hold NaN or Inf (a diverged run): it would generate blank
    images and exit 0. Names the first bad tensor and how many are bad."""
    bad = [k for k, v in payload["weights"].items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"checkpoint {source} holds NaN or Inf weights in {len(bad)} tensor(s), first '{bad[0]}': "
                              "the run diverged before this checkpoint; use an earlier checkpoint (e.g. best.ckpt) or "
                              "train again with a lower learning rate")


#: config fields a resumed run may change: they alter how training goes on, not what the saved
#: state means. Every other change (geometry, model, data, seed, batch size, privacy) is refused.
RESUME_CHANGEABLE = (
    "training.epochs", "training.max_steps", "training.learning_rate", "training.group_learning_rates",
    "training.lr_schedule", "training.warmup_steps", "training.min_lr_ratio", "training.grad_clip_norm",
    "training.betas", "training.weight_decay", "training.validate_every", "training.sample_every",
    "training.num_sample_images", "training.tensorboard", "training.progress", "training.device",
    "training.num_workers", "training.checkpoint_every_steps", "data.cache", "federation",
)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping) and not (prefix.endswith("group_learning_rates")):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def _stored_defaults(stored: Mapping[str, Any]) -> dict[str, Any]:
    """Every field of a stored config with the defaults of the fields it lacks filled in (a checkpoint
    written before a field existed); ``{}`` if it no longer validates (its changes are then listed as is)."""
    from fedsynth.config import config_from_dict

    try:
        return _flatten(config_from_dict(dict(stored), "stored config").to_dict())
    except ConfigError:
        return {}


def config_changes(stored: Mapping[str, Any], config: Any, source: str) -> list[str]:
    """Compare a checkpoint's config with the one a resumed run uses.

    Returns one ``"field: old -> new"`` line per allowed change; raises :class:`CheckpointError`
    listing every change a resume cannot honour exactly.
    """
    old, new = _flatten(dict(stored)), _flatten(config.to_dict())
    for key, value in _stored_defaults(stored).items():
        old.setdefault(key, value)  # a field newer than the checkpoint: what its fedsynth did is the default
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    allowed = [k for k in changed if any(k == a or k.startswith(a + ".") for a in RESUME_CHANGEABLE)]
    if new.get("privacy.enabled") and new.get("privacy.target_epsilon") and new.get("privacy.epochs") is None:
        allowed = [k for k in allowed if k != "training.epochs"]  # the noise was calibrated for training.epochs
    refused = [k for k in changed if k not in allowed]
    if refused:
        lines = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in refused)
        raise CheckpointError(f"cannot resume from {source} with this config: {lines}. These settings must stay as "
                              f"the run started (only {', '.join(a.split('.')[-1] for a in RESUME_CHANGEABLE)} may "
                              f"change); start a new run folder instead")
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in allowed]


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """Metadata of a checkpoint as plain JSON-able values (what ``fedsynth info`` prints)."""
    payload = load_checkpoint(path)
    privacy = payload.get("privacy") or {}
    n_params = sum(int(t.numel()) for t in payload["weights"].values())
    return {
        "path": str(path),
        "family": payload.get("family"),
        "spatial_dims": payload.get("spatial_dims"),
        "image_size": payload["config"].get("image_size"),
        "channels": payload["config"].get("channels"),
        "num_classes": payload["config"].get("num_classes"),
        "groups": payload.get("groups"),
        "num_weights": n_params,
        "epoch": payload["epoch"],
        "step": payload["step"],
        "batch_in_epoch": payload.get("batch_in_epoch", 0),
        "round": payload.get("round"),
        "best_metric": payload.get("best_metric"),
        "metrics": payload.get("metrics", {}),
        "privacy_epsilon": privacy.get("epsilon") if privacy else None,
        "privacy_delta": privacy.get("delta") if privacy else None,
        # a federation's global model: the example-level guarantee (weakest site) and the client-level one
        "privacy": ({k: privacy.get(k) for k in ("example_level", "client_level")}
                    if privacy.get("level") == "federation" else None),
        "fedsynth_version": payload.get("fedsynth_version"),
        "created": payload.get("created"),
        "latent_diffusion": FIRST_STAGE_EXTRA in payload.get("extra", {}),  # a model on a first stage
        "weights_finite": all(bool(torch.isfinite(v).all()) for v in payload["weights"].values() if v.is_floating_point()),
        "training_data": ({"sha256": payload["data"].get("sha256"), "images": payload["data"].get("images")}
                          if payload.get("data") else None),
        "ema": ({"groups": payload["ema"].get("groups"), "decay": payload["ema"].get("decay"),
                 "updates": payload["ema"].get("num_updates")} if payload.get("ema") else None),
    }
