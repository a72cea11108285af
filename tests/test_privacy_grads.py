"""Per-sample gradients under DP equal a per-example loop, for every model family shipped.

Opacus computes per-sample gradients with hooks (or functorch); a wrong layout gives wrong
per-sample gradients while ``.grad`` still looks fine, so each family's private network is
checked against plain autograd on one real example at a time (after the plugin's own folding
of ``[real; fake]`` rows for discriminators). The losses are the model's own objectives, the
ones its ``training_step`` minimises; only the sampled noise is fixed so that a batch and its
examples one at a time see the same draw.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import tiny_config

from fedsynth.data.dataset import load_datasets, make_loader
from fedsynth.models import build_model
from fedsynth.models.base import SynthesisModel, to_model_range
from fedsynth.privacy import make_privacy_plugin

pytest.importorskip("opacus")

N = 3  # real examples per checked batch


def _private(cfg, csv) -> tuple[SynthesisModel, object, dict, torch.Tensor]:
    model = build_model(cfg)
    plugin = make_privacy_plugin(cfg, model)
    train, _ = load_datasets(cfg, str(csv))
    optimizers, _ = plugin.make_private(model, model.configure_optimizers(cfg.training),
                                        make_loader(train, cfg.training.batch_size, shuffle=False, seed=0))
    images = next(iter(make_loader(train, N, shuffle=False, seed=0))).images
    return model, plugin, optimizers, images


def _check(model: SynthesisModel, optimizers: dict, groups: list[str], net_name: str,
           loss_of: Callable[[torch.nn.Module, slice], torch.Tensor]) -> None:
    """Opacus per-sample gradients (folded per example) == autograd on each example alone."""
    torch.manual_seed(0)
    model.train()
    for g in groups:
        optimizers[g].zero_grad(set_to_none=True)
        optimizers[g].examples = N
    loss_of(model.net(net_name), slice(0, N)).backward()
    got: dict[int, torch.Tensor] = {}
    for g in groups:
        optimizers[g].clip_and_accumulate()  # folds rows into examples; grad_sample itself is unclipped
        for p in optimizers[g].params:
            got[id(p)] = p.grad_sample.detach().clone()
    params = [p for g in groups for p in optimizers[g].params]
    gsm = model.net(net_name)
    gsm.disable_hooks()
    try:
        for i in range(N):
            ref = torch.autograd.grad(loss_of(model.plain_net(net_name), slice(i, i + 1)), params, allow_unused=True)
            ref = [torch.zeros_like(p) if r is None else r for p, r in zip(params, ref, strict=False)]
            floor = 1e-3 * max(float(r.abs().max()) for r in ref)  # biases before a norm have ~0 gradient
            for p, r in zip(params, ref, strict=False):
                err = float((got[id(p)][i] - r).abs().max()) / (float(r.abs().max()) + floor)
                assert err < 1e-3, f"per-sample gradient of a {tuple(p.shape)} parameter differs (relative error {err:.3g})"
    finally:
        gsm.enable_hooks()
    for g in groups:
        optimizers[g].zero_grad(set_to_none=True)


def test_gan_discriminator_per_sample_grads_fold_real_and_fake(mri2d) -> None:
    # DiffAugment draws per-row parameters, so a batch and its rows alone differ: off here
    model_cfg = {"family": "gan", "latent_dim": 16, "generator_channels": 32, "discriminator_channels": 16,
                 "augment": []}
    cfg = tiny_config("gan", model=model_cfg, privacy={"enabled": True, "noise_multiplier": 1.0})
    model, _, optimizers, images = _private(cfg, mri2d["mni152"])
    real = to_model_range(images)
    with torch.no_grad():
        fake = model.plain_net("generator")(torch.randn(N, cfg.model.latent_dim))

    def loss_of(net, rows):
        return model.discriminator_objective(net, real[rows], fake[rows], None)

    _check(model, optimizers, ["discriminator"], "discriminator", loss_of)


@pytest.mark.slow  # trains beyond a step or spawns processes
@pytest.mark.parametrize("attention", [False, True], ids=["plain", "attention"])
def test_autoencoder_kl_per_sample_grads(mri2d, attention: bool) -> None:
    model_cfg = {"family": "autoencoder", "channels": [8, 16], "latent_channels": 2, "attention": attention,
                 "adversarial_weight": 0.1}
    cfg = tiny_config("autoencoder", model=model_cfg, privacy={"enabled": True, "noise_multiplier": 1.0})
    model, _, optimizers, images = _private(cfg, mri2d["mni152"])
    eps = torch.randn(N, 2, 16, 16)

    def loss_of(net, rows):
        x = to_model_range(images[rows])
        inner = net._module if hasattr(net, "_module") else net
        mu, sigma = inner.encode(x)  # AutoencoderKL.forward with its sampling noise fixed
        _, rec_loss, kl = model.codec_losses(x, (inner.decode(mu + eps[rows] * sigma), mu, sigma))
        return rec_loss + kl

    # the GradSampleModule's hooks sit on the inner modules, so calling encode/decode runs them
    _check(model, optimizers, ["encoder", "decoder"], "autoencoder", loss_of)
    with torch.no_grad():
        recon = model.plain_net("autoencoder")(to_model_range(images))[0]

    def d_loss_of(net, rows):
        return model.discriminator_objective(net, to_model_range(images[rows]), recon[rows])

    _check(model, optimizers, ["discriminator"], "discriminator", d_loss_of)


@pytest.mark.parametrize("spatial_dims", [2, pytest.param(3, marks=pytest.mark.slow)], ids=["2d-hooks", "3d-functorch"])
def test_replicate_padded_decoder_per_sample_grads(request: pytest.FixtureRequest, spatial_dims: int) -> None:
    """The decoder's edge padding is a parameter-free module in front of each convolution (padding 0):
    Opacus' Conv hooks, which assume zero padding inside the conv, see the padded input and stay exact
    (``padding_mode="replicate"`` on the convolutions themselves is off by ~100 %). In float64, so that
    the biases a GroupNorm cancels (gradient ~0) are not decided by float32 rounding."""
    model_cfg = {"family": "autoencoder", "channels": [8, 16], "latent_channels": 2, "decoder_padding": "replicate"}
    cfg = tiny_config("autoencoder", spatial_dims, model=model_cfg, privacy={"enabled": True, "noise_multiplier": 1.0})
    model, plugin, optimizers, images = _private(cfg, request.getfixturevalue(f"mri{spatial_dims}d")["mni152"])
    assert plugin.grad_sample_mode == ("hooks" if spatial_dims == 2 else "functorch")
    pad = torch.nn.ReplicationPad2d if spatial_dims == 2 else torch.nn.ReplicationPad3d
    assert any(isinstance(m, pad) for m in model.plain_net("autoencoder").decoder.modules())
    model.to(torch.float64)  # in place: the optimizers keep the same parameters
    images = images.double()
    eps = torch.randn(N, *model.latent_shape(), dtype=torch.float64)

    def loss_of(net, rows):
        x = to_model_range(images[rows])
        inner = net._module if hasattr(net, "_module") else net
        mu, sigma = inner.encode(x)
        _, rec_loss, kl = model.codec_losses(x, (inner.decode(mu + eps[rows] * sigma), mu, sigma))
        return rec_loss + kl

    _check(model, optimizers, ["encoder", "decoder"], "autoencoder", loss_of)


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_vqvae_per_sample_grads_and_frozen_codebook(mri2d) -> None:
    model_cfg = {"family": "autoencoder", "architecture": "vqvae", "channels": [8, 16], "latent_channels": 2}
    cfg = tiny_config("autoencoder", model=model_cfg, privacy={"enabled": True, "noise_multiplier": 1.0})
    model, _, optimizers, images = _private(cfg, mri2d["mni152"])
    codebook = model.plain_net("autoencoder").quantizer.quantizer.embedding.weight.detach().clone()

    def loss_of(net, rows):
        x = to_model_range(images[rows])
        _, rec_loss, quant_loss = model.codec_losses(x, net(x))
        return rec_loss + quant_loss

    _check(model, optimizers, ["encoder", "decoder"], "autoencoder", loss_of)
    after = model.plain_net("autoencoder").quantizer.quantizer.embedding.weight
    assert torch.equal(codebook, after), "the VQ codebook changed from raw data under DP"


@pytest.mark.slow  # trains beyond a step or spawns processes
@pytest.mark.parametrize("spatial_dims", [2, 3], ids=["2d-hooks", "3d-functorch"])
def test_diffusion_unet_per_sample_grads(mri2d, mri3d, spatial_dims: int) -> None:
    data = mri2d if spatial_dims == 2 else mri3d
    cfg = tiny_config("diffusion", spatial_dims, privacy={"enabled": True, "noise_multiplier": 1.0})
    model, plugin, optimizers, images = _private(cfg, data["mni152"])
    assert plugin.grad_sample_mode == ("hooks" if spatial_dims == 2 else "functorch")
    x0 = to_model_range(images)
    noise = torch.randn_like(x0)
    t = torch.tensor([3, 50, 97])

    def loss_of(net, rows):
        return model.denoising_objective(net, x0[rows], noise[rows], t[rows])

    _check(model, optimizers, ["unet"], "unet", loss_of)


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_autoencoder_3d_attention_functorch(mri3d) -> None:
    model_cfg = {"family": "autoencoder", "channels": [8, 16], "latent_channels": 2, "attention": True}
    cfg = tiny_config("autoencoder", 3, model=model_cfg, privacy={"enabled": True, "noise_multiplier": 1.0})
    model, _, optimizers, images = _private(cfg, mri3d["mni152"])

    def loss_of(net, rows):
        x = to_model_range(images[rows])
        inner = net._module if hasattr(net, "_module") else net
        mu, sigma = inner.encode(x)
        _, rec_loss, kl = model.codec_losses(x, (inner.decode(mu + 0.1 * sigma), mu, sigma))
        return rec_loss + kl

    _check(model, optimizers, ["encoder", "decoder"], "autoencoder", loss_of)
