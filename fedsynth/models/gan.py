"""GAN family: DCGAN-style generator and discriminator built from MONAI's ``Generator`` and
``Discriminator`` networks, 2D or 3D, optionally class-conditional.

Groups: ``generator`` and ``discriminator``. Only the discriminator sees real images, so it is
the group differential privacy wraps; the generator learns through it (post-processing). What DP
needs besides is declared in :meth:`GanModel.group_specs`: the discriminator scores real and fake
rows in one forward, BatchNorm is switched to GroupNorm, R1 is off, and the generator steps on a
fixed number of fakes (:class:`~fedsynth.models.base.DrawnSample`).

Conditioning: the generator gets a learned label embedding concatenated to its noise vector;
the discriminator gets one-hot label maps concatenated to its input channels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, UpSample
from monai.networks.layers import Act
from monai.networks.nets import Discriminator, Generator
from torch import nn

from fedsynth.families.gan import GROUP_NORM_GROUPS, GanConfig, gan_levels
from fedsynth.models.base import (
    Batch,
    ConfigSwitch,
    DrawnSample,
    Feature,
    FrozenParameters,
    GroupSpec,
    PrivacySpec,
    SynthesisModel,
    to_data_range,
    to_model_range,
)
from fedsynth.models.losses import discriminator_loss, generator_loss
from fedsynth.recipes import diff_augment, r1_penalty

if TYPE_CHECKING:
    from fedsynth.config import ExperimentConfig

def _levels(image_size: tuple[int, ...]) -> int:
    """:func:`gan_levels`, checked against ``image_size``."""
    levels = gan_levels(image_size)
    for s in image_size:
        if s % (2**levels):
            raise ValueError(f"GAN image_size {list(image_size)} must be divisible by {2**levels} in every dimension")
    return levels


class ResizeConvGenerator(nn.Module):
    """Linear -> (nearest 2x upsample -> 3^d conv -> BatchNorm -> ReLU) per level -> 3^d conv.

    Resize-convolution avoids the checkerboard artefacts of stride-2 transposed convolutions
    (Odena et al. 2016); built from MONAI's ``UpSample`` and ``Convolution`` blocks, 2D or 3D.
    """

    def __init__(self, spatial_dims: int, latent_dim: int, start: tuple[int, ...], channels: list[int],
                 out_channels: int) -> None:
        super().__init__()
        self.start = (channels[0], *start)
        self.project = nn.Linear(latent_dim, channels[0] * math.prod(start))
        layers: list[nn.Module] = [Act["relu"]()]
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=False):
            layers += [UpSample(spatial_dims, c_in, c_in, scale_factor=2, mode="nontrainable", interp_mode="nearest",
                                align_corners=None),
                       Convolution(spatial_dims, c_in, c_out, kernel_size=3, act="RELU", norm="BATCH")]
        layers += [UpSample(spatial_dims, channels[-1], channels[-1], scale_factor=2, mode="nontrainable",
                            interp_mode="nearest", align_corners=None),
                   Convolution(spatial_dims, channels[-1], out_channels, kernel_size=3, conv_only=True)]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).view(-1, *self.start))


class ConditionalGenerator(nn.Module):
    """Noise (+ label embedding) -> resize-conv generator (or MONAI's transposed-conv Generator) -> tanh."""

    def __init__(self, cfg: GanConfig, spatial_dims: int, out_channels: int, image_size: tuple[int, ...], num_classes: int):
        super().__init__()
        levels = _levels(image_size)
        start = tuple(s // 2**levels for s in image_size)
        embed_dim = cfg.latent_dim if num_classes else 0
        self.label_embedding = nn.Embedding(num_classes, embed_dim) if num_classes else None
        width = cfg.generator_channels
        if cfg.generator_upsample == "resize":
            widths = [max(width // 2**i, 16) for i in range(levels)]
            self.body: nn.Module = ResizeConvGenerator(spatial_dims, cfg.latent_dim + embed_dim, start, widths, out_channels)
            self.latent_dim = cfg.latent_dim
            return
        channels = [max(width // 2**i, 16) for i in range(1, levels)] + [out_channels]
        self.body = Generator(
            latent_shape=(cfg.latent_dim + embed_dim,),
            start_shape=(width, *start),
            channels=channels,
            strides=[2] * levels,
            kernel_size=3,
            num_res_units=0,
            act="RELU",
            norm="BATCH",
        )
        self.latent_dim = cfg.latent_dim

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.label_embedding is not None:
            assert labels is not None, "a conditional generator needs labels"
            z = torch.cat([z, self.label_embedding(labels)], dim=1)
        return torch.tanh(self.body(z))


class ConditionalDiscriminator(nn.Module):
    """(Image [+ one-hot label maps]) -> MONAI Discriminator -> one logit per image."""

    def __init__(self, cfg: GanConfig, spatial_dims: int, in_channels: int, image_size: tuple[int, ...], num_classes: int):
        super().__init__()
        levels = _levels(image_size)
        norm = {"batch": "BATCH", "group": ("GROUP", {"num_groups": GROUP_NORM_GROUPS}), "none": None}[cfg.discriminator_norm]
        width = cfg.discriminator_channels
        channels = [width * 2**i for i in range(levels)]
        if cfg.discriminator_norm == "group" and any(c % 8 for c in channels):
            raise ValueError("discriminator_channels must be a multiple of 8 with group norm")
        self.num_classes = num_classes
        self.body = Discriminator(
            in_shape=(in_channels + num_classes, *image_size),
            channels=channels,
            strides=[2] * levels,
            kernel_size=3,
            num_res_units=0,
            act=("LEAKYRELU", {"negative_slope": 0.2}),
            norm=norm,
            dropout=None,
            last_act=None,
        )
        if cfg.spectral_norm:
            for module in list(self.body.modules()):
                if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                    nn.utils.parametrizations.spectral_norm(module)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            assert labels is not None, "a conditional discriminator needs labels"
            onehot = F.one_hot(labels, self.num_classes).to(images.dtype)
            maps = onehot.view(*onehot.shape, *([1] * (images.dim() - 2))).expand(-1, -1, *images.shape[2:])
            images = torch.cat([images, maps], dim=1)
        return self.body(images).reshape(-1)


class GanModel(SynthesisModel):
    """DCGAN-style GAN with non-saturating or hinge loss."""

    family = "gan"
    # Sharing the discriminator keeps every site's generator judged by the same critic; keeping
    # it local saves half the traffic and keeps the only data-facing network on site.
    default_federation_policy = {"generator": "shared", "discriminator": "shared"}
    generating = ("generator",)
    #: discriminator settings per-example DP forbids (the style-based GAN declares its own)
    discriminator_switches: ClassVar[tuple[ConfigSwitch, ...]] = (
        ConfigSwitch("discriminator_norm", allowed=("group", "none"), value="group", change="BatchNorm replaced by GroupNorm",
                     reason="BatchNorm mixes examples, which per-example DP forbids"),
    )

    def __init__(self, config: ExperimentConfig) -> None:
        super().__init__(config)
        cfg = config.model
        assert isinstance(cfg, GanConfig)
        self.cfg = cfg
        self._build()

    def _build(self) -> None:
        """The per-step features and the two networks (shared with the style-based GAN)."""
        # R1 differentiates D twice on real images: a gradient per-example clipping would not bound
        self.r1 = Feature("the R1 penalty", "it takes a second gradient of the discriminator on real images, "
                                            "which per-example clipping does not bound")
        self.fakes = DrawnSample(self._generator_only_step)  # what generator_step draws (see DrawnSample)
        self.nets["generator"] = self.build_net("generator")
        self.nets["discriminator"] = self.build_net("discriminator")

    def build_net(self, name: str) -> nn.Module:
        if name == "generator":
            return ConditionalGenerator(self.cfg, self.spatial_dims, self.in_channels, self.image_size, self.num_classes)
        if name == "discriminator":
            return ConditionalDiscriminator(self.cfg, self.spatial_dims, self.in_channels, self.image_size, self.num_classes)
        return super().build_net(name)

    def group_specs(self) -> dict[str, GroupSpec]:
        discriminator = PrivacySpec(
            rows_per_example=2,  # real and fake in one forward (discriminator_objective)
            switches=self.discriminator_switches,
            features=(self.r1,) if self.cfg.r1_gamma > 0 else (),
        )
        return {
            "generator": GroupSpec("generator", sees_real_data=False, privacy=PrivacySpec(drawn=self.fakes)),
            "discriminator": GroupSpec("discriminator", privacy=discriminator),
        }

    def _noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.cfg.latent_dim, generator=generator, device=self.device if generator is None else generator.device)

    def discriminator_objective(self, discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                                labels: torch.Tensor | None) -> torch.Tensor:
        """D's training loss: real and fake (augmented) through D in one forward, as one batch.

        One forward keeps per-sample DP accounting to one pass per real image (the privacy plugin
        folds rows ``i`` and ``n + i`` into example ``i``'s gradient before clipping).
        """
        n = real.shape[0]
        both_labels = torch.cat([labels, labels]) if labels is not None else None
        logits = discriminator(self.augment(torch.cat([real, fake])), both_labels)
        return discriminator_loss(logits[:n], logits[n:], self.cfg.loss)

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """DiffAugment with the configured policy (identity when ``augment: []``)."""
        return diff_augment(images, self.cfg.augment) if self.cfg.augment else images

    def training_step(self, batch: Batch, optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, float]:
        real = to_model_range(batch.images)
        n = real.shape[0]
        labels = batch.labels if self.num_classes else None
        discriminator = self.net("discriminator")

        # Discriminator: a fake batch sized like the real one; both halves get the same
        # augmentation policy (DiffAugment), per-sample random parameters.
        with torch.no_grad():
            fake = self.plain_net("generator")(self._noise(n), labels)
        d_loss = self.discriminator_objective(discriminator, real, fake, labels)
        metrics: dict[str, float] = {}
        total = d_loss
        # R1 on (augmented) reals, lazily every r1_every steps, unless switched off (self.r1, under DP)
        if self.cfg.r1_gamma > 0 and self.r1.on and self.global_step % self.cfg.r1_every == 0:
            r1 = r1_penalty(lambda x: discriminator(x, labels), self.augment(real))
            total = d_loss + 0.5 * self.cfg.r1_gamma * self.cfg.r1_every * r1
            metrics["r1"] = float(r1.detach())
        optimizers["discriminator"].zero_grad(set_to_none=True)
        total.backward()
        optimizers["discriminator"].step()

        d, g = float(d_loss.detach()), self.generator_step(optimizers, n, labels)
        return {"loss": d + g, "d_loss": d, "g_loss": g, **metrics}

    def generator_step(self, optimizers: Mapping[str, torch.optim.Optimizer], n: int,
                       labels: torch.Tensor | None) -> float:
        """One generator step on ``n`` fakes; returns the generator loss.

        Gradients flow through D (unwrapped: no DDP sync, no DP per-sample hooks) but D's
        parameters get no gradient and only G's optimizer steps. With ``self.fakes.size`` set (DP
        sets it) the step uses that many fakes with random labels, so it depends only on the
        (private) discriminator, never on the real batch's size or labels.
        """
        if self.fakes.size is not None:
            n = self.fakes.size
            labels = torch.randint(0, self.num_classes, (n,), device=self.device) if self.num_classes else None
        fake = self.net("generator")(self._noise(n), labels)
        with self.discriminator_frozen():
            g_loss = generator_loss(self.plain_net("discriminator")(self.augment(fake), labels), self.cfg.loss)
            optimizers["generator"].zero_grad(set_to_none=True)
            g_loss.backward()
            optimizers["generator"].step()
        optimizers["discriminator"].zero_grad(set_to_none=True)
        return float(g_loss.detach())

    def _generator_only_step(self, optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, float]:
        """The generator's step alone, on ``self.fakes.size`` fakes (DP takes it on an empty batch)."""
        return {"g_loss": self.generator_step(optimizers, 0, None)}

    def discriminator_frozen(self) -> FrozenParameters:
        """Context in which D computes no parameter gradients (and no per-sample gradients under DP)."""
        return FrozenParameters(self.net("discriminator"))

    @torch.no_grad()
    def validation_step(self, batch: Batch) -> dict[str, float]:
        real = to_model_range(batch.images)
        labels = batch.labels if self.num_classes else None
        fake = self.net("generator")(self._noise(real.shape[0]), labels)
        disc = self.net("discriminator")
        d_loss = discriminator_loss(disc(real, labels), disc(fake, labels), self.cfg.loss)
        g_loss = generator_loss(disc(fake, labels), self.cfg.loss)
        # Lower is "better" only loosely for GANs; the engine uses it to pick `best`.
        return {"loss": float(g_loss + d_loss), "d_loss": float(d_loss), "g_loss": float(g_loss)}

    @torch.no_grad()
    def generate(self, num_images: int, *, generator: torch.Generator, labels: torch.Tensor | None = None,
                 prompts: list[str] | None = None, sampler: str | None = None, steps: int | None = None,
                 guidance_scale: float | None = None) -> torch.Tensor:
        labels = self.check_labels(labels, num_images)
        self.check_prompts(prompts, num_images)
        z = torch.randn(num_images, self.cfg.latent_dim, generator=generator, device=generator.device).to(self.device)
        return to_data_range(self.plain_net("generator")(z, labels))
