"""Encoder features and the distribution metrics computed on them: encoder-FID, KID, PRDC.

No ImageNet Inception here (it needs a hub download and sees natural photos). Two encoders
that work offline, named in every report:

- ``random-conv``: a fixed, untrained 4-level strided conv net (LeakyReLU), weights drawn from
  a seeded generator, features = per-level channel mean and std (texture statistics of random
  filters at 4 scales). Random conv features are a known, weak-but-honest stand-in for a learned
  encoder: they respond to texture, contrast, sharpness and intensity layout, not to semantics.
- ``autoencoder``: the encoder of a fedsynth autoencoder checkpoint trained on real data
  (``AutoencoderModel.encode_latent``), latent pooled to 4 cells per axis.

Features are z-scored with the real set's per-feature mean and std before every metric
(:func:`standardize`), so each feature counts equally (otherwise a few high-variance features
decide everything, and e.g. blur goes unnoticed). Scores from different encoders are not comparable with each other, nor with published FIDs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Pool

if TYPE_CHECKING:
    from fedsynth.models.autoencoder import AutoencoderModel

RANDOM_CONV_SEED = 0
RANDOM_CONV_CHANNELS = (16, 32, 64, 64)


class RandomConvEncoder(torch.nn.Module):
    """Untrained strided conv features (2D or 3D), reproducible from ``seed``."""

    name = "random-conv"

    def __init__(self, spatial_dims: int, in_channels: int, seed: int = RANDOM_CONV_SEED,
                 channels: tuple[int, ...] = RANDOM_CONV_CHANNELS) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]  # torch.nn.Conv2d / Conv3d
        gen = torch.Generator().manual_seed(seed)
        self.spatial_dims = spatial_dims
        self.layers = torch.nn.ModuleList()
        c_in = in_channels
        for c_out in channels:
            layer = conv(c_in, c_out, kernel_size=3, stride=2, padding=1)
            fan_in = c_in * 3**spatial_dims
            with torch.no_grad():
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * np.sqrt(2.0 / fan_in))
                layer.bias.zero_()
            self.layers.append(layer)
            c_in = c_out
        self.description = (f"fixed random-init conv encoder (untrained), seed {seed}, channels {list(channels)}, stride-2 "
                            "3^d convs, LeakyReLU(0.2); features = per-level channel mean and std")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        feats = []
        for layer in self.layers:
            x = F.leaky_relu(layer(x), 0.2)
            flat = x.flatten(2)
            feats += [flat.mean(-1), flat.std(-1, correction=0)]
        return torch.cat(feats, dim=1)


class AutoencoderEncoder(torch.nn.Module):
    """Latents of a trained fedsynth autoencoder, pooled to 4 cells per axis."""

    name = "autoencoder"

    def __init__(self, model: AutoencoderModel, source: str) -> None:
        super().__init__()
        self.model = model
        self.description = f"encoder of the fedsynth autoencoder checkpoint {source} (latent pooled to 4^d cells)"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = self.model.encode_latent(images.to(self.model.device)).float().cpu()
        return Pool[Pool.ADAPTIVEAVG, z.ndim - 2](4)(z).flatten(1)


@torch.no_grad()
def embed(encoder: torch.nn.Module, images: np.ndarray, batch_size: int = 32,
          tick: Callable[[int], None] | None = None) -> np.ndarray:
    """Encoder features of ``(N, C, *spatial)`` images as an ``(N, D)`` float64 array; ``tick(n)``
    after each batch of ``n`` images."""
    encoder.eval()
    out = []
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
        out.append(encoder(torch.from_numpy(batch).float()).double().numpy())
        if tick is not None:
            tick(len(batch))
    return np.concatenate(out)


def standardize(real: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score both feature sets with the real set's per-feature mean/std (constant features dropped)."""
    mean, std = real.mean(0), real.std(0)
    keep = std > 1e-12
    return (real[:, keep] - mean[keep]) / std[keep], (other[:, keep] - mean[keep]) / std[keep]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two ``(N, D)`` feature sets (FID formula).

    ``tr sqrtm(S1 S2)`` is computed as the nuclear norm of ``A B^T`` (``S1 = A^T A``, ``S2 = B^T B``
    with ``A``, ``B`` the centred features over ``sqrt(N - 1)``): the eigenvalues of ``S1 S2`` are
    the squared singular values of ``A B^T``. Exact, with no matrix square root to go complex or
    singular when N < D, and an N x N problem, fast enough for bootstrap replicates. With fewer
    features than images, the D x D form ``sum sqrt(eig(S1^1/2 S2 S1^1/2))`` gives the same trace.
    """
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("Fréchet distance: features contain NaN or Inf")
    ca = (a - a.mean(0)) / np.sqrt(max(len(a) - 1, 1))
    cb = (b - b.mean(0)) / np.sqrt(max(len(b) - 1, 1))
    diff = a.mean(0) - b.mean(0)
    if a.shape[1] <= min(len(a), len(b)):  # few features: the same trace from D x D symmetric matrices
        w, v = np.linalg.eigh(ca.T @ ca)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(root @ (cb.T @ cb) @ root), 0, None)).sum()
    else:
        trace_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    return float(max(diff @ diff + (ca**2).sum() + (cb**2).sum() - 2 * trace_sqrt, 0.0))


def kid(real: np.ndarray, synthetic: np.ndarray, subsets: int = 20, subset_size: int = 100,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance formula (unbiased MMD², cubic polynomial kernel): ``(mean, std)`` over subsets."""
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(real), len(synthetic))
    d = real.shape[1]
    values = []
    for _ in range(subsets if m < max(len(real), len(synthetic)) else 1):
        x = real[rng.choice(len(real), m, replace=False)]
        y = synthetic[rng.choice(len(synthetic), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(d2, 0.0))


def prdc(real: np.ndarray, synthetic: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020) with k nearest neighbours."""
    k = max(1, min(k, len(real) - 1, len(synthetic) - 1))
    rr = _pairwise(real, real)
    ss = _pairwise(synthetic, synthetic)
    rs = _pairwise(real, synthetic)
    r_radius = np.sort(rr, axis=1)[:, k]  # column 0 is the point itself
    s_radius = np.sort(ss, axis=1)[:, k]
    inside_real = rs < r_radius[:, None]  # (real i, synthetic j): j inside i's ball
    return {
        "precision": float(inside_real.any(axis=0).mean()),
        "recall": float((rs < s_radius[None, :]).any(axis=1).mean()),
        "density": float(inside_real.sum(axis=0).mean() / k),
        "coverage": float((rs.min(axis=1) < r_radius).mean()),
        "k": float(k),
    }
