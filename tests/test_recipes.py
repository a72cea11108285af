"""Training recipes: EMA, learning-rate schedules, gradient clipping, DiffAugment, R1 (unit level)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedsynth.recipes import WeightAverage, diff_augment, lr_factor, r1_penalty
from fedsynth.recipes.augment import OPS
from tests.conftest import tiny_config


def _model(family: str = "gan", **overrides: object):  # type: ignore[no-untyped-def]
    from fedsynth.models import build_model

    torch.manual_seed(0)
    return build_model(tiny_config(family, **overrides))


# --------------------------------------------------------------------------- EMA


def test_ema_update_follows_the_warmup_formula() -> None:
    model = _model()
    ema = WeightAverage(model, ["generator"], decay=0.99)
    key = next(k for k, v in ema.weights.items() if v.is_floating_point() and v.numel() > 1)
    start = ema.weights[key].clone()
    with torch.no_grad():
        for p in model.group_module("generator").parameters():
            p.add_(1.0)
    ema.update(model)  # n = 0: decay = min(0.99, 1/10) = 0.1  ->  ema = 0.1 * old + 0.9 * new
    expected = 0.1 * start + 0.9 * (start + 1.0)
    assert torch.allclose(ema.weights[key], expected, atol=1e-6)
    assert ema.current_decay() == pytest.approx(2 / 11)
    for _ in range(5000):
        ema.num_updates += 1
    assert ema.current_decay() == pytest.approx(0.99)
    assert all(k.startswith("generator/") for k in ema.weights)


def test_ema_applied_swaps_and_restores_weights() -> None:
    model = _model()
    ema = WeightAverage(model, ["generator"], decay=0.9)
    raw = model.get_weights(["generator"])
    for t in ema.weights.values():
        if t.is_floating_point():
            t.add_(0.5)
    with ema.applied(model):
        inside = model.get_weights(["generator"])
        key = next(k for k in raw if raw[k].dtype.kind == "f")
        assert abs(float((inside[key] - raw[key]).mean()) - 0.5) < 1e-6
    after = model.get_weights(["generator"])
    assert all((after[k] == raw[k]).all() for k in raw)


def test_checkpoint_stores_ema_and_generate_uses_it(tmp_path: Path) -> None:
    from fedsynth.engine import Engine
    from fedsynth.models import model_from_checkpoint

    model = _model(training__ema_decay=0.9)
    engine = Engine(model, model.config, device=torch.device("cpu"))
    assert engine.ema is not None and engine.ema.groups == ["generator"]
    for t in engine.ema.weights.values():
        if t.is_floating_point():
            t.mul_(0.0)
    path = engine.save(tmp_path / "last.ckpt")
    ema_model = model_from_checkpoint(path)
    raw_model = model_from_checkpoint(path, weights="raw")
    key = next(k for k, v in engine.ema.weights.items() if v.is_floating_point() and v.numel() > 1)
    assert float(abs(ema_model.get_weights([key.split("/")[0]])[key]).max()) == 0.0
    assert float(abs(raw_model.get_weights([key.split("/")[0]])[key]).max()) > 0.0
    assert ema_model.weights_loaded == "ema" and raw_model.weights_loaded == "raw"
    # the discriminator is not a generating group: identical in both
    d = "discriminator"
    assert all((ema_model.get_weights([d])[k] == raw_model.get_weights([d])[k]).all() for k in raw_model.get_weights([d]))
    again = _model(training__ema_decay=0.9)
    resumed = Engine(again, again.config, device=torch.device("cpu"))
    resumed.resume(path)
    assert resumed.ema is not None and float(abs(resumed.ema.weights[key]).max()) == 0.0


def test_generating_groups_per_family() -> None:
    assert _model("gan").generating_groups() == ["generator"]
    assert _model("diffusion").generating_groups() == ["unet"]
    assert _model("autoencoder").generating_groups() == ["encoder", "decoder"]


# --------------------------------------------------------------------------- schedules and clipping


def test_lr_factor_values() -> None:
    assert lr_factor(0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_factor(9, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_factor(50, 100, warmup_steps=10) == 1.0  # constant after warm-up
    assert lr_factor(10, 110, warmup_steps=10, schedule="cosine", min_ratio=0.1) == pytest.approx(1.0)
    assert lr_factor(60, 110, warmup_steps=10, schedule="cosine", min_ratio=0.1) == pytest.approx(0.55)
    assert lr_factor(110, 110, warmup_steps=10, schedule="cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(500, 110, schedule="cosine", min_ratio=0.0) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_factor(20, 100, schedule="linear")


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_engine_applies_schedule_and_clipping(mri2d: dict[str, Path]) -> None:
    from fedsynth.data import load_datasets
    from fedsynth.engine import Engine

    config = tiny_config("diffusion", training__learning_rate=1e-3, training__warmup_steps=4,
                         training__lr_schedule="cosine", training__min_lr_ratio=0.0, training__grad_clip_norm=1e-3,
                         training__max_steps=4, training__ema_decay=0.0)
    train, _ = load_datasets(config, str(mri2d["mni152"]))
    model = _model("diffusion")
    engine = Engine(model, config, device=torch.device("cpu"))
    engine.loader(train, train=True)  # attaches the clipping hook, so ours (registered after it) sees clipped grads
    norms: list[float] = []
    opt = engine.optimizers["unet"]
    opt.register_step_pre_hook(lambda o, a, k: norms.append(float(torch.sqrt(sum(
        p.grad.pow(2).sum() for g in o.param_groups for p in g["params"] if p.grad is not None)))))
    lrs: list[float] = []
    opt.register_step_post_hook(lambda o, a, k: lrs.append(o.param_groups[0]["lr"]))
    engine.fit(train, epochs=2)
    assert engine.state.step == 4
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warm-up to the base rate
    assert max(norms) <= 1e-3 * 1.001  # clipped before every step


# --------------------------------------------------------------------------- DiffAugment and R1


@pytest.mark.parametrize("spatial", [(16, 16), (8, 8, 8)])
def test_diff_augment_same_transform_for_real_and_fake_given_the_same_draw(spatial: tuple[int, ...]) -> None:
    x = torch.rand(4, 1, *spatial) * 2 - 1
    policy = list(OPS)
    a = diff_augment(x, policy, torch.Generator().manual_seed(3))
    b = diff_augment(x.clone(), policy, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    c = diff_augment(x, policy, torch.Generator().manual_seed(4))
    assert not torch.equal(a, c)


def test_diff_augment_is_differentiable_and_per_sample() -> None:
    x = (torch.rand(6, 1, 16, 16) * 2 - 1).requires_grad_(True)
    y = diff_augment(x, ["brightness", "contrast", "translation", "cutout"], torch.Generator().manual_seed(0))
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    # per-sample: changing one image leaves the others' outputs untouched
    x2 = x.detach().clone()
    x2[0] += 0.3
    y2 = diff_augment(x2, ["brightness", "contrast", "translation", "cutout"], torch.Generator().manual_seed(0))
    assert torch.allclose(y2[1:], y.detach()[1:]) and not torch.allclose(y2[0], y.detach()[0])


def test_gan_discriminator_sees_the_same_policy_on_real_and_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedsynth.models.base import Batch

    model = _model("gan")
    calls: list[int] = []
    original = model.augment

    def spy(images: torch.Tensor) -> torch.Tensor:
        calls.append(images.shape[0])
        return original(images)

    monkeypatch.setattr(model, "augment", spy)
    opts = model.configure_optimizers(model.config.training)
    model.training_step(Batch(torch.rand(8, 1, 32, 32)), opts)
    # one call on [real, fake] together (16), one on reals for R1 at step 0 (8), one on the generator's fakes (8)
    assert calls == [16, 8, 8]


def test_r1_penalty_known_case() -> None:
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])

    def linear_d(x: torch.Tensor) -> torch.Tensor:  # D(x) = <w, x>: grad_x = w for every sample
        return (x[:, 0] * w).flatten(1).sum(1)

    x = torch.randn(5, 1, 2, 2)
    assert float(r1_penalty(linear_d, x).detach()) == pytest.approx(float(w.pow(2).sum()))

    def quadratic_d(x: torch.Tensor) -> torch.Tensor:  # D(x) = 0.5 ||x||^2: grad = x, penalty = mean ||x||^2
        return 0.5 * x.pow(2).flatten(1).sum(1)

    assert float(r1_penalty(quadratic_d, x).detach()) == pytest.approx(float(x.pow(2).flatten(1).sum(1).mean()), rel=1e-5)


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_r1_is_skipped_under_dp_and_between_lazy_steps() -> None:
    from fedsynth.models.base import Batch

    model = _model("gan", model={"family": "gan", "latent_dim": 16, "generator_channels": 32,
                                 "discriminator_channels": 16, "r1_every": 2})
    opts = model.configure_optimizers(model.config.training)
    batch = Batch(torch.rand(4, 1, 32, 32))
    model.global_step = 0
    assert "r1" in model.training_step(batch, opts)
    model.global_step = 1
    assert "r1" not in model.training_step(batch, opts)
    model.global_step, model.r1.on, model.fakes.size = 2, False, 4  # what DP sets
    assert "r1" not in model.training_step(batch, opts)
    assert math.isfinite(model.training_step(batch, opts)["loss"])
