"""Shared fixtures: real brain-MRI slices (MNI152 from nilearn, Colin27 from mricron-data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


class DemoData(dict):
    """The demo CSVs; a test asking for a brain that is not installed is skipped, with the reason."""

    def __missing__(self, key: str) -> Path:
        if key == "colin27":
            pytest.skip("Colin27 needs Debian's mricron-data (/usr/share/mricron/templates/ch2.nii.gz); "
                        "apt-get install mricron-data")
        raise KeyError(key)


def _volumes() -> list[str] | None:
    """``FEDSYNTH_TEST_NO_COLIN27=1`` runs the suite as on a machine without mricron-data."""
    return ["mni152"] if os.environ.get("FEDSYNTH_TEST_NO_COLIN27") == "1" else None


@pytest.fixture(scope="session")
def mri2d(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """32x32 axial slices: ``{"mni152": csv, "colin27": csv (if installed), "all": csv}`` with labels."""
    from fedsynth.demo import build_demo_dataset

    return DemoData(build_demo_dataset(tmp_path_factory.mktemp("mri2d"), image_size=32, count=24, spatial_dims=2,
                                       volumes=_volumes()))


@pytest.fixture(scope="session")
def mri3d(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """16^3 sub-volumes of each brain, same layout as :func:`mri2d`."""
    from fedsynth.demo import build_demo_dataset

    return DemoData(build_demo_dataset(tmp_path_factory.mktemp("mri3d"), image_size=16, count=8, spatial_dims=3,
                                       volumes=_volumes()))


def tiny_config(family: str, spatial_dims: int = 2, num_classes: int = 0, **overrides: object):
    """A config sized for tests: tiny networks, few steps, no progress bars."""
    from fedsynth.config import config_from_dict
    from fedsynth.families import family as registered

    size = 32 if spatial_dims == 2 else 16
    model: dict[str, object] = {"family": family, **registered(family).test_model}
    data: dict[str, object] = {
        "spatial_dims": spatial_dims, "image_size": size, "num_classes": num_classes, "seed": 0,
        "model": model,
        "training": {"epochs": 2, "batch_size": 8 if spatial_dims == 2 else 4, "progress": False,
                     "tensorboard": False, "sample_every": 100, "num_sample_images": 4},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            data.setdefault(section, {})[field] = value  # type: ignore[index]
        else:
            data[section] = value
    return config_from_dict(data, "tiny_config")
