"""Style-based GAN family (StyleGAN2-like, Karras et al. 2020), 2D or 3D, optionally class-conditional.

Generator: a mapping network turns noise (+ a label embedding) into a style vector ``w``; a
synthesis network starts from a learned constant and, per resolution, upsamples and applies
modulated 3^d convolutions with weight demodulation (one grouped convolution per batch), adds
per-layer noise with a learned per-channel strength, and sums ToImage skip outputs.
Discriminator: StyleGAN2's residual network (equalised learning rate, average-pool downsampling,
minibatch standard deviation, projection on the label for class conditioning), without
normalisation layers, so Opacus computes its per-sample gradients.

Groups (and what DP needs of them), losses, training and validation are the GAN family's
(:class:`~fedsynth.models.gan.GanModel`): only the networks differ, and under DP the minibatch
stddev is switched off instead of BatchNorm. The quality recipe is the
same too: EMA of the generator (the engine's EMA extension), DiffAugment of real and fake images,
lazy R1 (skipped under DP) and per-group learning rates (``training.group_learning_rates``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from monai.networks.blocks import UpSample
from monai.networks.layers.factories import Conv, Pool
from torch import nn

from fedsynth.families.gan import gan_levels
from fedsynth.families.stylegan import StyleGanConfig
from fedsynth.models.base import ConfigSwitch, SynthesisModel, to_data_range
from fedsynth.models.gan import GanModel

if TYPE_CHECKING:
    from fedsynth.config import ExperimentConfig


# --------------------------------------------------------------------------- layers

GAIN = math.sqrt(2.0)  # leaky ReLU(0.2) gain that keeps unit activation scale


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2) * GAIN


class EqualLinear(nn.Module):
    """``nn.Linear`` with an equalised learning rate: N(0, 1) weights scaled at run time.

    ``y = lr * Linear(x / sqrt(in))`` with weights and bias stored divided by ``lr``, so Adam's
    steps are the same size for every layer (and ``lr`` slows a whole layer down); the inner
    ``nn.Linear`` keeps Opacus' per-sample gradients exact.
    """

    def __init__(self, in_features: int, out_features: int, lr_multiplier: float = 1.0, bias_init: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        nn.init.normal_(self.linear.weight, std=1.0 / lr_multiplier)
        nn.init.constant_(self.linear.bias, bias_init / lr_multiplier)
        self.scale, self.lr_multiplier = 1.0 / math.sqrt(in_features), lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lr_multiplier * self.linear(x * self.scale)


class EqualConv(nn.Module):
    """A MONAI-factory ``Conv`` (2D or 3D) with an equalised learning rate, ``padding = k // 2``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__()
        self.conv = Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        nn.init.normal_(self.conv.weight)
        if bias:
            nn.init.zeros_(self.conv.bias)
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size**spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x * self.scale)


def modulated_conv(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool = True) -> torch.Tensor:
    """StyleGAN2's modulated convolution as one grouped convolution (2D or 3D by ``x``'s rank).

    ``weight`` is ``(out, in, k, ...)``, ``styles`` ``(N, in)``. Each example's kernel is the weight
    scaled per input channel by its style; demodulation rescales every output channel to unit
    L2 norm, so unit-variance inputs give unit-variance outputs whatever the style.
    """
    n, c_in = x.shape[:2]
    spatial = weight.dim() - 2
    w = weight.unsqueeze(0) * styles.reshape(n, 1, c_in, *([1] * spatial))  # (N, out, in, k...)
    if demodulate:
        w = w * torch.rsqrt(w.square().sum(dim=tuple(range(2, w.dim())), keepdim=True) + 1e-8)
    conv = (F.conv2d, F.conv3d)[spatial - 2]
    out = conv(x.reshape(1, n * c_in, *x.shape[2:]), w.reshape(-1, *weight.shape[1:]), padding=weight.shape[-1] // 2,
               groups=n)
    return out.reshape(n, -1, *out.shape[2:])


class StyledConv(nn.Module):
    """Modulated 3^d convolution (demodulated), noise input, bias and leaky ReLU; or a 1^d ToImage."""

    def __init__(self, spatial_dims: int, w_dim: int, in_channels: int, out_channels: int, *, to_image: bool = False,
                 noise: bool = True) -> None:
        super().__init__()
        k = 1 if to_image else 3
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *([k] * spatial_dims)))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.noise_strength = nn.Parameter(torch.zeros(out_channels)) if noise and not to_image else None
        self.to_image = to_image
        self.gain = 1.0 / math.sqrt(in_channels * k**spatial_dims) if to_image else 1.0

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_generator: torch.Generator | None = None) -> torch.Tensor:
        x = modulated_conv(x, self.weight, self.affine(w) * self.gain, demodulate=not self.to_image)
        shape = (1, -1, *([1] * (x.dim() - 2)))
        if self.noise_strength is not None:
            device = noise_generator.device if noise_generator is not None else x.device
            noise = torch.randn((x.shape[0], 1, *x.shape[2:]), generator=noise_generator, device=device)
            x = x + noise.to(x.device, x.dtype) * self.noise_strength.reshape(shape)
        x = x + self.bias.reshape(shape)
        return x if self.to_image else _act(x)


# --------------------------------------------------------------------------- networks


def _widths(base: int, cap: int, levels: int) -> list[int]:
    """Channels per level, finest first: ``base`` doubled per coarser level, capped."""
    return [min(cap, base * 2**i) for i in range(levels + 1)]


class MappingNetwork(nn.Module):
    """z (+ label embedding) -> w: normalised inputs, ``layers`` equalised linear layers at a low learning rate."""

    def __init__(self, cfg: StyleGanConfig, num_classes: int) -> None:
        super().__init__()
        dim = cfg.latent_dim
        self.label_embedding = nn.Embedding(num_classes, dim) if num_classes else None
        layers = [EqualLinear(dim * (2 if num_classes else 1) if i == 0 else dim, dim, cfg.mapping_lr_multiplier)
                  for i in range(cfg.mapping_layers)]
        self.layers = nn.ModuleList(layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        x = F.normalize(z, dim=1) * math.sqrt(z.shape[1])
        if self.label_embedding is not None:
            assert labels is not None, "a conditional generator needs labels"
            y = self.label_embedding(labels)
            x = torch.cat([x, F.normalize(y, dim=1) * math.sqrt(y.shape[1])], dim=1)
        for layer in self.layers:
            x = _act(layer(x))
        return x


class StyleGenerator(nn.Module):
    """Mapping network + synthesis network (learned constant, modulated convolutions, ToImage skips) -> tanh."""

    w_avg: torch.Tensor

    def __init__(self, cfg: StyleGanConfig, spatial_dims: int, out_channels: int, image_size: tuple[int, ...],
                 num_classes: int) -> None:
        super().__init__()
        levels = gan_levels(image_size)
        start = tuple(s // 2**levels for s in image_size)
        widths = _widths(cfg.generator_channels, cfg.max_channels, levels)[::-1]  # coarsest first
        self.latent_dim, self.style_mixing = cfg.latent_dim, cfg.style_mixing
        self.mapping = MappingNetwork(cfg, num_classes)
        self.register_buffer("w_avg", torch.zeros(cfg.latent_dim))  # tracked average style, for truncation
        self.const = nn.Parameter(torch.randn(widths[0], *start))

        def styled(c_in: int, c_out: int) -> StyledConv:
            return StyledConv(spatial_dims, cfg.latent_dim, c_in, c_out, noise=cfg.noise_inputs)

        self.convs = nn.ModuleList([styled(widths[0], widths[0])])
        self.to_images = nn.ModuleList([StyledConv(spatial_dims, cfg.latent_dim, widths[0], out_channels, to_image=True)])
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=False):
            self.convs.extend([styled(c_in, c_out), styled(c_out, c_out)])
            self.to_images.append(StyledConv(spatial_dims, cfg.latent_dim, c_out, out_channels, to_image=True))
        self.upsample = UpSample(spatial_dims, scale_factor=2, mode="nontrainable", interp_mode="linear",
                                 align_corners=False)
        self.num_styles = len(self.convs) + len(self.to_images)

    def styles(self, z: torch.Tensor, labels: torch.Tensor | None, truncation: float = 1.0) -> torch.Tensor:
        """One w per style input, ``(N, num_styles, w_dim)``: mixed in training, truncated on request."""
        w = self.mapping(z, labels)
        if self.training:
            with torch.no_grad():
                self.w_avg.lerp_(w.detach().float().mean(0), 0.005)
        ws = w.unsqueeze(1).repeat(1, self.num_styles, 1)
        if self.training and self.style_mixing > 0 and float(torch.rand(())) < self.style_mixing:
            cutoff = int(torch.randint(1, self.num_styles, ()))
            ws[:, cutoff:] = self.mapping(torch.randn_like(z), labels).unsqueeze(1)
        if truncation != 1.0:
            ws = self.w_avg.to(ws.dtype) + truncation * (ws - self.w_avg.to(ws.dtype))
        return ws

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None, *, truncation: float = 1.0,
                noise_generator: torch.Generator | None = None) -> torch.Tensor:
        ws = self.styles(z, labels, truncation).unbind(1)
        x = self.const.unsqueeze(0).expand(z.shape[0], *self.const.shape)
        x = self.convs[0](x, ws[0], noise_generator)
        image = self.to_images[0](x, ws[1])
        i = 2
        for level, to_image in enumerate(self.to_images[1:]):
            x = self.upsample(x)
            for conv in self.convs[1 + 2 * level: 3 + 2 * level]:
                x = conv(x, ws[i], noise_generator)
                i += 1
            image = self.upsample(image) + to_image(x, ws[i])
            i += 1
        return torch.tanh(image)


class ResidualDown(nn.Module):
    """conv 3^d -> conv 3^d -> 2x average pool, plus a pooled 1^d skip, summed at unit scale."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv0 = EqualConv(spatial_dims, in_channels, in_channels, 3)
        self.conv1 = EqualConv(spatial_dims, in_channels, out_channels, 3)
        self.skip = EqualConv(spatial_dims, in_channels, out_channels, 1, bias=False)
        self.pool = Pool[Pool.AVG, spatial_dims](kernel_size=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(_act(self.conv1(_act(self.conv0(x)))))
        return (self.skip(self.pool(x)) + y) * math.sqrt(0.5)


def minibatch_stddev(x: torch.Tensor, group_size: int = 4) -> torch.Tensor:
    """Append the mean standard deviation over groups of consecutive examples as one feature map.

    The group is the largest size <= ``group_size`` that divides the batch; with a ``[real; fake]``
    batch whose halves it divides, real and fake images are never grouped together.
    """
    n = x.shape[0]
    g = next(s for s in range(min(group_size, n), 0, -1) if n % s == 0)
    y = x.reshape(n // g, g, *x.shape[1:]).float()
    y = (y.var(dim=1, unbiased=False) + 1e-8).sqrt().flatten(1).mean(1)  # (n // g,)
    y = y.repeat_interleave(g).reshape(n, 1, *([1] * (x.dim() - 2))).to(x.dtype)
    return torch.cat([x, y.expand(-1, -1, *x.shape[2:])], dim=1)


class StyleDiscriminator(nn.Module):
    """FromImage -> residual downsampling blocks -> (minibatch stddev) conv, linear -> logit (or label projection)."""

    def __init__(self, cfg: StyleGanConfig, spatial_dims: int, in_channels: int, image_size: tuple[int, ...],
                 num_classes: int) -> None:
        super().__init__()
        levels = gan_levels(image_size)
        widths = _widths(cfg.discriminator_channels, cfg.max_channels, levels)
        self.from_image = EqualConv(spatial_dims, in_channels, widths[0], 1)
        self.blocks = nn.Sequential(*[ResidualDown(spatial_dims, a, b) for a, b in zip(widths[:-1], widths[1:], strict=False)])
        self.stddev = cfg.minibatch_stddev
        self.conv = EqualConv(spatial_dims, widths[-1] + int(self.stddev), widths[-1], 3)
        coarsest = math.prod(s // 2**levels for s in image_size)
        self.fc = EqualLinear(widths[-1] * coarsest, widths[-1])
        self.out = EqualLinear(widths[-1], widths[-1] if num_classes else 1)
        self.label_embedding = nn.Embedding(num_classes, widths[-1]) if num_classes else None

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.blocks(_act(self.from_image(images)))
        if self.stddev:
            x = minibatch_stddev(x)
        x = self.out(_act(self.fc(_act(self.conv(x)).flatten(1))))
        if self.label_embedding is None:
            return x.reshape(-1)
        assert labels is not None, "a conditional discriminator needs labels"
        return (x * self.label_embedding(labels)).sum(1) / math.sqrt(x.shape[1])  # projection discriminator


# --------------------------------------------------------------------------- model


class StyleGanModel(GanModel):
    """Style-based GAN: the GAN family's training (non-saturating or hinge loss, DiffAugment, lazy R1,
    DP on the discriminator with a fixed-size fake batch) on StyleGAN2-like networks."""

    family = "stylegan"
    # minibatch stddev makes each logit depend on the other examples of the batch
    discriminator_switches: ClassVar[tuple[ConfigSwitch, ...]] = (
        ConfigSwitch("minibatch_stddev", allowed=(False,), value=False, change="minibatch standard deviation removed",
                     reason="it mixes examples, which per-example DP forbids"),
    )

    def __init__(self, config: ExperimentConfig) -> None:
        SynthesisModel.__init__(self, config)  # not GanModel's: its config is the DCGAN one
        cfg = config.model
        assert isinstance(cfg, StyleGanConfig)
        self.cfg: StyleGanConfig = cfg  # type: ignore[assignment]
        self._build()

    def build_net(self, name: str) -> nn.Module:
        if name == "generator":
            return StyleGenerator(self.cfg, self.spatial_dims, self.in_channels, self.image_size, self.num_classes)
        if name == "discriminator":
            return StyleDiscriminator(self.cfg, self.spatial_dims, self.in_channels, self.image_size, self.num_classes)
        return SynthesisModel.build_net(self, name)

    @torch.no_grad()
    def generate(self, num_images: int, *, generator: torch.Generator, labels: torch.Tensor | None = None,
                 prompts: list[str] | None = None, sampler: str | None = None, steps: int | None = None,
                 guidance_scale: float | None = None) -> torch.Tensor:
        """``num_images`` samples with truncation ``model.truncation``; styles and noise come from
        ``generator`` alone (the generator runs in eval mode: no style mixing, no average update)."""
        labels = self.check_labels(labels, num_images)
        self.check_prompts(prompts, num_images)
        z = torch.randn(num_images, self.cfg.latent_dim, generator=generator, device=generator.device).to(self.device)
        net = self.plain_net("generator")
        training = net.training
        net.eval()
        try:
            images = net(z, labels, truncation=self.cfg.truncation, noise_generator=generator)
        finally:
            net.train(training)
        return to_data_range(images)
