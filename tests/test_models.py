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
    ("autoencoder", 2, 0, {"model__decoder_padding": "replicate"}), ("autoencoder", 3, 0, {"model__decoder_padding": "replicate"}),
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


@pytest.mark.parametrize("dims", [2, 3])
def test_replicate_padded_kl_decoder_has_no_bright_border(dims: int) -> None:
    """A constant latent decodes to a constant image once every decoder convolution pads with edge
    pixels: zero padding made the border (a bright corner pixel on every demo sample) differ, mostly
    through the last 3x3 convolution. The pads hold no weights: the state-dict keys stay the same."""
    from fedsynth.models.autoencoder import AutoencoderModel

    zeros = _model("autoencoder", dims, 0, {})
    padded = _model("autoencoder", dims, 0, {"model__decoder_padding": "replicate"})
    assert isinstance(zeros, AutoencoderModel) and isinstance(padded, AutoencoderModel)
    assert padded.get_weights().keys() == zeros.get_weights().keys()
    padded.set_weights(zeros.get_weights(), strict=True)  # either's weights load into the other
    latent = torch.full((1, *zeros.latent_shape()), 0.7)
    with torch.no_grad():
        old, new = zeros.codec().decode(latent)[0, 0], padded.codec().decode(latent)[0, 0]
    centre = tuple(s // 2 for s in old.shape)
    corners = [tuple(c) for c in np.ndindex(*(2,) * dims)]
    corner_values = [float(old[tuple(0 if c == 0 else -1 for c in corner)]) for corner in corners]
    assert max(abs(v - float(old[centre])) for v in corner_values) > 1e-3  # zero padding: corners differ
    torch.testing.assert_close(new, torch.full_like(new, float(new[centre])), atol=1e-5, rtol=0)
    pads = [m for m in padded.codec().decoder.modules() if isinstance(m, (torch.nn.ReplicationPad2d, torch.nn.ReplicationPad3d))]
    convs = [m for m in padded.codec().decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert len(pads) == sum(m.kernel_size[0] > 1 for m in convs) and all(not any(m.padding) for m in convs)
    assert not any(isinstance(m, torch.nn.ReplicationPad2d) for m in padded.codec().encoder.modules())


def test_decoder_padding_defaults_keep_old_checkpoints_and_recipes_fix_new_configs(tmp_path) -> None:
    """A checkpoint written before ``decoder_padding`` existed loads and resumes as zero padding (what
    it was trained with); configs from the recipe (init-config, the demo) pad with edge pixels."""
    from fedsynth.checkpoint import TrainingState, config_changes, load_checkpoint, save_checkpoint
    from fedsynth.config import default_config
    from fedsynth.errors import CheckpointError, ConfigError
    from fedsynth.models import model_from_checkpoint

    assert default_config("autoencoder", 2, 32).model.decoder_padding == "replicate"
    latent = default_config("diffusion", 2, 32, latent=True).model
    assert latent.first_stage.decoder_padding == "replicate"
    config = tiny_config("autoencoder")
    assert config.model.decoder_padding == "zeros"
    model = _model("autoencoder", 2, 0, {})
    path = save_checkpoint(tmp_path / "old.ckpt", model, TrainingState())
    payload = load_checkpoint(path)
    del payload["config"]["model"]["decoder_padding"]  # as written before the field existed
    torch.save(payload, path)
    old = model_from_checkpoint(path)
    assert old.config.model.decoder_padding == "zeros"
    assert not any(isinstance(m, torch.nn.ReplicationPad2d) for m in old.codec().modules())
    assert config_changes(payload["config"], config, str(path)) == []  # resumes with its config
    fixed = tiny_config("autoencoder", model={**config.model.model_dump(), "decoder_padding": "replicate"})
    with pytest.raises(CheckpointError, match=r"model\.decoder_padding: 'zeros' -> 'replicate'"):
        config_changes(payload["config"], fixed, str(path))
    with pytest.raises(ConfigError, match="decoder_padding"):
        tiny_config("autoencoder", model={"family": "autoencoder", "architecture": "vqvae", "decoder_padding": "replicate"})


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
