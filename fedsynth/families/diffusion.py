"""The diffusion family's light half: its config block, recipe, architecture rules and the
first stage of latent diffusion as a config describes it (no torch).

The UNet, schedulers and latent codec are in :mod:`fedsynth.models.diffusion`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from fedsynth.config_base import FamilyConfig
from fedsynth.errors import ConfigError
from fedsynth.families import Family
from fedsynth.families.autoencoder import AutoencoderConfig
from fedsynth.families.autoencoder import recipe as autoencoder_recipe
from fedsynth.geometry import check_groups, fail, nearest, size_rule

if TYPE_CHECKING:
    from fedsynth.config import ExperimentConfig


class DiffusionConfig(FamilyConfig):
    """DDPM-trained DiffusionModelUNet; optional latent diffusion on a trained autoencoder run."""

    family: Literal["diffusion"] = "diffusion"
    channels: list[int] = Field([32, 64], description="UNet channels per level")
    num_res_blocks: int = Field(1, ge=1)
    attention_levels: list[bool] | None = Field(None, description="default: attention at the last level")
    num_head_channels: int = Field(16, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    num_train_timesteps: int = Field(1000, ge=10)
    schedule: Literal["linear_beta", "scaled_linear_beta", "cosine"] = Field(
        "cosine", description="noise schedule (cosine: Nichol & Dhariwal 2021)")
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = Field(
        "v_prediction", description="what the UNet predicts (v: stable with the cosine schedule)")
    sampler: Literal["ddpm", "ddim"] = Field("ddim", description="default sampler for generate")
    sampling_steps: int = Field(50, ge=1, description="default DDIM steps for generate")
    guidance_scale: float = Field(3.0, ge=0, description="classifier-free guidance at generation")
    class_dropout: float = Field(0.1, ge=0, le=1, description="label drop rate for CFG training")
    autoencoder_checkpoint: str | None = Field(
        None, description="checkpoint of a trained autoencoder run: enables latent diffusion"
    )
    first_stage: AutoencoderConfig | None = Field(
        None, description="latent diffusion from one config: train this autoencoder first (fedsynth train), then the UNet"
    )
    first_stage_steps: int = Field(2000, ge=1, description="optimiser steps of the first stage (with first_stage)")
    first_stage_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$",
        description="set by a federation that ships its first stage: model.first_stage is then its architecture, "
                    "its weights travel with the global model and every site checks them against this hash")

    @model_validator(mode="after")
    def _attention_matches(self) -> DiffusionConfig:
        if self.attention_levels is not None and len(self.attention_levels) != len(self.channels):
            raise ValueError(
                f"attention_levels must have one entry per level ({len(self.channels)}), "
                f"got {len(self.attention_levels)}"
            )
        return self


def first_stage_config(config: ExperimentConfig) -> ExperimentConfig:
    """The autoencoder experiment of a latent-diffusion config's ``model.first_stage``."""
    from fedsynth.config import config_from_dict

    data = config.to_dict()
    data["model"] = data["model"]["first_stage"]
    data["text"] = None  # the first stage learns images only; prompts condition the UNet
    assert isinstance(config.model, DiffusionConfig)
    data["training"]["max_steps"] = config.model.first_stage_steps
    data["training"]["epochs"] = 10**6
    data["privacy"] = config.privacy.model_dump(mode="json")
    return config_from_dict(data, "model.first_stage")


@dataclass(frozen=True)
class LatentFirstStage:
    """Latent diffusion's first stage as a config describes it (a :class:`~fedsynth.families.FirstStage`).

    Three fields say it: ``model.autoencoder_checkpoint`` (a trained autoencoder run),
    ``model.first_stage`` (an autoencoder to train first, ``first_stage_steps`` long, or the
    architecture of a shipped one) and ``model.first_stage_sha256`` (set by a federation that
    ships it).
    """

    config: ExperimentConfig
    kind: str = "latent-diffusion"
    groups: tuple[str, ...] = ("autoencoder",)

    @property
    def _model(self) -> DiffusionConfig:
        assert isinstance(self.config.model, DiffusionConfig)
        return self.config.model

    @property
    def checkpoint(self) -> str | None:
        return self._model.autoencoder_checkpoint

    @property
    def pinned_sha256(self) -> str | None:
        return self._model.first_stage_sha256

    @property
    def to_train(self) -> bool:
        return self._model.first_stage is not None and not self.checkpoint

    def to_load(self) -> str | None:
        if self.pinned_sha256 and self.checkpoint and not Path(self.checkpoint).is_file():
            return None  # a site without the copy: the weights come with the global model, checked by hash
        return self.checkpoint

    def check_local_training(self) -> None:
        if self.pinned_sha256 and not self.checkpoint:
            raise ConfigError("model.first_stage_sha256 is set: this config's first stage was shipped by a federation "
                              "and its weights live in the federation's global checkpoint; to train locally, set "
                              "model.autoencoder_checkpoint to that checkpoint or remove first_stage_sha256 to train "
                              "a new first stage")

    def experiment(self) -> ExperimentConfig:
        return first_stage_config(self.config)

    def trained_at(self, checkpoint: str) -> ExperimentConfig:
        return self._with({"autoencoder_checkpoint": checkpoint})

    def shipped(self, trained: ExperimentConfig, sha256: str) -> ExperimentConfig:
        return self._with({"first_stage": trained.model.model_copy(deep=True), "autoencoder_checkpoint": None,
                           "first_stage_sha256": sha256})

    def _with(self, fields: dict[str, Any]) -> ExperimentConfig:
        out = self.config.model_copy(deep=True)
        out.model = out.model.model_copy(update=fields)
        return out


def first_stage(config: ExperimentConfig) -> LatentFirstStage | None:
    """The first stage of a latent-diffusion config; ``None`` for pixel diffusion."""
    m = config.model
    assert isinstance(m, DiffusionConfig)
    if m.autoencoder_checkpoint or m.first_stage is not None or m.first_stage_sha256:
        return LatentFirstStage(config)
    return None



def check_geometry(config: ExperimentConfig) -> None:
    """GroupNorm groups, attention heads and the UNet's levels (pixel diffusion: the image size)."""
    m = config.model
    assert isinstance(m, DiffusionConfig)
    levels = len(m.channels)
    check_groups("model.channels", list(m.channels), m.norm_num_groups, "model.norm_num_groups")
    attention = m.attention_levels or [False] * (levels - 1) + [True]
    for c, att in zip(m.channels, attention, strict=False):
        if att and c % m.num_head_channels:
            fail("model.num_head_channels", m.num_head_channels,
                 f"must divide the channels {c} of every attention level",
                 nearest(m.num_head_channels, lambda h: all(ch % h == 0 for ch, a in zip(m.channels, attention, strict=False) if a), span=c + 1))
    if m.autoencoder_checkpoint:  # the UNet sees latents: their size is checked when the model is built
        return
    divisor = 2 ** (levels - 1)
    size_rule(config, lambda size: divisor if any(s % divisor for s in size) else None,
              f"the UNet halves it {levels - 1} time(s) for {levels} levels of model.channels")


def recipe(spatial_dims: int, size: list[int], latent: bool = False) -> dict[str, Any]:
    """Cosine schedule, v-prediction, warm-up, cosine decay and clipping; ``latent``: on a first-stage
    autoencoder trained from the same config (docs/recipes.md)."""
    small = min(size) < 32
    model: dict[str, Any] = {"family": "diffusion", "channels": [32, 64] if small or spatial_dims == 3 else [32, 64, 64],
                             "schedule": "cosine", "prediction_type": "v_prediction"}
    if latent:
        model["channels"] = [64, 128]
        model["first_stage"] = autoencoder_recipe(spatial_dims, size)["model"]
        model["first_stage_steps"] = 2000
    training = {"learning_rate": 5e-4, "betas": [0.9, 0.999], "ema_decay": 0.999, "warmup_steps": 200,
                "lr_schedule": "cosine", "grad_clip_norm": 1.0}
    return {"model": model, "training": training}



FAMILY = Family(
    name="diffusion", config=DiffusionConfig, model_ref="fedsynth.models.diffusion:DiffusionModel", recipe=recipe, check_geometry=check_geometry,
    build_ref="fedsynth.models.diffusion:build", first_stage=first_stage, conditioning=("none", "class", "text"), options=("latent",),
    test_model={"channels": [16, 32], "num_train_timesteps": 100, "sampling_steps": 5, "num_head_channels": 8},
)
