"""The style-based GAN family on real MRI slices: its layers, training through the engine (2D, 3D,
class-conditional), generation, the weight contract and DP on the discriminator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

from fedsynth.data.dataset import load_datasets
from fedsynth.errors import ConfigError
from fedsynth.families.stylegan import FAMILY
from fedsynth.local import build_engine
from fedsynth.models import build_model
from fedsynth.models.base import to_model_range
from fedsynth.models.stylegan import StyleDiscriminator, minibatch_stddev, modulated_conv

DP = {"enabled": True, "noise_multiplier": 1.1, "max_grad_norm": 1.0}


def test_demodulation_keeps_unit_activation_scale() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 64, 16, 16)
    weight = torch.randn(32, 64, 3, 3)
    styles = torch.rand(8, 64) * 4 + 0.1  # far from 1: modulation alone changes the scale
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # away from the zero padding
    demodulated = modulated_conv(x, weight, styles)[interior]
    assert float(demodulated.std()) == pytest.approx(1.0, abs=0.03)
    assert float(modulated_conv(x, weight, styles, demodulate=False)[interior].std()) > 10
    # one grouped convolution == each example's own modulated kernel
    one = torch.nn.functional.conv2d(x[:1], weight * styles[0].reshape(1, -1, 1, 1), padding=1, bias=None)
    one = one * torch.rsqrt((weight * styles[0].reshape(1, -1, 1, 1)).square().sum((1, 2, 3)) + 1e-8).reshape(1, -1, 1, 1)
    torch.testing.assert_close(modulated_conv(x, weight, styles)[:1], one, rtol=1e-4, atol=1e-4)


def test_minibatch_stddev_groups_never_mix_real_and_fake() -> None:
    real, fake = torch.zeros(4, 2, 4, 4), torch.randn(4, 2, 4, 4)
    out = minibatch_stddev(torch.cat([real, fake]))
    assert out.shape == (8, 3, 4, 4)
    assert torch.all(out[:4, 2] < 1e-3) and torch.all(out[4:, 2] > 0.1)


@pytest.mark.slow  # trains beyond a step or spawns processes
@pytest.mark.parametrize(("dims", "classes"), [(2, 0), (3, 2)], ids=["2d", "3d-conditional"])
def test_trains_through_the_engine_and_generates(mri2d, mri3d, dims: int, classes: int) -> None:
    cfg = tiny_config("stylegan", dims, classes)
    train, _ = load_datasets(cfg, str((mri2d if dims == 2 else mri3d)["all" if classes else "mni152"]))
    engine = build_engine(cfg, None)
    model = engine.model
    before = model.get_weights()
    state = engine.fit(train, epochs=1, max_steps=3)
    assert state.step == 3 and np.isfinite(state.metrics["train_loss"])
    after = model.get_weights()
    for group in ("generator", "discriminator"):
        assert any(not np.array_equal(before[k], after[k]) for k in before if k.startswith(f"{group}/")), group
    assert engine.ema is not None and engine.ema.groups == ["generator"]
    model.eval()
    out = model.generate(3, generator=torch.Generator().manual_seed(1))
    size = [32, 32] if dims == 2 else [16, 16, 16]
    assert tuple(out.shape) == (3, 1, *size) and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    torch.testing.assert_close(out, model.generate(3, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(out, model.generate(3, generator=torch.Generator().manual_seed(2)))
    if classes:  # one label for all, one per image; out-of-range labels are refused
        zeros = model.generate(2, generator=torch.Generator().manual_seed(1), labels=torch.tensor([0]))
        ones = model.generate(2, generator=torch.Generator().manual_seed(1), labels=torch.tensor([1, 1]))
        assert not torch.equal(zeros, ones)
        with pytest.raises(ValueError, match=r"labels must be 2 integers in \[0, 1\]"):
            model.generate(2, generator=torch.Generator(), labels=torch.tensor([2, 0]))


def test_truncation_pulls_samples_to_the_average_style() -> None:
    def spread(psi: float) -> float:
        torch.manual_seed(0)
        model = build_model(tiny_config("stylegan", model__truncation=psi, model__noise_inputs=False)).eval()
        model.plain_net("generator").w_avg.normal_()
        return float(model.generate(8, generator=torch.Generator().manual_seed(0)).std(0).mean())

    assert spread(0.01) < 0.1 * spread(1.0)


def test_group_weights_round_trip() -> None:
    torch.manual_seed(0)
    a = build_model(tiny_config("stylegan", 2, 2))
    b = build_model(tiny_config("stylegan", 2, 2))
    assert a.groups() == ["generator", "discriminator"] and a.generating_groups() == ["generator"]
    weights = a.get_weights()
    assert len(weights) == len(a.nets.state_dict()) and "generator/w_avg" in weights
    b.set_weights(a.get_weights(["discriminator"]))
    assert all(np.array_equal(v, b.get_weights()[k]) for k, v in weights.items() if k.startswith("discriminator/"))
    assert not all(np.array_equal(v, b.get_weights()[k]) for k, v in weights.items() if k.startswith("generator/"))
    b.set_weights(weights)
    for key, value in weights.items():
        np.testing.assert_array_equal(value, b.get_weights()[key], err_msg=key)
    z = torch.randn(2, 16)
    labels = torch.tensor([0, 1])
    torch.testing.assert_close(a.plain_net("generator").eval()(z, labels, noise_generator=torch.Generator().manual_seed(0)),
                               b.plain_net("generator").eval()(z, labels, noise_generator=torch.Generator().manual_seed(0)))


@pytest.mark.slow  # trains beyond a step or spawns processes
@pytest.mark.parametrize("dims", [2, 3], ids=["2d-hooks", "3d-functorch"])
def test_dp_on_the_discriminator(mri2d, mri3d, dims: int) -> None:
    from opacus.grad_sample import GradSampleModule

    cfg = tiny_config("stylegan", dims, 2, privacy=DP)
    assert cfg.model.minibatch_stddev
    train, _ = load_datasets(cfg, str((mri2d if dims == 2 else mri3d)["all"]))
    engine = build_engine(cfg, None)
    model = engine.model
    assert not cfg.model.minibatch_stddev and any("minibatch standard deviation" in m for m in engine.privacy.messages)
    g_before = model.get_weights(["generator"])
    engine.fit(train, epochs=1, max_steps=2)
    assert isinstance(model.net("discriminator"), GradSampleModule)
    assert not isinstance(model.net("generator"), GradSampleModule)
    assert engine.privacy.ledger.steps == 2 and model.fakes.size == cfg.training.batch_size
    g_after = model.get_weights(["generator"])
    assert any(not np.array_equal(g_before[k], g_after[k]) for k in g_before), "the generator did not train"


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_dp_per_sample_grads_fold_real_and_fake(mri2d) -> None:
    """Opacus' per-sample gradients of the discriminator objective == autograd per example."""
    from test_privacy_grads import N, _check, _private

    cfg = tiny_config("stylegan", 2, 2, privacy={"enabled": True, "noise_multiplier": 1.0}, model__augment=[])
    model, _, optimizers, images = _private(cfg, mri2d["all"])
    assert isinstance(model.plain_net("discriminator"), StyleDiscriminator) and not model.cfg.minibatch_stddev
    real = to_model_range(images)
    labels = torch.tensor([0, 1, 1])[:N]
    with torch.no_grad():
        fake = model.plain_net("generator")(torch.randn(N, cfg.model.latent_dim), labels)

    def loss_of(net, rows):
        return model.discriminator_objective(net, real[rows], fake[rows], labels[rows])

    _check(model, optimizers, ["discriminator"], "discriminator", loss_of)


def test_config_and_geometry_errors() -> None:
    with pytest.raises(ConfigError, match=r"field 'image_size': \[60, 64\] must be divisible by 8 .*nearest valid: 56, 64"):
        tiny_config("stylegan", image_size=[60, 64])
    with pytest.raises(ConfigError, match=r"field 'model.max_channels': 8 .*nearest valid: 16"):
        tiny_config("stylegan", model__max_channels=8, model__discriminator_channels=16)
    with pytest.raises(ConfigError, match="model.style_mixing"):
        tiny_config("stylegan", model__style_mixing=1.5)


def test_recipe_builds_for_every_geometry() -> None:
    from fedsynth.config import config_from_dict

    for dims, size in [(2, 32), (2, 64), (2, 128), (3, 32)]:
        r = FAMILY.recipe(dims, [size] * dims)
        cfg = config_from_dict({"spatial_dims": dims, "image_size": size, "model": r["model"], "training": r["training"]},
                               "recipe")
        assert cfg.model.family == "stylegan" and cfg.model.max_channels >= cfg.model.generator_channels
