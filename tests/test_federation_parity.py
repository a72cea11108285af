"""One federation contract: the same 2-site config on Flower and OpenFL.

Both one-machine trials take the same :class:`TrialRequest`, return the same :class:`TrialResult`,
write the same ``RUN/global`` layout through ``GlobalModel`` (same history.json keys per round),
refuse the same impossible config with the same message, and fail a round with too few valid
updates with the same error (the round policy lives in ``GlobalModel.aggregate``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_config

from fedsynth.config import save_config
from fedsynth.errors import ConfigError
from fedsynth.federated.aggregation import NoValidUpdates, SiteUpdate
from fedsynth.federated.trial_common import TrialRequest

ROUNDS = 2


def _config(tmp_path: Path, **federation: object) -> Path:
    fed = {"rounds": ROUNDS, "local_steps": 2, "round_timeout_s": 120.0, **federation}
    path = tmp_path / "cfg.yaml"
    save_config(tiny_config("autoencoder", **{f"federation__{k}": v for k, v in fed.items()}), path)
    return path


def _sites(mri2d: dict[str, Path]) -> dict[str, Path]:
    return {"site1": mri2d["mni152"], "site2": mri2d.get("colin27", mri2d["mni152"])}


def _trials():
    pytest.importorskip("flwr")
    pytest.importorskip("openfl")
    from fedsynth.federated.flower.trial import run_trial as flower
    from fedsynth.federated.openfl.trial import run_trial as openfl

    return {"flower": flower, "openfl": openfl}


def test_one_site_syntax_for_both_trials() -> None:
    from fedsynth.federated.trial_common import parse_sites

    sites = parse_sites(["site1=a.csv", "site2=b.csv,bv.csv"])
    assert sites == {"site1": (Path("a.csv"), None), "site2": (Path("b.csv"), Path("bv.csv"))}
    for bad, message in ((["site1"], "expected ID=TRAIN_CSV or ID=TRAIN_CSV,VAL_CSV"), (["site1=a,b,c"], "expected ID="),
                         (["site1=a.csv", "site1=b.csv"], "given twice"), (["Site 1=a.csv"], "invalid site id")):
        with pytest.raises(ConfigError, match=message):
            parse_sites(bad)
    # the request takes plain paths or (train, val); the deprecated val_sites folds into sites
    request = TrialRequest("cfg.yaml", {"site1": "a.csv", "site2": ("b.csv", "bv.csv")}, "run", val_sites={"site1": "av.csv"})
    assert request.site_csvs == {"site1": (Path("a.csv"), Path("av.csv")), "site2": (Path("b.csv"), Path("bv.csv"))}
    with pytest.raises(ConfigError, match="--val-site site9"):
        TrialRequest("cfg.yaml", {"site1": "a.csv"}, "run", val_sites={"site9": "x.csv"})


def test_a_config_both_must_refuse_is_refused_with_the_same_message(mri2d: dict[str, Path], tmp_path: Path) -> None:
    messages = {}
    for backend, run_trial in _trials().items():
        with pytest.raises(ConfigError) as err:
            run_trial(TrialRequest(_config(tmp_path, min_sites=3), _sites(mri2d), tmp_path / backend))
        messages[backend] = str(err.value)
        assert not (tmp_path / backend / "global").exists()
    assert messages["flower"] == messages["openfl"] == "federation.min_sites is 3 but the trial has only 2 site(s)"


def test_too_few_valid_updates_fail_the_round_the_same_way(tmp_path: Path) -> None:
    """Flower's server (GlobalModel.aggregate) and OpenFL's aggregation function, same updates."""
    pytest.importorskip("openfl")
    from openfl.utilities import LocalTensor

    from fedsynth.federated.openfl.aggregation import GroupRoutedFedAvg
    from fedsynth.federated.server import GlobalModel

    cfg = tiny_config("autoencoder")
    save_config(cfg, tmp_path / "fedsynth.yaml")
    server = GlobalModel(cfg, tmp_path / "flower")
    ref = {k: np.asarray(v, dtype=np.float32) for k, v in server.shared_weights().items()}
    bad = {k: np.full_like(v, np.nan) for k, v in ref.items()}
    with pytest.raises(NoValidUpdates) as flower_err:
        server.aggregate(1, [SiteUpdate("site1", ref, 1), SiteUpdate("site2", bad, 1)])
    fn = GroupRoutedFedAvg.__new__(GroupRoutedFedAvg)  # OpenFL aggregation functions are singletons
    fn.__init__(str(tmp_path / "fedsynth.yaml"), run_dir=str(tmp_path / "openfl"))
    rows = [{"tensor_name": k, "round": 0, "tags": ("model",), "nparray": v} for k, v in ref.items()]
    for site, weights in (("site1", ref), ("site2", bad)):
        rows += [{"tensor_name": k, "round": 0, "tags": ("trained", site), "nparray": v} for k, v in weights.items()]
    name = next(iter(ref))
    with pytest.raises(NoValidUpdates) as openfl_err:
        fn([LocalTensor("site1", ref[name], 0.5), LocalTensor("site2", bad[name], 0.5)],
           (row for _, row in pd.DataFrame(rows).iterrows()), name, 0, ("trained",))
    assert str(flower_err.value) == str(openfl_err.value)
    assert "round 1" in str(flower_err.value) and "site 'site2'" in str(flower_err.value)
    for backend in ("flower", "openfl"):  # a failed round writes no checkpoint
        assert not (tmp_path / backend / "global" / "last.ckpt").exists()


def test_a_late_validation_makes_that_round_best(tmp_path: Path) -> None:
    """OpenFL validates a round's global model at the start of the next round: GlobalModel records it late."""
    from fedsynth.checkpoint import checkpoint_info
    from fedsynth.federated.server import GlobalModel

    server = GlobalModel(tiny_config("autoencoder"), tmp_path)
    for rnd in (1, 2):
        weights = server.shared_weights()
        server.aggregate(rnd, [SiteUpdate("site1", weights, 1), SiteUpdate("site2", weights, 1)])
        if rnd == 2:
            server.record_past_evaluation(1, 0.5)
        server.save()
    history = json.loads((tmp_path / "global" / "history.json").read_text(encoding="utf-8"))
    assert [h["val_loss"] for h in history] == [0.5, None]
    best = checkpoint_info(tmp_path / "global" / "best.ckpt")
    assert best["round"] == 1 and best["best_metric"] == 0.5 and best["metrics"]["val_loss"] == 0.5


def test_the_server_logs_each_round_and_the_federations_eta(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Both backends aggregate through GlobalModel: one line per round, with the ETA of the rest."""
    import logging

    from fedsynth.federated.server import GlobalModel

    server = GlobalModel(tiny_config("autoencoder", federation__rounds=3), tmp_path)
    with caplog.at_level(logging.INFO, logger="fedsynth.server"):
        for rnd in (1, 2):
            weights = server.shared_weights()
            server.aggregate(rnd, [SiteUpdate("site1", weights, 1), SiteUpdate("site2", weights, 1)])
    lines = [r.getMessage() for r in caplog.records if "aggregated" in r.getMessage()]
    assert lines[0] == "round 1/3 aggregated: 2 site(s) accepted, 0 rejected"
    assert lines[1].startswith("round 2/3 aggregated: 2 site(s) accepted, 0 rejected, ETA ") and lines[1].endswith(" s")


@pytest.mark.slow
def test_both_backends_write_the_same_layout(mri2d: dict[str, Path], tmp_path: Path) -> None:
    results = {}
    for backend, run_trial in _trials().items():
        results[backend] = run_trial(TrialRequest(_config(tmp_path), _sites(mri2d), tmp_path / backend, timeout_s=400))
    layouts = {b: sorted(p.name for p in (r.run_dir / "global").iterdir()) for b, r in results.items()}
    expected = sorted(["last.ckpt", "best.ckpt", "history.json"] + [f"round_{r:04d}.ckpt" for r in range(1, ROUNDS + 1)])
    assert layouts["flower"] == layouts["openfl"] == expected
    from fedsynth.checkpoint import checkpoint_info

    histories = {}
    for backend, result in results.items():
        assert result.round == ROUNDS and result.checkpoint == result.run_dir / "global" / "last.ckpt"
        assert checkpoint_info(result.checkpoint)["round"] == ROUNDS
        histories[backend] = json.loads((result.run_dir / "global" / "history.json").read_text(encoding="utf-8"))
        assert histories[backend] == result.history and [h["round"] for h in result.history] == [1, 2]
        assert all(h["accepted"] == ["site1", "site2"] or sorted(h["accepted"]) == ["site1", "site2"] for h in result.history)
    for flower_round, openfl_round in zip(histories["flower"], histories["openfl"], strict=False):
        assert set(flower_round) == set(openfl_round)
        assert set(flower_round["metrics"]) == set(openfl_round["metrics"])
        assert set(flower_round["site_metrics"]) == set(openfl_round["site_metrics"]) == {"site1", "site2"}
    # round 1's global model was validated on both (OpenFL validates it at the start of round 2)
    assert histories["flower"][0]["val_loss"] is not None and histories["openfl"][0]["val_loss"] is not None
