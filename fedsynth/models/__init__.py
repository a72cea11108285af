"""Model families and the one place that maps a config to a model."""

from __future__ import annotations

from fedsynth.config import ExperimentConfig
from fedsynth.models.autoencoder import AutoencoderModel
from fedsynth.models.base import Batch, GroupSpec, SynthesisModel, unwrap
from fedsynth.models.diffusion import DiffusionModel
from fedsynth.models.gan import GanModel

FAMILIES: dict[str, type[SynthesisModel]] = {
    cls.family: cls for cls in (AutoencoderModel, GanModel, DiffusionModel)
}


def build_model(config: ExperimentConfig, autoencoder: SynthesisModel | None = None) -> SynthesisModel:
    """Build the (randomly initialised) model that ``config`` describes.

    For latent diffusion, ``autoencoder`` is the trained first stage; when it is not given it is
    loaded from ``config.model.autoencoder_checkpoint``. A network that cannot be built from the
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
        if autoencoder is None and ae_path:
            from fedsynth.checkpoint import model_from_checkpoint

            autoencoder = model_from_checkpoint(ae_path)
        if autoencoder is None and getattr(config.model, "first_stage", None) is not None:
            from fedsynth.errors import ConfigError

            raise ConfigError("model.first_stage: the first-stage autoencoder is trained by `fedsynth train` "
                              "(it writes RUN_DIR/first_stage/last.ckpt); elsewhere set model.autoencoder_checkpoint "
                              "to a trained autoencoder checkpoint")
        if autoencoder is not None:
            _check_first_stage(autoencoder, config, ae_path or "<autoencoder>")
        return DiffusionModel(config, autoencoder=autoencoder)
    return FAMILIES[config.family](config)


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
           "AutoencoderModel", "GanModel", "DiffusionModel"]
