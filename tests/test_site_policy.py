"""A site owns its privacy: its floor (from its own data.yaml) refuses a weaker coordinator config,
and only the metrics it allows leave it. Both backends build their Site through this policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_config

from fedsynth.errors import ConfigError
from fedsynth.federated.site_config import (
    SiteDataConfig,
    SitePolicy,
    SitePrivacyFloor,
    load_site_config,
    write_site_config,
    write_trial_site_config,
)

DP = {"enabled": True, "noise_multiplier": 1.2, "max_grad_norm": 1.0, "target_epsilon": 5.0, "delta": 1e-5}
FLOOR = SitePrivacyFloor(require_dp=True, max_epsilon=8.0, max_delta=1e-5, min_noise_multiplier=1.0, max_grad_norm=1.0)


@pytest.mark.parametrize("weakened, field, site_value, sent", [
    ({"enabled": False}, "privacy.enabled", "true", "false"),
    ({"target_epsilon": 50.0}, "privacy.target_epsilon", "8", "50"),
    ({"target_epsilon": None}, "privacy.target_epsilon", "8", "none"),
    ({"delta": 1e-3}, "privacy.delta", "1e-05", "0.001"),
    ({"noise_multiplier": 0.3}, "privacy.noise_multiplier", "1", "0.3"),
    ({"max_grad_norm": 10.0}, "privacy.max_grad_norm", "1", "10"),
])
def test_a_weaker_coordinator_config_is_refused_naming_field_and_values(weakened, field, site_value, sent) -> None:
    privacy = {**DP, **weakened} if weakened != {"enabled": False} else {"enabled": False}
    cfg = tiny_config("gan", privacy=privacy)
    with pytest.raises(ConfigError) as err:
        SitePolicy(FLOOR).check(cfg, "site1")
    msg = str(err.value)
    assert "site 'site1'" in msg and field in msg and site_value in msg and sent in msg, msg


def test_the_coordinator_may_tighten() -> None:
    stricter = {**DP, "noise_multiplier": 3.0, "target_epsilon": 1.0, "max_grad_norm": 0.5, "delta": 1e-7}
    SitePolicy(FLOOR).check(tiny_config("gan", privacy=stricter), "site1")
    SitePolicy().check(tiny_config("gan"), "site1")  # no floor: anything goes


def test_only_allowed_metrics_leave_the_site() -> None:
    metrics = {"loss": 0.5, "d_loss": 0.7, "g_loss": 0.9, "val_loss": 0.4, "epsilon": 1.5, "nan": float("nan")}
    assert SitePolicy().outbound(metrics) == {"epsilon": 1.5}  # default: DP accounting only
    assert SitePolicy(share_metrics=["loss"]).outbound(metrics) == {"loss": 0.5, "val_loss": 0.4, "epsilon": 1.5}
    assert set(SitePolicy(share_metrics=["*"]).outbound(metrics)) == {"loss", "d_loss", "g_loss", "val_loss", "epsilon"}


def test_site_data_config_carries_the_floor(tmp_path: Path) -> None:
    path = write_site_config(tmp_path / "data.yaml", SiteDataConfig(
        site_id="site1", train_csv=Path("train.csv"), privacy=FLOOR, share_metrics=["loss"]))
    cfg = load_site_config(path)
    assert cfg.privacy == FLOOR and cfg.share_metrics == ["loss"] and cfg.state_dir is None
    (tmp_path / "typo.yaml").write_text("site_id: s\ntrain_csv: a.csv\nprivacy: {max_epsilom: 1}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="max_epsilom"):
        load_site_config(tmp_path / "typo.yaml")
    trial = load_site_config(write_trial_site_config(tmp_path / "s2", "s2", tmp_path / "t.csv", None))
    assert trial.share_metrics == ["*"] and trial.state_dir == (tmp_path / "s2" / "state").resolve()


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_site_refuses_calibrated_noise_below_its_floor_and_keeps_losses_in(mri2d, tmp_path: Path) -> None:
    pytest.importorskip("opacus")
    from fedsynth.federated.site import Site

    cfg = tiny_config("gan", privacy={"enabled": True, "target_epsilon": 50.0}, federation={"local_steps": 1})
    hostile = Site(cfg, mri2d["mni152"], tmp_path / "a", site_id="site1",
                   policy=SitePolicy(SitePrivacyFloor(min_noise_multiplier=5.0)))
    with pytest.raises(ConfigError, match=r"privacy.noise_multiplier \(calibrated from target_epsilon\)"):
        hostile.train_round(hostile.shared_weights(), 1)
    assert not (tmp_path / "a" / "last.ckpt").exists(), "nothing may be trained before the refusal"
    site = Site(cfg, mri2d["mni152"], tmp_path / "b", site_id="site2", policy=SitePolicy(SitePrivacyFloor(max_epsilon=50)))
    result = site.train_round(site.shared_weights(), 1)
    assert set(result.metrics) == {"epsilon"} and result.metrics["epsilon"] > 0
    loss, n, metrics = site.evaluate(site.shared_weights())
    assert loss is None and n > 0 and "loss" not in metrics


def test_a_refusal_leaves_the_site_without_its_values() -> None:
    with pytest.raises(ConfigError) as err:
        SitePolicy(FLOOR).check(tiny_config("gan", privacy={**DP, "noise_multiplier": 0.3, "max_grad_norm": 10.0}), "site1")
    public = err.value.public()  # type: ignore[attr-defined]
    assert public == "site 'site1': refused by the site's own policy (privacy.max_grad_norm, privacy.noise_multiplier)"
    assert "0.3" not in public and "10" not in public


def test_kept_local_groups_are_averaged_over_the_other_sites_only() -> None:
    """A site that keeps its discriminator home sends back what it received and says so: FedAvg
    averages that group over the sites that trained it; under client-level DP it counts as unchanged."""
    import numpy as np

    from fedsynth.federated.aggregation import FedAvg, SiteUpdate

    ref = {"generator/w": np.zeros(2, np.float32), "discriminator/w": np.zeros(2, np.float32)}
    a = SiteUpdate("a", {"generator/w": np.full(2, 1.0), "discriminator/w": np.full(2, 4.0)}, 10, {})
    b = SiteUpdate("b", {"generator/w": np.full(2, 3.0), "discriminator/w": np.zeros(2)}, 10,
                   {"kept_local:discriminator": 1.0})
    fedavg = FedAvg(ref)
    assert fedavg.add(a) and fedavg.add(b)
    out = fedavg.result()
    assert np.allclose(out["generator/w"], 2.0) and np.allclose(out["discriminator/w"], 4.0)
    unchanged = FedAvg(ref, honour_kept_local=False)
    unchanged.add(a), unchanged.add(b)
    assert np.allclose(unchanged.result()["discriminator/w"], 2.0)
    assert SitePolicy().outbound({"kept_local:discriminator": 1.0, "loss": 0.1}) == {"kept_local:discriminator": 1.0}


@pytest.mark.slow
def test_a_site_keeps_its_discriminator_whatever_the_server_asks(tmp_path: Path, mri2d: dict[str, Path]) -> None:
    import numpy as np

    from fedsynth.federated.site import Site

    config = tiny_config("gan", federation={"local_steps": 2})  # the server shares every group
    site = Site(config, mri2d["mni152"], tmp_path / "state", site_id="a", keep_local=["discriminator"])
    received = {k: v + 0.5 for k, v in site.shared_weights().items()}  # "the server's" weights
    own_before = site.engine.model.get_weights(["discriminator"])
    result = site.train_round(received, 1)
    assert result.metrics["kept_local:discriminator"] == 1.0
    for key, value in result.weights.items():
        if key.startswith("discriminator/"):
            assert np.array_equal(value, received[key])  # nothing of the site's discriminator leaves
    own_after = site.engine.model.get_weights(["discriminator"])
    # trained from its own weights, not from what the server sent
    assert any(not np.allclose(own_after[k], own_before[k]) for k in own_before)
    assert all(not np.allclose(own_after[k], received[k], atol=0.2) for k in own_after if own_after[k].size > 8)
    with pytest.raises(ConfigError, match="keep_local names group 'critic'"):
        Site(config, mri2d["mni152"], tmp_path / "state2", site_id="b", keep_local=["critic"])


def test_a_site_that_declares_nothing_gets_the_safe_floor(tmp_path: Path) -> None:
    """No privacy section: DP required, only the sample count and epsilon leave; the shipped
    template carries a floor with a lifetime budget; the one-operator trial is the exception."""
    from fedsynth.resources import resource_dir

    (tmp_path / "data.yaml").write_text("site_id: s\ntrain_csv: t.csv\n", encoding="utf-8")
    bare = load_site_config(tmp_path / "data.yaml")
    assert bare.privacy.require_dp and bare.share_metrics == [] and bare.ledger_dir == (tmp_path / "ledger").resolve()
    with pytest.raises(ConfigError, match="privacy.enabled"):
        SitePolicy.of(bare).check(tiny_config("gan"), "s")
    with pytest.raises(ConfigError, match="privacy.enabled"):
        SitePolicy.default().check(tiny_config("gan"), "s")  # an OpenFL line naming bare CSVs
    template = load_site_config(resource_dir("flower-site") / "data.yaml")
    assert template.privacy.require_dp and template.privacy.lifetime_epsilon and template.share_metrics == []
    assert template.privacy.budget() is not None and not template.privacy.allow_non_private
    trial = load_site_config(write_trial_site_config(tmp_path / "t", "t", tmp_path / "t.csv", None))
    SitePolicy.of(trial).check(tiny_config("gan"), "t")
