"""Table-driven bad inputs: every one is refused by the CLI with exit status 2, no traceback, a
message naming the file/row/field/value, and nothing half-written.

Each case builds its inputs in a fresh folder from small 16x16 images (no training happens: every
error is found before the first step), runs ``fedsynth`` in-process (an uncaught exception fails
the test, so "no traceback" is checked for every case; a few cases also run as subprocesses).
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from schema_cases import schema_cases

from fedsynth.cli import main
from fedsynth.data.images import save_image

SIZE = 16


def tiny_gan(**training: object) -> dict:
    return {"spatial_dims": 2, "image_size": SIZE, "seed": 0,
            "model": {"family": "gan", "latent_dim": 8, "generator_channels": 16, "discriminator_channels": 8},
            "training": {"epochs": 1, "batch_size": 4, "progress": False, "tensorboard": False, "sample_every": 100,
                         "num_sample_images": 2, **training}}


def _nifti(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4)), str(path))
    return path


class Workspace:
    """A folder with 8 good images, ``data.csv`` listing them and ``cfg.yaml`` (tiny GAN)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        rng = np.random.default_rng(0)
        self.images = []
        for i in range(8):
            path = root / f"img{i}.nii.gz"
            save_image(rng.random((1, SIZE, SIZE), dtype=np.float32), path)
            self.images.append(path)
        self.rows = [(f"s{i}", p.name) for i, p in enumerate(self.images)]
        self.csv = self.write_csv(self.rows)
        self.cfg = self.write_cfg(tiny_gan())
        self.run = root / "run"
        self.holders: list[subprocess.Popen[str]] = []

    def write_csv(self, rows: list[tuple[str, str]], name: str = "data.csv", encoding: str = "utf-8") -> Path:
        path = self.root / name
        path.write_bytes(("SubjectID,Channel_0\n" + "".join(f"{s},{f}\n" for s, f in rows)).encode(encoding))
        return path

    def write_cfg(self, data: dict | str, name: str = "cfg.yaml") -> Path:
        path = self.root / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
        return path

    def replace_image(self, index: int, path: Path) -> None:
        self.rows[index] = (self.rows[index][0], path.name)
        self.write_csv(self.rows)

    def train(self, *extra: str, cfg: Path | None = None, data: Path | None = None, out: Path | None = None) -> list[str]:
        return ["train", "-c", str(cfg or self.cfg), "--data", str(data or self.csv), "-o", str(out or self.run), *extra]

    def checkpoint(self, spatial_dims: int = 2, family: str = "gan") -> Path:
        from fedsynth.checkpoint import TrainingState, save_checkpoint
        from fedsynth.config import config_from_dict
        from fedsynth.models import build_model

        data = tiny_gan()
        data["spatial_dims"] = spatial_dims
        if family != "gan":
            data["model"] = {"family": family, "channels": [8, 16], "latent_channels": 2}
        model = build_model(config_from_dict(data))
        return save_checkpoint(self.root / f"{family}{spatial_dims}d.ckpt", model, TrainingState())


def _truncated_gz(ws: Workspace) -> list[str]:
    bad = ws.root / "cut.nii.gz"
    bad.write_bytes(ws.images[2].read_bytes()[:200])
    ws.replace_image(2, bad)
    return ws.train()


def _truncated_nii(ws: Workspace) -> list[str]:
    full = _nifti(ws.root / "full.nii", np.random.default_rng(1).random((SIZE, SIZE)))
    bad = ws.root / "half.nii"
    data = full.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    ws.replace_image(3, bad)
    return ws.train()


def _bad_values(value: float, every: bool = False) -> Callable[[Workspace], list[str]]:
    def make(ws: Workspace) -> list[str]:
        array = np.random.default_rng(2).random((SIZE, SIZE))
        if every:
            array[:] = value
        else:
            array[3, 4] = value
        ws.replace_image(1, _nifti(ws.root / "bad.nii.gz", array))
        return ws.train()

    return make


def _all_constant(ws: Workspace) -> list[str]:
    for i in range(len(ws.rows)):
        ws.replace_image(i, _nifti(ws.root / f"flat{i}.nii.gz", np.full((SIZE, SIZE), 7.0)))
    return ws.train()


def _not_an_image(ws: Workspace) -> list[str]:
    (ws.root / "notes.png").write_text("this is not a PNG", encoding="utf-8")
    ws.replace_image(0, ws.root / "notes.png")
    return ws.train()


def _slice_as_volume(ws: Workspace) -> list[str]:
    for i in range(len(ws.rows)):
        ws.replace_image(i, _nifti(ws.root / f"vol{i}.nii.gz", np.random.default_rng(i).random((SIZE, SIZE, 1))))
    data = tiny_gan()
    data["spatial_dims"] = 3
    data["training"]["batch_size"] = 2
    return ws.train(cfg=ws.write_cfg(data, "cfg3d.yaml"))


def _csv(rows: Callable[[Workspace], str], encoding: str = "utf-8") -> Callable[[Workspace], list[str]]:
    def make(ws: Workspace) -> list[str]:
        path = ws.root / "bad.csv"
        path.write_bytes(rows(ws).encode(encoding))
        return ws.train(data=path)

    return make


def _cfg(data: Callable[[], dict | str] | dict | str) -> Callable[[Workspace], list[str]]:
    def make(ws: Workspace) -> list[str]:
        content = data() if callable(data) else data
        return ws.train(cfg=ws.write_cfg(content, "bad.yaml"))

    return make


def _gan_model(**model: object) -> dict:
    data = tiny_gan()
    data["model"].update(model)
    return data


def _family(family: str, image_size: int = SIZE, **model: object) -> dict:
    data = tiny_gan()
    data["image_size"] = image_size
    data["model"] = {"family": family, **model}
    return data


def _resume_changed(**training: object) -> Callable[[Workspace], list[str]]:
    def make(ws: Workspace) -> list[str]:
        from fedsynth.checkpoint import TrainingState, save_checkpoint
        from fedsynth.config import config_from_dict
        from fedsynth.models import build_model

        ws.run.mkdir()
        save_checkpoint(ws.run / "last.ckpt", build_model(config_from_dict(tiny_gan())), TrainingState(epoch=1, step=2))
        return ws.train("--resume", cfg=ws.write_cfg(tiny_gan(**training), "changed.yaml"))

    return make


def _foreign_resume(ws: Workspace) -> list[str]:
    ws.run.mkdir()
    ws.checkpoint(family="autoencoder").rename(ws.run / "last.ckpt")
    return ws.train("--resume")


def _corrupt_checkpoint(ws: Workspace) -> list[str]:
    ckpt = ws.checkpoint()
    ckpt.write_bytes(ckpt.read_bytes()[:5000])
    return ["generate", "--checkpoint", str(ckpt), "-n", "2", "-o", str(ws.root / "gen")]


def _text_checkpoint(ws: Workspace) -> list[str]:
    (ws.root / "model.ckpt").write_text("not a checkpoint", encoding="utf-8")
    return ["generate", "--checkpoint", str(ws.root / "model.ckpt"), "-n", "2", "-o", str(ws.root / "gen")]


def _existing_run(ws: Workspace) -> list[str]:
    ws.run.mkdir()
    (ws.run / "metrics.csv").write_text("epoch,step\n1,2\n", encoding="utf-8")
    return ws.train()


def _generate(*extra: str, spatial_dims: int = 2) -> Callable[[Workspace], list[str]]:
    def make(ws: Workspace) -> list[str]:
        return ["generate", "--checkpoint", str(ws.checkpoint(spatial_dims)), "-o", str(ws.root / "gen"), *extra]

    return make


def _file_at(path_of: Callable[[Workspace], Path], argv: Callable[[Workspace, Path], list[str]]) -> Callable[[Workspace], list[str]]:
    def make(ws: Workspace) -> list[str]:
        target = path_of(ws)
        return argv(ws, target)

    return make


def _blocker(ws: Workspace) -> Path:
    path = ws.root / "blocker"
    path.write_text("a file", encoding="utf-8")
    return path


def _alias_row(make_alias: Callable[[Path, Path], None]) -> Callable[[Workspace], list[str]]:
    """A CSV whose last row is another name for the first row's image (symlink, hard link, ``..``)."""
    def make(ws: Workspace) -> list[str]:
        alias = ws.root / "sub" / "alias.nii.gz"
        alias.parent.mkdir()
        make_alias(ws.images[0], alias)
        rows = [*ws.rows, ("s99", str(alias if alias.exists() else ws.root / "sub" / ".." / ws.images[0].name))]
        return ws.train(data=ws.write_csv(rows, "alias.csv"))

    return make


def _complex_nifti(ws: Workspace) -> list[str]:
    array = np.random.default_rng(3).random((SIZE, SIZE)) * (1 + 1j)
    path = ws.root / "kspace.nii.gz"
    nib.save(nib.Nifti1Image(array.astype(np.complex64), np.eye(4)), str(path))
    ws.replace_image(4, path)
    return ws.train()


def _nan_checkpoint(ws: Workspace) -> list[str]:
    import torch

    ckpt = ws.checkpoint()
    payload = torch.load(ckpt, weights_only=True)
    key = next(k for k, v in payload["weights"].items() if v.is_floating_point())
    payload["weights"][key] = torch.full_like(payload["weights"][key], float("nan"))
    torch.save(payload, ckpt)
    return ["generate", "--checkpoint", str(ckpt), "-n", "2", "-o", str(ws.root / "gen")]


def _labelled(ws: Workspace, labels: list[int]) -> Path:
    path = ws.root / "labelled.csv"
    path.write_text("SubjectID,Channel_0,Label\n" + "".join(f"{s},{f},{labels[i % len(labels)]}\n"
                                                             for i, (s, f) in enumerate(ws.rows)), encoding="utf-8")
    return path


def _missing_class(ws: Workspace) -> list[str]:
    data = tiny_gan()
    data["num_classes"] = 3
    return ws.train(cfg=ws.write_cfg(data, "three.yaml"), data=_labelled(ws, [0, 1]))


def _version_type(ws: Workspace) -> list[str]:
    import torch

    ckpt = ws.checkpoint()
    payload = torch.load(ckpt, weights_only=True)
    payload["format_version"] = "one"
    torch.save(payload, ckpt)
    return ["info", str(ckpt)]


def _resume_other_data(ws: Workspace) -> list[str]:
    assert main(ws.train("--max-steps", "1")) == 0  # a real run, one step
    ws.replace_image(5, _nifti(ws.root / "other.nii.gz", np.random.default_rng(9).random((SIZE, SIZE))))
    return ws.train("--resume", "--max-steps", "2")


def _second_writer(ws: Workspace) -> list[str]:
    """A run folder locked by another live process."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom fedsynth.io import FolderLock\n"
                               f"FolderLock({str(ws.run)!r}, 'fedsynth train').acquire()\nprint('locked', flush=True)\n"
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    ws.holders.append(holder)
    return ws.train()


def _privacy(**privacy: object) -> dict:
    data = tiny_gan()
    data["privacy"] = {"enabled": True, "noise_multiplier": 1.0, **privacy}
    return data


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Workspace], list[str]]
    expected: tuple[str, ...]  # all must appear in the error message


CASES = [
    # ---- YAML
    Case("empty_yaml", _cfg("# only a comment\n"), ("bad.yaml", "empty")),
    Case("latin1_yaml", lambda ws: ws.train(cfg=_latin1(ws.root / "bad.yaml", "seed: 1 # caf\u00e9\n")), ("bad.yaml", "UTF-8")),
    Case("unknown_key", _cfg({"training": {"epocs": 2}}), ("bad.yaml", "training.epocs", "unknown key")),
    Case("gan_size_36", _cfg(_family("gan", 36)), ("image_size", "36", "nearest valid: 32, 40")),
    Case("gan_group_norm_12", _cfg(_gan_model(discriminator_channels=12)), ("model.discriminator_channels", "12", "8, 16")),
    Case("diffusion_size_33", _cfg(_family("diffusion", 33)), ("image_size", "33", "32, 34")),
    Case("diffusion_norm_groups", _cfg(_family("diffusion", channels=[12, 24])), ("model.norm_num_groups", "8", "must divide")),
    Case("autoencoder_norm_7", _cfg(_family("autoencoder", norm_num_groups=7)), ("model.norm_num_groups", "7", "nearest valid")),
    Case("patch_disc_layers", _cfg(_family("autoencoder", adversarial_weight=0.1, discriminator_layers=4)),
         ("model.discriminator_layers", "4", "nearest valid: 2")),
    Case("slice_as_3d", _slice_as_volume, ("row 1", "SubjectID 's0'", "spatial_dims: 3")),
    # ---- CSV
    Case("latin1_csv", _csv(lambda ws: "SubjectID,Channel_0\ns\u00e9,img0.nii.gz\n", "latin-1"), ("bad.csv", "UTF-8", "row 1")),
    Case("no_subject_column", _csv(lambda ws: "ID,Channel_0\na,img0.nii.gz\n"), ("bad.csv", "SubjectID")),
    Case("duplicate_row", _csv(lambda ws: "SubjectID,Channel_0\na,img0.nii.gz\nb,img1.nii.gz\na,img0.nii.gz\n"),
         ("bad.csv, row 3", "SubjectID 'a'", "repeats the file of row 1")),
    Case("file_under_two_subjects", _csv(lambda ws: "SubjectID,Channel_0\na,img0.nii.gz\nb,img0.nii.gz\n"),
         ("row 2", "another SubjectID", "img0.nii.gz")),
    Case("extra_field", _csv(lambda ws: "SubjectID,Channel_0\na,img0.nii.gz,oops\n"), ("bad.csv, row 1", "3 values")),
    Case("missing_file", _csv(lambda ws: "SubjectID,Channel_0\na,img0.nii.gz\nb,gone.nii.gz\n"),
         ("row 2", "SubjectID 'b'", "gone.nii.gz")),
    Case("header_only", _csv(lambda ws: "SubjectID,Channel_0\n"), ("bad.csv", "no data rows")),
    # ---- images
    Case("truncated_nii_gz", _truncated_gz, ("data.csv, row 3", "SubjectID 's2'", "cut.nii.gz")),
    Case("truncated_nii", _truncated_nii, ("row 4", "SubjectID 's3'", "half.nii", "truncated")),
    Case("nan_voxel", _bad_values(float("nan")), ("row 2", "SubjectID 's1'", "bad.nii.gz", "1 NaN")),
    Case("inf_voxel", _bad_values(float("inf")), ("row 2", "bad.nii.gz", "1 Inf")),
    Case("all_nan", _bad_values(float("nan"), every=True), ("row 2", "bad.nii.gz", f"{SIZE * SIZE} NaN")),
    Case("all_constant", _all_constant, ("data.csv", "every image is constant")),
    Case("not_an_image", _not_an_image, ("row 1", "SubjectID 's0'", "notes.png")),
    # ---- checkpoints
    Case("corrupt_checkpoint", _corrupt_checkpoint, ("gan2d.ckpt", "corrupt")),
    Case("text_checkpoint", _text_checkpoint, ("model.ckpt", "not a fedsynth checkpoint")),
    Case("foreign_family_resume", _foreign_resume, ("last.ckpt", "autoencoder checkpoint", "gan")),
    Case("resume_changed_batch", _resume_changed(batch_size=2), ("last.ckpt", "training.batch_size: 4 -> 2")),
    Case("resume_without_checkpoint", lambda ws: ws.train("--resume"), ("--resume", "last.ckpt")),
    Case("existing_run_folder", _existing_run, ("run", "already holds a run", "--resume", "--overwrite")),
    # ---- CLI values
    Case("devices_0", lambda ws: ws.train("--devices", "0"), ("--devices", "0")),
    Case("devices_minus_2", lambda ws: ws.train("--devices", "-2"), ("--devices", "-2")),
    Case("epochs_0", lambda ws: ws.train("--epochs", "0"), ("--epochs", "0")),
    Case("epochs_minus_1", lambda ws: ws.train("--epochs", "-1"), ("--epochs", "-1")),
    Case("generate_steps_0", _generate("--steps", "0"), ("--steps", "0")),
    Case("generate_n_0", _generate("-n", "0"), ("--num-images", "0")),
    Case("generate_png_from_3d", _generate("--format", "png", "-n", "1", spatial_dims=3), ("--format png", "3D")),
    Case("build_dataset_size_4", lambda ws: ["build-dataset", "-o", str(ws.root / "brains"), "--image-size", "4"],
         ("--image-size", "4")),
    Case("build_dataset_volume_0", lambda ws: ["build-dataset", "-o", str(ws.root / "brains"), "--volume-sizes", "0"],
         ("--volume-sizes", "0")),
    Case("demo_steps_0", lambda ws: ["demo", "-o", str(ws.root / "demo"), "--steps", "0"], ("--steps", "0")),
    Case("evaluate_bins_1", lambda ws: ["evaluate", "--real", str(ws.csv), "--synthetic", str(ws.root), "-o",
                                        str(ws.root / "r.json"), "--bin-count", "1"], ("--bin-count", "1")),
    Case("generate_prompt_unconditional", _generate("--prompt", "axial T1 slice"), ("prompt", "not text-conditional")),
    Case("init_config_untrainable", lambda ws: ["init-config", "--family", "gan", "--image-size", "36", "-o",
                                                str(ws.root / "new.yaml")], ("image_size", "36", "32, 40")),
    Case("init_config_exists", lambda ws: ["init-config", "--family", "gan", "--image-size", "32", "-o", str(ws.cfg)],
         ("cfg.yaml", "exists", "--overwrite")),
    # ---- unwritable outputs
    Case("train_o_is_file", lambda ws: ws.train(out=_blocker(ws)), ("blocker", "existing file")),
    Case("train_o_under_file", lambda ws: ws.train(out=_blocker(ws) / "run"), ("blocker", "is a file")),
    Case("generate_o_under_file", lambda ws: ["generate", "--checkpoint", str(ws.checkpoint()), "-o",
                                              str(_blocker(ws) / "gen")], ("blocker", "is a file")),
    Case("init_config_o_under_file", lambda ws: ["init-config", "--family", "gan", "--image-size", "32", "-o",
                                                 str(_blocker(ws) / "c.yaml")], ("blocker", "is a file")),
    Case("init_config_o_is_folder", lambda ws: ["init-config", "--family", "gan", "--image-size", "32", "-o",
                                                str(ws.root)], ("existing folder",)),
    # ---- silently accepted once
    Case("duplicate_yaml_key", _cfg("seed: 1\nimage_size: 16\nseed: 2\n"), ("bad.yaml", "key 'seed' appears twice", "lines 1 and 3")),
    Case("epochs_true", _cfg(tiny_gan(epochs=True)), ("training.epochs", "valid integer", "True")),
    Case("num_classes_1", _cfg({**tiny_gan(), "num_classes": 1}), ("num_classes", "two or more")),
    Case("symlink_duplicate", _alias_row(lambda target, alias: alias.symlink_to(target)),
         ("alias.csv, row 9", "the file of row 1", "img0.nii.gz")),
    Case("hardlink_duplicate", _alias_row(lambda target, alias: os.link(target, alias)),
         ("alias.csv, row 9", "same file on disk")),
    Case("dotdot_duplicate", _alias_row(lambda target, alias: None), ("alias.csv, row 9", "the file of row 1")),
    Case("complex_nifti", _complex_nifti, ("row 5", "kspace.nii.gz", "complex-valued")),
    Case("nan_checkpoint_generate", _nan_checkpoint, ("gan2d.ckpt", "NaN or Inf weights", "diverged")),
    Case("train_csv_as_val", lambda ws: ws.train("--val-data", str(ws.csv)), ("--val-data", "training CSV", "held-out")),
    Case("class_never_occurs", _missing_class, ("labelled.csv", "num_classes is 3", "Label 2")),
    Case("delta_half", _cfg(_privacy(delta=0.5)), ("privacy.delta", "1/N = 1/8")),
    Case("version_wrong_type", _version_type, ("gan2d.ckpt", "format_version", "'one'")),
    Case("resume_other_data", _resume_other_data, ("last.ckpt", "training data differ", "row 6")),
    Case("second_writer", _second_writer, ("run", "in use by PID", "fedsynth train")),
    # ---- tracebacks once (values that passed validation and failed in torch, MONAI or SimpleITK)
    Case("device_cuda_without_gpu", _cfg(tiny_gan(device="cuda")), ("device cuda", "no CUDA GPU")),
    Case("model_too_big", _cfg(_gan_model(generator_channels=60000)), ("parameters", "GiB", "narrower")),
    Case("images_too_big", _cfg({**tiny_gan(), "image_size": 65536}), ("data.csv", "GiB", "smaller image_size")),
    Case("betas_above_1", _cfg(tiny_gan(betas=[0.9, 1.5])), ("training.betas.1", "less than 1")),
    Case("negative_group_lr", _cfg(tiny_gan(group_learning_rates={"generator": -1e-3})),
         ("training.group_learning_rates.generator", "greater than 0")),
    Case("seed_beyond_31_bits", _cfg({**tiny_gan(), "seed": 2**70}), ("seed", "less than 2147483648")),
    Case("spacing_zero", _cfg({**tiny_gan(), "data": {"resample_spacing": [0, 1]}}), ("data.resample_spacing.0",)),
    Case("spacing_wrong_length", _cfg({**tiny_gan(), "data": {"resample_spacing": [1, 1, 1]}}),
         ("data.resample_spacing", "one spacing per spatial dimension")),
    Case("flip_axis_2_in_2d", _cfg({**tiny_gan(), "data": {"augmentations": [{"name": "flip", "spatial_axis": 2}]}}),
         ("data.augmentations.0.spatial_axis", "not an axis of a 2D image")),
    # ---- messages
    Case("info_on_a_folder", lambda ws: ["info", str(ws.root)], ("is a folder", "last.ckpt")),
    Case("config_is_a_folder", lambda ws: ws.train(cfg=ws.root), ("is a folder", "YAML")),
    Case("data_is_a_folder", lambda ws: ws.train(data=ws.root), ("is a folder", "construct-csv")),
    Case("evaluate_o_exists", lambda ws: ["evaluate", "--real", str(ws.csv), "--synthetic", str(ws.root), "-o", str(ws.csv)],
         ("-o", "data.csv", "exists", "--overwrite")),
    Case("evaluate_png_exists", lambda ws: ["evaluate", "--real", str(ws.csv), "--synthetic", str(ws.root), "-o",
                                            str(ws.root / "r.json"), "--png", str(ws.images[0])], ("--png", "exists")),
    Case("construct_csv_exists", lambda ws: ["construct-csv", "--input-dir", str(ws.root), "-o", str(ws.csv)],
         ("data.csv", "exists", "--overwrite")),
]


def _latin1(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("latin-1"))
    return path


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


#: cases that train a step first or start another process: the slow tier
SLOW_CASES = {"resume_other_data", "second_writer"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c.name in SLOW_CASES else c for c in CASES],
                         ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_error(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ws = Workspace(tmp_path)
    argv = case.make(ws)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    try:
        assert main(argv) == 2
    finally:
        for holder in ws.holders:
            holder.kill()
            holder.wait()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    first = err.strip().splitlines()[0]
    assert first.startswith(f"fedsynth {argv[0]}: error: "), err
    for text in case.expected:
        assert text in err, f"{text!r} not in: {err}"
    assert _snapshot(tmp_path) == before, "the failed command wrote or changed files"


def test_enough_cases() -> None:
    assert len(CASES) >= 30


@pytest.mark.slow  # trains beyond a step or spawns processes
@pytest.mark.parametrize("argv_of", [
    lambda ws: ws.train("--epochs", "0"),
    lambda ws: ["init-config", "--family", "gan", "--image-size", "36", "-o", str(ws.root / "x.yaml")],
    _truncated_gz,
], ids=["epochs_0", "init_config_36", "truncated_nii_gz"])
def test_bad_input_in_a_real_process(argv_of: Callable[[Workspace], list[str]], tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "fedsynth", *argv_of(ws)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "error:" in proc.stderr


def test_utf8_bom_csv_is_accepted(tmp_path: Path) -> None:
    from fedsynth.data.manifest import read_manifest

    ws = Workspace(tmp_path)
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + ws.csv.read_bytes())
    assert [r.subject_id for r in read_manifest(path)] == [s for s, _ in ws.rows]


def test_rows_of_one_subject_by_design_are_accepted(tmp_path: Path) -> None:
    from fedsynth.data.manifest import read_manifest

    ws = Workspace(tmp_path)
    rows = [("brain", p.name) for p in ws.images]  # slices of one volume: one subject, different files
    assert {r.subject_id for r in read_manifest(ws.write_csv(rows, "one.csv"))} == {"brain"}


def test_constant_image_is_skipped_with_a_warning_naming_its_row(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fedsynth.config import config_from_dict
    from fedsynth.data import load_datasets

    ws = Workspace(tmp_path)
    ws.replace_image(5, _nifti(tmp_path / "flat.nii.gz", np.zeros((SIZE, SIZE))))
    train, _ = load_datasets(config_from_dict(tiny_gan()), str(ws.csv))
    assert len(train) == 7 and [r.row for r in train.skipped] == [6]
    assert any("row 6" in m and "SubjectID 's5'" in m and "constant" in m for m in caplog.messages)


def test_simpleitk_alone_would_miss_these(tmp_path: Path) -> None:
    """The reason for the nibabel checks: SimpleITK reads a half NIfTI file without complaint."""
    import SimpleITK as sitk

    full = _nifti(tmp_path / "full.nii", np.random.default_rng(1).random((SIZE, SIZE)) + 1)
    half = tmp_path / "half.nii"
    half.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    try:
        sitk.GetArrayFromImage(sitk.ReadImage(str(half)))
    except RuntimeError:
        pytest.skip("this SimpleITK refuses truncated NIfTI itself")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ws = Workspace(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(ws.train(out=locked / "run")) == 2
        assert "no permission" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_full_disk_names_the_path_and_leaves_no_temp_files(tmp_path: Path) -> None:
    """A file-size limit (RLIMIT_FSIZE) makes the checkpoint write fail as a full disk would."""
    ws = Workspace(tmp_path)
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
            "from fedsynth.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, *ws.train()], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "cannot write" in proc.stderr and str(ws.run / "last.ckpt") in proc.stderr
    assert not list(ws.run.glob(".*.tmp")) and not (ws.run / "last.ckpt").exists()
    assert not (ws.run / "metrics.csv").exists(), "metrics.csv must not get ahead of the checkpoint"


def test_stale_temp_files_are_removed(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    ws.run.mkdir()
    (ws.run / ".last.ckpt.abc123.tmp").write_bytes(b"")
    assert main(ws.train("--epochs", "1")) == 0
    assert not list(ws.run.glob(".*.tmp")) and (ws.run / "last.ckpt").is_file()


def test_overwrite_starts_again(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    assert main(ws.train()) == 0
    assert main(ws.train("--overwrite")) == 0
    from fedsynth.checkpoint import load_checkpoint

    assert load_checkpoint(ws.run / "last.ckpt")["epoch"] == 1
    assert len((ws.run / "metrics.csv").read_text(encoding="utf-8").splitlines()) == 2


def test_resume_applies_and_logs_a_new_learning_rate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedsynth.config import load_config
    from fedsynth.engine import build_engine

    ws = Workspace(tmp_path)
    assert main(ws.train()) == 0
    changed = ws.write_cfg(tiny_gan(learning_rate=1e-2, epochs=2), "lr.yaml")
    config = load_config(changed)
    engine = build_engine(config, ws.run)
    engine.resume(ws.run / "last.ckpt")
    assert {g["lr"] for opt in engine.optimizers.values() for g in opt.param_groups} == {1e-2}
    assert "training.learning_rate: 0.0002 -> 0.01 (applied)" in capsys.readouterr().out
    assert main(ws.train("--resume", cfg=changed)) == 0
    assert load_config(ws.run / "config.yaml").training.learning_rate == 1e-2


def test_generate_replaces_a_previous_generation(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    out = tmp_path / "gen"
    ckpt = ws.checkpoint()
    assert main(["generate", "--checkpoint", str(ckpt), "-n", "4", "-o", str(out)]) == 0
    assert main(["generate", "--checkpoint", str(ckpt), "-n", "2", "-o", str(out)]) == 2  # not without --overwrite
    assert len(list(out.glob("synthetic_*"))) == 4
    assert main(["generate", "--checkpoint", str(ckpt), "-n", "2", "-o", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("synthetic_*")) == ["synthetic_0000.png", "synthetic_0001.png"]
    assert len((out / "manifest.csv").read_text(encoding="utf-8").splitlines()) == 3


def test_evaluate_warns_on_an_interrupted_generation(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fedsynth.config import config_from_dict
    from fedsynth.metrics.images import load_synthetic

    ws = Workspace(tmp_path)
    out = tmp_path / "gen"
    assert main(["generate", "--checkpoint", str(ws.checkpoint()), "-n", "4", "-o", str(out)]) == 0
    (out / "manifest.csv").unlink()  # as a generate killed before its manifest
    (out / "synthetic_0003.png").unlink()
    images = load_synthetic(out, config_from_dict(tiny_gan()))
    assert len(images) == 3
    assert any("interrupted" in m and str(out) in m for m in caplog.messages)


def test_gzip_header_cut_is_refused_by_read_image(tmp_path: Path) -> None:
    from fedsynth.data.images import read_image
    from fedsynth.errors import DataError

    good = _nifti(tmp_path / "a.nii.gz", np.ones((SIZE, SIZE)))
    raw = gzip.decompress(good.read_bytes())
    (tmp_path / "b.nii.gz").write_bytes(gzip.compress(raw[: len(raw) - 100]))  # valid gzip, too few voxels
    with pytest.raises(DataError, match="b.nii.gz"):
        read_image(tmp_path / "b.nii.gz")


# ---- every scalar config field, from the schema: wrong type, and past its bound

SCHEMA_CASES = schema_cases()


def _family_base(family: str) -> dict:
    from fedsynth.families import family as registered

    data = tiny_gan()
    if family != "gan":
        data["model"] = {"family": family, **registered(family).test_model}
    return data


@pytest.fixture(scope="module")
def shared_ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("schema"))


@pytest.mark.parametrize(("family", "path", "value"), SCHEMA_CASES,
                         ids=[f"{f}-{p}-{v!r}" for f, p, v in SCHEMA_CASES])
def test_every_config_field_refuses_a_bad_value(family: str, path: str, value: object, shared_ws: Workspace,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    data = _family_base(family)
    section, field = path.split(".")
    data.setdefault(section, {})[field] = value
    cfg = shared_ws.write_cfg(data, "schema.yaml")
    before = _snapshot(shared_ws.root)
    capsys.readouterr()
    assert main(shared_ws.train(cfg=cfg)) == 2, f"{path}: {value!r} was accepted"
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"field '{path}" in err, err
    assert _snapshot(shared_ws.root) == before


def test_the_schema_cases_start_from_valid_configs() -> None:
    from fedsynth.config import config_from_dict

    for family in {f for f, _, _ in SCHEMA_CASES}:
        config_from_dict(_family_base(family), family)


def test_enough_cases_in_all() -> None:
    assert len(CASES) + len(SCHEMA_CASES) >= 200
