"""Real brain-MRI demo data that installs offline, and the ``fedsynth demo`` command.

Sources (each a T1-weighted brain, one "site" each, never split across train/test by slice):
- ``mni152``: the MNI ICBM152 2009 template shipped inside the ``nilearn`` package;
- ``colin27``: the Colin27 T1 from Debian's ``mricron-data`` (``/usr/share/mricron/templates``).

2D data are axial slices; class label 0 = inferior half of the brain, 1 = superior half.
3D data are overlapping sub-volumes of each brain, resized to the requested size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk

from fedsynth.data.brains import mni152_template
from fedsynth.data.brains import resize as _resize
from fedsynth.data.images import save_image
from fedsynth.data.manifest import write_manifest
from fedsynth.errors import DataError
from fedsynth.io import atomic_write_text
from fedsynth.metrics import ImageSet, evaluate_sets, load_real

COLIN27 = Path("/usr/share/mricron/templates/ch2.nii.gz")


def load_volume(name: str) -> np.ndarray:
    """A real T1 brain volume as a float32 ``(z, y, x)`` array."""
    if name == "mni152":
        img = mni152_template()
        return np.asarray(img.get_fdata(), dtype=np.float32).transpose(2, 1, 0)
    if name == "colin27":
        if not COLIN27.is_file():
            raise DataError(f"Colin27 T1 not found at {COLIN27}: install Debian's mricron-data (apt-get install mricron-data)")
        return sitk.GetArrayFromImage(sitk.ReadImage(str(COLIN27))).astype(np.float32)
    raise DataError(f"unknown demo volume '{name}': expected 'mni152' or 'colin27'")


def available_volumes() -> list[str]:
    """Names of the demo volumes present on this machine (MNI152 always, Colin27 if installed)."""
    return ["mni152"] + (["colin27"] if COLIN27.is_file() else [])


def _brain_box(volume: np.ndarray) -> tuple[slice, ...]:
    mask = volume > np.percentile(volume, 60)
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0) + 1
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=False))


def write_slices(volume_name: str, out_dir: Path, *, image_size: int = 32, count: int = 24,
                 spatial_dims: int = 2) -> list[tuple[str, list[Path], int]]:
    """Write ``count`` 2D slices (or 3D sub-volumes) of one brain; returns manifest rows."""
    volume = load_volume(volume_name)
    box = _brain_box(volume)
    brain = volume[box]
    brain = (brain - brain.min()) / max(float(brain.max() - brain.min()), 1e-6)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, list[Path], int]] = []
    depth = brain.shape[0]
    if spatial_dims == 2:
        # central 70% of the axial extent, evenly spaced
        positions = np.linspace(int(depth * 0.15), int(depth * 0.85) - 1, count).round().astype(int)
        for i, z in enumerate(positions):
            sl = brain[z]
            side = max(sl.shape)
            padded = np.zeros((side, side), np.float32)
            oy, ox = (side - sl.shape[0]) // 2, (side - sl.shape[1]) // 2
            padded[oy:oy + sl.shape[0], ox:ox + sl.shape[1]] = sl
            img = np.clip(_resize(padded, [image_size, image_size]), 0, 1)
            path = out_dir / f"{volume_name}_slice{i:03d}.nii.gz"
            save_image(img[None], path)
            rows.append((volume_name, [path], int(z >= depth // 2)))
    else:
        rng = np.random.default_rng(sum(map(ord, volume_name)))
        crop = [max(8, int(s * 0.6)) for s in brain.shape]
        for i in range(count):
            start = [int(rng.integers(0, s - c + 1)) for s, c in zip(brain.shape, crop, strict=False)]
            sub = brain[tuple(slice(a, a + c) for a, c in zip(start, crop, strict=False))]
            img = np.clip(_resize(sub, [image_size] * 3), 0, 1)
            path = out_dir / f"{volume_name}_block{i:03d}.nii.gz"
            save_image(img[None], path)
            rows.append((volume_name, [path], int(start[0] + crop[0] // 2 >= brain.shape[0] // 2)))
    return rows


def build_demo_dataset(out_dir: str | Path, *, image_size: int = 32, count: int = 24, spatial_dims: int = 2,
                       volumes: list[str] | None = None) -> dict[str, Path]:
    """Write slices of each available brain and one CSV per brain (``<name>.csv``) plus ``all.csv``."""
    out = Path(out_dir)
    names = volumes or available_volumes()
    csvs: dict[str, Path] = {}
    all_rows: list[tuple[str, list[Path], int]] = []
    for name in names:
        rows = write_slices(name, out / "images" / name, image_size=image_size, count=count, spatial_dims=spatial_dims)
        csvs[name] = out / f"{name}.csv"
        write_manifest(csvs[name], rows)
        all_rows += rows
    csvs["all"] = out / "all.csv"
    write_manifest(csvs["all"], all_rows)
    return csvs


def fast_precision() -> Literal["fp32", "bf16"]:
    """``bf16`` where this machine computes it natively (a CUDA GPU with bf16, or a CPU with AVX512-BF16
    or AMX), else ``fp32`` (emulated bf16 on other CPUs is slower than fp32)."""
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def run_demo(out_dir: str | Path, *, family: str = "latent-diffusion", steps: int = 1500, image_size: int = 32,
             num_images: int = 64, first_stage_steps: int = 600, precision: str = "auto") -> dict[str, Path]:
    """Real 2D brain slices (``fedsynth build-dataset`` split), the family's recipe, a short training run,
    samples and their held-out precision next to the real-vs-real floor (as many real training slices
    scored the same way); returns the paths made (``grid`` is the PNG to look at).

    Uses MNI152 and, when installed, Colin27's brain-extracted T1 (``ch2bet``) so it runs in minutes.
    ``precision``: ``auto`` = :func:`fast_precision` (bf16 autocast where the hardware has it).
    """
    import json

    import torch

    from fedsynth.config import default_config, render_yaml
    from fedsynth.data.brains import available_volumes, build_brain_dataset
    from fedsynth.extensions import sampling_weights
    from fedsynth.generation import sample, write_images
    from fedsynth.local import TrainRequest, run_training
    from fedsynth.metrics.evaluate import EvaluationOptions

    out = Path(out_dir)
    volumes = [v for v in ("mni152", "ch2bet") if v in available_volumes()]
    csvs = build_brain_dataset(out / "data", image_size=image_size, volumes=volumes, volume_sizes=())
    latent = family == "latent-diffusion"  # the autoencoder first stage (first_stage_steps), then the UNet (steps)
    config = default_config("diffusion" if latent else family, 2, image_size, latent=latent)
    if latent:
        config.model = config.model.model_copy(update={"first_stage_steps": first_stage_steps})
    config.training.max_steps = steps
    config.training.precision = fast_precision() if precision == "auto" else precision  # type: ignore[assignment]
    config.training.epochs = 10**6
    config.training.sample_every = 10**6
    config.training.tensorboard = False
    config_path = out / "config.yaml"
    atomic_write_text(config_path, render_yaml(config))
    run_dir = out / "run"
    engine = run_training(TrainRequest(str(config_path), str(csvs["train"]), str(run_dir), resume=(run_dir / "last.ckpt").is_file()))
    with sampling_weights(engine.extensions, engine.model):  # the EMA weights, as sample grids use
        images = sample(engine.model, num_images, seed=0)
    write_images(images, out / "generated", image_format="png")
    held_out = load_real(csvs["held_out"], config)
    options = EvaluationOptions(use_pyradiomics=False, max_pairs=100)
    report = evaluate_sets(held_out, ImageSet(images.numpy(), [], "demo samples"), options)
    train = load_real(csvs["train"], config)
    pick = np.random.default_rng(0).choice(len(train.images), size=min(num_images, len(train.images)), replace=False)
    floor = evaluate_sets(held_out, ImageSet(train.images[pick], [], "real training slices"), options)
    summary = {"held_out_images": len(held_out), "samples": num_images, "precision": report["precision"],
               "recall": report["recall"], "coverage": report["coverage"], "encoder": report["encoder"]["name"],
               "real_vs_real": {k: floor[k] for k in ("precision", "recall", "coverage")},
               "steps": engine.state.step, "precision_mode": config.training.precision,
               "threads": torch.get_num_threads()}
    atomic_write_text(out / "demo_report.json", json.dumps(summary, indent=2))
    return {"config": config_path, "train_csv": csvs["train"], "held_out_csv": csvs["held_out"], "run_dir": run_dir,
            "generated": out / "generated", "grid": out / "generated" / "grid.png", "report": out / "demo_report.json"}

