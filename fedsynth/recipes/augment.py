"""Differentiable augmentation (DiffAugment, Zhao et al. 2020) for GANs on small data sets.

The same random transforms are applied to real and generated images before the discriminator
(and to generated images in the generator step), so the discriminator cannot memorise the few
real images and the generator is not pushed to reproduce the augmentations. Every op is
differentiable and per-sample, works for 2D and 3D, and takes an explicit ``torch.Generator``.
Images are in the networks' range [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

AugmentOp = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]


def _rand(n: int, x: torch.Tensor, gen: torch.Generator | None, *shape: int) -> torch.Tensor:
    return torch.rand((n, *shape), generator=gen, device=gen.device if gen is not None else x.device).to(x.device, x.dtype)


def brightness(x: torch.Tensor, gen: torch.Generator | None = None, strength: float = 0.25) -> torch.Tensor:
    """Add a per-image offset in [-strength, strength] (range [-1, 1] images: 2x the [0, 1] offset)."""
    shape = (1,) * (x.dim() - 1)
    return x + (_rand(x.shape[0], x, gen, *shape) - 0.5) * 2 * strength


def contrast(x: torch.Tensor, gen: torch.Generator | None = None, low: float = 0.7, high: float = 1.3) -> torch.Tensor:
    """Scale each image's deviation from its mean by a factor in [low, high]."""
    shape = (1,) * (x.dim() - 1)
    mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return (x - mean) * (low + (high - low) * _rand(x.shape[0], x, gen, *shape)) + mean


def translation(x: torch.Tensor, gen: torch.Generator | None = None, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ``ratio`` of its size per axis (zero-padded at the background value -1)."""
    n, spatial = x.shape[0], x.shape[2:]
    shifts = [((_rand(n, x, gen) * 2 - 1) * ratio * s).round().long().flatten() for s in spatial]
    pad = [int(ratio * s) + 1 for s in spatial]
    padded = F.pad(x, [p for p in reversed(pad) for _ in range(2)], value=-1.0)
    out = torch.empty_like(x)
    for i in range(n):  # per-sample crop of the padded image (gradients flow through the slice)
        index = tuple(slice(p - int(d[i]), p - int(d[i]) + s) for p, d, s in zip(pad, shifts, spatial, strict=False))
        out[i] = padded[i][(slice(None), *index)]
    return out


def cutout(x: torch.Tensor, gen: torch.Generator | None = None, ratio: float = 0.5) -> torch.Tensor:
    """Set a random box of ``ratio`` of the size per axis to the background value -1."""
    n, spatial = x.shape[0], x.shape[2:]
    mask = torch.ones_like(x)
    sizes = [max(1, int(s * ratio)) for s in spatial]
    centres = [(_rand(n, x, gen) * (s + 1 - c % 2)).long().flatten() for s, c in zip(spatial, sizes, strict=False)]
    for i in range(n):
        index = tuple(slice(max(0, int(c[i]) - z // 2), max(0, int(c[i]) - z // 2) + z) for c, z in zip(centres, sizes, strict=False))
        mask[i][(slice(None), *index)] = 0.0
    return x * mask + (mask - 1.0)  # masked voxels -> -1


OPS: dict[str, AugmentOp] = {"brightness": brightness, "contrast": contrast, "translation": translation, "cutout": cutout}


def diff_augment(x: torch.Tensor, policy: Sequence[str], generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the ops named in ``policy`` in order (per-sample random parameters)."""
    for name in policy:
        if name not in OPS:
            raise ValueError(f"unknown augmentation '{name}': expected one of {sorted(OPS)}")
        x = OPS[name](x, generator)
    return x
