"""Image reading (SimpleITK), preprocessing and augmentation (MONAI transforms), 2D and 3D.

Arrays are channel-first, ``(C, *spatial)``, float32. Spatial axes follow SimpleITK's array
order (``z, y, x`` / ``y, x``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai import transforms as mt

from fedsynth.config import AugmentationConfig, DataConfig
from fedsynth.errors import DataError
from fedsynth.io import atomic_path


def read_image(path: Path, *, resample_spacing: list[float] | None = None) -> np.ndarray:
    """Read one image (file or DICOM series folder) as ``(components, *spatial)`` float32.

    NIfTI files are first checked with nibabel (:func:`check_nifti`): SimpleITK zero-fills a
    truncated NIfTI file and reads NaN/Inf voxels as 0, so neither would be noticed otherwise.
    Any other format's NaN/Inf survive SimpleITK's read and are refused by :func:`check_finite`.
    """
    path = Path(path)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        check_nifti(path)
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            names = reader.GetGDCMSeriesFileNames(str(path))
            if not names:
                raise RuntimeError("no DICOM series in folder")
            reader.SetFileNames(names)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot read image {path}: {first}") from None
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        check_real(np.dtype(np.complex64), f"image {path}")
    if resample_spacing is not None:
        image = _resample(image, resample_spacing, path)
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if image.GetNumberOfComponentsPerPixel() > 1:  # RGB(A) PNG/TIFF: components last
        array = np.moveaxis(array, -1, 0)
    else:
        array = array[None]
    check_finite(array, f"image {path}")
    return array


def check_nifti(path: Path) -> None:
    """Refuse a NIfTI file that is truncated, corrupt, or holds NaN/Inf voxels (:class:`DataError`)."""
    import nibabel as nib

    try:
        img = nib.load(str(path), mmap=False)
        if not isinstance(img, nib.Nifti1Image):  # NIfTI-2 images are Nifti1Image too
            raise ValueError(f"nibabel reads it as {type(img).__name__}")
        header = img.header
        shape = tuple(int(s) for s in header.get_data_shape())
        need = int(np.prod(shape)) * np.dtype(header.get_data_dtype()).itemsize
        offset = int(header.get_data_offset())
    except Exception as err:  # nibabel raises many types for a damaged header or gzip stream
        raise DataError(f"cannot read image {path}: not a readable NIfTI file ({_reason(err)})") from None
    if not path.name.lower().endswith(".gz"):
        size = path.stat().st_size
        if size < offset + need:
            raise DataError(f"image {path} is truncated: its header promises {need} bytes of voxels after byte {offset}, "
                            f"the file has {size} bytes")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:
        raise DataError(f"image {path} is truncated or corrupt: {_reason(err)}") from None
    check_real(data.dtype, f"image {path}")
    check_finite(data, f"image {path}")


def check_real(dtype: np.dtype, what: str) -> None:
    """Refuse complex-valued images (e.g. raw k-space or phase data): a magnitude is a choice the user makes."""
    if np.issubdtype(dtype, np.complexfloating):
        raise DataError(f"{what} is complex-valued ({dtype}); store the magnitude (or the channel you want) as a "
                        "real-valued image")


def check_finite(array: np.ndarray, what: str) -> None:
    """Refuse arrays with NaN or Inf values, saying how many voxels are bad."""
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        n_nan, n_inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        raise DataError(f"{what} contains {n_nan} NaN and {n_inf} Inf value(s) of {array.size}: fix or remove the file")


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1]}" if text else type(err).__name__


def _resample(image: sitk.Image, spacing: list[float], path: Path) -> sitk.Image:
    if len(spacing) != image.GetDimension():
        raise DataError(f"data.resample_spacing has {len(spacing)} values but {path} is {image.GetDimension()}D")
    old_size, old_spacing = image.GetSize(), image.GetSpacing()
    new_size = [max(1, int(round(sz * sp / ns))) for sz, sp, ns in zip(old_size, old_spacing, spacing, strict=False)]
    return sitk.Resample(image, new_size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                         image.GetDirection(), 0.0, image.GetPixelID())


def to_spatial_dims(array: np.ndarray, spatial_dims: int, where: str) -> np.ndarray:
    """Squeeze singleton spatial axes until the array has ``spatial_dims`` of them."""
    while array.ndim - 1 > spatial_dims:
        singletons = [ax for ax in range(1, array.ndim) if array.shape[ax] == 1]
        if not singletons:
            break
        array = np.squeeze(array, axis=singletons[0])
    if array.ndim - 1 != spatial_dims:
        raise DataError(f"{where}: image is {array.ndim - 1}D with shape {list(array.shape[1:])}, "
                        f"but the config says spatial_dims: {spatial_dims}")
    if spatial_dims == 3 and min(array.shape[1:]) == 1:
        raise DataError(f"{where}: image is a 2D slice stored as a volume (shape {list(array.shape[1:])}), "
                        f"but the config says spatial_dims: 3; use spatial_dims: 2 or 3D volumes")
    return array


def preprocessing(config: DataConfig, image_size: list[int]) -> mt.Compose:
    """Deterministic preprocessing: size, then intensity normalisation (per channel)."""
    steps: list[mt.Transform] = []
    if config.resize_mode == "resize":
        steps.append(mt.Resize(spatial_size=image_size, mode="area"))
    else:
        steps.append(mt.ResizeWithPadOrCrop(spatial_size=image_size))
    if config.normalization == "minmax":
        steps.append(mt.ScaleIntensity(minv=0.0, maxv=1.0, channel_wise=True))
    elif config.normalization == "percentile":
        lo, hi = config.percentiles
        steps.append(mt.ScaleIntensityRangePercentiles(lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True, channel_wise=True))
    else:
        steps.append(mt.NormalizeIntensity(channel_wise=True))
    steps.append(mt.EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False))
    return mt.Compose(steps)


def augmentation(augs: list[AugmentationConfig], spatial_dims: int) -> mt.Compose | None:
    """Random train-time transforms from the config (``None`` when there are none)."""
    if not augs:
        return None
    steps: list[mt.Transform] = []
    for a in augs:
        if a.name == "flip":
            steps.append(mt.RandFlip(prob=a.prob, spatial_axis=a.spatial_axis))
        elif a.name == "rotate90":
            steps.append(mt.RandRotate90(prob=a.prob, spatial_axes=(0, 1)))
        elif a.name == "affine":
            rot = a.rotate_range if spatial_dims == 2 else (a.rotate_range,) * 3
            steps.append(mt.RandAffine(prob=a.prob, rotate_range=rot, scale_range=a.scale_range, padding_mode="zeros"))
        elif a.name == "gaussian_noise":
            steps.append(mt.RandGaussianNoise(prob=a.prob, std=a.std))
        elif a.name == "contrast":
            steps.append(mt.RandAdjustContrast(prob=a.prob, gamma=a.gamma))
        elif a.name == "intensity_shift":
            steps.append(mt.RandShiftIntensity(prob=a.prob, offsets=a.offset))
    steps.append(mt.EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False))
    return mt.Compose(steps)


def save_image(array: np.ndarray, path: Path) -> None:
    """Write a ``(C, *spatial)`` array in [0, 1] as NIfTI (any dims) or PNG (2D, 1 or 3 channels)."""

    name = path.name.lower()
    if name.endswith(".png"):
        if array.ndim != 3 or array.shape[0] not in (1, 3):
            raise ValueError(f"PNG needs a 2D image with 1 or 3 channels, got shape {array.shape}")
        data = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
        image = sitk.GetImageFromArray(data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1),
                                       isVector=data.shape[0] == 3)
    else:
        data = array.astype(np.float32)
        image = sitk.GetImageFromArray(data[0]) if data.shape[0] == 1 else sitk.JoinSeries([sitk.GetImageFromArray(c) for c in data])
    suffix = ".nii.gz" if name.endswith(".nii.gz") else path.suffix
    with atomic_path(path) as tmp:
        target = tmp.with_name(tmp.name + suffix)
        sitk.WriteImage(image, str(target))
        target.replace(tmp)
