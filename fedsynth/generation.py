"""Generating images from a trained model and writing them (NIfTI/PNG) with a PNG grid.

What made the images is recorded beside them: ``generation.json`` holds the checkpoint (path,
SHA-256, step, epoch, round), the weights (EMA or raw), the seed, the sampler and its steps
(:func:`checkpoint_provenance`, :func:`sampling_settings`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsynth import __version__
from fedsynth.data.images import save_image
from fedsynth.data.manifest import IMAGE_SUFFIXES, write_manifest
from fedsynth.errors import OutputError
from fedsynth.io import atomic_write_text
from fedsynth.models.base import SynthesisModel
from fedsynth.progress import bar

#: 3D grids: each plane is upscaled (nearest) to at least this many pixels, so a 16^3 volume is readable
MIN_3D_TILE = 128


def orthogonal_planes(volumes: np.ndarray, min_tile: int = MIN_3D_TILE) -> np.ndarray:
    """``(N, C, D, H, W)`` volumes -> ``(N, C, S, 3S + 4)`` images: the three orthogonal planes through
    each volume's centre side by side (axes 0, 1, 2 of the array), each upscaled by a whole factor
    (nearest, so voxels stay visible as voxels) to at least ``min_tile`` pixels and padded to one square size;
    grey lines separate one volume's planes, the grid's black borders separate volumes."""
    n, c, *shape = volumes.shape
    planes = [volumes[:, :, shape[0] // 2], volumes[:, :, :, shape[1] // 2], volumes[:, :, :, :, shape[2] // 2]]
    factor = max(1, -(-min_tile // max(shape)))  # ceil: the largest side reaches min_tile
    side = max(shape) * factor
    out = np.zeros((n, c, side, 3 * side + 4), dtype=np.float32)
    out[..., side:side + 2] = out[..., 2 * side + 2:2 * side + 4] = 0.5  # grey lines join one volume's planes
    for k, plane in enumerate(planes):
        big = plane.repeat(factor, axis=-2).repeat(factor, axis=-1)
        h, w = big.shape[-2:]
        top, left = (side - h) // 2, k * (side + 2) + (side - w) // 2
        out[:, :, top:top + h, left:left + w] = big
    return out


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Tile ``(N, C, *spatial)`` images in [0, 1] into one ``(C', H, W)`` image (3D: each volume's
    three orthogonal centre planes, see :func:`orthogonal_planes`)."""
    if images.ndim == 5:
        images = orthogonal_planes(images)
    if images.shape[1] not in (1, 3):
        images = images[:, :1]
    n, c, h, w = images.shape
    cols = columns or int(np.ceil(np.sqrt(n / (w / h))))  # about square (a 3D tile is 3 planes wide)
    rows = int(np.ceil(n / cols))
    grid = np.zeros((c, rows * (h + 2) + 2, cols * (w + 2) + 2), dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, 2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + k * (w + 2): 2 + k * (w + 2) + w] = images[i]
    return np.clip(grid, 0, 1)


def sample(model: SynthesisModel, num_images: int, *, seed: int = 0, labels: torch.Tensor | None = None,
           prompts: list[str] | None = None, sampler: str | None = None, steps: int | None = None,
           guidance_scale: float | None = None, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """Generate ``num_images`` reproducibly from ``seed``, in batches; returns CPU images in [0, 1].

    ``labels`` and ``prompts`` hold one condition for all images or one per image; ``progress``
    shows a bar over the images (with ETA)."""
    model.eval()
    generator = torch.Generator(device=model.device).manual_seed(seed)
    if prompts is not None and len(prompts) not in (1, num_images):
        raise ValueError(f"{len(prompts)} prompts for {num_images} images: give one prompt, or one per image")
    model.check_prompts(prompts, num_images)  # conditions are checked before the progress bar starts
    model.check_labels(labels, num_images)
    out = []
    shown = bar(num_images, "generating", unit="img", enabled=progress)
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        lab = None
        if labels is not None:
            lab = labels if labels.numel() == 1 else labels[start:start + n]
        texts = None
        if prompts is not None:
            texts = prompts if len(prompts) == 1 else prompts[start:start + n]
        out.append(model.generate(n, generator=generator, labels=lab, prompts=texts, sampler=sampler, steps=steps,
                                  guidance_scale=guidance_scale).float().cpu())
        if shown is not None:
            shown.update(n)
    if shown is not None:
        shown.close()
    return torch.cat(out)


def sampling_settings(model: SynthesisModel, sampler: str | None, steps: int | None, guidance_scale: float | None,
                      conditioned: bool) -> dict[str, Any]:
    """The sampler, steps and guidance a model's ``generate`` will use for these arguments (its
    config's defaults filled in); empty for a model without a sampler (GAN, autoencoder)."""
    cfg = model.config.model
    default = getattr(cfg, "sampler", None)
    if default is None:
        return {}
    used = sampler or default
    settings: dict[str, Any] = {
        "sampler": used,
        "sampling_steps": steps or (cfg.sampling_steps if used == "ddim" else cfg.num_train_timesteps),  # type: ignore[attr-defined]
    }
    if conditioned:
        settings["guidance_scale"] = cfg.guidance_scale if guidance_scale is None else guidance_scale  # type: ignore[attr-defined]
    return settings


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_provenance(path: str | Path, payload: Mapping[str, Any]) -> dict[str, Any]:
    """Which checkpoint, exactly: its path, SHA-256, step, epoch, round, family and when it was written."""
    path = Path(path)
    return {"path": str(path.resolve()), "sha256": _sha256(path), "step": payload.get("step"),
            "epoch": payload.get("epoch"), "round": payload.get("round"), "family": payload.get("family"),
            "created": payload.get("created"), "fedsynth_version": payload.get("fedsynth_version")}


def describe_checkpoint(info: Mapping[str, Any]) -> str:
    """``runs/gan/last.ckpt (step 120, epoch 3)``: a checkpoint as one line shows it."""
    where = [f"step {info.get('step')}", f"epoch {info.get('epoch')}"]
    if info.get("round") is not None:
        where.append(f"round {info['round']}")
    return f"{info.get('path')} ({', '.join(where)})"


def previous_generation(out: Path, prefix: str = "synthetic") -> list[str]:
    """Names of an earlier generation's files in ``out`` (what :func:`write_images` would replace)."""
    if not out.is_dir():
        return []
    names = [n for n in ("manifest.csv", "generation.json", "grid.png") if (out / n).exists()]
    return names + sorted(p.name for p in out.glob(f"{prefix}_*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))


def write_images(images: torch.Tensor, out_dir: str | Path, *, image_format: str = "nii.gz",
                 labels: torch.Tensor | None = None, prompts: list[str] | None = None,
                 prefix: str = "synthetic", provenance: Mapping[str, Any] | None = None) -> list[Path]:
    """Write each image as ``<prefix>_<i>.<format>``, a ``grid.png``, a ``manifest.csv``
    (with each image's ``Label`` and ``Prompt`` when it was generated from one) and
    ``generation.json`` (count, format, and ``provenance``: what made the images).

    Everything is written into a hidden folder inside ``out_dir`` first; only when every file is
    written does an earlier generation there (the caller decided to replace it) give way and the
    new files move in, the manifest last. A write that fails (a full disk) leaves ``out_dir`` as it
    was, without temporary files.
    """
    out = Path(out_dir)
    arrays = images.numpy()
    if image_format == "png" and arrays.ndim != 4:
        raise ValueError("PNG output is for 2D images; use nii.gz for 3D")
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fedsynth-generating-", dir=out))
    names = [f"{prefix}_{i:04d}.{image_format}" for i in range(len(arrays))]
    paths = [out / name for name in names]
    try:
        for name, array in zip(names, arrays, strict=True):
            save_image(array, staging / name)
        save_image(image_grid(arrays), staging / "grid.png")
        label_list = [int(labels[i]) if labels is not None and labels.numel() > 1 else (int(labels) if labels is not None else None)
                      for i in range(len(names))]
        prompt_list = None if prompts is None else (list(prompts) * len(names) if len(prompts) == 1 else list(prompts))
        # paths relative to the manifest's folder: the same names once the files have moved into out_dir
        write_manifest(staging / "manifest.csv", [(name.split(".")[0], [staging / name], lab)
                                                  for name, lab in zip(names, label_list, strict=True)], prompts=prompt_list)
        record = {"count": len(paths), "format": image_format,
                  "written": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "fedsynth_version": __version__,
                  **dict(provenance or {})}
        atomic_write_text(staging / "generation.json", json.dumps(record, indent=2))
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(f"cannot write the generated images to {out}: {err.strerror or err}; nothing was "
                          "changed there") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in previous_generation(out, prefix):
        (out / old).unlink()
    for name in [*names, "grid.png", "generation.json", "manifest.csv"]:  # the manifest last: it marks a complete set
        (staging / name).rename(out / name)
    staging.rmdir()
    return paths
