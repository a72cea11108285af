"""Diffusion family: MONAI ``DiffusionModelUNet`` trained as DDPM, sampled with DDPM or DDIM.

Groups: ``unet``; for latent diffusion a frozen ``autoencoder`` (the networks of a trained
autoencoder run plus the latent scale factor); for text conditioning a ``text_encoder`` whose
output the UNet's cross-attention reads. Class-conditional models learn a label embedding with
one extra "null" class, text-conditional ones the empty prompt: the inputs that classifier-free
guidance contrasts with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from fedsynth.errors import ConfigError, WeightsError
from fedsynth.families.diffusion import DiffusionConfig
from fedsynth.families.diffusion import first_stage as latent_first_stage
from fedsynth.models.autoencoder import AutoencoderModel
from fedsynth.models.base import Batch, GroupSpec, PrivacySpec, SynthesisModel, to_data_range, to_model_range
from fedsynth.models.losses import denoising_loss
from fedsynth.models.text import TransformerTextEncoder, build_text_encoder

if TYPE_CHECKING:
    from fedsynth.config import ExperimentConfig


class LatentCodec(nn.Module):
    """A frozen trained autoencoder plus the scale that brings its latents to unit variance."""

    scale: torch.Tensor

    def __init__(self, autoencoder: AutoencoderModel) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.register_buffer("scale", torch.zeros(()))
        for p in self.parameters():
            p.requires_grad_(False)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.autoencoder.encode_latent(images)
        if float(self.scale) == 0.0:  # first batch ever: fix the scale factor from the data
            self.scale.fill_(1.0 / float(z.flatten().std().clamp_min(1e-6)))
        return z * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode_latent(z / self.scale)


#: the latent scale is fixed from the first batch a site sees, so it is not part of the identity
LATENT_SCALE_KEY = "autoencoder/scale"


def first_stage_digest(weights: Mapping[str, np.ndarray]) -> str:
    """sha256 of a latent-diffusion model's frozen first stage (the ``autoencoder`` group's
    networks, float32 bytes in key order; the latent scale is excluded): what a federation pins
    in ``model.first_stage_sha256`` and every site checks on the weights it receives."""
    digest = hashlib.sha256()
    for key in sorted(k for k in weights if k.startswith("autoencoder/") and k != LATENT_SCALE_KEY):
        array = np.asarray(weights[key])
        array = array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array
        digest.update(key.encode("utf-8"))
        digest.update(str(array.shape).encode("ascii"))
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


class DiffusionModel(SynthesisModel):
    """DDPM training objective; DDPM or DDIM sampling with optional classifier-free guidance."""

    family = "diffusion"
    default_federation_policy = {"unet": "shared", "autoencoder": "shared", "text_encoder": "shared"}
    generating = ("unet", "text_encoder")

    def __init__(self, config: ExperimentConfig, autoencoder: SynthesisModel | None = None) -> None:
        super().__init__(config)
        cfg = config.model
        assert isinstance(cfg, DiffusionConfig)
        self.cfg = cfg
        if autoencoder is not None:
            assert isinstance(autoencoder, AutoencoderModel)
            self.nets["autoencoder"] = LatentCodec(autoencoder)
            sample_shape = tuple(autoencoder.latent_shape())
        else:
            sample_shape = (self.in_channels, *self.image_size)
        self.sample_shape: tuple[int, ...] = sample_shape
        context_dim = None
        if config.text is not None:
            text_encoder = build_text_encoder(config.text)
            self.nets["text_encoder"] = text_encoder
            context_dim = text_encoder.width
        levels = len(cfg.channels)
        attention = cfg.attention_levels or [False] * (levels - 1) + [True]
        for s in sample_shape[1:]:
            if s % 2 ** (levels - 1):
                raise ValueError(f"diffusion input size {list(sample_shape[1:])} must be divisible by {2 ** (levels - 1)}")
        self.nets["unet"] = DiffusionModelUNet(
            spatial_dims=self.spatial_dims,
            in_channels=sample_shape[0],
            out_channels=sample_shape[0],
            channels=tuple(cfg.channels),
            num_res_blocks=cfg.num_res_blocks,
            attention_levels=tuple(attention),
            num_head_channels=cfg.num_head_channels,
            norm_num_groups=cfg.norm_num_groups,
            num_class_embeds=self.num_classes + 1 if self.num_classes else None,
            with_conditioning=context_dim is not None,
            cross_attention_dim=context_dim,
        )
        self.train_scheduler = self.make_scheduler("ddpm")

    @property
    def is_latent(self) -> bool:
        return "autoencoder" in self.nets

    # the first stage, told through SynthesisModel's generic hooks (callers never ask is_latent)

    def first_stage(self) -> SynthesisModel | None:
        if not self.is_latent:
            return None
        codec = self.plain_net("autoencoder")
        assert isinstance(codec, LatentCodec), "a latent diffusion model's 'autoencoder' network is its LatentCodec"
        return codec.autoencoder

    def first_stage_sha256(self, weights: Mapping[str, np.ndarray] | None = None) -> str | None:
        if not self.is_latent:
            return None
        return first_stage_digest(self.get_weights(["autoencoder"]) if weights is None else weights)

    def check_received(self, weights: Mapping[str, np.ndarray], source: str) -> None:
        pinned = self.cfg.first_stage_sha256
        if pinned:  # a shipped first stage: exactly the one the federation pinned
            check_first_stage(weights, pinned, f"{source}: the first stage received from the server")

    def averaged_frozen_keys(self) -> frozenset[str]:
        return frozenset({LATENT_SCALE_KEY}) if self.is_latent else frozenset()

    def group_specs(self) -> dict[str, GroupSpec]:
        # the UNet learns the latents' distribution at their scale: under DP that scale is frozen
        specs = {"unet": GroupSpec("unet", privacy=PrivacySpec(freezes=(self.fix_latent_scale,)))}
        if self.is_latent:
            specs["autoencoder"] = GroupSpec("autoencoder", trainable=False, sees_real_data=False)
        if "text_encoder" in self.nets:
            trained = isinstance(self.plain_net("text_encoder"), TransformerTextEncoder)
            specs["text_encoder"] = GroupSpec("text_encoder", trainable=trained, sees_real_data=trained)
        return specs

    def fix_latent_scale(self) -> list[str]:
        """Latent diffusion: fix a latent scale factor still to be computed from the first real
        batch (which would read raw images outside DP) to 1."""
        codec = self.nets["autoencoder"] if self.is_latent else None
        if codec is not None and float(codec.scale) == 0.0:  # type: ignore[arg-type]
            codec.scale.fill_(1.0)  # type: ignore[operator]
            return ["latent diffusion: latent scale factor fixed to 1.0 (computing it from the data would leak)"]
        return []

    def make_scheduler(self, sampler: str) -> DDIMScheduler | DDPMScheduler:
        """Build a fresh scheduler from the config (rebuildable on any host)."""
        cfg = self.cfg
        if sampler == "ddim":
            return DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
                                 prediction_type=cfg.prediction_type, clip_sample=not self.is_latent)
        if sampler == "ddpm":
            return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
                                 prediction_type=cfg.prediction_type, clip_sample=not self.is_latent)
        raise ValueError(f"unknown sampler '{sampler}': expected 'ddpm' or 'ddim'")

    # ------------------------------------------------------------------ training

    def _to_sample_space(self, images: torch.Tensor) -> torch.Tensor:
        if self.is_latent:
            return self.plain_net("autoencoder").encode(images)  # type: ignore[operator]
        return to_model_range(images)

    def _class_inputs(self, labels: torch.Tensor | None, drop: float) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        assert labels is not None, "a conditional diffusion model needs labels"
        if drop > 0:
            mask = torch.rand(labels.shape, device=labels.device) < drop
            labels = torch.where(mask, torch.full_like(labels, self.num_classes), labels)
        return labels

    def _text_context(self, prompts: list[str] | None, drop: float, text_net: nn.Module | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Cross-attention context of ``prompts``; with ``drop`` > 0 that share becomes the empty prompt."""
        if self.config.text is None:
            return None
        assert prompts is not None, "a text-conditional diffusion model needs prompts"
        if drop > 0:
            keep = torch.rand(len(prompts), generator=generator) >= drop
            prompts = [p if k else "" for p, k in zip(prompts, keep.tolist(), strict=False)]
        encoder = self.plain_net("text_encoder")
        if not isinstance(encoder, TransformerTextEncoder):
            return encoder.encode(prompts, self.device)  # type: ignore[operator]
        ids, mask = encoder.tokenizer(prompts)
        net = text_net if text_net is not None else encoder
        return net(ids.to(self.device), mask.to(self.device))

    def _loss(self, unet: nn.Module, batch: Batch, drop: float, generator: torch.Generator | None = None,
              text_net: nn.Module | None = None, prompt_drop: float = 0.0) -> torch.Tensor:
        x0 = self._to_sample_space(batch.images)
        n = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator, device=x0.device) if generator is not None else torch.randn_like(x0)
        t = torch.randint(0, self.cfg.num_train_timesteps, (n,), generator=generator, device=x0.device)
        context = self._text_context(batch.prompts, prompt_drop, text_net)
        return self.denoising_objective(unet, x0, noise, t, self._class_inputs(batch.labels, drop), context)

    def denoising_objective(self, unet: nn.Module, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                            class_labels: torch.Tensor | None = None,
                            context: torch.Tensor | None = None) -> torch.Tensor:
        """The DDPM loss for clean samples ``x0`` noised with ``noise`` at timesteps ``t``.

        ``class_labels`` and the text ``context`` condition the UNet where the model is conditional.

        The target is the noise, the clean sample or the velocity, after ``prediction_type``.
        """
        x_t = self.train_scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
        pred = unet(x_t, timesteps=t, context=context, class_labels=class_labels)
        if self.cfg.prediction_type == "epsilon":
            target = noise
        elif self.cfg.prediction_type == "sample":
            target = x0
        else:
            target = self.train_scheduler.get_velocity(x0, noise, t)
        return denoising_loss(pred, target)

    def training_step(self, batch: Batch, optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, float]:
        trained_text = "text_encoder" in optimizers
        loss = self._loss(self.net("unet"), batch, self.cfg.class_dropout,
                          text_net=self.net("text_encoder") if trained_text else None,
                          prompt_drop=self.config.text.prompt_dropout if self.config.text is not None else 0.0)
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        optimizers["unet"].step()
        if trained_text:
            optimizers["text_encoder"].step()
        return {"loss": float(loss.detach())}

    @torch.no_grad()
    def validation_step(self, batch: Batch) -> dict[str, float]:
        gen = torch.Generator(device=batch.images.device).manual_seed(1234)
        return {"loss": float(self._loss(self.plain_net("unet"), batch, 0.0, generator=gen))}

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(self, num_images: int, *, generator: torch.Generator, labels: torch.Tensor | None = None,
                 prompts: list[str] | None = None, sampler: str | None = None, steps: int | None = None,
                 guidance_scale: float | None = None) -> torch.Tensor:
        """Reverse diffusion from Gaussian noise, one visible loop, seeded by ``generator``."""
        labels = self.check_labels(labels, num_images)
        prompts = self.check_prompts(prompts, num_images)
        context = self._text_context(prompts, 0.0)
        null_context = self._text_context([""] * num_images, 0.0) if context is not None else None
        sampler = sampler or self.cfg.sampler
        steps = steps or (self.cfg.sampling_steps if sampler == "ddim" else self.cfg.num_train_timesteps)
        scale = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        scheduler = self.make_scheduler(sampler)
        scheduler.set_timesteps(num_inference_steps=steps, device=self.device)
        unet = self.plain_net("unet")
        guided = (labels is not None or context is not None) and scale != 1.0
        x = torch.randn((num_images, *self.sample_shape), generator=generator, device=generator.device).to(self.device)
        for t in scheduler.timesteps:
            t_batch = torch.full((num_images,), int(t), device=self.device, dtype=torch.long)
            if guided:
                both_labels = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if labels is not None else None
                both_context = torch.cat([context, null_context]) if context is not None else None  # type: ignore[list-item]
                out = unet(torch.cat([x, x]), timesteps=torch.cat([t_batch, t_batch]), context=both_context,
                           class_labels=both_labels)
                cond, uncond = out.chunk(2)
                model_output = uncond + scale * (cond - uncond)
            else:
                model_output = unet(x, timesteps=t_batch, context=context, class_labels=labels)
            x, _ = scheduler.step(model_output, int(t), x, generator=generator)
        if self.is_latent:
            codec = self.plain_net("autoencoder")
            assert isinstance(codec, LatentCodec)
            return codec.decode(x).clamp(0, 1)
        return to_data_range(x)


# --------------------------------------------------------------------------- the family


def build(config: ExperimentConfig, autoencoder: SynthesisModel | None = None) -> DiffusionModel:
    """The diffusion model of ``config``; latent diffusion gets its first stage ``autoencoder``
    (:func:`fedsynth.models.build_model` loads it from ``model.autoencoder_checkpoint``), checked
    against ``model.first_stage_sha256`` when that is set."""
    cfg = config.model
    assert isinstance(cfg, DiffusionConfig)
    stage = latent_first_stage(config)
    ae_path = stage.to_load() if stage is not None else None
    shipped = stage.pinned_sha256 if stage is not None else None
    assert autoencoder is not None or not ae_path, "build_model loads the first stage from its checkpoint"
    if autoencoder is None and stage is not None and shipped and cfg.first_stage is not None:
        autoencoder = AutoencoderModel(stage.experiment())  # weights: from the federation
        ae_path = "<shipped first stage>"
    if autoencoder is None and stage is not None and stage.to_train:
        raise ConfigError("model.first_stage: the first-stage autoencoder is trained by `fedsynth train` "
                          "(it writes RUN_DIR/first_stage/last.ckpt); elsewhere set model.autoencoder_checkpoint "
                          "to a trained autoencoder checkpoint")
    if autoencoder is not None:
        _check_first_stage(autoencoder, config, ae_path or "<autoencoder>")
    model = DiffusionModel(config, autoencoder=autoencoder)
    if shipped and ae_path and ae_path != "<shipped first stage>":
        check_first_stage(model.get_weights(["autoencoder"]), shipped, f"model.autoencoder_checkpoint {ae_path}")
    return model


def check_first_stage(weights: Mapping[str, np.ndarray], expected_sha256: str, source: str) -> None:
    """Raise :class:`WeightsError` unless ``weights`` hold the first stage ``expected_sha256`` pins."""

    actual = first_stage_digest(weights)
    if actual != expected_sha256:
        raise WeightsError(f"{source}: the first-stage autoencoder's weights have sha256 {actual}, "
                           f"model.first_stage_sha256 pins {expected_sha256}")


def _check_first_stage(autoencoder: SynthesisModel, config: ExperimentConfig, source: str) -> None:
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
