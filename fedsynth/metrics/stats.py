"""Shared statistics of the evaluation and the privacy audit: the percentile bootstrap, ROC AUC,
TPR at a fixed FPR, exact binomial (Clopper-Pearson) bounds and the empirical epsilon they imply.

numpy and scipy only (no scikit-learn): the formulas are short and their tie handling is stated
here. Every score is oriented so that **higher means "member"** (the attacker's guess).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

#: two-sided level of every interval in the reports
LEVEL = 0.95


def interval(values: np.ndarray | Sequence[float], level: float = LEVEL) -> list[float | None]:
    """``[low, high]`` percentile interval of bootstrap replicates (NaN replicates ignored; None if all are)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return [None, None]
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(v, [tail, 100 - tail])
    return [float(lo), float(hi)]


def resample(rng: np.random.Generator, n: int, size: int | None = None) -> np.ndarray:
    """Indices of one bootstrap draw: ``size`` (default ``n``) of ``range(n)`` with replacement."""
    return rng.integers(0, n, size if size is not None else n)


def bootstrap(statistic: Callable[..., float | dict[str, float]], sizes: Sequence[int], replicates: int,
              seed: int = 0, tick: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Replicates of ``statistic(idx_0, idx_1, ...)``, each set resampled with replacement independently.

    ``statistic`` gets one index array per set (its size from ``sizes``) and returns a number or a
    ``{name: number}`` dict; the result maps each name (``"value"`` for a number) to its replicates.
    ``tick(1)`` after each replicate.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {}
    for _ in range(replicates):
        value = statistic(*(resample(rng, n) for n in sizes))
        for key, v in (value if isinstance(value, dict) else {"value": value}).items():
            out.setdefault(key, []).append(float(v) if v is not None else math.nan)
        if tick is not None:
            tick(1)
    return {k: np.asarray(v) for k, v in out.items()}


def _scores(members: np.ndarray | Sequence[float], non_members: np.ndarray | Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(members, dtype=np.float64).ravel()
    n = np.asarray(non_members, dtype=np.float64).ravel()
    if not (len(m) and len(n)):
        raise ValueError(f"need members and non-members, got {len(m)} and {len(n)} scores")
    if not (np.isfinite(m).all() and np.isfinite(n).all()):
        raise ValueError("attack scores contain NaN or Inf")
    return m, n


def roc_auc(members: np.ndarray | Sequence[float], non_members: np.ndarray | Sequence[float]) -> float:
    """Area under the ROC curve = P(member score > non-member score), ties counting one half
    (the Mann-Whitney U statistic divided by ``n_m * n_n``)."""
    m, n = _scores(members, non_members)
    ranks = sps.rankdata(np.concatenate([m, n]))  # average ranks: ties count 1/2
    u = ranks[: len(m)].sum() - len(m) * (len(m) + 1) / 2
    return float(u / (len(m) * len(n)))


def threshold_at_fpr(non_members: np.ndarray, fpr: float) -> float:
    """The lowest threshold ``t`` with ``mean(non_members > t) <= fpr`` (a strict ``>`` keeps ties out)."""
    s = np.sort(np.asarray(non_members, dtype=np.float64))[::-1]
    allowed = int(math.floor(fpr * len(s) + 1e-9))  # false positives the target FPR permits
    return float(s[allowed]) if allowed < len(s) else -math.inf


def tpr_at_fpr(members: np.ndarray | Sequence[float], non_members: np.ndarray | Sequence[float],
               fpr: float) -> dict[str, float]:
    """True-positive rate of the attack at false-positive rate <= ``fpr``.

    Returns ``tpr``, the ``fpr`` actually reached (at most the target; with ``n`` non-members the
    smallest non-zero FPR is ``1/n``), the counts behind them and the threshold.
    """
    m, n = _scores(members, non_members)
    t = threshold_at_fpr(n, fpr)
    tp, fp = int((m > t).sum()), int((n > t).sum())
    return {"tpr": tp / len(m), "fpr": fp / len(n), "true_positives": tp, "members": len(m),
            "false_positives": fp, "non_members": len(n), "threshold": t}


def clopper_pearson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Exact two-sided binomial interval for ``k`` successes in ``n`` trials."""
    alpha = 1 - level
    lo = float(sps.beta.ppf(alpha / 2, k, n - k + 1)) if k > 0 else 0.0
    hi = float(sps.beta.ppf(1 - alpha / 2, k + 1, n - k)) if k < n else 1.0
    return lo, hi


def epsilon_lower_bound(true_positives: int, members: int, false_positives: int, non_members: int,
                        delta: float = 0.0, level: float = LEVEL) -> dict[str, Any]:
    """The epsilon an (epsilon, delta)-DP model must have for this attack outcome to be possible.

    DP bounds every test: ``TPR <= e^eps * FPR + delta`` and ``TNR <= e^eps * FNR + delta``, so
    ``eps >= max(ln((TPR - delta) / FPR), ln((TNR - delta) / FNR))``. The rates are replaced by the
    conservative ends of their Clopper-Pearson intervals (TPR low, FPR high), so a finite sample
    cannot inflate the bound: with ``n`` non-members and no false positive the FPR is still taken
    as about ``3.7 / n`` (95 %), not 0.
    """
    tpr_lo, _ = clopper_pearson(true_positives, members, level)
    _, fpr_hi = clopper_pearson(false_positives, non_members, level)
    candidates = [0.0]
    if tpr_lo - delta > 0 and fpr_hi > 0:
        candidates.append(math.log((tpr_lo - delta) / fpr_hi))
    tnr_lo, fnr_hi = 1 - fpr_hi, 1 - tpr_lo
    if tnr_lo - delta > 0 and fnr_hi > 0:
        candidates.append(math.log((tnr_lo - delta) / fnr_hi))
    return {"epsilon": max(candidates), "tpr_low": tpr_lo, "fpr_high": fpr_hi, "delta": delta, "level": level}


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Share of correct predictions."""
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (chance = 1 / classes)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean([np.mean(p[t == c] == c) for c in np.unique(t)]))
