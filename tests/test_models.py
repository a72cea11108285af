"""The parameter-group contract, one suite every model family must pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config
from monai.losses import PatchAdversarialLoss

from fedsynth.errors import WeightsError
from fedsynth.models import build_model
from fedsynth.models.losses import discriminator_loss, generator_loss

VARIANTS = [
    ("gan", 2, 0, {}), ("gan", 3, 2, {}), ("gan", 2, 2, {"model__spectral_norm": True, "model__loss": "hinge"}),
    ("autoencoder", 2, 0, {}), ("autoencoder", 3, 0, {}), ("autoencoder", 2, 0, {"model__architecture": "vqvae"}),
    ("autoencoder", 2, 0, {"model__adversarial_weight": 0.1}), ("autoencoder", 2, 0, {"model__attention": True}),
    ("diffusion", 2, 0, {}), ("diffusion", 3, 2, {}),
]
EXPECTED_GROUPS = {"gan": ["generator", "discriminator"], "autoencoder": ["encoder", "decoder"], "diffusion": ["unet"]}


def _model(family: str, dims: int, classes: int, extra: dict):
    torch.manual_seed(0)
    return build_model(tiny_config(family, dims, classes, **extra))


@pytest.mark.parametrize(("family", "dims", "classes", "extra"), VARIANTS)
def test_groups_partition_every_weight(family: str, dims: int, classes: int, extra: dict) -> None:
    model = _model(family, dims, classes, extra)
    groups = model.groups()
    assert groups[: len(EXPECTED_GROUPS[family])] == EXPECTED_GROUPS[family]
    weights = model.get_weights()
    n_group_tensors = sum(len(model.group_module(g).state_dict()) for g in groups)
    assert len(weights) == n_group_tensors == len(model.nets.state_dict())  # nothing left out, nothing twice
    assert all(k.split("/", 1)[0] in groups and "_module." not in k for k in weights)
    assert all(isinstance(v, np.ndarray) for v in weights.values())
    optimizers = model.configure_optimizers(tiny_config(family, dims, classes, **extra).training)
    assert sorted(optimizers) == sorted(model.trainable_groups())


@pytest.mark.parametrize(("family", "dims", "classes", "extra"), VARIANTS)
def test_get_set_round_trip(family: str, dims: int, classes: int, extra: dict) -> None:
    a, b = _model(family, dims, classes, extra), _model(family, dims, classes, extra)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    b.set_weights(a.get_weights())
    for key, value in a.get_weights().items():
        np.testing.assert_array_equal(value, b.get_weights()[key])
    # a subset of groups loads alone and leaves the others untouched: make b differ again first
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    first = a.groups()[0]
    before, source = b.get_weights(), a.get_weights()
    b.set_weights(a.get_weights([first]))
    after = b.get_weights()
    assert after.keys() == before.keys()
    changed = [k for k in after if not np.array_equal(after[k], before[k])]
    assert changed and all(k.startswith(f"{first}/") for k in changed)
    for key, value in after.items():
        np.testing.assert_array_equal(value, source[key] if key.startswith(f"{first}/") else before[key], err_msg=key)


def test_set_weights_rejects_bad_keys_and_shapes() -> None:
    model = _model("gan", 2, 0, {})
    weights = model.get_weights(["generator"])
    key = next(iter(weights))
    with pytest.raises(WeightsError, match="unknown weight key 'critic/x'"):
        model.set_weights({"critic/x": np.zeros(1)})
    with pytest.raises(WeightsError, match="unknown weight key 'generator/not_a_param'"):
        model.set_weights({**weights, "generator/not_a_param": np.zeros(1)})
    with pytest.raises(WeightsError, match=f"wrong shape for '{key}'"):
        model.set_weights({**weights, key: np.zeros((1, 2, 3))})
    del weights[key]
    with pytest.raises(WeightsError, match="missing weight key"):
        model.set_weights(weights)


@pytest.mark.slow  # trains beyond a step or spawns processes
@pytest.mark.parametrize(("family", "dims", "classes", "extra"), VARIANTS)
def test_generate_shape_range_and_seed(family: str, dims: int, classes: int, extra: dict) -> None:
    model = _model(family, dims, classes, extra).eval()
    out1 = model.generate(2, generator=torch.Generator().manual_seed(3), steps=3)
    out2 = model.generate(2, generator=torch.Generator().manual_seed(3), steps=3)
    assert tuple(out1.shape) == (2, 1, *([32] * dims if dims == 2 else [16] * 3))
    assert 0.0 <= float(out1.min()) and float(out1.max()) <= 1.0
    torch.testing.assert_close(out1, out2)


def test_conditional_label_checks() -> None:
    model = _model("gan", 2, 2, {})
    with pytest.raises(ValueError, match=r"labels must be 2 integers in \[0, 1\]"):
        model.generate(2, generator=torch.Generator(), labels=torch.tensor([5, 0]))
    uncond = _model("gan", 2, 0, {})
    with pytest.raises(ValueError, match="unconditional"):
        uncond.generate(1, generator=torch.Generator(), labels=torch.tensor([0]))


def test_gan_losses_are_exact_where_monai_patch_adversarial_loss_differs() -> None:
    """Why the GAN keeps its own losses (models/losses.py): MONAI's "bce" saturates in float32 (a
    fake at logit 20 scores 100 instead of 20, with no gradient) and its "hinge" is tanh-bounded."""
    fake, sure_real = torch.tensor([20.0], requires_grad=True), torch.tensor([1e4])
    ours = discriminator_loss(sure_real, fake)  # softplus(20) = 20 + 2e-9
    monai_bce = PatchAdversarialLoss(criterion="bce")(fake, target_is_real=False, for_discriminator=True)
    assert float(ours.detach()) == pytest.approx(20.0) and float(torch.autograd.grad(ours, fake)[0]) == pytest.approx(1.0)
    assert float(monai_bce.detach()) == pytest.approx(100.0) and float(torch.autograd.grad(monai_bce, fake)[0]) == 0.0
    logits, monai_hinge = torch.tensor([0.5, 3.0]), PatchAdversarialLoss(criterion="hinge")
    bounded = float((1 - torch.tanh(logits)).mean())  # MONAI's hinge for D on reals and for G alike
    assert float(discriminator_loss(logits, -sure_real, "hinge")) == pytest.approx(0.25)  # mean relu(1 - x)
    assert float(monai_hinge(logits, target_is_real=True, for_discriminator=True)) == pytest.approx(bounded)
    assert float(generator_loss(logits, "hinge")) == pytest.approx(-1.75)  # -x, unbounded
    assert float(monai_hinge(logits, target_is_real=True, for_discriminator=False)) == pytest.approx(bounded)
