"""Image-space similarity: MS-SSIM diversity, autoencoder reconstruction quality, memorization.

MS-SSIM is MONAI's SSIM/contrast-structure terms (``compute_ssim_and_cs``) combined over a
number of scales adapted to the image size (the standard 11-pixel kernel and 5 scales need
images of at least 161 pixels per axis); negative terms are clamped at 0 before the
weighted product, as torchmetrics' ``normalize="relu"`` does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics.regression import compute_ssim_and_cs

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ssim_geometry(size: int) -> tuple[int, int]:
    """``(kernel_size, scales)`` that fit images whose smallest side is ``size``."""
    kernel = 11 if size >= 176 else 7 if size >= 64 else 3
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and size // 2**scales > kernel:
        scales += 1
    return kernel, scales


def ms_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pair MS-SSIM of two ``(N, C, *spatial)`` batches in [0, 1] (shape ``(N,)``)."""
    spatial_dims = a.ndim - 2
    kernel, scales = ssim_geometry(min(a.shape[2:]))
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float64)
    weights = weights / weights.sum()
    pool = F.avg_pool2d if spatial_dims == 2 else F.avg_pool3d
    terms = []
    x, y = a.double(), b.double()
    for level in range(scales):
        ssim, cs = compute_ssim_and_cs(x, y, spatial_dims, [kernel] * spatial_dims, [1.5] * spatial_dims, data_range=1.0)
        value = ssim if level == scales - 1 else cs
        terms.append(value.flatten(1).mean(1).clamp_min(0))
        if level < scales - 1:
            x, y = pool(x, 2), pool(y, 2)
    stacked = torch.stack(terms, dim=1)
    return torch.prod(stacked ** weights[None, :], dim=1)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pair single-scale SSIM (kernel adapted to the size), shape ``(N,)``."""
    spatial_dims = a.ndim - 2
    kernel, _ = ssim_geometry(min(a.shape[2:]))
    value, _ = compute_ssim_and_cs(a.double(), b.double(), spatial_dims, [kernel] * spatial_dims, [1.5] * spatial_dims,
                                   data_range=1.0)
    return value.flatten(1).mean(1)


def pairwise_ms_ssim(images: np.ndarray, max_pairs: int = 300, seed: int = 0) -> dict[str, float]:
    """Mean MS-SSIM over (up to ``max_pairs`` random) distinct pairs: high = alike = low diversity."""
    n = len(images)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        pairs = [pairs[k] for k in rng.choice(len(pairs), max_pairs, replace=False)]
    t = torch.from_numpy(np.clip(images, 0, 1))
    i, j = (list(x) for x in zip(*pairs))
    values = torch.cat([ms_ssim(t[i[s:s + 64]], t[j[s:s + 64]]) for s in range(0, len(i), 64)]).numpy()
    return {"mean": float(values.mean()), "std": float(values.std()), "pairs": len(pairs)}


def reconstruction_quality(model: torch.nn.Module, images: np.ndarray, batch_size: int = 16) -> dict[str, float]:
    """SSIM and PSNR (data range 1) of an autoencoder's reconstructions of ``images``."""
    ssims, psnrs = [], []
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(images[s:s + batch_size]).float().clamp(0, 1)
        recon = model.reconstruct(x).float().cpu().clamp(0, 1)
        ssims.append(ssim(recon, x))
        mse = ((recon - x) ** 2).flatten(1).mean(1).clamp_min(1e-10)
        psnrs.append(10 * torch.log10(1.0 / mse))
    ssim_all, psnr_all = torch.cat(ssims), torch.cat(psnrs)
    return {"ssim": float(ssim_all.mean()), "psnr": float(psnr_all.mean()), "count": len(images)}


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
