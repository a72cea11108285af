"""The style-based GAN family's light half: its config block, recipe and architecture rules (no torch).

The networks are in :mod:`fedsynth.models.stylegan`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from fedsynth.config_base import FamilyConfig
from fedsynth.families import Family
from fedsynth.families.gan import gan_levels
from fedsynth.geometry import size_rule


class StyleGanConfig(FamilyConfig):
    """Style-based GAN (StyleGAN2-like): mapping network, modulated convolutions, noise inputs."""

    family: Literal["stylegan"] = Field("stylegan", description="the model family: style-based GAN")
    latent_dim: int = Field(128, ge=1, description="size of the noise vector z and of the style vector w")
    mapping_layers: int = Field(4, ge=1, description="fully connected layers of the mapping network z -> w")
    mapping_lr_multiplier: float = Field(0.01, gt=0, le=1, description="learning-rate multiplier of the mapping "
                                                                       "network (equalised learning rate)")
    generator_channels: int = Field(32, ge=1, description="generator channels at the output resolution; doubled "
                                                          "per coarser level up to max_channels")
    discriminator_channels: int = Field(32, ge=1, description="discriminator channels at the input resolution; "
                                                              "doubled per coarser level up to max_channels")
    max_channels: int = Field(256, ge=1, description="cap on the channels of any level (both networks)")
    noise_inputs: bool = Field(True, description="per-layer noise inputs with a learned per-channel strength")
    style_mixing: float = Field(0.9, ge=0, le=1, description="share of training batches generated from two "
                                                             "styles switched at a random layer (mixing regularisation)")
    truncation: float = Field(1.0, gt=0, le=1, description="truncation psi at generate: styles pulled towards "
                                                           "the average style (1 = off, lower = less diverse)")
    minibatch_stddev: bool = Field(True, description="minibatch standard deviation feature in the discriminator "
                                                     "(couples examples, so it is switched off under DP)")
    loss: Literal["nonsaturating", "hinge"] = Field("nonsaturating", description="adversarial loss")
    augment: list[Literal["brightness", "contrast", "translation", "cutout"]] = Field(
        ["brightness", "contrast", "translation", "cutout"],
        description="DiffAugment ops applied to real and fake images before D ([] = off); the fix for small data")
    r1_gamma: float = Field(0.1, ge=0, description="R1 gradient penalty weight on real images (0 = off; skipped under DP)")
    r1_every: int = Field(16, ge=1, description="lazy R1: apply every N steps (weight scaled by N)")

    @model_validator(mode="after")
    def _widths_capped(self) -> StyleGanConfig:
        widest = max(self.generator_channels, self.discriminator_channels)
        if self.max_channels < widest:
            raise ValueError(f"field 'model.max_channels': {self.max_channels} is below the widest first level "
                             f"({widest}); nearest valid: {widest}")
        return self



# --------------------------------------------------------------------------- family


def check_geometry(config: Any) -> None:
    """Each level halves the image down to 4-7 voxels per side: every side divisible by 2^levels."""

    def rule(size: list[int]) -> int | None:
        d = 2 ** gan_levels(size)
        return d if any(s % d for s in size) else None

    size_rule(config, rule, "the style-based GAN doubles a 4-7 pixel constant once per level")


def recipe(spatial_dims: int, image_size: list[int], **_: Any) -> dict[str, Any]:
    """Widths per image size (as in StyleGAN, channels ~ 1 / resolution, capped; sized for small data
    and modest hardware) and StyleGAN2's optimiser settings (equalised learning rate: Adam at 2e-3,
    betas (0, 0.99)); R1 gamma ~ resolution^2 / batch."""
    side = min(image_size)
    batch = 32 if spatial_dims == 2 else 4
    width = max(16, min(32, 1024 // side)) if spatial_dims == 2 else 16
    model = {"family": "stylegan", "latent_dim": 128 if spatial_dims == 2 else 64,
             "mapping_layers": 4 if spatial_dims == 2 else 2, "generator_channels": width,
             "discriminator_channels": width, "max_channels": 128 if spatial_dims == 3 or side <= 64 else 256,
             "r1_gamma": round(max(0.01, 2e-4 * side**2 / batch), 4), "r1_every": 16}
    training = {"batch_size": batch, "learning_rate": 2e-3, "betas": [0.0, 0.99], "ema_decay": 0.998}
    return {"model": model, "training": training}


TEST_MODEL: dict[str, Any] = {"latent_dim": 16, "mapping_layers": 2, "generator_channels": 8,
                              "discriminator_channels": 8, "max_channels": 16}

FAMILY = Family(name="stylegan", config=StyleGanConfig, model_ref="fedsynth.models.stylegan:StyleGanModel", recipe=recipe, test_model=TEST_MODEL,
                check_geometry=check_geometry, conditioning=("none", "class"))
