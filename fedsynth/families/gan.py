"""The GAN family's light half: its config block, recipe and architecture rules (no torch).

The networks are in :mod:`fedsynth.models.gan`; the registry imports them only to build a model.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from fedsynth.config_base import FamilyConfig
from fedsynth.families import Family
from fedsynth.geometry import fail, nearest, size_rule

if TYPE_CHECKING:
    from fedsynth.config import ExperimentConfig

#: ConditionalDiscriminator's GroupNorm(num_groups=8)
GROUP_NORM_GROUPS = 8



class GanConfig(FamilyConfig):
    """DCGAN-style generator and discriminator (2D or 3D)."""

    family: Literal["gan"] = "gan"
    latent_dim: int = Field(64, ge=1, description="size of the generator's noise vector")
    generator_channels: int = Field(64, ge=1, description="channels of the generator's first block")
    generator_upsample: Literal["resize", "transpose"] = Field(
        "resize", description="resize: nearest upsample + conv (no checkerboard); transpose: MONAI Generator")
    discriminator_channels: int = Field(32, ge=1)
    loss: Literal["nonsaturating", "hinge"] = "nonsaturating"
    spectral_norm: bool = Field(False, description="spectral normalisation in the discriminator")
    discriminator_norm: Literal["batch", "group", "none"] = Field(
        "group", description="GroupNorm is DP-compatible; BatchNorm is the classic DCGAN choice"
    )
    augment: list[Literal["brightness", "contrast", "translation", "cutout"]] = Field(
        ["brightness", "contrast", "translation", "cutout"],
        description="DiffAugment ops applied to real and fake images before D ([] = off); the fix for small data"
    )
    r1_gamma: float = Field(1.0, ge=0, description="R1 gradient penalty weight on real images (0 = off; skipped under DP)")
    r1_every: int = Field(4, ge=1, description="lazy R1: apply every N steps (weight scaled by N)")



def gan_levels(image_size: list[int] | tuple[int, ...]) -> int:
    """2x up/down-sampling levels of the DCGAN nets: the coarsest map is 4 or more per side."""
    return max(1, int(math.log2(min(image_size) / 4)))



# --------------------------------------------------------------------------- the family


def check_geometry(config: ExperimentConfig) -> None:
    """The image sizes and channel counts the DCGAN nets can be built with."""
    m = config.model
    assert isinstance(m, GanConfig)

    def rule(size: list[int]) -> int | None:
        d = 2 ** gan_levels(size)
        return d if any(s % d for s in size) else None

    size_rule(config, rule, "the GAN halves the image once per level down to 4-7 pixels")
    if m.discriminator_norm == "group" and m.discriminator_channels % GROUP_NORM_GROUPS:
        fail("model.discriminator_channels", m.discriminator_channels,
             f"must be a multiple of {GROUP_NORM_GROUPS} with discriminator_norm: group (GroupNorm of {GROUP_NORM_GROUPS} groups)",
             nearest(m.discriminator_channels, lambda v: v % GROUP_NORM_GROUPS == 0))


def recipe(spatial_dims: int, size: list[int]) -> dict[str, Any]:
    """Wide generator, R1 and DiffAugment, Adam (0, 0.99), EMA (docs/recipes.md)."""
    small = min(size) < 32
    model = {"family": "gan", "latent_dim": 128 if spatial_dims == 2 else 64,
             "generator_channels": (64 if small else 128) if spatial_dims == 2 else 64,
             "discriminator_channels": 32 if spatial_dims == 2 else 16, "r1_gamma": 1.0}
    training = {"learning_rate": 2e-4, "betas": [0.0, 0.99], "ema_decay": 0.999,
                "batch_size": 32 if spatial_dims == 2 else 4}
    return {"model": model, "training": training}


FAMILY = Family(
    name="gan", config=GanConfig, model_ref="fedsynth.models.gan:GanModel", recipe=recipe, check_geometry=check_geometry,
    test_model={"latent_dim": 16, "generator_channels": 32, "discriminator_channels": 16},
)
