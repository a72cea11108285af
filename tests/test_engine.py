"""Engine: checkpoints (atomic, self-describing), exact resume, training every family on real MRI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from fedsynth.checkpoint import checkpoint_info, load_checkpoint
from fedsynth.cli import main
from fedsynth.config import render_yaml
from fedsynth.data import load_datasets, read_manifest
from fedsynth.engine import Engine, build_engine
from fedsynth.errors import CheckpointError
from fedsynth.generation import sample
from fedsynth.local import TrainRequest, run_training
from fedsynth.models import model_from_checkpoint


def _write_config(tmp_path: Path, cfg) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(render_yaml(cfg), encoding="utf-8")
    return path


def test_checkpoint_write_is_atomic(tmp_path: Path) -> None:
    engine = build_engine(tiny_config("gan"), None)
    path = engine.save(tmp_path / "last.ckpt")
    before = path.read_bytes()

    class Boom(RuntimeError):
        pass

    def exploding_save(*args: object, **kwargs: object) -> None:
        raise Boom("disk full")

    original = torch.save
    torch.save = exploding_save  # type: ignore[assignment]
    try:
        with pytest.raises(Boom):
            engine.save(path)
    finally:
        torch.save = original  # type: ignore[assignment]
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        model_from_checkpoint(tmp_path / "none.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt or not a fedsynth checkpoint"):
        model_from_checkpoint(bad)
    good = build_engine(tiny_config("gan"), None).save(tmp_path / "good.ckpt")
    truncated = tmp_path / "trunc.ckpt"
    truncated.write_bytes(good.read_bytes()[: 2000])
    with pytest.raises(CheckpointError, match="corrupt"):
        model_from_checkpoint(truncated)
    torch.save({"weights": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="not a fedsynth checkpoint"):
        model_from_checkpoint(tmp_path / "foreign.ckpt")


def test_generate_without_checkpoint_never_uses_random_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run").mkdir()
    assert main(["generate", "--run", str(tmp_path / "run"), "-n", "2", "-o", str(tmp_path / "out")]) == 2
    assert "no checkpoint in run folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _train(cfg, csv: Path, run: Path, epochs: int, resume: bool = False) -> Engine:
    train, val = load_datasets(cfg, str(csv))
    engine = build_engine(cfg, run)
    if resume:
        engine.resume(run / "last.ckpt")
    engine.fit(train, val, epochs=epochs)
    return engine


@pytest.mark.slow  # trains beyond a step or spawns processes
@pytest.mark.parametrize("family", ["gan", "diffusion"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path: Path, mri2d: dict[str, Path], family: str) -> None:
    cfg = tiny_config(family, data__augmentations=[{"name": "flip", "prob": 0.5, "spatial_axis": 1}])
    full = _train(cfg, mri2d["mni152"], tmp_path / "full", epochs=3)
    _train(cfg, mri2d["mni152"], tmp_path / "part", epochs=1)
    resumed = _train(cfg, mri2d["mni152"], tmp_path / "part", epochs=3, resume=True)
    assert resumed.state.epoch == full.state.epoch == 3 and resumed.state.step == full.state.step
    a, b = full.model.get_weights(), resumed.model.get_weights()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert len((tmp_path / "part" / "metrics.csv").read_text(encoding="utf-8").splitlines()) == 4  # header + 3 epochs, no duplicates


TRAIN_CASES = [("gan", 2, 0), ("gan", 3, 0), ("autoencoder", 2, 0), ("autoencoder", 3, 0), ("diffusion", 2, 0), ("diffusion", 3, 0)]


@pytest.mark.slow  # trains beyond a step or spawns processes
@pytest.mark.parametrize(("family", "dims", "classes"), TRAIN_CASES)
def test_train_generate_every_family_on_real_mri(tmp_path: Path, mri2d: dict[str, Path], mri3d: dict[str, Path],
                                                 family: str, dims: int, classes: int) -> None:
    data = mri2d if dims == 2 else mri3d
    cfg = tiny_config(family, dims, classes, training__epochs=2, training__max_steps=3)
    val = str(data["colin27"]) if "colin27" in data else None
    engine = run_training(TrainRequest(str(_write_config(tmp_path, cfg)), str(data["mni152"]), str(tmp_path / "run"), val))
    assert engine.state.step == 3 and (tmp_path / "run" / "last.ckpt").is_file()
    info = checkpoint_info(tmp_path / "run" / "last.ckpt")
    assert info["family"] == family and info["spatial_dims"] == dims and info["step"] == 3
    model = model_from_checkpoint(tmp_path / "run" / "last.ckpt")
    images = sample(model, 2, seed=0, steps=3)
    assert images.shape[0] == 2 and torch.isfinite(images).all()


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_cli_train_resume_generate_info(tmp_path: Path, mri2d: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write_config(tmp_path, tiny_config("gan", 2, 2, training__sample_every=1))
    run = tmp_path / "run"
    args = ["train", "-c", str(cfg), "--data", str(mri2d["all"]), "-o", str(run), "--epochs", "1"]
    assert main(args) == 0
    assert main(args[:-1] + ["2", "--resume"]) == 0
    assert (run / "samples" / "epoch_0002.png").is_file() and (run / "metrics.csv").is_file()
    capsys.readouterr()
    assert main(["info", str(run / "last.ckpt")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["epoch"] == 2 and info["groups"] == ["generator", "discriminator"] and info["fedsynth_version"]
    out = tmp_path / "gen"
    assert main(["generate", "--run", str(run), "-n", "4", "-o", str(out), "--label", "1"]) == 0
    assert len(list(out.glob("synthetic_*.png"))) == 4 and (out / "grid.png").is_file()
    assert {r.label for r in read_manifest(out / "manifest.csv", num_classes=2)} == {1}
    assert main(["generate", "--run", str(run), "-n", "1", "-o", str(out), "--label", "9"]) == 2


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_conditional_diffusion_with_guidance_and_ddpm(tmp_path: Path, mri2d: dict[str, Path]) -> None:
    cfg = tiny_config("diffusion", 2, 2, training__epochs=1, training__max_steps=2)
    engine = run_training(TrainRequest(str(_write_config(tmp_path, cfg)), str(mri2d["all"]), str(tmp_path / "run")))
    model = engine.model
    ddim = sample(model, 2, seed=1, labels=torch.tensor([0, 1]), sampler="ddim", steps=4, guidance_scale=3.0)
    ddpm = sample(model, 2, seed=1, labels=torch.tensor([1]), sampler="ddpm", steps=5, guidance_scale=1.0)
    assert ddim.shape == ddpm.shape == (2, 1, 32, 32)


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_latent_diffusion_on_trained_autoencoder_run(tmp_path: Path, mri2d: dict[str, Path]) -> None:
    ae_cfg = tiny_config("autoencoder", training__epochs=1, training__max_steps=2)
    run_training(TrainRequest(str(_write_config(tmp_path, ae_cfg)), str(mri2d["mni152"]), str(tmp_path / "ae")))
    ldm = tiny_config("diffusion", training__epochs=1, training__max_steps=2,
                      model__autoencoder_checkpoint=str(tmp_path / "ae" / "last.ckpt"), model__channels=[16, 16])
    (tmp_path / "ldm").mkdir()
    engine = run_training(TrainRequest(str(_write_config(tmp_path / "ldm", ldm)), str(mri2d["mni152"]), str(tmp_path / "ldm" / "run")))
    assert engine.model.groups() == ["unet", "autoencoder"] and float(engine.model.nets["autoencoder"].scale) > 0
    (tmp_path / "ae" / "last.ckpt").unlink()  # the diffusion checkpoint must be self-contained
    model = model_from_checkpoint(tmp_path / "ldm" / "run" / "last.ckpt")
    assert checkpoint_info(tmp_path / "ldm" / "run" / "last.ckpt")["latent_diffusion"]
    assert sample(model, 2, seed=0, steps=3).shape == (2, 1, 32, 32)


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_ddp_two_cpu_processes(tmp_path: Path, mri2d: dict[str, Path]) -> None:
    cfg = _write_config(tmp_path, tiny_config("gan", training__epochs=1))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fedsynth.cli", "train", "-c", str(cfg), "--data", str(mri2d["mni152"]),
                           "-o", str(run), "--devices", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = load_checkpoint(run / "last.ckpt")
    n = len(read_manifest(mri2d["mni152"]))
    assert payload["step"] == -(-n // 2 // 8)  # each rank sees half the data: ceil(n/2/batch) steps
    # only rank 0 wrote: one metrics row
    assert len((run / "metrics.csv").read_text(encoding="utf-8").splitlines()) == 2


def _ddp_rank(rank: int, request: TrainRequest, port: int, out: str) -> None:
    """One rank of a 2-process gloo job through the local driver; records its weights and writes."""
    import torch.distributed as torch_dist

    import fedsynth.io as fio
    from fedsynth.engine import Distributed

    written: list[str] = []
    plain = fio.atomic_path

    def recording(target, **kwargs):  # every file fedsynth writes goes through atomic_path
        written.append(str(target))
        return plain(target, **kwargs)

    fio.atomic_path = recording
    import fedsynth.checkpoint as fck

    fck.atomic_path = recording  # imported by name there and in the engine; elsewhere looked up in fedsynth.io
    import fedsynth.engine as feng

    feng.atomic_path = recording
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        engine = run_training(request, Distributed(rank, 2))
        weights = {k.replace("/", "|"): v for k, v in engine.model.get_weights().items()}
        np.savez(Path(out) / f"rank{rank}.npz", **weights)
        (Path(out) / f"rank{rank}.writes").write_text("\n".join(written), encoding="utf-8")
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_ddp_ranks_end_identical_and_only_rank0_writes(tmp_path: Path, mri2d: dict[str, Path]) -> None:
    from fedsynth.processes import free_port

    cfg = _write_config(tmp_path, tiny_config("gan", training__epochs=2, training__sample_every=1))
    run = tmp_path / "run"
    request = TrainRequest(str(cfg), str(mri2d["mni152"]), str(run))
    torch.multiprocessing.start_processes(_ddp_rank, args=(request, free_port(), str(tmp_path)), nprocs=2,
                                          start_method="spawn")
    a, b = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    assert sorted(a.files) == sorted(b.files) and a.files
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"ranks differ in {key}")
    first = dict(np.load(tmp_path / "rank0.npz"))
    start = build_engine(tiny_config("gan"), None).model.get_weights()
    assert any(not np.array_equal(first[k.replace("/", "|")], v) for k, v in start.items()), "no training happened"
    assert (tmp_path / "rank1.writes").read_text(encoding="utf-8") == "", "rank 1 wrote files"
    rank0 = (tmp_path / "rank0.writes").read_text(encoding="utf-8").splitlines()
    assert str(run / "last.ckpt") in rank0 and str(run / "metrics.csv") in rank0


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_ddp_resume_mid_epoch_equals_uninterrupted(tmp_path: Path, mri2d: dict[str, Path]) -> None:
    """2 DDP ranks stopped inside an epoch (max_steps) and resumed with 2 ranks end with the same
    weights as an uninterrupted 2-rank run: the checkpoint holds the position in the sharded epoch."""
    n = len(read_manifest(mri2d["mni152"]))
    per_epoch = -(-n // 2 // 4)
    assert per_epoch >= 3
    stop = per_epoch + per_epoch // 2  # inside the second epoch

    def cli(run: Path, cfg: Path, *extra: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "fedsynth.cli", "train", "-c", str(cfg), "--data",
                               str(mri2d["mni152"]), "-o", str(run), "--devices", "2", *extra],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    (tmp_path / "full").mkdir()
    (tmp_path / "part").mkdir()
    full = _write_config(tmp_path / "full", tiny_config("gan", training__epochs=2, training__batch_size=4))
    part = _write_config(tmp_path / "part", tiny_config("gan", training__epochs=2, training__batch_size=4,
                                                       training__max_steps=stop))
    cli(tmp_path / "straight", full)
    cli(tmp_path / "run", part)
    saved = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert saved["step"] == stop and saved["epoch"] == 1 and saved["batch_in_epoch"] == stop - per_epoch
    cli(tmp_path / "run", full, "--resume")
    a = model_from_checkpoint(tmp_path / "straight" / "last.ckpt").get_weights()
    b = model_from_checkpoint(tmp_path / "run" / "last.ckpt").get_weights()
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert load_checkpoint(tmp_path / "run" / "last.ckpt")["step"] == 2 * per_epoch
