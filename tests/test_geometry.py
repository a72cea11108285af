"""Geometry is validated at config time: ``init-config`` never writes a config that cannot train.

The sweep covers every family x 2D/3D x image sizes 8..128 x image channels: each config is either
refused with a ConfigError naming ``image_size`` (and nearest valid sizes), or its model builds;
a sample of the valid ones trains one step, validates and generates.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from fedsynth.cli import main
from fedsynth.config import config_from_dict, default_config
from fedsynth.errors import ConfigError
from fedsynth.families import family_names
from fedsynth.models import build_model
from fedsynth.models.base import Batch

FAMILIES = family_names()


def _config_or_error(family: str, dims: int, size: int, channels: int, classes: int = 0):
    try:
        return default_config(family, dims, size, channels, classes), None
    except ConfigError as err:
        return None, str(err)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dims", [2, 3])
def test_sweep_every_size_is_valid_or_refused_at_config_time(family: str, dims: int) -> None:
    refused = 0
    for size, channels in itertools.product(range(8, 129), (1, 3)):
        config, error = _config_or_error(family, dims, size, channels)
        if error is not None:
            assert "field 'image_size'" in error and str(size) in error and "nearest valid: " in error, error
            refused += 1
            continue
        if channels == 1 and (dims == 2 or size <= 64):  # building is cheap: every valid size up to 64^3
            build_model(config)
    assert 0 < refused < 2 * 121


TRAIN_SAMPLE = [(f, d, s, c, k) for f in FAMILIES for d, sizes in ((2, (8, 10, 14, 24)), (3, (8, 12)))
                for s in sizes for c, k in ((1, 0), (3, 0 if f == "autoencoder" else 2))]


@pytest.mark.slow  # trains beyond a step or spawns processes
@pytest.mark.parametrize(("family", "dims", "size", "channels", "classes"), TRAIN_SAMPLE)
def test_valid_configs_train_one_step(family: str, dims: int, size: int, channels: int, classes: int) -> None:
    config, error = _config_or_error(family, dims, size, channels, classes)
    if error is not None:
        pytest.skip(f"refused at config time: {error}")
    torch.manual_seed(0)
    model = build_model(config)
    optimizers = model.configure_optimizers(config.training)
    images = torch.rand(2, channels, *[size] * dims)
    labels = torch.tensor([0, 1]) if classes else None
    out = model.training_step(Batch(images, labels), optimizers)
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
    model.eval()
    assert "loss" in model.validation_step(Batch(images, labels))
    generated = model.generate(1, generator=torch.Generator().manual_seed(0), labels=labels[:1] if classes else None,
                               steps=2)
    assert generated.shape == (1, channels, *[size] * dims)


@pytest.mark.parametrize(("model", "size", "field", "nearest"), [
    ({"family": "gan", "discriminator_channels": 12}, 32, "model.discriminator_channels", "8, 16"),
    ({"family": "gan"}, 36, "image_size", "32, 40"),
    ({"family": "gan"}, [32, 36], "image_size", "32, 40"),
    ({"family": "diffusion"}, 33, "image_size", "32, 34"),
    ({"family": "diffusion", "channels": [32, 64, 64]}, 34, "image_size", "32, 36"),
    ({"family": "diffusion", "channels": [12, 24]}, 32, "model.norm_num_groups", "6, 12"),
    ({"family": "diffusion", "channels": [32, 48], "num_head_channels": 32}, 32, "model.num_head_channels", "24, 48"),
    ({"family": "autoencoder", "norm_num_groups": 7}, 32, "model.norm_num_groups", "4, 8"),
    ({"family": "autoencoder", "architecture": "vqvae", "channels": [8, 16, 32]}, 36, "image_size", "32, 40"),
    ({"family": "autoencoder", "adversarial_weight": 0.1, "discriminator_channels": 12}, 32,
     "model.discriminator_channels", "8, 16"),
    ({"family": "autoencoder", "adversarial_weight": 0.1, "discriminator_layers": 3}, 16,
     "model.discriminator_layers", "nearest valid: 2"),
])
def test_geometry_error_names_field_value_and_nearest(model: dict, size: int | list[int], field: str, nearest: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"image_size": size, "model": model}, "exp.yaml")
    message = str(err.value)
    assert "exp.yaml" in message and f"field '{field}'" in message and nearest in message, message


@pytest.mark.parametrize("model", [
    {"family": "gan", "discriminator_channels": 12, "discriminator_norm": "batch"},
    {"family": "gan", "discriminator_channels": 12, "discriminator_norm": "none"},
    {"family": "autoencoder", "architecture": "vqvae", "norm_num_groups": 7},  # VQVAE has no GroupNorm option
    {"family": "autoencoder", "channels": [12, 24], "norm_num_groups": 6},
    {"family": "autoencoder", "architecture": "vqvae", "channels": [8, 16, 32]},  # 16 = 2^3 x 2
    {"family": "autoencoder", "adversarial_weight": 0.1, "discriminator_channels": 4},
    {"family": "diffusion", "channels": [24, 48], "norm_num_groups": 12, "num_head_channels": 24},
])
def test_near_misses_are_valid_and_build(model: dict) -> None:
    config = config_from_dict({"image_size": 16, "model": model})
    built = build_model(config)
    images = torch.rand(2, 1, 16, 16)
    built.training_step(Batch(images, None), built.configure_optimizers(config.training))


def test_autoencoder_with_classes_is_refused() -> None:
    with pytest.raises(ConfigError, match="field 'num_classes': 2 .*unconditional"):
        default_config("autoencoder", 2, 32, num_classes=2)


def test_model_build_errors_become_config_errors() -> None:
    """A rule geometry.py does not know still reaches the user as a ConfigError, not a traceback."""
    config = default_config("gan", 2, 32)
    config.model.__dict__["discriminator_channels"] = 12  # bypass the validator, as a stale object could
    with pytest.raises(ConfigError, match="cannot build the gan model"):
        build_model(config)


@pytest.mark.slow  # trains beyond a step or spawns processes
@pytest.mark.parametrize(("family", "dims", "size"), [("gan", 2, 12), ("diffusion", 3, 8), ("autoencoder", 2, 20)])
def test_init_config_writes_configs_that_train(family: str, dims: int, size: int, tmp_path: Path) -> None:
    """The whole path: init-config, then ``fedsynth train`` for one step on images of that size."""
    import numpy as np
    import yaml

    from fedsynth.data import save_image, write_manifest

    cfg = tmp_path / "cfg.yaml"
    assert main(["init-config", "--family", family, "--spatial-dims", str(dims), "--image-size", str(size),
                 "-o", str(cfg)]) == 0
    data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    data["training"].update(max_steps=1, epochs=1, batch_size=2, progress=False, tensorboard=False, num_sample_images=1)
    cfg.write_text(yaml.safe_dump(data), encoding="utf-8")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2):
        save_image(rng.random((1, *[size] * dims), dtype=np.float32), tmp_path / f"i{i}.nii.gz")
        rows.append((f"s{i}", [tmp_path / f"i{i}.nii.gz"], None))
    write_manifest(tmp_path / "d.csv", rows)
    assert main(["train", "-c", str(cfg), "--data", str(tmp_path / "d.csv"), "-o", str(tmp_path / "run")]) == 0
