"""Exact resume from any step: interrupted + resumed == uninterrupted, bit for bit.

Every family, 2D and 3D, stopped at an epoch boundary and in the middle of an epoch, with
augmentation (its random state is in the checkpoint), validation (which must not shift the
training RNG) and differential privacy (Poisson sampling draws from the RNG). Tiny 8-pixel
images keep each case to seconds.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedsynth.checkpoint import load_checkpoint
from fedsynth.config import config_from_dict
from fedsynth.data import load_datasets, save_image, write_manifest
from fedsynth.engine import LAST, build_engine
from fedsynth.families import family as family_spec
from fedsynth.families import family_names

SIZE = 8
ROWS = 12  # batch 4 -> 3 batches per epoch (DP: 3 Poisson steps per epoch)


def _config(family: str, dims: int, **training: object) -> dict:
    model: dict[str, object] = {"family": family, **family_spec(family).test_model}
    return {"spatial_dims": dims, "image_size": SIZE, "seed": 3, "model": model,
            "data": {"val_fraction": 0.25, "augmentations": [{"name": "flip", "prob": 0.5, "spatial_axis": dims - 1},
                                                             {"name": "gaussian_noise", "prob": 0.5, "std": 0.05}]},
            "training": {"epochs": 2, "batch_size": 4, "progress": False, "tensorboard": False, "sample_every": 1,
                         "num_sample_images": 2, **training}}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    out: dict[int, Path] = {}
    rng = np.random.default_rng(0)
    for dims in (2, 3):
        root = tmp_path_factory.mktemp(f"resume{dims}d")
        rows = []
        for i in range(ROWS + 4):  # 4 more for the validation split (subjects s0..s15)
            path = root / f"img{i}.nii.gz"
            save_image(rng.random((1, *[SIZE] * dims), dtype=np.float32), path)
            rows.append((f"s{i}", [path], None))
        write_manifest(root / "data.csv", rows)
        out[dims] = root / "data.csv"
    return out


def _train(cfg: dict, csv: Path, run: Path, *, max_steps: int | None = None, resume: bool = False):
    config = config_from_dict(cfg)
    train, val = load_datasets(config, str(csv))
    engine = build_engine(config, run)
    if resume:
        engine.resume(run / LAST)
    engine.fit(train, val, max_steps=max_steps)
    return engine


def _assert_same(a, b) -> None:
    wa, wb = a.model.get_weights(), b.model.get_weights()
    assert wa.keys() == wb.keys()
    for key in wa:
        np.testing.assert_array_equal(wa[key], wb[key], err_msg=key)
    assert a.state.step == b.state.step and a.state.epoch == b.state.epoch
    if a.privacy is not None:
        assert a.privacy.ledger.history == b.privacy.ledger.history


CASES = [(family, dims, stop) for family in family_names() for dims in (2, 3) for stop in (3, 4)]


@pytest.mark.slow  # trains beyond a step or spawns processes
@pytest.mark.parametrize(("family", "dims", "stop"), CASES,
                         ids=[f"{f}-{d}d-{'boundary' if s == 3 else 'mid_epoch'}" for f, d, s in CASES])
def test_interrupted_and_resumed_equals_uninterrupted(family: str, dims: int, stop: int, data: dict[int, Path],
                                                      tmp_path: Path) -> None:
    """Stopping after step 3 is an epoch boundary (3 batches per epoch), after step 4 mid-epoch."""
    cfg = _config(family, dims)
    straight = _train(cfg, data[dims], tmp_path / "straight")
    _train(cfg, data[dims], tmp_path / "part", max_steps=stop)
    saved = load_checkpoint(tmp_path / "part" / LAST)
    assert saved["step"] == stop and saved["batch_in_epoch"] == stop % 3 and saved["epoch"] == stop // 3
    resumed = _train(cfg, data[dims], tmp_path / "part", resume=True)
    _assert_same(straight, resumed)
    assert (tmp_path / "part" / "metrics.csv").read_text(encoding="utf-8").count("\n") == 3  # header + 2 epochs


@pytest.mark.parametrize("stop", [3, 4, 5], ids=["boundary", "mid_epoch", "late_mid_epoch"])
def test_resume_with_dp_is_exact(stop: int, data: dict[int, Path], tmp_path: Path) -> None:
    pytest.importorskip("opacus")
    cfg = _config("gan", 2)
    cfg["privacy"] = {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0}
    straight = _train(cfg, data[2], tmp_path / "straight")
    _train(cfg, data[2], tmp_path / "part", max_steps=stop)
    resumed = _train(cfg, data[2], tmp_path / "part", resume=True)
    _assert_same(straight, resumed)


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_checkpoint_every_steps_writes_mid_epoch_and_resumes_exactly(data: dict[int, Path], tmp_path: Path) -> None:
    cfg = _config("autoencoder", 2, checkpoint_every_steps=1)
    config = config_from_dict(cfg)
    train, val = load_datasets(config, str(data[2]))
    straight = build_engine(config, tmp_path / "straight")
    plain_save = straight.save

    def save_and_keep(path, extra=None, **kwargs):  # keep a copy of every checkpoint the run writes
        out = plain_save(path, extra, **kwargs)
        shutil.copy(out, tmp_path / f"step{straight.state.step}.ckpt")
        return out

    straight.save = save_and_keep  # type: ignore[method-assign]
    straight.fit(train, val)
    kept = sorted(int(p.stem[4:]) for p in tmp_path.glob("step*.ckpt"))
    assert kept == [1, 2, 3, 4, 5, 6]
    four = load_checkpoint(tmp_path / "step4.ckpt")
    assert (four["step"], four["epoch"], four["batch_in_epoch"]) == (4, 1, 1)
    (tmp_path / "again").mkdir()
    shutil.copy(tmp_path / "step4.ckpt", tmp_path / "again" / LAST)
    resumed = _train(cfg, data[2], tmp_path / "again", resume=True)
    _assert_same(straight, resumed)


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_sigkill_leaves_a_loadable_checkpoint_and_resume_is_exact(data: dict[int, Path], tmp_path: Path) -> None:
    """``fedsynth train`` killed with SIGKILL as soon as its first mid-epoch checkpoint exists."""
    cfg = _config("gan", 2, checkpoint_every_steps=1)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "fedsynth", "train", "-c", str(path), "--data", str(data[2]), "-o", str(run)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (run / LAST).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    payload = load_checkpoint(run / LAST)  # loadable, whatever moment the kill hit
    assert payload["step"] >= 1
    resume = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stderr[-2000:]
    assert not list(run.glob(".*.tmp"))
    straight = _train(cfg, data[2], tmp_path / "straight")
    final = load_checkpoint(run / LAST)
    assert final["step"] == straight.state.step
    for key, value in straight.model.get_weights().items():
        np.testing.assert_array_equal(final["weights"][key].numpy(), value, err_msg=key)
