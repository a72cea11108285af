"""Model families and the one place that maps a config to a model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsynth.families import family
from fedsynth.families.diffusion import first_stage_config
from fedsynth.models.autoencoder import AutoencoderModel
from fedsynth.models.base import Batch, GroupSpec, SynthesisModel, unwrap
from fedsynth.models.diffusion import DiffusionModel, check_first_stage, first_stage_digest
from fedsynth.models.gan import GanModel

if TYPE_CHECKING:
    from fedsynth.config import ExperimentConfig


def build_model(config: ExperimentConfig, autoencoder: SynthesisModel | None = None) -> SynthesisModel:
    """Build the (randomly initialised) model that ``config`` describes, with its family's
    ``build`` hook when it has one, else its model class.

    For latent diffusion, ``autoencoder`` is the trained first stage; when it is not given it is
    loaded from ``config.model.autoencoder_checkpoint`` (and checked against
    ``model.first_stage_sha256`` when that is set). A config whose first stage was shipped by a
    federation (``first_stage`` + ``first_stage_sha256``, no checkpoint) gets an untrained
    first stage of that architecture: its weights arrive with the global model (see
    :func:`fedsynth.models.diffusion.build`). A network that cannot be built from the config (a
    rule the family's geometry check does not know) is a :class:`ConfigError`, never a traceback.
    """
    from fedsynth.errors import ConfigError

    spec = family(config.family)
    if autoencoder is not None and spec.build is None:
        raise ConfigError(f"the {spec.name} family builds no first stage: a trained autoencoder was given for it")
    try:
        return spec.build(config, autoencoder) if spec.build is not None else spec.model(config)
    except (ValueError, AssertionError, RuntimeError, TypeError) as err:
        raise ConfigError(f"cannot build the {config.family} model from this config "
                          f"(spatial_dims {config.spatial_dims}, image_size {list(config.image_size)}, "
                          f"channels {config.channels}): {err}") from None


__all__ = ["Batch", "GroupSpec", "SynthesisModel", "build_model", "unwrap",
           "check_first_stage", "first_stage_config", "first_stage_digest",
           "AutoencoderModel", "GanModel", "DiffusionModel"]
