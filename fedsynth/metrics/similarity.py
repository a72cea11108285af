"""Image-space similarity: MS-SSIM diversity, autoencoder reconstruction quality, memorization.

MS-SSIM, SSIM and PSNR are MONAI's metrics (``MultiScaleSSIMMetric``, ``SSIMMetric``,
``PSNRMetric``), with the kernel and the number of scales adapted to the image size: the
standard 11-pixel kernel and 5 scales need images of at least 161 pixels per axis, so smaller
images get a smaller kernel and the first scales' weights, renormalised to sum to 1. MONAI
clamps negative terms at 0 before the weighted product, as torchmetrics' ``normalize="relu"``,
and computes in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

if TYPE_CHECKING:
    from fedsynth.models.autoencoder import AutoencoderModel

#: MS-SSIM's per-scale weights (Wang et al. 2003; MONAI's default), finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
#: PSNR of a perfect reconstruction (MSE floored at 1e-10 for data range 1), instead of infinity.
PSNR_CAP_DB = 100.0


def ssim_geometry(size: int) -> tuple[int, int]:
    """``(kernel_size, scales)`` that fit images whose smallest side is ``size``."""
    kernel = 11 if size >= 176 else 7 if size >= 64 else 3
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and size // 2**scales > kernel:
        scales += 1
    return kernel, scales


def ms_ssim_metric(spatial_dims: int, size: int) -> MultiScaleSSIMMetric:
    """MONAI's MS-SSIM (data range 1, per-pair values) for images whose smallest side is ``size``."""
    kernel, scales = ssim_geometry(size)
    weights = np.array(MS_SSIM_WEIGHTS[:scales]) / sum(MS_SSIM_WEIGHTS[:scales])
    return MultiScaleSSIMMetric(spatial_dims, data_range=1.0, kernel_size=kernel, weights=tuple(weights.tolist()),
                                reduction="none")


def pairwise_ms_ssim(images: np.ndarray, max_pairs: int = 300, seed: int = 0,
                     tick: Callable[[int], None] | None = None) -> dict[str, float]:
    """Mean MS-SSIM over (up to ``max_pairs`` random) distinct pairs: high = alike = low diversity;
    ``tick(n)`` after each batch of ``n`` pairs."""
    n = len(images)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        pairs = [pairs[k] for k in rng.choice(len(pairs), max_pairs, replace=False)]
    t = torch.from_numpy(np.clip(images, 0, 1))
    metric = ms_ssim_metric(t.ndim - 2, min(t.shape[2:]))
    i, j = (list(x) for x in zip(*pairs, strict=False))
    for s in range(0, len(i), 64):
        metric(t[i[s:s + 64]], t[j[s:s + 64]])
        if tick is not None:
            tick(len(i[s:s + 64]))
    values = metric.get_buffer().flatten().numpy()
    return {"mean": float(values.mean()), "std": float(values.std()), "pairs": len(pairs)}


def reconstruction_quality(model: AutoencoderModel, images: np.ndarray, batch_size: int = 16,
                           tick: Callable[[int], None] | None = None) -> dict[str, float]:
    """Mean per-image SSIM (kernel adapted to the size) and PSNR (data range 1) of an autoencoder's
    reconstructions of ``images``; ``tick(n)`` after each batch of ``n`` images."""
    spatial_dims = images.ndim - 2
    kernel, _ = ssim_geometry(min(images.shape[2:]))
    ssim = SSIMMetric(spatial_dims, data_range=1.0, win_size=kernel, reduction="none")
    psnr = PSNRMetric(max_val=1.0, reduction="none")
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(images[s:s + batch_size]).float().clamp(0, 1)
        recon = model.reconstruct(x).float().cpu().clamp(0, 1)
        ssim(recon, x)
        psnr(recon, x)
        if tick is not None:
            tick(len(x))
    return {"ssim": float(ssim.get_buffer().mean()), "psnr": float(psnr.get_buffer().clamp_max(PSNR_CAP_DB).mean()),
            "count": len(images)}


def _nearest(a: np.ndarray, b: np.ndarray, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    fa, fb = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    d2 = (fa**2).sum(1)[:, None] + (fb**2).sum(1)[None, :] - 2 * fa @ fb.T
    d = np.sqrt(np.maximum(d2, 0.0)) / np.sqrt(fa.shape[1])  # RMS pixel difference
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    return d.min(1), d.argmin(1)


def memorization_share(train: np.ndarray, held_out: np.ndarray, synthetic: np.ndarray) -> dict[str, float]:
    """Share of synthetic images nearer a training image than any held-out real image is.

    Distances are RMS pixel differences; the threshold is the smallest distance from a held-out
    image to its nearest training image (real data never comes closer than that), so a model that
    only makes new images scores 0 and one that copies training images scores up to 1.
    """
    held_nn, _ = _nearest(held_out, train)
    syn_nn, _ = _nearest(synthetic, train)
    threshold = float(held_nn.min())
    return {"threshold_rms": threshold, "held_out_nn_median": float(np.median(held_nn)),
            "synthetic_nn_median": float(np.median(syn_nn)), "share": float((syn_nn < threshold).mean())}


def memorization(train: np.ndarray, synthetic: np.ndarray, train_ids: list[str], threshold: float = 0.5,
                 max_listed: int = 20) -> dict[str, object]:
    """Per synthetic image: RMS distance to its nearest training image divided by the median real-vs-real
    nearest-neighbour distance. A ratio below ``threshold`` flags a near-copy."""
    real_nn, _ = _nearest(train, train, exclude_self=True)
    reference = float(np.median(real_nn[np.isfinite(real_nn)])) if len(train) > 1 else float("nan")
    syn_nn, idx = _nearest(synthetic, train)
    ratio = syn_nn / max(reference, 1e-12)
    flagged = np.flatnonzero(ratio < threshold)
    order = flagged[np.argsort(ratio[flagged])][:max_listed]
    return {
        "distance": "RMS pixel difference in [0, 1] after preprocessing",
        "real_nn_median": reference,
        "synthetic_nn_median": float(np.median(syn_nn)),
        "ratio_median": float(np.median(ratio)),
        "ratio_min": float(ratio.min()),
        "threshold": threshold,
        "near_copies": int(len(flagged)),
        "near_copy_fraction": float(len(flagged) / len(synthetic)),
        "closer_than_real_fraction": float((ratio < 1.0).mean()),
        "flagged": [{"synthetic_index": int(i), "nearest_training_id": train_ids[int(idx[i])],
                     "ratio": float(ratio[i])} for i in order],
        "ratios": [float(r) for r in ratio],
    }
