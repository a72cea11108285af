"""Model families and the one place that maps a config (or a checkpoint) to a model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedsynth.checkpoint import FIRST_STAGE_EXTRA, check_finite_weights, load_checkpoint
from fedsynth.errors import CheckpointError, ConfigError, WeightsError
from fedsynth.families import family, first_stage
from fedsynth.models.autoencoder import AutoencoderModel
from fedsynth.models.base import Batch, GroupSpec, SynthesisModel, unwrap
from fedsynth.models.diffusion import DiffusionModel, first_stage_digest
from fedsynth.models.gan import GanModel

if TYPE_CHECKING:
    from fedsynth.config import ExperimentConfig


def build_model(config: ExperimentConfig, first_stage_model: SynthesisModel | None = None) -> SynthesisModel:
    """Build the (randomly initialised) model that ``config`` describes, with its family's
    ``build`` hook when it has one, else its model class.

    A model built on a first stage (:func:`fedsynth.families.first_stage`; latent diffusion's
    autoencoder) gets ``first_stage_model``, the trained first stage; when it is not given it is
    loaded from the checkpoint the config names (:meth:`~fedsynth.families.FirstStage.to_load`),
    and the family's hook checks it (e.g. against a pinned hash) or, for a config whose first stage
    was shipped by a federation, builds its architecture untrained: its weights arrive with the
    global model. A network that cannot be built from the config (a rule the family's geometry
    check does not know) is a :class:`ConfigError`, never a traceback.
    """
    spec = family(config.family)
    if first_stage_model is not None and spec.build is None:
        raise ConfigError(f"the {spec.name} family builds no first stage: a trained first stage was given for it")
    stage = spec.first_stage(config)
    try:
        if first_stage_model is None and stage is not None and (source := stage.to_load()):
            first_stage_model = model_from_checkpoint(source)
        return spec.build(config, first_stage_model) if spec.build is not None else spec.model(config)
    except (ValueError, AssertionError, RuntimeError, TypeError) as err:
        raise ConfigError(f"cannot build the {config.family} model from this config "
                          f"(spatial_dims {config.spatial_dims}, image_size {list(config.image_size)}, "
                          f"channels {config.channels}): {err}") from None


def model_from_checkpoint(path_or_payload: str | Path | Mapping[str, Any], device: str | torch.device = "cpu",
                          weights: str = "ema") -> Any:
    """Rebuild the model a checkpoint describes and load its weights (never random weights).

    ``weights="ema"`` (default) loads the checkpoint's EMA of the generating groups over the raw
    weights when it has one; ``"raw"`` loads the trained weights only. A model built on a first
    stage is rebuilt from the first stage's config the checkpoint stores, so the checkpoint is
    self-contained.
    """
    from fedsynth.config import config_from_dict

    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    if isinstance(path_or_payload, Mapping):
        payload, source = dict(path_or_payload), "<checkpoint>"
    else:
        payload, source = load_checkpoint(path_or_payload), str(path_or_payload)
    check_finite_weights(payload, source)
    try:
        config = config_from_dict(payload["config"], f"{source} (stored config)")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    trained_first_stage = None
    stored = payload.get("extra", {}).get(FIRST_STAGE_EXTRA)
    if stored is not None:
        trained_first_stage = build_model(config_from_dict(stored, f"{source} (first-stage config)"))
    stage = first_stage(config)
    if stage is not None and stage.checkpoint and trained_first_stage is None:
        raise CheckpointError(f"checkpoint {source} is a {stage.kind} run but stores no first-stage config")
    model = build_model(config, trained_first_stage)
    try:
        model.set_weights(payload["weights"], strict=True)
    except WeightsError as err:
        raise CheckpointError(f"checkpoint {source} does not match its model: {err}") from None
    missing = set(model.groups()) - {k.split("/", 1)[0] for k in payload["weights"]}
    if missing:
        raise CheckpointError(f"checkpoint {source} has no weights for group(s) {sorted(missing)}")
    ema = payload.get("ema")
    if weights == "ema" and ema:
        try:
            model.set_weights(ema["weights"], strict=True)
        except WeightsError as err:
            raise CheckpointError(f"checkpoint {source}: its EMA weights do not match the model: {err}") from None
    model.weights_loaded = "ema" if weights == "ema" and ema else "raw"
    return model.to(device)


__all__ = ["Batch", "GroupSpec", "SynthesisModel", "build_model", "model_from_checkpoint", "unwrap",
           "first_stage_digest", "AutoencoderModel", "GanModel", "DiffusionModel"]
