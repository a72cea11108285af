"""Client-level DP on the server: clipping, equal weights, calibrated noise, per-round epsilon."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_config

from fedsynth.checkpoint import checkpoint_info
from fedsynth.errors import ConfigError
from fedsynth.federated.aggregation import FedAvg, SiteUpdate
from fedsynth.federated.central_dp import ClientLevelDP, client_level_epsilon
from fedsynth.federated.server import make_aggregator

pytest.importorskip("opacus")


def _reference() -> dict[str, np.ndarray]:
    return {"g/w": np.zeros(40_000, dtype=np.float32), "g/count": np.array(7, dtype=np.int64)}


def _agg(z: float, clip: float = 1.0, rnd: int = 1, seed: int = 0) -> ClientLevelDP:
    return ClientLevelDP(FedAvg(_reference(), weighting="equal"), clip_update_norm=clip, noise_multiplier=z, delta=1e-5,
                         server_round=rnd, rng=np.random.default_rng(seed))


def test_updates_are_clipped_and_equally_weighted() -> None:
    agg = _agg(1e-12)
    big = np.zeros(40_000, dtype=np.float32)
    big[0] = 10.0  # norm 10 -> clipped to 1
    small = np.zeros(40_000, dtype=np.float32)
    small[1] = 0.5  # within the bound
    agg.add(SiteUpdate("a", {"g/w": big, "g/count": np.array(107)}, num_samples=1000))
    agg.add(SiteUpdate("b", {"g/w": small, "g/count": np.array(9)}, num_samples=1))
    out = agg.result()
    assert out["g/w"][0] == pytest.approx(0.5, abs=1e-6)  # (1.0 + 0) / 2: equal weights, not 1000:1
    assert out["g/w"][1] == pytest.approx(0.25, abs=1e-6)
    assert int(out["g/count"]) == 7, "integer buffers must not be averaged under client-level DP"
    assert agg.clipped == ["a"]
    assert agg.site_metrics["a"]["num_samples"] == 1000.0


def test_noise_std_is_multiplier_times_clip_over_sites() -> None:
    agg = _agg(2.0, clip=0.5, seed=1)
    for site in ("a", "b", "c", "d"):
        agg.add(SiteUpdate(site, _reference(), num_samples=10))
    noise = agg.result()["g/w"].astype(np.float64)
    assert agg.noise_std == pytest.approx(2.0 * 0.5 / 4)
    assert noise.std() == pytest.approx(0.25, rel=0.03)
    assert abs(noise.mean()) < 0.01


def test_bad_update_is_still_rejected() -> None:
    agg = _agg(1.0)
    bad = _reference()
    bad["g/w"] = bad["g/w"].copy()
    bad["g/w"][3] = np.nan
    assert not agg.add(SiteUpdate("x", bad, num_samples=5))
    assert agg.add(SiteUpdate("y", _reference(), num_samples=5))
    assert agg.accepted == ["y"] and agg.rejected[0][0] == "x"


def test_epsilon_per_round_matches_opacus_and_grows() -> None:
    from opacus.accountants import RDPAccountant

    eps = []
    for rnd in (1, 2, 5):
        acc = RDPAccountant()
        acc.history = [(1.5, 1.0, rnd)]
        agg = _agg(1.5, rnd=rnd)
        agg.add(SiteUpdate("a", _reference(), num_samples=3))
        metrics = agg.metrics()
        assert metrics["client_epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)
        assert agg.privacy_state()["epsilon"] == metrics["client_epsilon"]
        eps.append(metrics["client_epsilon"])
    assert eps[0] < eps[1] < eps[2]
    assert client_level_epsilon(1.5, 0, 1e-5) == 0.0


def test_make_aggregator_follows_the_config() -> None:
    plain = tiny_config("gan")
    assert type(make_aggregator(_reference(), plain, 1)) is FedAvg
    dp = tiny_config("gan", privacy={"client_noise_multiplier": 1.0}, federation={"clip_update_norm": 0.1})
    assert isinstance(make_aggregator(_reference(), dp, 3), ClientLevelDP)
    with pytest.raises(ConfigError, match="clip_update_norm"):
        make_aggregator(_reference(), tiny_config("gan", privacy={"client_noise_multiplier": 1.0}), 1)


def test_client_level_dp_wraps_an_aggregation() -> None:
    """A wrapper around the inner aggregation, not a subclass of it; a sample-weighted mean is refused
    (the noise covers an equal-weight one), and the aggregation module does not import client-level DP."""
    import ast
    import inspect

    import fedsynth.federated.aggregation as aggregation

    inner = FedAvg(_reference(), weighting="equal")
    agg = ClientLevelDP(inner, clip_update_norm=1.0, noise_multiplier=1.0, delta=1e-5, server_round=1)
    assert not isinstance(agg, FedAvg) and agg.inner is inner
    assert agg.add(SiteUpdate("a", _reference(), num_samples=3)) and inner.accepted == ["a"]
    with pytest.raises(ValueError, match="equal"):
        ClientLevelDP(FedAvg(_reference()), clip_update_norm=1.0, noise_multiplier=1.0, delta=1e-5, server_round=1)
    tree = ast.parse(inspect.getsource(aggregation))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "fedsynth.federated.central_dp" not in imported


def test_global_model_checkpoint_carries_client_epsilon(tmp_path) -> None:
    from fedsynth.federated.server import GlobalModel

    cfg = tiny_config("gan", privacy={"client_noise_multiplier": 1.0}, federation={"clip_update_norm": 1.0})
    server = GlobalModel(cfg, tmp_path)
    weights = server.shared_weights()
    for rnd in (1, 2):
        summary = server.aggregate(rnd, [SiteUpdate("a", weights, 4), SiteUpdate("b", weights, 6)])
        server.save()
        assert summary["metrics"]["client_epsilon"] == pytest.approx(client_level_epsilon(1.0, rnd, 1e-5))
    info = checkpoint_info(tmp_path / "global" / "last.ckpt")
    assert info["privacy_epsilon"] == pytest.approx(client_level_epsilon(1.0, 2, 1e-5))
    assert info["privacy_delta"] == 1e-5


def test_openfl_aggregation_applies_client_level_dp(tmp_path) -> None:
    """OpenFL's per-tensor aggregation function goes through the same client-level DP."""
    pytest.importorskip("openfl")
    import pandas as pd
    from openfl.utilities import LocalTensor

    from fedsynth.config import save_config
    from fedsynth.federated.openfl.aggregation import GroupRoutedFedAvg
    from fedsynth.models import build_model

    cfg = tiny_config("gan", federation={"groups": {"discriminator": "local"}, "clip_update_norm": 1e3},
                      privacy={"client_noise_multiplier": 1e-9})
    save_config(cfg, tmp_path / "fedsynth.yaml")
    fn = GroupRoutedFedAvg.__new__(GroupRoutedFedAvg)  # OpenFL aggregation functions are singletons
    fn.__init__(str(tmp_path / "fedsynth.yaml"), run_dir=str(tmp_path / "run"))
    ref = {k: v.astype(np.float32) for k, v in build_model(cfg).get_weights(["generator"]).items()}
    a = {k: v + 1 for k, v in ref.items()}
    b = {k: v + 3 for k, v in ref.items()}
    rows = [{"tensor_name": k, "round": 0, "tags": ("model",), "nparray": v} for k, v in ref.items()]
    for site, weights in (("a", a), ("b", b)):
        rows += [{"tensor_name": k, "round": 0, "tags": ("trained", site), "nparray": v} for k, v in weights.items()]
    name = next(k for k, v in ref.items() if v.dtype == np.float32 and v.size > 1)
    local = [LocalTensor("a", a[name], 0.9), LocalTensor("b", b[name], 0.1)]
    out = fn(local, (row for _, row in pd.DataFrame(rows).iterrows()), name, 0, ("trained",))
    np.testing.assert_allclose(out, ref[name] + 2.0, atol=1e-3)  # equal weights, not 0.9 / 0.1
    # the OpenFL global checkpoint carries the client-level epsilon, as the Flower server's does
    from fedsynth.checkpoint import checkpoint_info

    info = checkpoint_info(tmp_path / "run" / "global" / "last.ckpt")
    assert info["round"] == 1 and info["privacy_delta"] == cfg.privacy.client_delta and info["privacy_epsilon"] > 0
