"""The shared statistics (fedsynth.metrics.stats) and the bootstrap metrics (fedsynth.metrics.intervals),
checked against their definitions and scipy on seeded synthetic numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import linalg
from scipy import stats as sps

from fedsynth.metrics import features as feat
from fedsynth.metrics import intervals, stats


def test_auc_is_mann_whitney_with_half_ties() -> None:
    assert stats.roc_auc([2, 3], [0, 1]) == 1.0
    assert stats.roc_auc([0, 1], [2, 3]) == 0.0
    assert stats.roc_auc([1, 1], [1, 1]) == 0.5
    rng = np.random.default_rng(0)
    m, n = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    u = sps.mannwhitneyu(m, n).statistic
    assert stats.roc_auc(m, n) == pytest.approx(u / (300 * 200))
    assert stats.roc_auc(m, n) == pytest.approx(sps.norm.cdf(1 / math.sqrt(2)), abs=0.04)  # binormal AUC


def test_tpr_at_fpr_never_exceeds_the_target_fpr() -> None:
    non = np.arange(1000, dtype=float)  # 0..999
    members = np.array([995.5, 990.5, 5.0, 999.5])
    at = stats.tpr_at_fpr(members, non, 0.01)
    assert at["false_positives"] <= 10 and at["fpr"] <= 0.01
    assert at["tpr"] == 0.75  # 995.5, 990.5, 999.5 are above the 11th highest non-member (989)
    at = stats.tpr_at_fpr(members, non, 0.001)
    assert at["false_positives"] == 1 and at["tpr"] == 0.25  # only 999.5 beats 998
    # fewer non-members than 1/FPR: no false positive allowed, the threshold is the top non-member
    small = stats.tpr_at_fpr([5.0, 0.5], [0.0, 1.0], 0.01)
    assert small["fpr"] == 0.0 and small["tpr"] == 0.5


def test_clopper_pearson_and_epsilon_bound() -> None:
    lo, hi = stats.clopper_pearson(0, 100)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 100))
    lo, hi = stats.clopper_pearson(50, 100)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.2, abs=0.01)
    # a perfect attack on 1000 + 1000 images: TPR >= 0.9963, FPR <= 0.0037 -> eps >= ln(0.9963/0.0037) ~ 5.6
    bound = stats.epsilon_lower_bound(1000, 1000, 0, 1000)
    assert bound["epsilon"] == pytest.approx(math.log(bound["tpr_low"] / bound["fpr_high"]))
    assert 5.4 < bound["epsilon"] < 5.8
    # a chance-level outcome implies nothing, and delta only lowers the bound
    assert stats.epsilon_lower_bound(10, 1000, 10, 1000)["epsilon"] == 0.0
    assert stats.epsilon_lower_bound(1000, 1000, 0, 1000, delta=0.1)["epsilon"] < bound["epsilon"]
    # a stricter level (Bonferroni) widens the intervals: a smaller bound
    assert stats.epsilon_lower_bound(1000, 1000, 0, 1000, level=0.999)["epsilon"] < bound["epsilon"]


def test_bootstrap_interval_covers_the_mean_and_is_seeded() -> None:
    x = np.random.default_rng(1).normal(0, 1, 400)
    draws = stats.bootstrap(lambda i: float(x[i].mean()), [len(x)], 300, seed=3)
    lo, hi = stats.interval(draws["value"])
    assert lo < x.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 / math.sqrt(400), rel=0.2)  # normal-theory width
    again = stats.bootstrap(lambda i: float(x[i].mean()), [len(x)], 300, seed=3)
    assert np.array_equal(draws["value"], again["value"])
    assert stats.interval([math.nan, math.nan]) == [None, None]


def test_accuracies() -> None:
    y = np.array([0, 0, 0, 0, 1])
    assert stats.accuracy(y, np.zeros(5)) == 0.8
    assert stats.balanced_accuracy(y, np.zeros(5)) == 0.5  # the majority guess is chance


def test_frechet_distance_matches_the_sqrtm_formula() -> None:
    rng = np.random.default_rng(2)
    for n, d in ((400, 12), (40, 90)):  # more images than features, and fewer
        a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d)) * 1.3 + 0.2
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        diff = a.mean(0) - b.mean(0)
        ref = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(linalg.sqrtm(s1 @ s2)))
        assert feat.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
        assert feat.frechet_distance(a, a) == pytest.approx(0, abs=1e-8)


def test_bootstrap_metrics_agree_with_the_report_formulas_at_identity() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(30, 6)), rng.normal(size=(25, 6)) + 0.5
    assert intervals._ks(a[:, 0], b[:, 0]) == pytest.approx(sps.ks_2samp(a[:, 0], b[:, 0]).statistic)
    assert intervals._w1(a[:, 0], b[:, 0]) == pytest.approx(sps.wasserstein_distance(a[:, 0], b[:, 0]))
    ia, ib = np.arange(30), np.arange(25)
    ours = intervals._prdc(feat._pairwise(a, a), feat._pairwise(b, b), feat._pairwise(a, b), ia, ib, 5)
    ref = feat.prdc(a, b, k=5)
    assert all(ours[k] == pytest.approx(ref[k]) for k in ("precision", "recall", "density", "coverage"))
    # a duplicated draw never counts as its own neighbour: the same set drawn twice is not "denser"
    twice = np.concatenate([ia, ia])
    dup = intervals._prdc(feat._pairwise(a, a)[np.ix_(twice, twice)], feat._pairwise(a, a)[np.ix_(twice, twice)],
                          feat._pairwise(a, a)[np.ix_(twice, twice)], twice, twice, 5)
    assert dup["precision"] == dup["recall"] == dup["coverage"] == 1.0
    a = a[:25]  # equal counts: the report's KID is then one subset of all images
    kxx, kyy, kxy = ((x @ y.T / 6 + 1) ** 3 for x, y in ((a, a), (b, b), (a, b)))
    once = intervals._mmd2(kxx, kyy, kxy, ib, ib)
    assert once == pytest.approx(feat.kid(a, b)[0])
    # each real image drawn twice: the same within-set pairs, no k(x, x) terms
    twice = np.concatenate([ib, ib])
    assert intervals._mmd2(kxx[np.ix_(twice, twice)], kyy, kxy[twice], twice, ib) == pytest.approx(once)

def test_summary_floor_of_the_same_distribution_has_a_gap_interval_around_zero() -> None:
    rng = np.random.default_rng(5)
    real = intervals.Features(rng.normal(size=(60, 4)), rng.normal(size=(60, 8)))
    same = intervals.Features(rng.normal(size=(60, 4)), rng.normal(size=(60, 8)))
    shifted = intervals.Features(rng.normal(size=(60, 4)) + 1.5, rng.normal(size=(60, 8)) + 1.5)
    out = intervals.summary(real, shifted, [0, 1, 2, 3], floor=same, replicates=60, seed=0)
    fid = out["metrics"]["encoder_fid"]
    assert fid["gap_ci95"][0] > 0  # the shifted set is worse than the floor, clearly
    # (FID is biased upwards by duplicates, so its percentile interval may sit above the point; the gap's does not)
    assert out["metrics"]["precision"]["gap_ci95"][1] < 0
    none = intervals.summary(real, same, [0, 1, 2, 3], floor=same, replicates=60, seed=0)
    assert none["metrics"]["encoder_fid"]["gap"] == 0.0
    assert intervals.summary(real, shifted, [0], replicates=0)["metrics"]["frd"]["ci95"] is None
