"""Radiomic features: the Fréchet Radiomics Distance and a per-feature first-order comparison.

Features are computed on the whole image (mask = every voxel but one corner, the usual
pyradiomics workaround for full masks) with a fixed **bin count** (default 32): images scaled to
[0, 1] would fall into a single bin with pyradiomics' default bin width of 25.

Backend: ``pyradiomics-bhklab`` (the maintained pyradiomics fork that installs on Python 3.11;
``pip install fedsynth[eval]``) gives first-order + texture features (GLCM, GLRLM, GLSZM, GLDM,
NGTDM) of the original image. Without it, first-order features are computed here with numpy
following the IBSI definitions, and the FRD uses those only (the report says which).

FRD follows Konz, Osuala et al. (FRDv1): features are z-scored with the real set's mean/std and
the Fréchet distance between the two Gaussians is reported (lower is better, 0 = identical
statistics).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from scipy import stats

from fedsynth.metrics.features import frechet_distance

TEXTURE_CLASSES = ("glcm", "glrlm", "glszm", "gldm", "ngtdm")
FIRST_ORDER = ("10Percentile", "90Percentile", "Energy", "Entropy", "InterquartileRange", "Kurtosis", "Maximum",
               "MeanAbsoluteDeviation", "Mean", "Median", "Minimum", "Range", "RobustMeanAbsoluteDeviation",
               "RootMeanSquared", "Skewness", "Uniformity", "Variance")


def backend() -> str:
    """``"pyradiomics-bhklab <version>"`` if importable, else ``"numpy (IBSI first-order)"``."""
    try:
        import radiomics

        return f"pyradiomics-bhklab {getattr(radiomics, '__version__', '?')}"
    except ImportError:
        return "numpy (IBSI first-order)"


def first_order_numpy(voxels: np.ndarray, bin_count: int = 32) -> dict[str, float]:
    """IBSI first-order statistics of a voxel array (the same names and definitions as pyradiomics)."""
    x = voxels.astype(np.float64).ravel()
    p10, p25, p50, p75, p90 = np.percentile(x, [10, 25, 50, 75, 90])
    mean = x.mean()
    dev = x - mean
    var = float((dev**2).mean())
    sd = np.sqrt(var)
    robust = x[(x >= p10) & (x <= p90)]
    lo, hi = x.min(), x.max()
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bin_count + 1)
    counts, _ = np.histogram(x, bins=edges)
    p = counts[counts > 0] / x.size
    return {
        "10Percentile": p10, "90Percentile": p90, "Energy": float((x**2).sum()),
        "Entropy": float(-(p * np.log2(p + np.finfo(float).eps)).sum()), "InterquartileRange": p75 - p25,
        "Kurtosis": float((dev**4).mean() / var**2) if var > 0 else 0.0, "Maximum": hi,
        "MeanAbsoluteDeviation": float(np.abs(dev).mean()), "Mean": mean, "Median": p50, "Minimum": lo,
        "Range": hi - lo, "RobustMeanAbsoluteDeviation": float(np.abs(robust - robust.mean()).mean()),
        "RootMeanSquared": float(np.sqrt((x**2).mean())),
        "Skewness": float((dev**3).mean() / sd**3) if sd > 0 else 0.0,
        "Uniformity": float((p**2).sum()), "Variance": var,
    }


def _pyradiomics_extractor(bin_count: int, spatial_dims: int) -> Callable[[np.ndarray], dict[str, float]]:
    import radiomics
    import SimpleITK as sitk
    from radiomics import featureextractor

    radiomics.setVerbosity(logging.ERROR)
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    extractor = featureextractor.RadiomicsFeatureExtractor(binCount=bin_count, label=1, force2D=spatial_dims == 2)
    extractor.disableAllFeatures()
    extractor.enableFeatureClassByName("firstorder")
    for cls in TEXTURE_CLASSES:
        extractor.enableFeatureClassByName(cls)

    def run(image: np.ndarray) -> dict[str, float]:
        vol = image[None] if image.ndim == 2 else image
        mask = np.ones(vol.shape, np.uint8)
        mask[(0,) * vol.ndim] = 0
        out = extractor.execute(sitk.GetImageFromArray(vol.astype(np.float32)), sitk.GetImageFromArray(mask))
        return {k.replace("original_", ""): float(v) for k, v in out.items() if not k.startswith("diagnostics")}

    return run


def extract(images: np.ndarray, bin_count: int = 32, use_pyradiomics: bool | None = None,
            tick: Callable[[int], None] | None = None) -> tuple[list[str], np.ndarray, int]:
    """Radiomic features of ``(N, C, *spatial)`` images: ``(names, (N, F) matrix, failed_count)``;
    ``tick(1)`` after each image.

    Channels are featurised separately (names prefixed ``c<k>_`` when C > 1). An image on which
    extraction fails (e.g. a constant image) gets NaN features and is counted in ``failed_count``.
    """
    if use_pyradiomics is None:
        use_pyradiomics = not backend().startswith("numpy")
    spatial_dims = images.ndim - 2
    if use_pyradiomics:
        run = _pyradiomics_extractor(bin_count, spatial_dims)
    else:
        def run(image: np.ndarray) -> dict[str, float]:
            return {f"firstorder_{k}": float(v) for k, v in first_order_numpy(image, bin_count).items()}
    rows: list[dict[str, float]] = []
    failed = 0
    for image in images:
        row: dict[str, float] = {}
        for c in range(image.shape[0]):
            prefix = f"c{c}_" if image.shape[0] > 1 else ""
            try:
                feats = run(image[c])
            except Exception:  # noqa: BLE001 - pyradiomics raises bare exceptions on degenerate images
                feats = {}
                failed += 1
            row.update({prefix + k: v for k, v in feats.items()})
        rows.append(row)
        if tick is not None:
            tick(1)
    names = sorted({k for r in rows for k in r})
    matrix = np.array([[r.get(k, np.nan) for k in names] for r in rows], dtype=np.float64)
    return names, matrix, failed


def zscore_by_reference(real: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-score both matrices with the real set's per-feature mean/std; drop features constant or NaN in real.

    Returns ``(real_z, other_z, kept_column_mask)``; NaN in ``other`` becomes +10 (far from real).
    """
    mean = np.nanmean(real, axis=0)
    std = np.nanstd(real, axis=0)
    keep = np.isfinite(mean) & np.isfinite(std) & (std > 1e-12) & np.isfinite(real).all(axis=0)
    rz = (real[:, keep] - mean[keep]) / std[keep]
    oz = (other[:, keep] - mean[keep]) / std[keep]
    oz = np.where(np.isfinite(oz), oz, 10.0)
    return rz, oz, keep


def frd(real_features: np.ndarray, synthetic_features: np.ndarray) -> tuple[float, int]:
    """Fréchet Radiomics Distance and the number of features used."""
    rz, sz, keep = zscore_by_reference(real_features, synthetic_features)
    return frechet_distance(rz, sz), int(keep.sum())


def per_feature(names: list[str], real: np.ndarray, synthetic: np.ndarray) -> dict[str, dict[str, float]]:
    """For each first-order feature: real/synthetic mean, Wasserstein-1 (in real-std units) and KS test."""
    out: dict[str, dict[str, float]] = {}
    for j, name in enumerate(names):
        if "firstorder_" not in name:
            continue
        r, s = real[:, j], synthetic[:, j]
        r, s = r[np.isfinite(r)], s[np.isfinite(s)]
        if len(r) < 2 or len(s) < 1:
            continue
        scale = float(np.std(r)) or 1.0
        ks = stats.ks_2samp(r, s)
        out[name.replace("firstorder_", "")] = {
            "real_mean": float(np.mean(r)), "synthetic_mean": float(np.mean(s)),
            "wasserstein": float(stats.wasserstein_distance(r, s) / scale),
            "ks_statistic": float(ks.statistic), "ks_pvalue": float(ks.pvalue),
        }
    return out
