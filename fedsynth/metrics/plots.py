"""The evaluation PNG: real vs synthetic sample grids and per-feature histograms (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedsynth.generation import image_grid
from fedsynth.io import atomic_path
from fedsynth.metrics import radiomics as rad
from fedsynth.metrics.images import ImageSet

#: first-order features shown as histograms (the rest are in the JSON)
SHOWN_FEATURES = ("Mean", "Variance", "Entropy", "Skewness", "Kurtosis", "90Percentile")


def spread(count: int, shown: int) -> np.ndarray:
    """Indices of ``shown`` images spread evenly over a set of ``count`` (first and last included), so a
    grid shows the whole set, not the first rows of a CSV sorted by position or site."""
    return np.unique(np.linspace(0, count - 1, min(shown, count)).round().astype(int))


def write_png(report: dict[str, Any], real: ImageSet, synthetic: ImageSet, path: str | Path,
              max_images: int = 16, bin_count: int = 32) -> None:
    """Sample grids (3D: three centre planes; images spread over each set) on top, then intensity and
    first-order feature histograms."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt


    fig = plt.figure(figsize=(12, 9), dpi=100)
    grid = fig.add_gridspec(3, 4, height_ratios=[2.2, 1, 1])
    for col, (name, images) in enumerate((("real", real), ("synthetic", synthetic))):
        ax = fig.add_subplot(grid[0, col * 2:col * 2 + 2])
        pick = spread(len(images), max_images)
        tile = image_grid(np.clip(images.images[pick], 0, 1))
        ax.imshow(tile[0] if tile.shape[0] == 1 else np.moveaxis(tile, 0, -1), cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_title(f"{name} ({len(images)} images; {len(pick)} spread over the set)", fontsize=10)
        ax.axis("off")
    real_f = {k: rad.first_order_numpy(im, bin_count) for k, im in enumerate(real.images)}
    syn_f = {k: rad.first_order_numpy(im, bin_count) for k, im in enumerate(synthetic.images)}
    panels = ["intensity", *SHOWN_FEATURES, None]
    comparison = report.get("radiomics", {}).get("first_order", {})
    for i, feature in enumerate(panels):
        ax = fig.add_subplot(grid[1 + i // 4, i % 4])
        if feature is None:
            _summary(ax, report)
            continue
        if feature == "intensity":
            r, s = real.images.ravel(), synthetic.images.ravel()
            title = "voxel intensity"
        else:
            r = np.array([v[feature] for v in real_f.values()])
            s = np.array([v[feature] for v in syn_f.values()])
            ks = comparison.get(feature, {}).get("ks_statistic")
            title = f"{feature}" + (f" (KS {ks:.2f})" if ks is not None else "")
        lo, hi = float(min(r.min(), s.min())), float(max(r.max(), s.max()))
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 25).tolist()
        ax.hist(r, bins=bins, alpha=0.55, density=True, label="real", color="tab:blue")
        ax.hist(s, bins=bins, alpha=0.55, density=True, label="synthetic", color="tab:orange")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _summary(ax: Any, report: dict[str, Any]) -> None:
    ax.axis("off")
    div = report.get("diversity", {})
    mem = report.get("memorization", {})

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3g}"

    lines = [
        f"FRD: {fmt(report.get('radiomics', {}).get('frd'))}",
        f"encoder-FID ({report.get('encoder', {}).get('name', '?')}): {fmt(report.get('encoder_fid'))}",
        f"KID: {fmt(report.get('kid', {}).get('mean'))}",
        f"precision {fmt(report.get('precision'))}  recall {fmt(report.get('recall'))}",
        f"density {fmt(report.get('density'))}  coverage {fmt(report.get('coverage'))}",
        f"MS-SSIM syn {fmt(div.get('ms_ssim_synthetic', {}).get('mean'))} / real {fmt(div.get('ms_ssim_real', {}).get('mean'))}",
        f"near-copies: {mem.get('near_copies', 'n/a')}",
    ]
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=8, family="monospace")
