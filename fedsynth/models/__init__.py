"""Model families and the one place that maps a config to a model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedsynth.config import ExperimentConfig
from fedsynth.models.autoencoder import AutoencoderModel
from fedsynth.models.base import Batch, GroupSpec, SynthesisModel, unwrap
from fedsynth.models.diffusion import DiffusionModel, first_stage_digest
from fedsynth.models.gan import GanModel

FAMILIES: dict[str, type[SynthesisModel]] = {
    cls.family: cls for cls in (AutoencoderModel, GanModel, DiffusionModel)
}


def build_model(config: ExperimentConfig, autoencoder: SynthesisModel | None = None) -> SynthesisModel:
    """Build the (randomly initialised) model that ``config`` describes.

    For latent diffusion, ``autoencoder`` is the trained first stage; when it is not given it is
    loaded from ``config.model.autoencoder_checkpoint`` (and checked against
    ``model.first_stage_sha256`` when that is set). A config whose first stage was shipped by a
    federation (``first_stage`` + ``first_stage_sha256``, no checkpoint) gets an untrained
    first stage of that architecture: its weights arrive with the global model. A network that cannot be built from the
    config (a rule :mod:`fedsynth.geometry` does not know) is a :class:`ConfigError`, never a
    traceback.
    """
    from fedsynth.errors import ConfigError

    try:
        return _build(config, autoencoder)
    except (ValueError, AssertionError, RuntimeError, TypeError) as err:
        raise ConfigError(f"cannot build the {config.family} model from this config "
                          f"(spatial_dims {config.spatial_dims}, image_size {list(config.image_size)}, "
                          f"channels {config.channels}): {err}") from None


def _build(config: ExperimentConfig, autoencoder: SynthesisModel | None) -> SynthesisModel:
    if config.family == "diffusion":
        ae_path = getattr(config.model, "autoencoder_checkpoint", None)
        shipped = getattr(config.model, "first_stage_sha256", None)
        if shipped and ae_path and not Path(ae_path).is_file():
            ae_path = None  # a site without the copy: the weights come with the global model, checked by hash
        if autoencoder is None and ae_path:
            from fedsynth.checkpoint import model_from_checkpoint

            autoencoder = model_from_checkpoint(ae_path)
        elif autoencoder is None and shipped and config.model.first_stage is not None:  # type: ignore[union-attr]
            autoencoder = FAMILIES["autoencoder"](first_stage_config(config))  # weights: from the federation
            ae_path = "<shipped first stage>"
        if autoencoder is None and getattr(config.model, "first_stage", None) is not None:
            from fedsynth.errors import ConfigError

            raise ConfigError("model.first_stage: the first-stage autoencoder is trained by `fedsynth train` "
                              "(it writes RUN_DIR/first_stage/last.ckpt); elsewhere set model.autoencoder_checkpoint "
                              "to a trained autoencoder checkpoint")
        if autoencoder is not None:
            _check_first_stage(autoencoder, config, ae_path or "<autoencoder>")
        model = DiffusionModel(config, autoencoder=autoencoder)
        if shipped and ae_path and ae_path != "<shipped first stage>":
            check_first_stage(model.get_weights(["autoencoder"]), shipped, f"model.autoencoder_checkpoint {ae_path}")
        return model
    return FAMILIES[config.family](config)


def first_stage_config(config: ExperimentConfig) -> ExperimentConfig:
    """The autoencoder experiment of a latent-diffusion config's ``model.first_stage``."""
    from fedsynth.config import config_from_dict

    data = config.to_dict()
    data["model"] = data["model"]["first_stage"]
    data["text"] = None  # the first stage learns images only; prompts condition the UNet
    data["training"]["max_steps"] = config.model.first_stage_steps  # type: ignore[union-attr]
    data["training"]["epochs"] = 10**6
    data["privacy"] = config.privacy.model_dump(mode="json")
    return config_from_dict(data, "model.first_stage")


def check_first_stage(weights: Mapping[str, np.ndarray], expected_sha256: str, source: str) -> None:
    """Raise :class:`WeightsError` unless ``weights`` hold the first stage ``expected_sha256`` pins."""
    from fedsynth.errors import WeightsError

    actual = first_stage_digest(weights)
    if actual != expected_sha256:
        raise WeightsError(f"{source}: the first-stage autoencoder's weights have sha256 {actual}, "
                           f"model.first_stage_sha256 pins {expected_sha256}")


def _check_first_stage(autoencoder: SynthesisModel, config: ExperimentConfig, source: str) -> None:
    from fedsynth.errors import ConfigError

    if autoencoder.family != "autoencoder":
        raise ConfigError(f"model.autoencoder_checkpoint {source}: expected an autoencoder run, got a {autoencoder.family} checkpoint")
    ae_cfg = autoencoder.config
    if (ae_cfg.spatial_dims, ae_cfg.channels, list(ae_cfg.image_size)) != (config.spatial_dims, config.channels, list(config.image_size)):
        raise ConfigError(
            f"model.autoencoder_checkpoint {source}: autoencoder was trained on spatial_dims={ae_cfg.spatial_dims}, "
            f"channels={ae_cfg.channels}, image_size={ae_cfg.image_size}; this config has "
            f"{config.spatial_dims}, {config.channels}, {config.image_size}"
        )
    if "discriminator" in autoencoder.nets:  # only the codec is needed for latent diffusion
        del autoencoder.nets["discriminator"]
    autoencoder.eval()


__all__ = ["FAMILIES", "Batch", "GroupSpec", "SynthesisModel", "build_model", "unwrap",
           "check_first_stage", "first_stage_config", "first_stage_digest",
           "AutoencoderModel", "GanModel", "DiffusionModel"]
