"""DP in federations: each site accounts for its own data across rounds (and restarts), its ε
reaches the server in the round's metrics, and a real Flower federation reports it per site."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_config

from fedsynth.federated.aggregation import SiteUpdate
from fedsynth.federated.server import GlobalModel
from fedsynth.federated.site import Site

pytest.importorskip("opacus")

PRIVACY = {"enabled": True, "noise_multiplier": 1.2, "max_grad_norm": 1.0}


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_two_sites_account_their_own_data_across_rounds(mri2d, tmp_path) -> None:
    cfg = tiny_config("gan", privacy=PRIVACY, federation={"local_steps": 2, "local_epochs": 1},
                      training__batch_size=6)
    server = GlobalModel(cfg, tmp_path / "server")
    csvs = {"site1": mri2d["mni152"], "site2": mri2d["colin27"]}
    eps: dict[str, list[float]] = {s: [] for s in csvs}
    for rnd in (1, 2, 3):
        updates = []
        for site_id, csv in csvs.items():
            # a fresh Site each round, as when each round runs in a new process
            site = Site(cfg, csv, tmp_path / site_id, site_id=site_id)
            result = site.train_round(server.shared_weights(), rnd)
            assert "_module" not in "".join(result.weights)
            eps[site_id].append(result.metrics["epsilon"])
            updates.append(SiteUpdate(site_id, result.weights, result.num_samples, result.metrics))
            ledger = site.engine.privacy.ledger
            assert ledger.steps == 2 * rnd, "the site's ledger must continue across rounds, not restart"
        summary = server.aggregate(rnd, updates)
        for site_id in csvs:
            assert summary["site_metrics"][site_id]["epsilon"] == eps[site_id][-1]
    for site_id, values in eps.items():
        assert values[0] < values[1] < values[2], (site_id, values)


@pytest.mark.slow
def test_flower_federation_reports_epsilon_per_site(tmp_path: Path, mri2d) -> None:
    """Also: each site's own data.yaml sets its floor. site1 keeps its losses in; site3's floor is
    stricter than what the (hostile) server sends, so site3 refuses every round, naming the field."""
    pytest.importorskip("flwr")
    from fedsynth import pki
    from fedsynth.config import save_config
    from fedsynth.federated.flower.trial import LocalFederation, TrialRequest

    run = tmp_path / "run"
    certs = run / "certs"
    pki.create_ca(certs, "test CA")
    pki.issue_server_cert(certs, certs, "server", ["127.0.0.1", "localhost"])
    for site in ("site1", "site2", "site3"):
        pki.issue_client_cert(certs, certs, site)
    cfg = tiny_config("gan", privacy={**PRIVACY, "client_noise_multiplier": 0.5},
                      federation={"local_steps": 2, "round_timeout_s": 120.0, "clip_update_norm": 5.0})
    save_config(cfg, tmp_path / "cfg.yaml")
    policies = {"site1": {"privacy": {"require_dp": True, "min_noise_multiplier": 1.0}, "share_metrics": []},
                "site3": {"privacy": {"require_dp": True, "min_noise_multiplier": 2.0}}}
    request = TrialRequest(tmp_path / "cfg.yaml", {"site1": mri2d["mni152"], "site2": mri2d["colin27"],
                                                   "site3": mri2d["mni152"]}, run, 2,
                           evaluate=False, timeout_s=300, site_policies=policies)
    fed = LocalFederation(request)
    assert fed.run()["round"] == 2
    events = [json.loads(line) for line in (run / "server" / "progress.jsonl").read_text(encoding="utf-8").splitlines()]
    rounds = [e for e in events if e["event"] == "round_end" or "site_metrics" in e]
    assert len(rounds) == 2, [e["event"] for e in events]
    for r in rounds:
        assert sorted(r["accepted"]) == ["site1", "site2"]
        # a refusal is a rejected site in the round record: which field, never the site's floor
        assert r["rejected"] == [["site3", "refused by the site's own policy (privacy.noise_multiplier)"]], r["rejected"]
        assert set(r["site_metrics"]["site1"]) == {"epsilon", "num_samples"}, "site1 keeps its losses in"
        assert "train_loss" in r["site_metrics"]["site2"]
    received = [json.loads(line) for line in (run / "server" / "received.jsonl").read_text(encoding="utf-8").splitlines()]
    refusals = [e for e in received if "refused" in e]
    assert [(e["site"], e["refused"]) for e in refusals] == [("site3", "privacy.noise_multiplier")] * 2, received
    server_side = "".join(f.read_text(encoding="utf-8") for f in [*(run / "server").glob("*"), *(run / "global").glob("*.json"),
                                                                   run / "logs" / "superlink.log"])
    assert "at least 2" not in server_side and "sent 1.2" not in server_side  # the floor's values stay home
    site3_log = (run / "logs" / "site3.log").read_text(encoding="utf-8")
    assert "at least 2" in site3_log and "privacy.noise_multiplier" in site3_log
    assert not list((run / "sites" / "site3" / "state").glob("*/last.ckpt")), "site3 trained nothing"
    for site in ("site1", "site2"):
        eps = [r["site_metrics"][site]["epsilon"] for r in rounds]
        assert 0 < eps[0] < eps[1], (site, eps)
    client_eps = [r["metrics"]["client_epsilon"] for r in rounds]
    assert 0 < client_eps[0] < client_eps[1]
    from fedsynth.checkpoint import checkpoint_info

    info = checkpoint_info(run / "global" / "last.ckpt")
    site_eps = {site: rounds[-1]["site_metrics"][site]["epsilon"] for site in ("site1", "site2")}
    # the model's guarantee: its weakest site's (not a mean over sites), each site's figure, and the client-level one
    assert info["privacy_epsilon"] == pytest.approx(max(site_eps.values()))
    assert info["privacy"]["example_level"]["sites"] == pytest.approx(site_eps)
    assert info["privacy"]["client_level"]["epsilon"] == pytest.approx(client_eps[1])
    shutil.rmtree(certs, ignore_errors=True)  # keys never outlive the test
