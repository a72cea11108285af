"""Generating images from a trained model and writing them (NIfTI/PNG) with a PNG grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fedsynth.data.images import save_image
from fedsynth.io import atomic_write_text
from fedsynth.models.base import SynthesisModel
from fedsynth.data.manifest import IMAGE_SUFFIXES, write_manifest


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Tile ``(N, C, *spatial)`` images in [0, 1] into one ``(C', H, W)`` image (3D: middle slices)."""
    if images.ndim == 5:  # 3D: show the middle slice of the first spatial axis
        images = images[:, :, images.shape[2] // 2]
    if images.shape[1] not in (1, 3):
        images = images[:, :1]
    n, c, h, w = images.shape
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((c, rows * (h + 2) + 2, cols * (w + 2) + 2), dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, 2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + k * (w + 2): 2 + k * (w + 2) + w] = images[i]
    return np.clip(grid, 0, 1)


def sample(model: SynthesisModel, num_images: int, *, seed: int = 0, labels: torch.Tensor | None = None,
           prompts: list[str] | None = None, sampler: str | None = None, steps: int | None = None,
           guidance_scale: float | None = None, batch_size: int = 16) -> torch.Tensor:
    """Generate ``num_images`` reproducibly from ``seed``, in batches; returns CPU images in [0, 1].

    ``labels`` and ``prompts`` hold one condition for all images or one per image."""
    model.eval()
    generator = torch.Generator(device=model.device).manual_seed(seed)
    if prompts is not None and len(prompts) not in (1, num_images):
        raise ValueError(f"{len(prompts)} prompts for {num_images} images: give one prompt, or one per image")
    out = []
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
    return torch.cat(out)


def write_images(images: torch.Tensor, out_dir: str | Path, *, image_format: str = "nii.gz",
                 labels: torch.Tensor | None = None, prompts: list[str] | None = None,
                 prefix: str = "synthetic") -> list[Path]:
    """Write each image as ``<prefix>_<i>.<format>``, a ``grid.png`` and a ``manifest.csv``
    (with each image's ``Label`` and ``Prompt`` when it was generated from one).

    The manifest (then ``generation.json``) is written last, so a folder without one is an
    interrupted generation. A re-used folder first loses the previous generation's images,
    manifest and grid, so no stale image is mixed with the new ones.
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = images.numpy()
    if image_format == "png" and arrays.ndim != 4:
        raise ValueError("PNG output is for 2D images; use nii.gz for 3D")
    for name in ("generation.json", "manifest.csv"):
        (out / name).unlink(missing_ok=True)
    for old in out.glob(f"{prefix}_*"):
        if old.is_file() and old.name.lower().endswith(IMAGE_SUFFIXES):
            old.unlink()
    (out / "grid.png").unlink(missing_ok=True)
    paths = []
    for i, array in enumerate(arrays):
        path = out / f"{prefix}_{i:04d}.{image_format}"
        save_image(array, path)
        paths.append(path)
    save_image(image_grid(arrays), out / "grid.png")
    label_list = [int(labels[i]) if labels is not None and labels.numel() > 1 else (int(labels) if labels is not None else None)
                  for i in range(len(paths))]
    prompt_list = None if prompts is None else (list(prompts) * len(paths) if len(prompts) == 1 else list(prompts))
    write_manifest(out / "manifest.csv", [(p.stem.split(".")[0], [p.resolve()], lab) for p, lab in zip(paths, label_list)],
                   prompts=prompt_list)
    atomic_write_text(out / "generation.json", json.dumps({"count": len(paths), "format": image_format}, indent=2))
    return paths
