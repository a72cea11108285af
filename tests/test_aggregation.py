"""Backend-neutral aggregation policy: weighting, rejection, clipping, streaming."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_config

from fedsynth.errors import ConfigError
from fedsynth.federated.aggregation import (
    FedAvg,
    NoValidUpdates,
    SiteUpdate,
    from_transport,
    resolve_group_policy,
    to_transport,
    update_norm,
    weighted_mean,
)
from fedsynth.models import build_model

REF = {"g/w": np.zeros((2, 2), np.float32), "g/n": np.array(4, np.int64)}


def _upd(site: str, value: float, n: int, **extra: np.ndarray) -> SiteUpdate:
    return SiteUpdate(site, {"g/w": np.full((2, 2), value, np.float32), "g/n": np.array(6, np.int64), **extra}, n)


def test_sample_weighted_mean_and_dtypes() -> None:
    agg = FedAvg(REF)
    assert agg.add(_upd("a", 1.0, 1)) and agg.add(_upd("b", 4.0, 3))
    out = agg.result()
    np.testing.assert_allclose(out["g/w"], np.full((2, 2), (1 * 1 + 4 * 3) / 4))
    assert out["g/w"].dtype == np.float32 and out["g/n"].dtype == np.int64 and int(out["g/n"]) == 6


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        (SiteUpdate("bad", {"g/w": np.full((2, 2), np.nan, np.float32), "g/n": np.array(1)}, 5), "NaN or Inf"),
        (SiteUpdate("bad", {"g/w": np.zeros((3, 2), np.float32), "g/n": np.array(1)}, 5), "wrong shape"),
        (SiteUpdate("bad", {**REF, "d/secret": np.zeros(1)}, 5), "unknown key 'd/secret'"),
        (SiteUpdate("bad", {"g/w": np.zeros((2, 2), np.float32)}, 5), "missing key 'g/n'"),
        (SiteUpdate("bad", dict(REF), 0), "num_samples must be positive"),
    ],
)
def test_bad_updates_are_rejected_and_round_goes_on(update: SiteUpdate, reason: str) -> None:
    agg = FedAvg(REF)
    assert agg.add(_upd("good", 2.0, 2))
    assert not agg.add(update)
    assert agg.rejected[0][0] == "bad" and reason in agg.rejected[0][1] and "site 'bad'" in agg.rejected[0][1]
    np.testing.assert_allclose(agg.result()["g/w"], 2.0)


def test_no_valid_update_is_an_error() -> None:
    agg = FedAvg(REF)
    agg.add(SiteUpdate("x", dict(REF), 0))
    with pytest.raises(NoValidUpdates, match="num_samples"):
        agg.result()


def test_clipping_bounds_each_update() -> None:
    agg = FedAvg(REF, clip_update_norm=1.0)
    agg.add(_upd("big", 10.0, 1))
    out = agg.result()
    assert update_norm(out, REF) == pytest.approx(1.0, rel=1e-5)
    assert agg.clipped == ["big"]


def test_streaming_equals_batch_mean() -> None:
    rng = np.random.default_rng(0)
    ref = {"g/a": rng.normal(size=(5, 3)).astype(np.float32), "g/b": rng.normal(size=(7,)).astype(np.float32)}
    sites = [({k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in ref.items()}, int(rng.integers(1, 50)))
             for _ in range(20)]
    agg = FedAvg(ref)
    for i, (w, n) in enumerate(sites):
        agg.add(SiteUpdate(f"s{i}", w, n))
    for key in ref:
        batch = weighted_mean([w[key] for w, _ in sites], [n for _, n in sites])
        np.testing.assert_allclose(agg.result()[key], batch, rtol=1e-5, atol=1e-6)


def test_transport_fp16_restores_dtypes() -> None:
    sent = to_transport({"g/w": np.ones((2, 2), np.float32), "g/n": np.array(3, np.int64)}, "float16")
    assert sent["g/w"].dtype == np.float16 and sent["g/n"].dtype == np.int64
    assert sent["g/n"].shape == ()  # 0-d buffers (num_batches_tracked) keep their shape
    back = from_transport({"g/w": sent["g/w"], "g/n": np.array(3.0)}, REF)
    assert back["g/w"].dtype == np.float32 and back["g/n"].dtype == np.int64


def test_group_policy_defaults_and_errors() -> None:
    model = build_model(tiny_config("gan"))
    assert resolve_group_policy(model, tiny_config("gan").federation) == {"generator": "shared", "discriminator": "shared"}
    cfg = tiny_config("gan", federation__groups={"discriminator": "local"})
    assert resolve_group_policy(model, cfg.federation)["discriminator"] == "local"
    with pytest.raises(ConfigError, match="unknown group 'critic'"):
        resolve_group_policy(model, tiny_config("gan", federation__groups={"critic": "local"}).federation)
    with pytest.raises(ConfigError, match="every group is 'local'"):
        resolve_group_policy(model, tiny_config("gan", federation__groups={"generator": "local", "discriminator": "local"}).federation)


def test_metric_means_count_only_sites_that_reported_a_finite_value() -> None:
    from fedsynth.federated.aggregation import mean_metrics

    out = mean_metrics([(100, {"loss": 1.0, "fid": 3.0}), (300, {"loss": float("nan")}), (100, {"loss": 3.0})])
    assert out == {"loss": 2.0, "fid": 3.0}  # the NaN site's 300 samples are not in the denominator
    assert mean_metrics([(10, {"loss": float("inf")})]) == {}


def test_site_weights_can_be_capped_or_equal() -> None:
    """Sites report their own sample counts: a site claiming 10^6 samples can be capped or ignored."""
    ref = {"g/w": np.zeros(2, np.float32)}
    updates = [SiteUpdate("honest", {"g/w": np.ones(2, np.float32)}, 100),
               SiteUpdate("inflated", {"g/w": np.full(2, 3.0, np.float32)}, 1_000_000)]
    results = {}
    for name, kwargs in (("samples", {}), ("capped", {"max_site_samples": 100}), ("equal", {"weighting": "equal"})):
        agg = FedAvg(ref, **kwargs)
        for u in updates:
            agg.add(u)
        results[name] = float(agg.result()["g/w"][0])
        assert agg.metrics()["num_samples"] == 1_000_100  # what the sites reported
    assert results["samples"] > 2.99 and results["capped"] == pytest.approx(2.0) and results["equal"] == pytest.approx(2.0)
