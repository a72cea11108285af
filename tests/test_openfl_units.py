"""Cheap OpenFL-adapter checks (no federation): wire format, per-group aggregation routing and
rejection, config pinning, --site parsing, and that started processes are always stopped."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_config

pytest.importorskip("openfl")

from openfl.utilities import LocalTensor  # noqa: E402

from fedsynth.config import save_config  # noqa: E402
from fedsynth.errors import ConfigError, FedsynthError  # noqa: E402
from fedsynth.families import family_names  # noqa: E402
from fedsynth.federated.openfl.common import file_sha256, load_pinned_config  # noqa: E402
from fedsynth.federated.trial_common import parse_sites  # noqa: E402
from fedsynth.processes import ProcessFailed, ProcessGroup  # noqa: E402


def test_pipeline_round_trip_is_lossless_and_writable() -> None:
    from fedsynth.federated.openfl.pipeline import Float32Pipeline

    pipe = Float32Pipeline()
    x = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    data, meta = pipe.forward(x)
    y = pipe.backward(data, meta)
    assert y.shape == x.shape and np.array_equal(x, y) and y.flags.writeable


def test_config_pin_mismatch_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "fedsynth.yaml"
    save_config(tiny_config("gan"), path)
    assert load_pinned_config(path, file_sha256(path)).family == "gan"
    with pytest.raises(ConfigError, match="does not match the federation's plan"):
        load_pinned_config(path, "0" * 64)


def test_parse_sites() -> None:
    sites = parse_sites(["col1=a.csv", "col2=b.csv,bv.csv"])
    assert sites["col1"] == (Path("a.csv"), None) and sites["col2"] == (Path("b.csv"), Path("bv.csv"))
    for bad in (["col1"], ["=a.csv"], ["col1=a.csv", "col1=b.csv"], ["col1=a.csv,b.csv,c.csv"], ["Col1=a.csv"],
                ["col1=,b.csv"]):
        with pytest.raises(ConfigError):
            parse_sites(bad)


@pytest.fixture()
def routed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The aggregation function of a GAN plan whose discriminator is local."""
    from fedsynth.federated.openfl.aggregation import GroupRoutedFedAvg
    from fedsynth.models import build_model

    cfg = tiny_config("gan", federation__groups={"discriminator": "local"})
    save_config(cfg, tmp_path / "fedsynth.yaml")
    fn = GroupRoutedFedAvg.__new__(GroupRoutedFedAvg)  # OpenFL aggregation functions are singletons:
    fn.__init__(str(tmp_path / "fedsynth.yaml"), run_dir=str(tmp_path / "run"))  # re-run __init__ for this config
    ref = {k: v.astype(np.float32) for k, v in build_model(cfg).get_weights(["generator"]).items()}
    return fn, ref


def _db(ref: dict[str, np.ndarray], sites: dict[str, dict[str, np.ndarray]], fl_round: int = 0):
    rows = [{"tensor_name": k, "round": fl_round, "tags": ("model",), "nparray": v} for k, v in ref.items()]
    for site, weights in sites.items():
        rows += [{"tensor_name": k, "round": fl_round, "tags": ("trained", site), "nparray": v} for k, v in weights.items()]
    return (row for _, row in pd.DataFrame(rows).iterrows())


def test_aggregation_is_sample_weighted_and_rejects_a_nan_site(routed) -> None:
    fn, ref = routed
    a = {k: v + 1 for k, v in ref.items()}
    b = {k: v + 3 for k, v in ref.items()}
    bad = {k: np.full_like(v, np.nan) for k, v in ref.items()}
    name = next(k for k, v in ref.items() if v.dtype == np.float32 and v.size > 1)
    local = [LocalTensor("a", a[name], 0.25), LocalTensor("b", b[name], 0.5), LocalTensor("bad", bad[name], 0.25)]
    out = fn(local, _db(ref, {"a": a, "b": b, "bad": bad}), name, 0, ("trained",))
    np.testing.assert_allclose(out, ref[name] + (0.25 * 1 + 0.5 * 3) / 0.75, rtol=1e-5)
    # the round went through GlobalModel: the shared layout, with the rejected site in history.json
    import json

    run = fn.run_dir / "global"
    assert {p.name for p in run.iterdir()} == {"last.ckpt", "round_0001.ckpt", "history.json"}
    history = json.loads((run / "history.json").read_text(encoding="utf-8"))
    assert history[0]["round"] == 1 and history[0]["accepted"] == ["a", "b"] and history[0]["rejected"][0][0] == "bad"


def test_too_few_valid_updates_fail_the_round_naming_the_sites(routed) -> None:
    from fedsynth.federated.aggregation import NoValidUpdates

    fn, ref = routed
    bad = {k: np.full_like(v, np.nan) for k, v in ref.items()}
    name = next(iter(ref))
    local = [LocalTensor("a", ref[name], 0.5), LocalTensor("bad", bad[name], 0.5)]
    with pytest.raises(NoValidUpdates, match=r"round 1: 1 valid update\(s\), fewer than federation.min_sites=2.*site 'bad'"):
        fn(local, _db(ref, {"a": ref, "bad": bad}), name, 0, ("trained",))


def test_a_local_group_tensor_is_refused(routed) -> None:
    fn, ref = routed
    with pytest.raises(FedsynthError, match="group 'discriminator'.*local"):
        fn([LocalTensor("a", np.zeros(3, np.float32), 1.0)], iter(()), "discriminator/x", 0, ("trained",))


def test_failed_process_is_named_and_every_process_stopped(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    with pytest.raises(ProcessFailed, match="crasher exited with status 3"):
        with ProcessGroup() as group:
            long = group.start("sleeper", sleeper, tmp_path, tmp_path / "sleeper.log")
            crash = group.start("crasher", [sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path, tmp_path / "c.log")
            group.wait_all([long, crash], deadline=time.monotonic() + 60)
    assert long.popen.poll() is not None  # stopped by the group on the way out


def test_timeout_names_the_stragglers(tmp_path: Path) -> None:
    with pytest.raises(ProcessFailed, match="still running after the deadline: sleeper"):
        with ProcessGroup() as group:
            proc = group.start("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"], tmp_path, tmp_path / "s.log")
            group.wait_all([proc], deadline=time.monotonic() + 1)
    assert proc.popen.poll() is not None


def test_data_loader_reads_train_and_optional_val_csv(tmp_path: Path) -> None:
    from fedsynth.errors import DataError
    from fedsynth.federated.openfl.data import FedsynthDataLoader

    train, val = tmp_path / "t.csv", tmp_path / "v.csv"
    train.write_text("SubjectID,Channel_0\n", encoding="utf-8")
    val.write_text("SubjectID,Channel_0\n", encoding="utf-8")
    loader = FedsynthDataLoader(f"{train},{val}")
    assert loader.train_csv == train and loader.val_csv == val
    assert FedsynthDataLoader(str(train)).val_csv is None
    assert FedsynthDataLoader(None).train_csv is None  # `fx plan initialize` builds no data
    with pytest.raises(DataError, match="CSV not found"):
        FedsynthDataLoader(str(tmp_path / "nope.csv"))


def test_aggregation_clips_each_site_update(tmp_path: Path) -> None:
    from fedsynth.federated.openfl.aggregation import GroupRoutedFedAvg
    from fedsynth.models import build_model

    cfg = tiny_config("gan", federation__clip_update_norm=1.0, federation__min_sites=1)
    save_config(cfg, tmp_path / "fedsynth.yaml")
    fn = GroupRoutedFedAvg.__new__(GroupRoutedFedAvg)
    fn.__init__(str(tmp_path / "fedsynth.yaml"), run_dir=str(tmp_path / "run"))
    ref = {k: v.astype(np.float32) for k, v in build_model(cfg).get_weights(["generator", "discriminator"]).items()}
    big = {k: v + 100 for k, v in ref.items()}
    name = next(iter(ref))
    out = fn([LocalTensor("a", big[name], 1.0)], _db(ref, {"a": big}), name, 0, ("trained",))
    assert np.abs(out - ref[name]).max() <= 1.0 + 1e-4  # the whole update has L2 norm <= 1


@pytest.mark.parametrize("family", family_names())
def test_plan_templates_are_complete_and_pinned(family: str, tmp_path: Path) -> None:
    """Every registered family's workspace, written from the one template, is complete and pinned."""
    import yaml

    from fedsynth.config import default_config
    from fedsynth.federated.openfl.workspace import TEMPLATE_IMAGE_SIZE, write_template

    ws = write_template(family, tmp_path / "ws")
    text = (ws / "plan" / "plan.yaml").read_text(encoding="utf-8")
    assert f"(family: {family})" in text and "{family}" not in text
    plan = yaml.safe_load(text)
    settings = plan["task_runner"]["settings"]
    config = load_pinned_config(ws / settings["config_path"], settings["config_sha256"])  # raises on drift
    assert config == default_config(family, 2, TEMPLATE_IMAGE_SIZE)  # the family's defaults, 2D 64x64
    assert plan["aggregator"]["settings"]["rounds_to_train"] == config.federation.rounds
    assert plan["compression_pipeline"]["template"].startswith("fedsynth.")
    for task in ("aggregated_model_validation", "train", "locally_tuned_model_validation"):
        assert plan["tasks"][task]["aggregation_type"]["settings"]["config_sha256"] == settings["config_sha256"]
    for name in (".workspace", "requirements.txt", "src", "plan/cols.yaml", "plan/data.yaml"):
        assert (ws / name).exists(), f"{name} is missing from the {family} workspace (fx workspace export needs it)"


def test_trial_command_rejects_bad_input_before_starting_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedsynth.cli import main

    save_config(tiny_config("gan"), tmp_path / "gan.yaml")
    two = ["--site", f"col1={tmp_path / 'missing.csv'}", "--site", f"col2={tmp_path / 'missing.csv'}"]
    rc = main(["federate", "openfl", "-c", str(tmp_path / "gan.yaml"), *two, "-o", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "CSV not found" in err and "missing.csv" in err
    rc = main(["federate", "openfl", "-c", str(tmp_path / "gan.yaml"), two[0], two[1], "-o", str(tmp_path / "run")])
    assert rc == 2 and "federation.min_sites is 2 but the trial has only 1 site(s)" in capsys.readouterr().err
    for field, value in (("fraction_fit", 0.5), ("transport_dtype", "float16")):
        save_config(tiny_config("gan", **{f"federation__{field}": value}), tmp_path / "x.yaml")
        rc = main(["federate", "openfl", "-c", str(tmp_path / "x.yaml"), *two, "-o", str(tmp_path / "run")])
        assert rc == 2 and f"federation.{field}={value!r} is not supported by the openfl backend" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_round_timeout_policy_is_the_flower_round_policy(caplog: pytest.LogCaptureFixture) -> None:
    """All reported: end now; after round_timeout_s: end with >= min_sites, else the federation fails."""
    from fedsynth.federated.openfl.stragglers import RoundTimeoutPolicy

    policy = RoundTimeoutPolicy(round_timeout_s=30.0, min_sites=2)
    assert policy.straggler_cutoff_check(3, 3)  # every site reported: no wait at all
    policy.is_timer_started, policy.round_start_time = True, time.time()
    assert not policy.straggler_cutoff_check(2, 3)  # within the timeout: wait for the third
    policy.round_start_time = time.time() - 31.0
    assert policy.straggler_cutoff_check(2, 3)  # timed out, min_sites reached: end the round
    with caplog.at_level("ERROR", logger="fedsynth.openfl"):
        assert not policy.straggler_cutoff_check(1, 3)  # timed out with too few (the aggregator entry exits here)
    assert "only 1 of 3 sites reported, fewer than federation.min_sites=2" in caplog.text
    policy.reset_policy_for_round()
    assert not policy.is_timer_started


def test_refusals_are_logged_by_name_and_revoking_is_one_command(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """OpenFL's own authorization check, wrapped by the fedsynth aggregator: who, which CN, why;
    ``revoke`` edits cols.yaml and the running aggregator refuses the site from its next request."""
    import types

    import yaml
    from openfl.component.aggregator.aggregator import Aggregator

    from fedsynth.federated.openfl.__main__ import main
    from fedsynth.federated.openfl.tools import log_refusals

    cols = tmp_path / "cols.yaml"
    cols.write_text(yaml.safe_dump({"collaborators": ["col1", "col2"]}), encoding="utf-8")
    aggregator = types.SimpleNamespace(single_col_cert_common_name="", authorized_cols=["col1", "col2"])
    aggregator.valid_collaborator_cn_and_id = types.MethodType(Aggregator.valid_collaborator_cn_and_id, aggregator)
    log_refusals(aggregator, str(cols))
    check = aggregator.valid_collaborator_cn_and_id
    with caplog.at_level("WARNING", logger="fedsynth.openfl"):
        assert check("col1", "col1") and check("col2", "col2")
        assert not caplog.records
        assert not check("intruder", "intruder") and not check("intruder", "intruder")  # retries: logged once
        assert not check("col1", "col2")
        assert main(["revoke", "col2", "-c", str(cols)]) == 0
        assert not check("col2", "col2")
    assert yaml.safe_load(cols.read_text(encoding="utf-8")) == {"collaborators": ["col1"]}
    assert check("col1", "col1")
    text = caplog.text
    assert text.count("refused collaborator 'intruder' (CN 'intruder'): not in cols.yaml") == 1
    assert "refused collaborator 'col2' (CN 'col1'): certificate CN is not 'col2'" in text
    assert "revoked collaborator 'col2'" in text and "refused collaborator 'col2' (CN 'col2'): not in cols.yaml" in text
    assert "revoked 'col2'" in capsys.readouterr().out
    assert main(["revoke", "ghost", "-c", str(cols)]) == 2
    assert "no collaborator 'ghost' to revoke" in capsys.readouterr().err


def test_a_round_without_any_validation_score_is_stored(tmp_path: Path) -> None:
    """Sites keep their validation losses by default, so the aggregator has no best score: OpenFL 1.9
    could not store such a round (``float(None)``) and the federation hung at the end of round 1."""
    from openfl.databases.persistent_db import PersistentTensorDB
    from openfl.utilities import TensorKey

    from fedsynth.federated.compat import openfl_persist_rounds_without_a_score
    from fedsynth.federated.openfl.tools import read_final_model

    openfl_persist_rounds_without_a_score()
    db = PersistentTensorDB(str(tmp_path / "tensor.db"))
    key = TensorKey("generator/w", "agg", 1, False, ("model",))
    db.finalize_round({key: np.ones(2, np.float32)}, {key: np.ones(2, np.float32)}, 0, None)
    assert db.get_round_and_best_score() == (0, float("-inf"))  # "none yet": any real score is better
    db.finalize_round({key: np.ones(2, np.float32)}, {key: np.ones(2, np.float32)}, 1, -0.5)
    assert db.get_round_and_best_score() == (1, -0.5)
    db.close()
    db = PersistentTensorDB(str(tmp_path / "none.db"))
    db.finalize_round({key: np.ones(2, np.float32)}, {key: np.ones(2, np.float32)}, 0, None)
    db.close()
    assert read_final_model(tmp_path / "none.db")[2] is None


def test_a_metric_is_averaged_over_the_sites_that_sent_it() -> None:
    """One site shares its validation score, the other keeps it home (or refused the round): OpenFL 1.9
    returned None for the average and the aggregator crashed on float(None)."""
    from openfl.databases.tensor_db import TensorDB
    from openfl.interface.aggregation_functions import WeightedAverage
    from openfl.utilities import TensorKey

    from fedsynth.federated.compat import openfl_average_metrics_over_senders

    openfl_average_metrics_over_senders()
    db = TensorDB()
    tags = ("metric", "validate_agg")
    db.cache_tensor({TensorKey("score", "agg", 0, True, ("col1", *tags)): np.array(-0.5, np.float32),
                     TensorKey("other", "agg", 0, True, ("col1", *tags)): np.array(1.0, np.float32),
                     TensorKey("other", "agg", 0, True, ("col2", *tags)): np.array(3.0, np.float32)})
    weights = {"col1": 0.25, "col2": 0.75}
    assert float(db.get_aggregated_tensor(TensorKey("score", "agg", 0, True, tags), weights, WeightedAverage())) == -0.5
    assert float(db.get_aggregated_tensor(TensorKey("other", "agg", 0, True, tags), weights, WeightedAverage())) == 2.5
