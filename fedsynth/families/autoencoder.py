"""The autoencoder family's light half: its config block, recipe and architecture rules (no torch).

The networks are in :mod:`fedsynth.models.autoencoder`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from fedsynth.config_base import FamilyConfig
from fedsynth.families import Family
from fedsynth.geometry import check_groups, fail, nearest, size_rule

if TYPE_CHECKING:
    from fedsynth.config import ExperimentConfig

#: PatchDiscriminator uses GroupNorm(min(8, channels))
PATCH_DISCRIMINATOR_GROUPS = 8



class AutoencoderConfig(FamilyConfig):
    """AutoencoderKL (KL-regularised) or VQVAE from MONAI, optionally with a patch discriminator."""

    family: Literal["autoencoder"] = "autoencoder"
    architecture: Literal["kl", "vqvae"] = Field("kl", description="MONAI AutoencoderKL or VQVAE")
    channels: list[int] = Field([32, 64], description="feature channels per resolution level")
    num_res_blocks: int = Field(1, ge=1)
    latent_channels: int = Field(3, ge=1, description="KL latent channels / VQ embedding dim")
    attention: bool = Field(False, description="self-attention at the lowest level (needs einops)")
    norm_num_groups: int = Field(8, ge=1)
    kl_weight: float = Field(1e-6, ge=0, description="weight of the KL term (kl only)")
    num_embeddings: int = Field(64, ge=2, description="codebook size (vqvae only)")
    adversarial_weight: float = Field(0.0, ge=0, description="> 0 adds a PatchDiscriminator group")
    adversarial_start_step: int = Field(0, ge=0, description="train reconstruction + KL only before this step (warm-up)")
    discriminator_channels: int = Field(32, ge=1)
    discriminator_layers: int = Field(2, ge=1)
    decoder_padding: Literal["zeros", "replicate"] = Field(
        "zeros", description="kl decoder's border: replicate pads each convolution with its edge pixels (no bright "
                             "corner pixel); zeros is MONAI's, and that of every run made before this field")

    @field_validator("channels")
    @classmethod
    def _channels_positive(cls, v: list[int]) -> list[int]:
        if not v or any(c <= 0 for c in v):
            raise ValueError("a non-empty list of positive integers")
        return v

    @model_validator(mode="after")
    def _padding_of_kl_decoders(self) -> AutoencoderConfig:
        if self.decoder_padding != "zeros" and self.architecture != "kl":
            raise ValueError(f"decoder_padding '{self.decoder_padding}' is for the kl decoder; the vqvae decoder "
                             "upsamples with transposed convolutions: set decoder_padding: zeros")
        return self




# --------------------------------------------------------------------------- the family


def check_geometry(config: ExperimentConfig) -> None:
    """The image sizes and channel counts the KL/VQ autoencoder and its patch discriminator accept."""
    m = config.model
    assert isinstance(m, AutoencoderConfig)
    levels = len(m.channels)
    if m.architecture == "kl":
        check_groups("model.channels", list(m.channels), m.norm_num_groups, "model.norm_num_groups")
        divisor = 2 ** (levels - 1)
    else:
        divisor = 2**levels
    size_rule(config, lambda size: divisor if any(s % divisor for s in size) else None,
              f"{levels} level(s) of the {m.architecture} autoencoder")
    if m.adversarial_weight > 0:
        c = m.discriminator_channels
        g = min(PATCH_DISCRIMINATOR_GROUPS, c)
        if c % g:
            fail("model.discriminator_channels", c, f"must be a multiple of {g} (the patch discriminator's GroupNorm)",
                 nearest(c, lambda v: v % min(PATCH_DISCRIMINATOR_GROUPS, v) == 0))
        # the first conv and each of the num_layers_d - 1 further ones halve the image, the last
        # two convolutions (kernel 4) take 2 more pixels: the smallest side must keep >= 3
        smallest = min(config.image_size)
        if smallest // 2**m.discriminator_layers < 3:
            fit = [v for v in range(1, 12) if smallest // 2**v >= 3]
            fail("model.discriminator_layers", m.discriminator_layers,
                 f"halves image_size {list(config.image_size)} below 3 pixels (the patch discriminator)",
                 str(max(fit)) if fit else "none: image_size must be >= 6 with adversarial_weight > 0")


def recipe(spatial_dims: int, size: list[int]) -> dict[str, Any]:
    """KL autoencoder, 3 levels from 64 pixels (2D), a patch adversarial loss after a warm-up (docs/recipes.md)."""
    small = min(size) < 32
    model: dict[str, Any] = {"family": "autoencoder", "channels": [32, 64] if small or spatial_dims == 3 else [32, 64, 64],
                             "latent_channels": 4 if spatial_dims == 2 else 3,
                             # the decoder's zero padding leaves a bright corner pixel on every sample
                             "decoder_padding": "replicate"}
    if spatial_dims == 2 and min(size) >= 64:  # sharper decoder: patch adversarial loss after a warm-up
        model.update(adversarial_weight=0.02, adversarial_start_step=1000)
    training = {"learning_rate": 5e-4, "betas": [0.9, 0.999], "ema_decay": 0.999, "warmup_steps": 100}
    return {"model": model, "training": training}


FAMILY = Family(
    name="autoencoder", config=AutoencoderConfig, model_ref="fedsynth.models.autoencoder:AutoencoderModel", recipe=recipe, check_geometry=check_geometry,
    conditioning=("none",), test_model={"channels": [8, 16], "latent_channels": 2},
)
