"""Autoencoder family: MONAI ``AutoencoderKL`` or ``VQVAE``, optional ``PatchDiscriminator``.

Groups: ``encoder`` and ``decoder`` (the VQ codebook belongs to the encoder), plus
``discriminator`` when ``adversarial_weight > 0``. All of them see real images. Under DP the
discriminator's per-example gradient folds its real and reconstructed rows, and the VQ codebook's
EMA update is frozen (declared in :meth:`AutoencoderModel.group_specs`).
A trained autoencoder run is also the first stage of latent diffusion
(:meth:`AutoencoderModel.encode_latent` / :meth:`decode_latent`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from monai.metrics import PSNRMetric
from monai.networks.nets import VQVAE, AutoencoderKL, PatchDiscriminator
from torch import nn

from fedsynth.families.autoencoder import PATCH_DISCRIMINATOR_GROUPS, AutoencoderConfig
from fedsynth.models.base import (
    Batch,
    FrozenParameters,
    GroupSpec,
    PrivacySpec,
    SynthesisModel,
    to_data_range,
    to_model_range,
)
from fedsynth.models.losses import kl_loss, patch_discriminator_loss, patch_generator_loss, reconstruction_loss

if TYPE_CHECKING:
    from fedsynth.config import ExperimentConfig

class AutoencoderModel(SynthesisModel):
    """Reconstruction (L1) + KL or VQ loss, with an optional least-squares patch adversarial loss (MONAI's)."""

    family = "autoencoder"
    default_federation_policy = {"encoder": "shared", "decoder": "shared", "discriminator": "shared"}
    # encoder and decoder are averaged together so the EMA codec stays consistent (latent diffusion)
    generating = ("encoder", "decoder")

    def __init__(self, config: ExperimentConfig) -> None:
        super().__init__(config)
        cfg = config.model
        assert isinstance(cfg, AutoencoderConfig)
        self.cfg = cfg
        levels = len(cfg.channels)
        if cfg.architecture == "kl":  # VQVAE has no GroupNorm
            for c in cfg.channels:
                if c % cfg.norm_num_groups:
                    raise ValueError(f"autoencoder channels {cfg.channels} must be multiples of norm_num_groups={cfg.norm_num_groups}")
        divisor = 2 ** (levels - 1) if cfg.architecture == "kl" else 2**levels  # see fedsynth.geometry
        for s in self.image_size:
            if s % divisor:
                raise ValueError(f"image_size {list(self.image_size)} must be divisible by {divisor} for {levels} levels")
        if cfg.architecture == "kl":
            kl = AutoencoderKL(
                spatial_dims=self.spatial_dims,
                in_channels=self.in_channels,
                out_channels=self.in_channels,
                channels=tuple(cfg.channels),
                num_res_blocks=cfg.num_res_blocks,
                attention_levels=tuple([False] * (levels - 1) + [cfg.attention]),
                latent_channels=cfg.latent_channels,
                norm_num_groups=cfg.norm_num_groups,
                with_encoder_nonlocal_attn=cfg.attention,
                with_decoder_nonlocal_attn=cfg.attention,
            )
            if cfg.decoder_padding != "zeros":  # zero padding left a bright corner pixel on every sample
                explicit_padding(kl.decoder, cfg.decoder_padding)
            self.nets["autoencoder"] = kl
            self.latent_factor = 2 ** (levels - 1)
        else:
            self.nets["autoencoder"] = VQVAE(
                spatial_dims=self.spatial_dims,
                in_channels=self.in_channels,
                out_channels=self.in_channels,
                channels=tuple(cfg.channels),
                num_res_channels=tuple(cfg.channels),
                num_res_layers=cfg.num_res_blocks,
                downsample_parameters=tuple((2, 4, 1, 1) for _ in cfg.channels),
                upsample_parameters=tuple((2, 4, 1, 1, 0) for _ in cfg.channels),
                num_embeddings=cfg.num_embeddings,
                embedding_dim=cfg.latent_channels,
            )
            self.latent_factor = 2**levels
        if cfg.adversarial_weight > 0:
            self.nets["discriminator"] = PatchDiscriminator(
                spatial_dims=self.spatial_dims,
                channels=cfg.discriminator_channels,
                in_channels=self.in_channels,
                num_layers_d=cfg.discriminator_layers,
                norm=("GROUP", {"num_groups": min(PATCH_DISCRIMINATOR_GROUPS, cfg.discriminator_channels)}),
            )

    def group_specs(self) -> dict[str, GroupSpec]:
        if self.cfg.architecture == "kl":
            specs = {
                "encoder": GroupSpec("autoencoder", ("encoder", "quant_conv_mu", "quant_conv_log_sigma")),
                "decoder": GroupSpec("autoencoder", ("post_quant_conv", "decoder")),
            }
        else:
            specs = {
                "encoder": GroupSpec("autoencoder", ("encoder", "quantizer"), privacy=PrivacySpec(freezes=(self.freeze_codebook,))),
                "decoder": GroupSpec("autoencoder", ("decoder",)),
            }
        if "discriminator" in self.nets:
            # real images and reconstructions in one forward (discriminator_objective)
            specs["discriminator"] = GroupSpec("discriminator", privacy=PrivacySpec(rows_per_example=2))
        return specs

    def freeze_codebook(self) -> list[str]:
        """Stop the VQ codebook's EMA update, which is computed from raw images (outside DP when the
        encoder trains privately); the codebook keeps its current entries."""
        said = []
        for module in self.nets["autoencoder"].modules():
            if type(module).__name__ == "EMAQuantizer":
                module.register_forward_pre_hook(_no_codebook_update)
                said.append("network 'autoencoder': the VQ codebook's EMA update is frozen under DP "
                            "(it is computed from raw images outside DP); the codebook keeps its current entries")
        return said

    # ------------------------------------------------------------------ losses

    def codec_losses(self, x: torch.Tensor, outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, L1 reconstruction loss, regulariser) from the network's outputs on ``x``.

        ``x`` is in model range; ``outputs`` is the network's forward: ``(recon, mu, sigma)`` for
        KL, whose regulariser is the weighted KL, or ``(recon, quant_loss)`` for VQ.
        """
        if self.cfg.architecture == "kl":
            recon, mu, sigma = outputs
            reg = self.cfg.kl_weight * kl_loss(mu, sigma)
        else:
            recon, quant_loss = outputs
            reg = quant_loss.mean()
        return recon, reconstruction_loss(recon, x), reg

    def discriminator_objective(self, discriminator: torch.nn.Module, real: torch.Tensor,
                                recon: torch.Tensor) -> torch.Tensor:
        """Patch D's loss: real images and reconstructions in one forward, scored per patch."""
        n = real.shape[0]
        logits = discriminator(torch.cat([real, recon]))[-1]
        return patch_discriminator_loss(logits[:n], logits[n:])

    def training_step(self, batch: Batch, optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, float]:
        x = to_model_range(batch.images)
        recon, rec_loss, reg = self.codec_losses(x, self.net("autoencoder")(x))
        loss = rec_loss + reg
        metrics: dict[str, float] = {"recon_loss": float(rec_loss.detach()), "reg_loss": float(reg.detach())}
        # the patch adversarial loss starts after a warm-up of reconstruction + KL only
        use_adv = "discriminator" in self.nets and self.global_step >= self.cfg.adversarial_start_step
        # D only scores the reconstruction here: its parameters get no gradient and, under DP,
        # its per-sample hooks are off (forward and backward), as in the GAN's generator step.
        frozen = FrozenParameters(self.net("discriminator")) if use_adv else contextlib.nullcontext()
        with frozen:
            if use_adv:
                g_adv = patch_generator_loss(self.plain_net("discriminator")(recon)[-1])
                loss = loss + self.cfg.adversarial_weight * g_adv
                metrics["g_adv"] = float(g_adv.detach())
            for group in ("encoder", "decoder"):
                optimizers[group].zero_grad(set_to_none=True)
            loss.backward()
            for group in ("encoder", "decoder"):
                optimizers[group].step()
        if use_adv:
            d_loss = self.discriminator_objective(self.net("discriminator"), x, recon.detach())
            optimizers["discriminator"].zero_grad(set_to_none=True)
            d_loss.backward()
            optimizers["discriminator"].step()
            metrics["d_loss"] = float(d_loss.detach())
        metrics["loss"] = float(loss.detach())
        return metrics

    @torch.no_grad()
    def validation_step(self, batch: Batch) -> dict[str, float]:
        x = to_model_range(batch.images)
        recon, rec, reg = self.codec_losses(x, self.plain_net("autoencoder")(x))
        # MONAI's per-image PSNR (data range 1), averaged as `fedsynth evaluate` does; a perfect copy scores 100 dB
        psnr = PSNRMetric(max_val=1.0)
        psnr(to_data_range(recon), batch.images.clamp(0, 1))
        return {"loss": float(rec + reg), "recon_loss": float(rec), "psnr": float(psnr.get_buffer().clamp_max(100.0).mean())}

    # ------------------------------------------------------------------ latent interface

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Encode and decode data-range images; returns data-range reconstructions."""
        x = to_model_range(images.to(self.device))
        return to_data_range(self.plain_net("autoencoder")(x)[0])

    def codec(self) -> AutoencoderKL | VQVAE:
        """The MONAI autoencoder network, unwrapped."""
        net = self.plain_net("autoencoder")
        assert isinstance(net, (AutoencoderKL, VQVAE))
        return net

    @torch.no_grad()
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Deterministic latent (KL mean, or VQ-quantised embedding) of data-range images."""
        net = self.codec()
        x = to_model_range(images)
        if isinstance(net, AutoencoderKL):
            mu, _ = net.encode(x)
            return mu
        quantized, _ = net.quantize(net.encode(x))
        return quantized

    @torch.no_grad()
    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Decode a latent back to data-range images."""
        return to_data_range(self.codec().decode(latent))

    def latent_shape(self) -> tuple[int, ...]:
        return (self.cfg.latent_channels, *(s // self.latent_factor for s in self.image_size))

    @torch.no_grad()
    def generate(self, num_images: int, *, generator: torch.Generator, labels: torch.Tensor | None = None,
                 prompts: list[str] | None = None, sampler: str | None = None, steps: int | None = None,
                 guidance_scale: float | None = None) -> torch.Tensor:
        """Decode latents drawn from the prior (KL: N(0, I); VQ: uniform codebook entries)."""
        if labels is not None:
            raise ValueError("autoencoders are unconditional: do not pass a label")
        self.check_prompts(prompts, num_images)
        shape = self.latent_shape()
        net = self.codec()
        if self.cfg.architecture == "kl":
            z = torch.randn(num_images, *shape, generator=generator, device=generator.device).to(self.device)
        else:
            idx = torch.randint(0, self.cfg.num_embeddings, (num_images, *shape[1:]), generator=generator,
                                device=generator.device).to(self.device)
            assert isinstance(net, VQVAE)
            z = net.quantizer.embed(idx).contiguous()
        return self.decode_latent(z)


#: parameter-free pads per mode, by spatial dims
_PADS: dict[str, tuple[type[nn.Module], ...]] = {
    "replicate": (nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d),
}


def explicit_padding(network: nn.Module, mode: str) -> int:
    """Give every zero-padded convolution inside ``network`` an explicit ``mode`` pad in front of it.

    The convolution then pads nothing (``padding=0``) and sees the already padded input, so Opacus
    computes its per-sample gradients as for any unpadded convolution (its Conv hooks assume zero
    padding inside the conv: ``padding_mode="replicate"`` on the conv itself breaks them). The pad
    is a parameter-free module inserted into the convolution's ``nn.Sequential`` (MONAI's
    ``Convolution``) under its own name, so the state-dict keys do not change. Returns how many
    convolutions were changed.
    """
    changed = 0
    for parent in list(network.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        if not any(_zero_padding(child) for _, child in children):
            continue
        for name, _ in children:  # re-added in order, each padded convolution after its pad
            delattr(parent, name)
        for name, child in children:
            padding = _zero_padding(child)
            if padding is not None:
                amounts = tuple(p for p in reversed(padding) for _ in (0, 1))  # last dim first, both sides
                parent.add_module(f"pad_{name}", _PADS[mode][len(padding) - 1](amounts))
                assert isinstance(child, nn.modules.conv._ConvNd)
                child.padding = (0,) * len(padding)
                changed += 1
            parent.add_module(name, child)
    return changed


def _zero_padding(module: nn.Module) -> tuple[int, ...] | None:
    """The zero padding per spatial axis of a (non-transposed) convolution that pads; ``None`` otherwise."""
    if not isinstance(module, nn.modules.conv._ConvNd) or module.transposed:
        return None
    padding = module.padding
    if padding == "valid" or not isinstance(padding, str) and not any(padding):
        return None
    if isinstance(padding, str) or module.padding_mode != "zeros":
        raise ValueError(f"cannot make the padding of {module} explicit: padding {padding!r}, mode {module.padding_mode}")
    return tuple(int(p) for p in padding)


def _no_codebook_update(module: nn.Module, _args: tuple[Any, ...]) -> None:
    module.training = False  # MONAI's EMAQuantizer updates its codebook only in training mode
