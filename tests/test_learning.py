"""Models learn: a short GAN and a short diffusion run on real brain slices improve the held-out FRD
over the same model untrained by a clear margin (a ratio, not a time)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def brains32(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from fedsynth.data.brains import build_brain_dataset

    return build_brain_dataset(tmp_path_factory.mktemp("brains32"), image_size=32, volumes=["mni152"], volume_sizes=())


def _frd(real: np.ndarray, synthetic: np.ndarray) -> float:
    from fedsynth.metrics import radiomics as rad

    _, real_f, _ = rad.extract(real, 32, False)
    _, syn_f, _ = rad.extract(synthetic, 32, False)
    return rad.frd(real_f, syn_f)[0]


def _train_and_score(family: str, brains32: dict[str, Path], tmp: Path, steps: int, **model: object) -> tuple[float, float]:
    from fedsynth.config import default_config
    from fedsynth.data import load_datasets
    from fedsynth.engine import build_engine
    from fedsynth.generation import sample
    from fedsynth.metrics import load_real

    config = default_config(family, 2, 32)
    config.model = config.model.model_validate({**config.model.model_dump(), **model})
    config.training.max_steps, config.training.epochs = steps, 10**6
    config.training.progress, config.training.tensorboard = False, False
    held_out = load_real(brains32["held_out"], config).images
    engine = build_engine(config, None)
    untrained = sample(engine.model, 64, seed=1).numpy()
    train, _ = load_datasets(config, str(brains32["train"]))
    engine.fit(train)
    assert engine.state.step == steps and engine.ema is not None
    with engine.ema.applied(engine.model):
        trained = sample(engine.model, 64, seed=1).numpy()
    return _frd(held_out, untrained), _frd(held_out, trained)


def test_gan_recipe_learns_brain_slices(brains32: dict[str, Path], tmp_path: Path) -> None:
    torch.manual_seed(0)
    before, after = _train_and_score("gan", brains32, tmp_path, 300)
    assert after < 0.5 * before, f"held-out FRD untrained {before:.1f} -> trained {after:.1f}"


def test_diffusion_recipe_learns_brain_slices(brains32: dict[str, Path], tmp_path: Path) -> None:
    torch.manual_seed(0)
    before, after = _train_and_score("diffusion", brains32, tmp_path, 400, channels=[16, 32], sampling_steps=20,
                                     num_head_channels=16)
    assert after < 0.5 * before, f"held-out FRD untrained {before:.1f} -> trained {after:.1f}"


def test_held_out_slices_never_neighbour_training_slices(brains32: dict[str, Path]) -> None:
    import csv

    from fedsynth.data.brains import split_of
    from fedsynth.data.manifest import read_manifest

    rows = list(csv.DictReader(brains32["slices"].open(encoding="utf-8")))
    assert {r["plane"] for r in rows} == {"axial", "coronal", "sagittal"}
    for plane in ("axial", "coronal", "sagittal"):
        train = np.array([float(r["position_mm"]) for r in rows if r["plane"] == plane and r["split"] == "train"])
        held = np.array([float(r["position_mm"]) for r in rows if r["plane"] == plane and r["split"] == "held_out"])
        assert len(train) and len(held)
        assert np.abs(held[:, None] - train[None, :]).min() >= 4.0 - 1e-6
    assert split_of(13.9) == "train" and split_of(15.0) is None and split_of(17.0) == "held_out" and split_of(22.0) is None
    n_train, n_held = len(read_manifest(brains32["train"])), len(read_manifest(brains32["held_out"]))
    assert n_train == sum(r["split"] == "train" for r in rows) and n_held == sum(r["split"] == "held_out" for r in rows)
