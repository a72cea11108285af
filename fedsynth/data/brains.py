"""A real brain-MRI data set that installs offline: 2D slices (three planes) and small 3D volumes.

Sources (T1-weighted, all in MNI-like world space, read in RAS+ orientation with nibabel):

- ``mni152``: the MNI ICBM152 2009 template shipped inside ``nilearn`` (one "brain");
- ``ch2``, ``ch2bet``, ``ch2better``: Debian ``mricron-data``'s Colin27 T1 with skull, brain-extracted,
  and the 0.5 mm "better" version (resampled to 1 mm). They are **one brain** (Colin Holmes).

**Split rule (no held-out slice neighbours a training slice).** Along each plane's axis the world
coordinate ``c`` (mm) is cut into 24 mm cycles, ``p = c mod 24``: ``p < 14`` train, ``17 <= p < 21``
held-out, the 3 mm gaps on both sides of each held-out slab are dropped. The rule uses world
coordinates, so the same anatomy of ch2/ch2bet/ch2better lands in the same split. At 64x64 one
pixel is about 3 mm, so every held-out slice is at least 4 mm (more than a pixel) from any training
slice. Gap slices are written too (``slices.csv`` lists them with split ``gap``) but are in no
training or held-out CSV. ``slices.csv`` records every slice's split, so ``fedsynth construct-csv
--input-dir brains/slices/mni152 --split train`` lists the training slices of one folder only.

**Brain-containing slices only:** a slice is kept when its brain area (voxels above 15 % of the
volume's 99.5th percentile) is at least 15 % of the largest area along that axis.

**Sites:** one site per brain (non-IID): ``mni152`` and ``colin27`` (its three versions).

**Label columns** (for downstream-utility tasks, :data:`LABEL_TASKS`): ``Label_plane`` (3 classes)
and ``Label_plane_third`` (9 classes: plane x third of the brain along the plane's axis).

**Prompts** (the CSVs' ``Prompt`` column, for text-conditional models) are written from each
slice's real metadata: its plane, which third of the brain along that plane's axis it lies in
(left/middle/right, posterior/middle/anterior, inferior/middle/superior) and its volume, e.g.
``"coronal T1 slice, posterior, Colin27 skull-stripped"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsynth.data.images import save_image
from fedsynth.data.manifest import SPLIT_INDEX, read_manifest, write_manifest
from fedsynth.errors import DataError
from fedsynth.io import atomic_write_text

MRICRON = Path("/usr/share/mricron/templates")
#: volume name -> brain (site) it belongs to
VOLUMES = {"mni152": "mni152", "ch2": "colin27", "ch2bet": "colin27", "ch2better": "colin27"}
PLANES = {"sagittal": 0, "coronal": 1, "axial": 2}  # RAS+ array axis that each plane cuts
CYCLE_MM, TRAIN_MM, HELD_OUT_MM = 24.0, (0.0, 14.0), (17.0, 21.0)
#: words for the thirds of the brain along each plane's (RAS+) axis, in increasing coordinate
THIRDS = {"sagittal": ("left", "middle", "right"), "coronal": ("posterior", "middle", "anterior"),
          "axial": ("inferior", "middle", "superior")}
#: how each volume is named in prompts
DESCRIPTIONS = {"mni152": "MNI152 template", "ch2": "Colin27 with skull", "ch2bet": "Colin27 skull-stripped",
                "ch2better": "Colin27 high resolution"}


#: label tasks written as CSV columns (``fedsynth evaluate --utility-label plane`` reads ``Label_plane``):
#: the slice's plane (0 sagittal, 1 coronal, 2 axial) and plane x third along its axis (``3 * plane + third``,
#: thirds in increasing coordinate as in ``THIRDS``)
LABEL_TASKS: dict[str, Callable[[SliceRow], int]] = {
    "Label_plane": lambda r: list(PLANES).index(r.plane),
    "Label_plane_third": lambda r: 3 * list(PLANES).index(r.plane) + THIRDS[r.plane].index(r.third),
}


@dataclass(frozen=True)
class SliceRow:
    """One written slice and where it came from."""

    path: Path
    volume: str
    brain: str
    plane: str
    position_mm: float
    split: str
    third: str = ""

    @property
    def prompt(self) -> str:
        """The slice described in words, from its metadata."""
        return f"{self.plane} T1 slice, {self.third}, {DESCRIPTIONS[self.volume]}"


def split_of(position_mm: float) -> str | None:
    """``"train"``, ``"held_out"`` or ``None`` (in a gap) for a slice at world coordinate ``position_mm``."""
    p = float(position_mm) % CYCLE_MM
    if TRAIN_MM[0] <= p < TRAIN_MM[1]:
        return "train"
    if HELD_OUT_MM[0] <= p < HELD_OUT_MM[1]:
        return "held_out"
    return None


def mni152_template() -> Any:
    """nilearn's MNI ICBM152 2009 T1 template at 1 mm (a nibabel image); needs the ``demo`` extra."""
    try:
        from nilearn.datasets import load_mni152_template
    except ImportError:
        raise DataError("the MNI152 brain ships inside nilearn, which is not installed: "
                        "pip install 'fedsynth[demo]'") from None
    return load_mni152_template(resolution=1)


def available_volumes() -> list[str]:
    """Volumes present on this machine (MNI152 always, the Colin27 versions if mricron-data is installed)."""
    return ["mni152"] + [n for n in ("ch2", "ch2bet", "ch2better") if (MRICRON / f"{n}.nii.gz").is_file()]


def load_canonical(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(volume, affine)``: a float32 RAS+ array at 1 mm and its voxel-to-world affine."""
    import nibabel as nib

    if name == "mni152":
        img = mni152_template()
    elif name in VOLUMES:
        path = MRICRON / f"{name}.nii.gz"
        if not path.is_file():
            raise DataError(f"{path} not found: install Debian's mricron-data (apt-get install mricron-data)")
        img = nib.load(str(path))
    else:
        raise DataError(f"unknown volume '{name}': expected one of {sorted(VOLUMES)}")
    img = nib.as_closest_canonical(img)
    data = np.asarray(img.get_fdata(), dtype=np.float32)
    affine = np.asarray(img.affine, dtype=np.float64)
    zooms = np.abs(np.diag(affine)[:3])
    factor = np.round(1.0 / zooms).astype(int)
    if (factor > 1).any():  # 0.5 mm -> 1 mm by block averaging
        f = tuple(int(x) for x in factor)
        shape = tuple(s // k * k for s, k in zip(data.shape, f, strict=False))
        data = data[: shape[0], : shape[1], : shape[2]]
        data = data.reshape(shape[0] // f[0], f[0], shape[1] // f[1], f[1], shape[2] // f[2], f[2]).mean((1, 3, 5))
        affine = affine.copy()
        affine[:3, :3] = affine[:3, :3] * np.array(f)[None, :]
        affine[:3, 3] += affine[:3, :3] @ ((1.0 / np.array(f) - 1) / 2)  # centre of each averaged block
    return data, affine


def _normalise(volume: np.ndarray) -> np.ndarray:
    hi = float(np.percentile(volume[volume > 0], 99.5)) if (volume > 0).any() else 1.0
    return np.clip(volume / max(hi, 1e-6), 0.0, 1.0).astype(np.float32)


def resize(array: np.ndarray, size: list[int]) -> np.ndarray:
    """Resize a 2D (antialiased bilinear) or 3D (trilinear) array to ``size``."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    mode = "bilinear" if array.ndim == 2 else "trilinear"
    return F.interpolate(t, size=size, mode=mode, align_corners=False, antialias=array.ndim == 2)[0, 0].numpy()


def _square(sl: np.ndarray) -> np.ndarray:
    side = max(sl.shape)
    out = np.zeros((side, side), np.float32)
    oy, ox = (side - sl.shape[0]) // 2, (side - sl.shape[1]) // 2
    out[oy:oy + sl.shape[0], ox:ox + sl.shape[1]] = sl
    return out


def _view(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Radiological-style 2D view: rows top->bottom = anterior/superior first."""
    sl = np.take(volume, index, axis=axis)
    # remaining axes in order; put the second one (y or z) on rows, flipped so it grows upwards
    return np.flipud(sl.T)


def volume_slices(name: str, out_dir: Path, image_size: int = 64) -> list[SliceRow]:
    """Write every brain-containing slice of one volume in the three planes; returns their rows."""
    volume, affine = load_canonical(name)
    volume = _normalise(volume)
    mask = volume > 0.15
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0) + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=False))
    brain, bmask = volume[box], mask[box]
    rows: list[SliceRow] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for plane, axis in PLANES.items():
        areas = bmask.sum(axis=tuple(a for a in range(3) if a != axis))
        keep = areas >= 0.15 * areas.max()
        kept = np.flatnonzero(keep)
        for i in kept:
            third = THIRDS[plane][min(2, int(3 * (i - kept[0]) / max(1, kept[-1] - kept[0] + 1)))]
            index = int(lo[axis] + i)
            position = float(affine[axis, axis] * index + affine[axis, 3])
            split = split_of(position) or "gap"
            img = np.clip(resize(_square(_view(brain, axis, int(i))), [image_size, image_size]), 0, 1)
            path = out_dir / f"{name}_{plane}_{position:+06.1f}mm.nii.gz".replace("+", "p").replace("-", "m")
            save_image(img[None].astype(np.float32), path)
            rows.append(SliceRow(path, name, VOLUMES[name], plane, position, split, third))
    return rows


def write_slice_index(out: Path, rows: Sequence[SliceRow]) -> Path:
    """Write ``out/slices.csv``: every slice (gap slices too) with its plane, position and split, paths
    relative to ``out`` (``fedsynth construct-csv --split`` reads it: :func:`fedsynth.data.manifest.read_split_index`)."""
    import csv
    import io

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "volume", "brain", "plane", "position_mm", "split", "third", "prompt"])
    writer.writerows([str(r.path.relative_to(out)), r.volume, r.brain, r.plane, f"{r.position_mm:.1f}", r.split,
                      r.third, r.prompt] for r in rows)
    index = out / SPLIT_INDEX
    atomic_write_text(index, text.getvalue())
    return index


def build_brain_dataset(out_dir: str | Path, *, image_size: int = 64, volumes: Sequence[str] | None = None,
                        volume_sizes: tuple[int, ...] = (32, 64),
                        progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Write the 2D slice set, its CSVs and a small 3D set; returns the CSV paths by name.

    CSVs (GaNDLF convention, ``SubjectID`` = ``<volume>_<plane>_<position>`` so every slice is its
    own subject): ``train.csv``, ``held_out.csv``, and per site ``<brain>_train.csv`` /
    ``<brain>_held_out.csv``; ``slices.csv`` lists every slice with its plane, position and split.
    3D: ``volumes_<size>.csv`` with each brain volume cropped to the brain and resized (plus its
    left-right mirror). ``progress`` is called once per volume written, in 2D and then per 3D size
    (``len(volumes) * (1 + len(volume_sizes))`` calls), with what was written.
    """
    out = Path(out_dir)
    names = volumes or available_volumes()
    rows: list[SliceRow] = []
    for name in names:
        rows += volume_slices(name, out / "slices" / name, image_size)
        if progress is not None:
            progress(f"{name} slices")
    csvs: dict[str, Path] = {}

    def write(key: str, selected: list[SliceRow]) -> None:
        if selected:
            csvs[key] = out / f"{key}.csv"
            write_manifest(csvs[key], [(r.path.name.split(".")[0], [r.path], None) for r in selected],
                           prompts=[r.prompt for r in selected],
                           columns={name: [task(r) for r in selected] for name, task in LABEL_TASKS.items()})

    for split in ("train", "held_out"):
        write(split, [r for r in rows if r.split == split])
        for brain in sorted({r.brain for r in rows}):
            write(f"{brain}_{split}", [r for r in rows if r.split == split and r.brain == brain])
    csvs["slices"] = write_slice_index(out, rows)
    for size in volume_sizes:
        vol_rows = []
        for name in names:
            volume, _ = load_canonical(name)
            volume = _normalise(volume)
            idx = np.argwhere(volume > 0.15)
            lo, hi = idx.min(0), idx.max(0) + 1
            crop = volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            for flip in (False, True):
                arr = np.clip(resize(crop[::-1] if flip else crop, [size] * 3), 0, 1)
                path = out / f"volumes_{size}" / f"{name}{'_mirrored' if flip else ''}.nii.gz"
                save_image(arr[None].astype(np.float32), path)
                vol_rows.append((path.name.split(".")[0], [path], None))
            if progress is not None:
                progress(f"{name} {size}^3")
        csvs[f"volumes_{size}"] = out / f"volumes_{size}.csv"
        write_manifest(csvs[f"volumes_{size}"], vol_rows)
    return csvs


def summary(csvs: dict[str, Path]) -> str:
    """One line per CSV with its row count."""

    return "\n".join(f"{k}: {v} ({len(read_manifest(v)) if k != 'slices' else 'index'} rows)" for k, v in csvs.items())
