"""Flower adapter pieces that need no running federation: records, app bundle, site config, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedsynth.errors import ConfigError, WeightsError
from fedsynth.federated.flower.bundle import APP_PACKAGE, AppSpec, write_app
from fedsynth.federated.flower.client_app import SiteDataConfig, load_site_config, write_site_config
from fedsynth.federated.flower.records import encode, metrics_record, record_groups, record_nbytes, record_to_weights


def test_encode_keeps_keys_shapes_and_integer_dtypes() -> None:
    weights = {"generator/w": np.random.rand(4, 3).astype(np.float32),
               "generator/bn.num_batches_tracked": np.array(7, dtype=np.int64),
               "discriminator/b": np.zeros(5, dtype=np.float32)}
    rec16 = encode(weights, "float16")
    back = record_to_weights(rec16)
    assert back.keys() == weights.keys()
    assert back["generator/bn.num_batches_tracked"].shape == () and back["generator/bn.num_batches_tracked"].dtype == np.int64
    assert back["generator/w"].dtype == np.float16
    np.testing.assert_allclose(back["generator/w"], weights["generator/w"], atol=1e-3)
    assert record_groups(rec16) == ["discriminator", "generator"]
    rec32 = encode(weights, "float32")
    assert record_nbytes(rec16) < record_nbytes(rec32)


def test_bfloat16_and_objects_are_refused() -> None:
    from fedsynth.federated.flower.records import weights_to_record

    with pytest.raises(WeightsError, match="dtype"):
        weights_to_record({"g/x": np.array(["a"])})


def test_metrics_are_plain_numbers() -> None:
    rec = metrics_record({"loss": np.float32(0.5), "nan": float("nan"), "steps": np.int64(3)}, num_samples=8)
    assert dict(rec) == {"loss": 0.5, "steps": 3, "num_samples": 8}
    assert all(type(v) in (int, float) for v in rec.values())


def test_site_config_resolves_relative_paths(tmp_path: Path) -> None:
    path = write_site_config(tmp_path / "site.yaml", SiteDataConfig(site_id="site1", train_csv=Path("train.csv"),
                                                                    state_dir=Path("state")))
    cfg = load_site_config(path)
    assert cfg.train_csv == tmp_path / "train.csv" and cfg.state_dir == tmp_path / "state" and cfg.val_csv is None
    (tmp_path / "bad.yaml").write_text("site_id: s\ntrain_csv: a.csv\nstate_dir: s\ntrian: typo\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_site_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_site_config(tmp_path / "missing.yaml")


def test_app_bundle_is_a_valid_flower_app(tmp_path: Path) -> None:
    """Flower's own loader accepts the generated app (components found, run config typed)."""
    from flwr.common.config import get_project_config, validate_config

    app = write_app(tmp_path / "app", AppSpec(tmp_path / "cfg.yaml", tmp_path / "run", "127.0.0.1:9093",
                                              tmp_path / "ca.crt", rounds=2))
    config = get_project_config(app)
    ok, errors, _ = validate_config(config, check_module=True, project_dir=app)
    assert ok, errors
    assert config["tool"]["flwr"]["app"]["config"]["rounds"] == 2
    from fedsynth.federated.flower import messages  # the keys the ServerApp reads

    assert set(config["tool"]["flwr"]["app"]["config"]) == {messages.RUN_CONFIG_PATH, messages.RUN_DIR, messages.RUN_ROUNDS,
                                                             messages.RUN_EVALUATE}
    assert config["tool"]["flwr"]["federations"]["fedsynth"]["root-certificates"] == str((tmp_path / "ca.crt").resolve())
    assert (app / APP_PACKAGE / "server_app.py").is_file()
    with pytest.raises(ValueError, match="absolute"):
        write_app(tmp_path / "x", AppSpec(Path("cfg.yaml"), tmp_path, "127.0.0.1:9093", None))


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedsynth.cli import main

    assert main(["federate", "flower", "-c", "c.yaml", "--site", "nonsense", "-o", str(tmp_path)]) == 2
    assert "ID=" in capsys.readouterr().err
    assert main(["federate", "flower", "-c", "c.yaml", "--site", "site1=a.csv", "--val-site", "site9=b.csv",
                 "-o", str(tmp_path)]) == 2
    assert "site9" in capsys.readouterr().err
    assert main(["federate", "flower-app", "-c", "c.yaml", "--run-dir", str(tmp_path), "--superlink", "127.0.0.1:9093",
                 "-o", str(tmp_path / "app")]) == 2
    assert "--ca" in capsys.readouterr().err


def test_collaborator_example_data_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[1] / "collaborator" / "flower" / "data.yaml"
    cfg = load_site_config(example)
    assert cfg.site_id == "site1" and cfg.train_csv.is_absolute() and cfg.val_csv is None


def test_the_server_tells_each_site_what_became_of_its_update(caplog: pytest.LogCaptureFixture) -> None:
    from flwr.app import ArrayRecord

    from fedsynth.federated.flower.client_app import report_verdict
    from fedsynth.federated.flower.messages import RoundInstruction
    from fedsynth.federated.flower.server_app import verdicts

    summary = {"accepted": ["site1"], "rejected": [("site2", "site 'site2': 'unet/w' contains NaN or Inf")]}
    told = verdicts(3, summary)
    assert {site: str(v) for site, v in told.items()} == {
        "site1": "round 3: accepted", "site2": "round 3: rejected: site 'site2': 'unet/w' contains NaN or Inf"}

    def received(site: str | None) -> RoundInstruction:  # what the site decodes from the next round's message
        sent = RoundInstruction(4, "{}", ArrayRecord(), told[site] if site else None)
        return RoundInstruction.from_record(sent.to_record())

    with caplog.at_level("WARNING", logger="fedsynth"):
        assert str(report_verdict(received("site1").verdict, "site1")) == "round 3: accepted"
        assert not caplog.records
        assert report_verdict(received("site2").verdict, "site2") == told["site2"]
        assert report_verdict(received(None).verdict, "site2") is None
    assert "site site2: the server rejected this site's update of round 3: site 'site2': 'unet/w' contains NaN" in caplog.text


def test_a_message_the_superlink_lost_is_sent_again(tmp_path: Path) -> None:
    """flwr 1.23's SuperLink stores a pushed message before it registers the message's objects; a
    SuperNode that pulls in between gets nothing and the SuperLink deletes the message (its fleet
    PullMessages handler, on NoObjectInStoreError). The server then reads "Message Unavailable" for
    that site. The round sends the message again instead of running without the site.

    Real flwr link state and in-memory grid; the SuperNode's side is played on the same state."""
    import threading
    import time

    from conftest import tiny_config
    from flwr.app import ConfigRecord, Message
    from flwr.server.grid.inmemory_grid import InMemoryGrid
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

    from fedsynth.federated.flower.messages import RoundInstruction, TrainReply
    from fedsynth.federated.flower.server_app import FlowerFederation

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME)
    state = factory.state()
    run_id = state.create_run(None, None, None, {}, ConfigRecord(), None)
    node = state.create_node("site1-owner", b"site1-key", heartbeat_interval=30.0)
    assert state.acknowledge_node_heartbeat(node, 30.0)
    grid = InMemoryGrid(factory)
    grid.set_run(run_id)
    config = tiny_config("autoencoder", federation__min_sites=1, federation__round_timeout_s=60.0)
    federation = FlowerFederation(grid, config, tmp_path / "run", evaluate=False)

    seen: list[str] = []

    def supernode() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for message in state.get_message_ins(node_id=node, limit=1):
                seen.append(message.metadata.message_id)
                if len(seen) == 1:  # what the fleet handler does when the objects are not registered yet
                    state.delete_messages(message_ins_ids={message.metadata.message_id})
                    continue
                sent = RoundInstruction.from_record(message.content)
                reply = Message(TrainReply("site1", sent.arrays, 5, {"loss": 0.5}).to_record(), reply_to=message)
                reply.metadata.__dict__["_message_id"] = reply.object_id
                assert state.store_message_res(reply)
                return
            time.sleep(0.02)

    site = threading.Thread(target=supernode, daemon=True)
    site.start()
    federation.run_round(1)
    site.join(10)
    assert len(seen) == 2 and seen[0] != seen[1]  # the lost message, then the one sent again
    assert federation.global_model.round == 1
    received = (tmp_path / "run" / "server" / "received.jsonl").read_text(encoding="utf-8")
    assert '"site": "site1"' in received and "error" not in received


@pytest.mark.slow
def test_a_site_worker_without_its_supernode_exits_so_it_can_be_restarted() -> None:
    """No SuperNode answers at the worker's ClientAppIo address: the worker exits with status 1
    after --unreachable-s (flwr's own retry would wait forever), so the site's start script exits."""
    import subprocess
    import sys
    import time

    from fedsynth.processes import free_port

    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "fedsynth.federated.flower.worker", "--clientappio-api-address",
                           f"127.0.0.1:{free_port()}", "--unreachable-s", "3"], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "did not answer for 3 s" in done.stderr and "restarts it" in done.stderr, done.stderr
    assert time.monotonic() - t0 < 60


def test_nodes_are_named_by_their_registered_keys(tmp_path: Path) -> None:
    """The roster binds node ids to site names: a node claiming another site's name is rejected
    under its real name; an unknown node is rejected; the real site's update counts.

    Real flwr link state and in-memory grid; the SuperNodes' side is played on the same state."""
    import threading
    import time

    from conftest import tiny_config
    from flwr.app import ConfigRecord, Message
    from flwr.server.grid.inmemory_grid import InMemoryGrid
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

    from fedsynth.federated.flower.messages import RoundInstruction, TrainReply
    from fedsynth.federated.flower.roster import Roster
    from fedsynth.federated.flower.server_app import FlowerFederation

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME)
    state = factory.state()
    run_id = state.create_run(None, None, None, {}, ConfigRecord(), None)
    nodes = {name: state.create_node(f"{name}-owner", f"{name}-key".encode(), heartbeat_interval=30.0)
             for name in ("site1", "site2", "stranger")}
    for node in nodes.values():
        assert state.acknowledge_node_heartbeat(node, 30.0)
    roster = Roster(tmp_path / "run")
    roster.bind(nodes["site1"], "site1")
    roster.bind(nodes["site2"], "site2")
    grid = InMemoryGrid(factory)
    grid.set_run(run_id)
    config = tiny_config("autoencoder", federation__min_sites=1, federation__round_timeout_s=60.0)
    federation = FlowerFederation(grid, config, tmp_path / "run", evaluate=False)
    claims = {"site1": "site1", "site2": "site1", "stranger": "site3"}  # site2 says it is site1

    def supernodes() -> None:
        answered: set[str] = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(answered) < 3:
            for name, node in nodes.items():
                for message in state.get_message_ins(node_id=node, limit=1):
                    sent = RoundInstruction.from_record(message.content)
                    reply = Message(TrainReply(claims[name], sent.arrays, 5, {}).to_record(), reply_to=message)
                    reply.metadata.__dict__["_message_id"] = reply.object_id
                    assert state.store_message_res(reply)
                    answered.add(name)
            time.sleep(0.02)

    sites = threading.Thread(target=supernodes, daemon=True)
    sites.start()
    federation.run_round(1)
    sites.join(10)
    summary = federation.global_model.history[-1]
    assert summary["accepted"] == ["site1"]
    rejected = dict(summary["rejected"])
    assert set(rejected) == {"site2", f"node {nodes['stranger']}"}
    assert "registered as site 'site2' but says it is 'site1'" in rejected["site2"]
    assert "not in the roster" in rejected[f"node {nodes['stranger']}"]
