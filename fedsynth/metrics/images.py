"""Reading the two image sets an evaluation compares, through the core data pipeline.

Real images come from a CSV manifest; synthetic ones from a folder (as written by
``fedsynth generate``: its ``manifest.csv`` is used when present) or a CSV. Both go through the
same :class:`fedsynth.data.ImageDataset` preprocessing (resize to ``image_size`` + intensity
normalisation from the config), so they are compared in the same geometry and range.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsynth.config import ExperimentConfig, default_config, load_config
from fedsynth.data.dataset import ImageDataset
from fedsynth.data.images import read_image, to_spatial_dims
from fedsynth.data.manifest import IMAGE_SUFFIXES, Record, read_manifest
from fedsynth.errors import DataError
from fedsynth.progress import Tick

log = logging.getLogger("fedsynth.evaluate")

#: files in a generation folder that are not samples
_SKIP_NAMES = {"grid.png"}


@dataclass(frozen=True)
class ImageSet:
    """Preprocessed images ``(N, C, *spatial)`` in the config's range, with their ids and source."""

    images: np.ndarray
    ids: list[str]
    source: str
    rows: tuple[int, ...] = ()  # each image's data row in the source CSV (constant images are dropped on loading)

    def __len__(self) -> int:
        return len(self.images)


def infer_config(real_csv: str | Path, config_path: str | Path | None = None) -> ExperimentConfig:
    """The config that defines geometry and normalisation: ``config_path``, else inferred from the first real image."""
    if config_path is not None:
        return load_config(config_path)
    records = read_manifest(real_csv)
    first = records[0]
    array = read_image(first.channels[0])
    # a 2D slice stored as a one-slice volume (a trailing or leading singleton axis) is 2D
    spatial_dims = 3 if sum(s > 1 for s in array.shape[1:]) >= 3 else 2
    array = to_spatial_dims(array, spatial_dims, f"{first.where()}, file {first.channels[0]}")
    size = [int(s) for s in array.shape[1:]]
    if any(s < 8 for s in size):
        raise DataError(f"{first.where()}: image size {size} is below 8 pixels per axis; pass --config with image_size")
    return default_config("autoencoder", len(size), size, channels=len(first.channels) * array.shape[0])


def stack(records: list[Record], config: ExperimentConfig, source: str, tick: Tick | None = None) -> ImageSet:
    """The images of ``records``, preprocessed as in training; ``tick(1)`` after each record read."""
    dataset = ImageDataset(records, config, train=False, progress=tick)
    images = np.stack([dataset[i][0].numpy() for i in range(len(dataset))]).astype(np.float32)
    return ImageSet(images, [r.subject_id for r in dataset.records], source, tuple(r.row for r in dataset.records))


def real_records(csv: str | Path, config: ExperimentConfig) -> list[Record]:
    """The rows of a real CSV manifest (read, not yet loaded)."""
    return read_manifest(csv, expected_channels=config.channels)


def load_real(csv: str | Path, config: ExperimentConfig) -> ImageSet:
    """Real images from a CSV manifest, preprocessed as in training."""
    return stack(real_records(csv, config), config, str(csv))


def _folder_records(folder: Path, channels: int) -> list[Record]:
    manifest = folder / "manifest.csv"
    if manifest.is_file():
        return read_manifest(manifest, expected_channels=channels)
    files = sorted(f for f in folder.iterdir()
                   if f.is_file() and f.name not in _SKIP_NAMES and any(f.name.lower().endswith(s) for s in IMAGE_SUFFIXES))
    if not files:
        raise DataError(f"synthetic folder {folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)}) and no manifest.csv")
    if channels != 1:
        raise DataError(f"synthetic folder {folder} has no manifest.csv; {channels}-channel images need a CSV with Channel_0..{channels - 1}")
    if any(f.name.startswith("synthetic_") for f in files) or (folder / "grid.png").exists():
        log.warning("warning: synthetic folder %s has no manifest.csv: it looks like an interrupted `fedsynth generate` "
                    "(%d image(s) found); scoring every image in it", folder, len(files))
    return [Record(f.name.split(".")[0], (f,), None, i + 1, str(folder)) for i, f in enumerate(files)]


def synthetic_records(path: str | Path, config: ExperimentConfig) -> list[Record]:
    """The synthetic images of a folder (``manifest.csv`` if present, else every image file) or a CSV, as records."""
    path = Path(path)
    if path.is_dir():
        return _folder_records(path, config.channels)
    if path.is_file() and path.suffix.lower() == ".csv":
        return read_manifest(path, expected_channels=config.channels)
    if path.exists():
        raise DataError(f"--synthetic {path}: expected a folder of images or a CSV manifest, got a {path.suffix or 'plain'} file")
    raise DataError(f"--synthetic {path}: no such folder or CSV")


def load_synthetic(path: str | Path, config: ExperimentConfig) -> ImageSet:
    """Synthetic images from a folder (``manifest.csv`` if present, else every image file) or a CSV."""
    return stack(synthetic_records(path, config), config, str(path))


def check_pair(real: ImageSet, synthetic: ImageSet, minimum: int = 2) -> None:
    """Both sets large enough and of the same geometry (raise :class:`DataError` otherwise)."""
    for name, s in (("real", real), ("synthetic", synthetic)):
        if len(s) < minimum:
            raise DataError(f"{name} images ({s.source}): {len(s)} image(s), at least {minimum} are needed")
    if real.images.shape[1:] != synthetic.images.shape[1:]:
        raise DataError(f"real images have shape {list(real.images.shape[1:])} but synthetic ones "
                        f"{list(synthetic.images.shape[1:])} after preprocessing")
