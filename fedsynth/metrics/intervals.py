"""Bootstrap intervals of the distribution metrics, the real-vs-real floor and the gap to it.

Everything works on features already extracted (radiomics and encoder features), so the
encoders run once: each bootstrap replicate resamples the row indices of both sets with
replacement and recomputes FRD, mean KS / W1, encoder-FID, KID and PRDC from those rows.

Fixed across replicates, on purpose: the feature scaling (z-scores with the **full** real set's
mean/std), so a replicate measures the sets' sampling, not a changing ruler.

KID here is the unbiased MMD² over all pairs of the two sets (the report's ``kid.mean`` averages
subsets of 100); PRDC's k-NN radii and KID's within-set pairs ignore copies of the same image
drawn twice.

The floor is the same computation with real training images in place of the synthetic ones:
what a perfect generator (one that draws new images from the training distribution) would score
against the held-out set at the same count. FID-like metrics are biased by the count, so the floor
uses a seeded random subset of the training images **of the synthetic set's size**. The gap is
``synthetic - floor`` per replicate, both against the same draw of real images (the real set's
own noise cancels) and with the synthetic and floor sets drawn independently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsynth.metrics import features as feat
from fedsynth.metrics import stats

#: metrics with an interval, in report order, and which way is better
HEADLINE = {
    "encoder_fid": "lower", "kid": "lower", "frd": "lower", "mean_ks_statistic": "lower", "mean_wasserstein": "lower",
    "precision": "higher", "recall": "higher", "density": "higher (about 1 when matched)", "coverage": "higher",
}


@dataclass(frozen=True)
class Features:
    """One image set's features: radiomics ``(N, F)`` (NaN where extraction failed) and encoder ``(N, D)``."""

    radiomics: np.ndarray
    encoder: np.ndarray


class Comparison:
    """Metrics of one ``other`` set against the real set, recomputable for any pair of index draws."""

    def __init__(self, real: Features, other: Features, first_order: list[int]) -> None:
        from fedsynth.metrics import radiomics as rad

        self.rz, self.oz, keep = rad.zscore_by_reference(real.radiomics, other.radiomics)
        # first-order columns among the kept ones, for KS/W1 (already in real-std units after z-scoring)
        kept = np.flatnonzero(keep)
        self.first_order = [int(np.searchsorted(kept, j)) for j in first_order if keep[j]]
        self.re, self.oe = feat.standardize(real.encoder, other.encoder)
        # KID's cubic kernel and PRDC's distances once; replicates index into them
        d = self.re.shape[1]
        self.k_rr, self.k_oo, self.k_ro = ((x @ y.T / d + 1) ** 3 for x, y in
                                           ((self.re, self.re), (self.oe, self.oe), (self.re, self.oe)))
        self.d_rr = feat._pairwise(self.re, self.re)
        self.d_oo = feat._pairwise(self.oe, self.oe)
        self.d_ro = feat._pairwise(self.re, self.oe)

    def metrics(self, ir: np.ndarray, io: np.ndarray, k: int = 5) -> dict[str, float]:
        """Every headline metric on real rows ``ir`` and other rows ``io``."""
        out: dict[str, float] = {"frd": feat.frechet_distance(self.rz[ir], self.oz[io]) if self.rz.shape[1] else np.nan}
        ks, w1 = [], []
        for j in self.first_order:
            a, b = self.rz[ir, j], self.oz[io, j]
            ks.append(_ks(a, b))
            w1.append(_w1(a, b))
        out["mean_ks_statistic"] = float(np.mean(ks)) if ks else np.nan
        out["mean_wasserstein"] = float(np.mean(w1)) if w1 else np.nan
        out["encoder_fid"] = feat.frechet_distance(self.re[ir], self.oe[io])
        out["kid"] = _mmd2(self.k_rr[np.ix_(ir, ir)], self.k_oo[np.ix_(io, io)], self.k_ro[np.ix_(ir, io)], ir, io)
        out.update(_prdc(self.d_rr[np.ix_(ir, ir)], self.d_oo[np.ix_(io, io)], self.d_ro[np.ix_(ir, io)], ir, io, k))
        return out


def _cdf(sorted_x: np.ndarray, at: np.ndarray) -> np.ndarray:
    return np.searchsorted(sorted_x, at, side="right") / len(sorted_x)


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (as ``scipy.stats.ks_2samp``)."""
    a, b = np.sort(a[np.isfinite(a)]), np.sort(b[np.isfinite(b)])
    if not (len(a) and len(b)):
        return np.nan
    at = np.concatenate([a, b])
    return float(np.abs(_cdf(a, at) - _cdf(b, at)).max())


def _w1(a: np.ndarray, b: np.ndarray) -> float:
    """Wasserstein-1 distance of two samples (as ``scipy.stats.wasserstein_distance``)."""
    a, b = np.sort(a[np.isfinite(a)]), np.sort(b[np.isfinite(b)])
    if not (len(a) and len(b)):
        return np.nan
    at = np.sort(np.concatenate([a, b]))
    return float((np.abs(_cdf(a, at[:-1]) - _cdf(b, at[:-1])) * np.diff(at)).sum())


def _mmd2(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, ix: np.ndarray, iy: np.ndarray) -> float:
    """Unbiased MMD² (the KID formula) over all pairs; pairs of one image with itself, even drawn
    twice, are left out (they would add k(x, x) and bias it up)."""
    same_x, same_y = ix[:, None] == ix[None, :], iy[:, None] == iy[None, :]
    return float(kxx[~same_x].mean() + kyy[~same_y].mean() - 2 * kxy.mean())


def _prdc(rr: np.ndarray, oo: np.ndarray, ro: np.ndarray, ir: np.ndarray, io: np.ndarray, k: int) -> dict[str, float]:
    """Naeem et al.'s PRDC from distance blocks; an image never counts as its own neighbour, even drawn twice."""
    rr = np.where(ir[:, None] == ir[None, :], np.inf, rr)
    oo = np.where(io[:, None] == io[None, :], np.inf, oo)
    k = max(1, min(k, len(np.unique(ir)) - 1, len(np.unique(io)) - 1))
    r_radius = np.sort(rr, axis=1)[:, k - 1]
    o_radius = np.sort(oo, axis=1)[:, k - 1]
    inside_real = ro < r_radius[:, None]
    return {"precision": float(inside_real.any(axis=0).mean()), "recall": float((ro < o_radius[None, :]).any(axis=1).mean()),
            "density": float(inside_real.sum(axis=0).mean() / k), "coverage": float((ro.min(axis=1) < r_radius).mean())}


def floor_subset(n_train: int, size: int, seed: int) -> np.ndarray:
    """Rows of the training set that make the floor: a seeded random subset of ``size`` (all if fewer)."""
    rng = np.random.default_rng(seed + 1)
    return np.sort(rng.permutation(n_train)[:size])


def summary(real: Features, synthetic: Features, first_order: list[int], *, floor: Features | None = None,
            replicates: int = 200, seed: int = 0, tick: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Point value, bootstrap interval, floor and gap of every headline metric (``tick(1)`` per replicate).

    ``first_order``: radiomic columns that are first-order statistics (for mean KS / W1).
    Returns ``{"metrics": {name: {...}}, "bootstrap": {...}}``; ``floor`` (training-image features,
    already subset to the synthetic count) adds ``floor``, ``gap`` and their intervals.
    """
    syn = Comparison(real, synthetic, first_order)
    ref = Comparison(real, floor, first_order) if floor is not None else None
    n_r, n_s = len(real.encoder), len(synthetic.encoder)
    n_f = len(floor.encoder) if floor is not None else 0
    point = syn.metrics(np.arange(n_r), np.arange(n_s))
    floor_point = ref.metrics(np.arange(n_r), np.arange(n_f)) if ref is not None else {}

    def replicate(ir: np.ndarray, io: np.ndarray, i_floor: np.ndarray) -> dict[str, float]:
        values = {f"syn.{k}": v for k, v in syn.metrics(ir, io).items()}
        if ref is not None:
            # the floor against the same real draw: the gap then cancels the real set's own noise
            values.update({f"floor.{k}": v for k, v in ref.metrics(ir, i_floor).items()})
        return values

    draws = stats.bootstrap(replicate, [n_r, n_s, max(n_f, 1)], replicates, seed, tick) if replicates > 0 else {}
    metrics: dict[str, Any] = {}
    for name, better in HEADLINE.items():
        entry: dict[str, Any] = {"value": point[name], "ci95": stats.interval(draws[f"syn.{name}"]) if draws else None}
        if ref is not None:
            entry["floor"] = floor_point[name]
            entry["floor_ci95"] = stats.interval(draws[f"floor.{name}"]) if draws else None
            entry["gap"] = point[name] - floor_point[name]
            entry["gap_ci95"] = stats.interval(draws[f"syn.{name}"] - draws[f"floor.{name}"]) if draws else None
        entry["better"] = better
        metrics[name] = entry
    return {
        "metrics": metrics,
        "bootstrap": {"replicates": replicates, "seed": seed, "level": stats.LEVEL,
                      "method": "percentile bootstrap: both sets resampled with replacement on the extracted features "
                                "(feature scaling fixed by the full real set)",
                      "counts": {"real": n_r, "synthetic": n_s, "floor": n_f}},
    }
