"""Prompt adherence: does a text-conditioned sample show what its prompt asks for?

A :class:`PromptReader` is a small MONAI classifier trained on *real* training images to read their
prompt back (one class per distinct prompt of the training CSV's ``Prompt`` column). Applied to
synthetic images it answers "which prompt does this image look like?"; the agreement with the prompt
the image was generated from is the adherence score. Its ceiling is the reader's accuracy on real
held-out images (the same table row as a distribution metric's real-vs-real floor), and a
shuffled-prompt control gives chance level for the same sample set.

Prompts are comma-separated attributes (``"axial T1 slice, inferior, MNI152 template"``); besides
the exact match, agreement is reported per attribute position, which says *what* a model follows
(plane, position, volume) and what it ignores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.networks.nets import Classifier
from torch import nn

from fedsynth.errors import DataError


def attributes(prompt: str) -> list[str]:
    """The comma-separated attributes of a prompt, stripped."""
    return [part.strip() for part in prompt.split(",")]


@dataclass
class Agreement:
    """Share of images whose read-back prompt matches the given one: exact and per attribute position."""

    exact: float
    per_attribute: list[float]
    count: int

    def as_dict(self, names: Sequence[str] | None = None) -> dict[str, float | int]:
        keys = list(names) if names is not None else [f"attribute_{i}" for i in range(len(self.per_attribute))]
        return {"exact": self.exact, **dict(zip(keys, self.per_attribute, strict=False)), "count": self.count}


def agreement(read: Sequence[str], given: Sequence[str]) -> Agreement:
    """Compare prompts read back from images with the prompts they should show."""
    if len(read) != len(given):
        raise ValueError(f"{len(read)} read prompts for {len(given)} given prompts")
    if not given:
        raise DataError("prompt agreement needs at least one image")
    width = max(len(attributes(p)) for p in given)
    exact = float(np.mean([r == g for r, g in zip(read, given, strict=False)]))
    per = []
    for i in range(width):
        hits = [ar[i] == ag[i] for ar, ag in ((attributes(r), attributes(g)) for r, g in zip(read, given, strict=False))
                if len(ar) > i and len(ag) > i]
        per.append(float(np.mean(hits)) if hits else float("nan"))
    return Agreement(exact, per, len(given))


class PromptReader:
    """A classifier from image to one of the training prompts (see the module docstring)."""

    def __init__(self, net: nn.Module, prompts: Sequence[str]) -> None:
        self.net = net.eval()
        self.prompts = list(prompts)

    @classmethod
    def fit(cls, images: np.ndarray, prompts: Sequence[str], *, steps: int = 1500, batch_size: int = 64,
            lr: float = 2e-3, seed: int = 0, channels: Sequence[int] = (16, 32, 64)) -> PromptReader:
        """Train on real images ``(N, C, *spatial)`` (values in [0, 1]) and their prompts.

        Light augmentation (intensity jitter, one-pixel shifts) keeps the reader from keying on
        exact pixel values, so it reads anatomy, not a training slice's fingerprint.
        """
        if len(images) != len(prompts):
            raise DataError(f"{len(images)} images but {len(prompts)} prompts")
        if any(not p for p in prompts):
            raise DataError("every training image needs a non-empty prompt to train a prompt reader")
        classes = sorted(set(prompts))
        if len(classes) < 2:
            raise DataError(f"a prompt reader needs at least two distinct prompts, got {classes}")
        torch.manual_seed(seed)
        gen = np.random.default_rng(seed)
        x = torch.as_tensor(images, dtype=torch.float32)
        y = torch.as_tensor([classes.index(p) for p in prompts])
        spatial = x.shape[2:]
        net = Classifier(in_shape=(x.shape[1], *spatial), classes=len(classes), channels=tuple(channels),
                         strides=(2,) * len(channels), num_res_units=1, dropout=0.1)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
        dims = tuple(range(2, x.ndim))
        net.train()
        for _ in range(steps):
            idx = torch.as_tensor(gen.integers(0, len(x), min(batch_size, len(x))))
            xb = x[idx]
            scale = torch.empty(len(xb), *([1] * (x.ndim - 1))).uniform_(0.85, 1.15)
            shift = torch.empty(len(xb), *([1] * (x.ndim - 1))).uniform_(-0.05, 0.05)
            xb = (xb * scale + shift).clamp(0, 1)
            xb = torch.roll(xb, shifts=tuple(int(s) for s in gen.integers(-1, 2, len(dims))), dims=dims)
            loss = loss_fn(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        return cls(net, classes)

    @torch.no_grad()
    def read(self, images: np.ndarray, batch_size: int = 256) -> list[str]:
        """The training prompt each image looks most like."""
        x = torch.as_tensor(images, dtype=torch.float32)
        picks = [self.net(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
        return [self.prompts[int(k)] for k in torch.cat(picks)] if picks else []

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> Agreement:
        """Agreement between what the images show and the prompts they should show."""
        return agreement(self.read(images), prompts)


def shuffled(prompts: Sequence[str], seed: int = 0) -> list[str]:
    """The same prompts in a random order: the chance-level control for a sample set."""
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [prompts[i] for i in order]
