"""Torch datasets and loaders over manifest records."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fedsynth.config import ExperimentConfig
from fedsynth.data.images import augmentation, preprocessing, read_image, to_spatial_dims
from fedsynth.data.manifest import Record, read_manifest, split_by_subject
from fedsynth.errors import DataError
from fedsynth.models.base import Batch
from fedsynth.processes import host_memory_available

log = logging.getLogger("fedsynth.data")


class ImageDataset(Dataset):
    """Preprocessed images (cached in memory by default) with optional train-time augmentation.

    Every image is read and checked when the dataset is built, before any training: an
    unreadable, truncated or non-finite image is a :class:`DataError` naming its CSV row and
    SubjectID; a constant image (nothing to learn, and undefined after normalisation) is skipped
    with a warning naming its row.
    """

    def __init__(self, records: Sequence[Record], config: ExperimentConfig, *, train: bool,
                 progress: Callable[[int], None] | None = None) -> None:
        """``progress(1)`` is called after each record is read (a progress display's tick)."""
        if not records:
            raise DataError("no images to load (empty record list)")
        self.config = config
        _check_memory(records, config)
        self.spatial_dims = config.spatial_dims
        self.pre = preprocessing(config.data, list(config.image_size))
        self.aug = augmentation(config.data.augmentations, config.spatial_dims) if train else None
        self._cache: dict[int, torch.Tensor] = {}
        kept: list[Record] = []
        self.skipped: list[Record] = []
        for rec in records:
            array = self._read(rec)
            if float(array.max()) == float(array.min()):
                log.warning("skipping %s: the image is constant (every voxel is %g)", rec.where(), float(array.min()))
                self.skipped.append(rec)
            else:
                if config.data.cache:
                    self._cache[len(kept)] = self._preprocess(rec, array)
                kept.append(rec)
            if progress is not None:
                progress(1)
        if not kept:
            raise DataError(f"{records[0].source}: every image is constant ({len(records)} row(s)); nothing to train on")
        self.records = kept

    def _load(self, index: int) -> torch.Tensor:
        rec = self.records[index]
        return self._preprocess(rec, self._read(rec))

    def _preprocess(self, rec: Record, array: np.ndarray) -> torch.Tensor:
        """Preprocess one image; intensities too large for float32 arithmetic are named by row here,
        not found later as a diverging loss."""
        image = self.pre(array)
        if not torch.isfinite(torch.as_tensor(image)).all():
            raise DataError(f"{rec.where()}: the image's intensities (from {float(array.min()):.4g} to "
                            f"{float(array.max()):.4g}) overflow float32 during data.normalization: "
                            f"{self.config.data.normalization}; rescale the image or fix its values")
        return image

    def _read(self, rec: Record) -> np.ndarray:
        """The record's channels as one checked ``(C, *spatial)`` array (errors name the row)."""
        parts = []
        for file in rec.channels:
            try:
                array = read_image(file, resample_spacing=self.config.data.resample_spacing)
            except DataError as err:
                raise DataError(f"{rec.where()}: {err}") from None
            parts.append(to_spatial_dims(array, self.spatial_dims, f"{rec.where()}, file {file}"))
        shapes = {p.shape[1:] for p in parts}
        if len(shapes) > 1:
            raise DataError(f"{rec.where()}: channel images have different shapes {sorted(map(list, shapes))}")
        array = np.concatenate(parts, axis=0)
        if array.shape[0] != self.config.channels:
            raise DataError(f"{rec.where()}: image has {array.shape[0]} channel(s) but the config says channels: {self.config.channels}")
        if not np.isfinite(array).all():
            raise DataError(f"{rec.where()}: image contains NaN or Inf values")
        return array

    def set_epoch(self, epoch: int) -> None:
        """Reseed augmentation so every epoch is reproducible (and resumable) from the seed."""
        if self.aug is not None:
            self.aug.set_random_state(seed=(self.config.seed * 1000 + epoch) % (2**32))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str | None]:
        image = self._cache[index] if index in self._cache else self._load(index)
        if self.aug is not None:
            image = self.aug(image)
        rec = self.records[index]
        return image, -1 if rec.label is None else rec.label, rec.prompt

    @property
    def labels(self) -> list[int | None]:
        return [r.label for r in self.records]


def collate(items: list[tuple[torch.Tensor, int, str | None]]) -> Batch:
    """Stack ``(image, label, prompt)`` items into a :class:`Batch` (labels/prompts only when every item has one)."""
    images = torch.stack([i for i, _, _ in items])
    labels = torch.tensor([l for _, l, _ in items], dtype=torch.long)
    prompts = [p for _, _, p in items]
    return Batch(images, labels if (labels >= 0).all() else None,
                 prompts if all(p is not None for p in prompts) else None)  # type: ignore[arg-type]


def make_loader(dataset: ImageDataset, batch_size: int, *, shuffle: bool, seed: int, rank: int = 0,
                world_size: int = 1, num_workers: int = 0) -> DataLoader:
    """A loader whose order depends only on (seed, epoch, rank): call ``loader.sampler.set_epoch``."""
    sampler: DistributedSampler[int] = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate)


def load_datasets(config: ExperimentConfig, train_csv: str, val_csv: str | None = None) -> tuple[ImageDataset, ImageDataset | None]:
    """Read manifests, split by subject if needed, and build train/validation datasets."""
    checks = dict(expected_channels=config.channels, num_classes=config.num_classes, require_prompt=config.text is not None)
    records = read_manifest(train_csv, **checks)  # type: ignore[arg-type]
    if val_csv is not None:
        train_records = records
        val_records = read_manifest(val_csv, **checks)  # type: ignore[arg-type]
    else:
        train_records, val_records = split_by_subject(records, config.data.val_fraction, config.seed)
    if val_csv is not None:
        _refuse_overlap(train_records, val_records, train_csv, val_csv)
    _check_classes(train_records, config.num_classes, train_csv)
    train = ImageDataset(train_records, config, train=True)
    val = ImageDataset(val_records, config, train=False) if val_records else None
    return train, val


def _check_memory(records: Sequence[Record], config: ExperimentConfig) -> None:
    """Images the machine cannot hold are refused before the first one is resized (float32, in memory)."""
    one = 4 * config.channels * math.prod(config.image_size)
    total = one * len(records) if config.data.cache else one * 2 * config.training.batch_size
    have = host_memory_available()
    if total > have:
        what = (f"caching {len(records)} images of {list(config.image_size)} x {config.channels} channel(s)"
                if config.data.cache else f"a batch of {config.training.batch_size} images of {list(config.image_size)}")
        hint = "set data.cache: false or " if config.data.cache and one * 2 * config.training.batch_size < have else ""
        raise DataError(f"{records[0].source}: {what} needs {total / 2**30:.1f} GiB but {have / 2**30:.1f} GiB are "
                        f"available; {hint}choose a smaller image_size")


def _refuse_overlap(train: Sequence[Record], val: Sequence[Record], train_csv: str, val_csv: str) -> None:
    """Validation images that are also training images would make ``best.ckpt`` a measure of memory."""
    train_files = {f for r in train for f in r.channels}
    shared = [r for r in val if any(f in train_files for f in r.channels)]
    if shared:
        same = " (it is the training CSV)" if Path(val_csv).resolve() == Path(train_csv).resolve() else ""
        raise DataError(f"--val-data {val_csv}{same}: {len(shared)} of its {len(val)} image(s) are training images "
                        f"of {train_csv}, first {shared[0].where()}: {shared[0].channels[0]}; validate on held-out images")


def _check_classes(records: Sequence[Record], num_classes: int, csv: str) -> None:
    """A class the training data never shows cannot be learnt: generating it would be noise."""
    if num_classes <= 0:
        return
    present = {r.label for r in records}
    missing = [c for c in range(num_classes) if c not in present]
    if missing:
        raise DataError(f"{csv}: num_classes is {num_classes} but no training row has Label "
                        f"{', '.join(map(str, missing))}; set num_classes to the classes the data has or add images")
