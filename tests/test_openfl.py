"""OpenFL end to end: real ``fx`` processes, mTLS on 127.0.0.1, real MRI slices.

One PKI (CA, aggregator and collaborator certificates) is made once per module with the plain
``fx`` commands and reused by every family's workspace (certificates do not depend on the plan),
which keeps the whole module within a few minutes on two cores. The GAN federation also runs two
collaborators that must be refused: one certified by the federation's CA but not listed in
cols.yaml, and one impersonating ``col1`` with a certificate from another CA.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_config

pytest.importorskip("openfl")

from fedsynth.federated.openfl.trial import export_run, run_federation  # noqa: E402
from fedsynth.federated.openfl.workspace import (  # noqa: E402
    LOCAL_AGGREGATOR_NAME,
    Workspace,
    certify_collaborator,
    create_workspace,
    fx,
    set_up_pki_and_plan,
)
from fedsynth.processes import ProcessFailed, free_port  # noqa: E402

pytestmark = pytest.mark.slow
ROUNDS = 2
FEDERATION_TIMEOUT = 180


def _config(family: str):
    overrides = {"federation__rounds": ROUNDS, "federation__local_steps": 2}
    if family == "gan":
        overrides["federation__groups"] = {"discriminator": "local"}
    return tiny_config(family, **overrides)


def _sites(mri2d: dict[str, Path]) -> dict[str, tuple[Path, Path | None]]:
    # two different real brains; without Debian's mricron-data (Colin27) both sites read MNI152
    return {"col1": (mri2d["mni152"], None), "col2": (mri2d.get("colin27", mri2d["mni152"]), None)}


def _generate(checkpoint: Path, out: Path) -> list[Path]:
    subprocess.run([str(Path(sys.executable).with_name("fedsynth")), "generate", "--checkpoint", str(checkpoint), "-n", "4",
                    "-o", str(out)], check=True, timeout=120, capture_output=True)
    return sorted(out.glob("synthetic_*.png"))


def _pbuf_names(path: Path) -> set[str]:
    from openfl.protocols import utils

    return {t.name for t in utils.load_proto(str(path)).tensors}


@pytest.fixture(scope="module")
def gan_federation(mri2d: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """PKI + GAN workspace via fx, 2 rounds with two refused intruders running alongside."""
    root = tmp_path_factory.mktemp("openfl")
    sites = _sites(mri2d)
    ws = create_workspace(root / "gan", _config("gan"), sites, agg_port=free_port())
    t0 = time.monotonic()
    set_up_pki_and_plan(ws)
    # certified by the federation's CA, then dropped from cols.yaml: must be refused by name
    (ws.path / "plan" / "data.yaml").open("a", encoding="utf-8").write(f"intruder,{mri2d['mni152']}\n")
    certify_collaborator(ws, "intruder")
    (ws.path / "plan" / "cols.yaml").write_text(yaml.safe_dump({"collaborators": ["col1", "col2"]}), encoding="utf-8")
    # impersonates col1 with a certificate from another CA (trusting the real chain to reach the server)
    rogue = Workspace(root / "rogue", ("col1",))
    shutil.copytree(ws.path / "plan", rogue.path / "plan")
    for d in ("cert", "logs", "local_state", "save"):
        (rogue.path / d).mkdir(parents=True, exist_ok=True)
    rogue.fx("workspace", "certify")
    certify_collaborator(rogue, "col1")
    shutil.copy(ws.path / "cert" / "cert_chain.crt", rogue.path / "cert" / "cert_chain.crt")
    setup_s = time.monotonic() - t0
    extra = {
        "intruder": ([fx(), "collaborator", "start", "-n", "intruder"], ws.path),
        "forger": ([fx(), "collaborator", "start", "-n", "col1"], rogue.path),
    }
    def refused() -> bool:  # the intruders have been turned away at least once before the sites start
        logs = {n: (ws.logs / f"{n}.log").read_text(encoding="utf-8") if (ws.logs / f"{n}.log").is_file() else ""
                for n in extra}
        return "StatusCode.UNAUTHENTICATED" in logs["intruder"] and logs["forger"].count("StatusCode.UNAVAILABLE") >= 2

    timings = run_federation(ws, timeout=FEDERATION_TIMEOUT, extra=extra, extra_ready=refused)
    run_dir = root / "gan_run"
    checkpoints = export_run(ws, run_dir)  # OpenFL's own models; GlobalModel wrote ws/global
    return {"ws": ws, "run_dir": run_dir, "checkpoints": checkpoints, "pki_root": ws.path / "cert",
            "timings": {"setup_s": setup_s, **timings}}


def test_gan_federation_end_to_end(gan_federation: dict[str, object], tmp_path: Path) -> None:
    ws: Workspace = gan_federation["ws"]  # type: ignore[assignment]
    agg_log = (ws.logs / "aggregator.log").read_text(encoding="utf-8")
    assert "listening on 127.0.0.1:" in agg_log
    for r in range(ROUNDS):
        assert f"Saving round {r} model" in agg_log
    for name in ("col1", "col2"):
        assert f"Round: {ROUNDS - 1} Received Tasks" in (ws.logs / f"collaborator_{name}.log").read_text(encoding="utf-8")
    # `fx plan initialize` produced the initial model from our task runner (shared groups only)
    assert "Saving model state to save/init.pbuf" in (ws.logs / "fx_plan_initialize.log").read_text(encoding="utf-8")
    names = _pbuf_names(ws.path / "save" / "init.pbuf")
    assert names and all(n.startswith("generator/") for n in names)
    checkpoints: dict[str, Path] = gan_federation["checkpoints"]  # type: ignore[assignment]
    from fedsynth.checkpoint import checkpoint_info

    gm_dir = ws.path / "global"  # GlobalModel's layout, written by the aggregator (run_dir defaults to the workspace)
    assert {p.name for p in gm_dir.iterdir()} >= {"last.ckpt", "history.json", "round_0001.ckpt", f"round_{ROUNDS:04d}.ckpt"}
    assert checkpoint_info(gm_dir / "last.ckpt")["round"] == ROUNDS
    last, best = checkpoint_info(checkpoints["last"]), checkpoint_info(checkpoints["best"])
    assert last["family"] == "gan" and last["round"] == ROUNDS
    assert best["best_metric"] is not None and np.isfinite(best["best_metric"])
    assert len(_generate(checkpoints["best"], tmp_path / "gen")) == 4


def test_local_group_never_reaches_the_aggregator(gan_federation: dict[str, object]) -> None:
    ws: Workspace = gan_federation["ws"]  # type: ignore[assignment]
    stored = (ws.path / "local_state" / "tensor.db").read_bytes()
    assert b"generator/" in stored  # the check can see tensor names at all
    assert b"discriminator/" not in stored
    for pbuf in ("init", "best", "last"):
        assert not any(n.startswith("discriminator/") for n in _pbuf_names(ws.path / "save" / f"{pbuf}.pbuf"))
    # ...while each site did train and keep its own discriminator
    from fedsynth.checkpoint import load_checkpoint

    site = load_checkpoint(next((ws.path / "local_state" / "fedsynth" / "col1").glob("*/last.ckpt")))  # <federation id>/
    assert any(k.startswith("discriminator/") for k in site["weights"]) and "discriminator" in site["optimizers"]


def test_collaborator_not_in_cols_yaml_is_refused(gan_federation: dict[str, object]) -> None:
    ws: Workspace = gan_federation["ws"]  # type: ignore[assignment]
    log = (ws.logs / "intruder.log").read_text(encoding="utf-8")
    assert "Received Tasks" not in log
    assert "StatusCode.UNAUTHENTICATED" in log  # valid certificate, but the aggregator refuses the name
    agg_log = (ws.logs / "aggregator.log").read_text(encoding="utf-8")
    assert "refused collaborator 'intruder' (CN 'intruder'): not in cols.yaml" in agg_log  # who and why, on the coordinator


def _signed_by(cert: Path, ca: Path) -> bool:
    from cryptography import x509

    child = x509.load_pem_x509_certificate(cert.read_bytes())
    issuer = x509.load_pem_x509_certificate(ca.read_bytes())
    try:
        child.verify_directly_issued_by(issuer)
        return True
    except Exception:
        return False


def test_certificate_from_another_ca_is_refused(gan_federation: dict[str, object]) -> None:
    ws: Workspace = gan_federation["ws"]  # type: ignore[assignment]
    signing_ca = ws.path / "cert" / "ca" / "signing-ca.crt"
    assert _signed_by(ws.path / "cert" / "client" / "col_col1.crt", signing_ca)
    assert not _signed_by(ws.path.parent / "rogue" / "cert" / "client" / "col_col1.crt", signing_ca)
    log = (ws.logs / "forger.log").read_text(encoding="utf-8")
    assert "Received Tasks" not in log
    assert log.count("StatusCode.UNAVAILABLE") >= 2  # every TLS handshake is rejected; it keeps retrying
    agg_log = (ws.logs / "aggregator.log").read_text(encoding="utf-8")
    for r in range(ROUNDS):  # only the genuine col1 ever delivered results
        assert agg_log.count(f"Collaborator col1 is sending task results for train, round {r}") == 1


def test_trial_command_end_to_end(mri2d: dict[str, Path], tmp_path: Path) -> None:
    """`fedsynth federate openfl` as a user types it (its own workspace and PKI), autoencoder."""
    from fedsynth.config import save_config

    save_config(_config("autoencoder"), tmp_path / "ae.yaml")
    sites = _sites(mri2d)
    run = tmp_path / "run"
    cmd = [str(Path(sys.executable).with_name("fedsynth")), "federate", "openfl", "-c", str(tmp_path / "ae.yaml"),
           "--site", f"col1={sites['col1'][0]}", "--site", f"col2={sites['col2'][0]}", "--rounds", str(ROUNDS),
           "-o", str(run), "--timeout", str(FEDERATION_TIMEOUT)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=FEDERATION_TIMEOUT + 240)
    assert done.returncode == 0, done.stdout + done.stderr
    from fedsynth.checkpoint import checkpoint_info

    gdir = run / "global"  # the layout of the Flower trial (GlobalModel)
    assert checkpoint_info(gdir / "last.ckpt")["round"] == ROUNDS and (gdir / "best.ckpt").is_file()
    assert (gdir / "history.json").is_file() and (gdir / f"round_{ROUNDS:04d}.ckpt").is_file()
    assert not _processes_in(run / "workspace")
    assert len(_generate(gdir / "best.ckpt", tmp_path / "gen")) == 4


def test_latent_diffusion_ships_its_first_stage_in_the_workspace(gan_federation: dict[str, object],
                                                                mri2d: dict[str, Path], tmp_path: Path) -> None:
    """Fresh diffusion workspace from plans/, the module's certificates, fx plan initialize, 2 rounds.

    Latent diffusion: pinning copies the first stage into ``plan/`` (it travels with the workspace)
    and pins its hash; the autoencoder run on the authoring host is deleted before the federation.
    """
    from fedsynth.checkpoint import checkpoint_info
    from fedsynth.config import save_config
    from fedsynth.local import TrainRequest, run_training

    save_config(tiny_config("autoencoder", training__epochs=1, training__max_steps=2), tmp_path / "ae.yaml")
    run_training(TrainRequest(str(tmp_path / "ae.yaml"), str(mri2d["mni152"]), str(tmp_path / "author-only" / "ae")))
    config = _config("diffusion")
    config.model.autoencoder_checkpoint = str(tmp_path / "author-only" / "ae" / "last.ckpt")
    config.model.channels = [16, 16]
    ws = _workspace_with_module_pki(tmp_path, "diffusion", _sites(mri2d), gan_federation, config=config)
    pinned = yaml.safe_load((ws.path / "plan" / "fedsynth.yaml").read_text(encoding="utf-8"))["model"]
    assert pinned["autoencoder_checkpoint"] == "plan/first_stage.ckpt" and len(pinned["first_stage_sha256"]) == 64
    assert (ws.path / "plan" / "first_stage.ckpt").is_file()
    shutil.rmtree(tmp_path / "author-only")
    run_federation(ws, timeout=FEDERATION_TIMEOUT)
    checkpoints = export_run(ws, tmp_path / "run")
    info = checkpoint_info(checkpoints["last"])
    assert info["round"] == ROUNDS and info["latent_diffusion"]
    assert len(_generate(checkpoints["last"], tmp_path / "gen")) == 4


def _workspace_with_module_pki(tmp_path: Path, family: str, sites: dict[str, tuple[Path, Path | None]],
                               gan_federation: dict[str, object], site_configs: dict[str, Path] | None = None,
                               config=None) -> Workspace:  # type: ignore[no-untyped-def]
    ws = create_workspace(tmp_path / "ws", config or _config(family), sites, agg_port=free_port(), site_configs=site_configs)
    shutil.rmtree(ws.path / "cert")
    shutil.copytree(gan_federation["pki_root"], ws.path / "cert")  # type: ignore[arg-type]
    ws.path.joinpath("plan", "cols.yaml").write_text(yaml.safe_dump({"collaborators": list(ws.collaborators)}), encoding="utf-8")
    ws.fx("plan", "initialize", "-a", LOCAL_AGGREGATOR_NAME)
    return ws


def test_a_failing_collaborator_is_named_and_every_process_stopped(gan_federation: dict[str, object],
                                                                   mri2d: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.csv"
    broken.write_text("SubjectID,Channel_0\nghost," + str(tmp_path / "missing.nii.gz") + "\n", encoding="utf-8")
    ws = _workspace_with_module_pki(tmp_path, "gan", {"col1": (mri2d["mni152"], None), "col2": (broken, None)},
                                    gan_federation)
    started = time.monotonic()
    with pytest.raises(ProcessFailed, match="collaborator col2 exited with status") as err:
        run_federation(ws, timeout=FEDERATION_TIMEOUT)
    assert "missing.nii.gz" in str(err.value)  # the log tail shows why
    assert time.monotonic() - started < FEDERATION_TIMEOUT
    assert not _processes_in(ws.path), "processes of the failed federation are still running"


def test_a_site_refuses_a_config_weaker_than_its_own_floor(gan_federation: dict[str, object],
                                                             mri2d: dict[str, Path], tmp_path: Path) -> None:
    """The plan's config (the coordinator's) has DP off; col1's own data.yaml requires DP: col1 refuses
    every round before training anything and reports it (the aggregator does not wait for it): the
    round record lists col1 as rejected, naming the field, never col1's floor; col2 trains on."""
    from fedsynth.federated.site_config import write_trial_site_config

    sites = _sites(mri2d)
    floor = {"privacy": {"require_dp": True, "max_epsilon": 8.0}}
    configs = {"col1": write_trial_site_config(tmp_path / "sites" / "col1", "col1", sites["col1"][0], None, floor)}
    config = _config("gan")
    config.federation.min_sites = 1
    ws = _workspace_with_module_pki(tmp_path, "gan", sites, gan_federation, site_configs=configs, config=config)
    assert f"col1,{configs['col1'].resolve()}" in (ws.path / "plan" / "data.yaml").read_text(encoding="utf-8")
    run_federation(ws, timeout=FEDERATION_TIMEOUT)  # round_timeout_s is an hour: nobody waited for col1
    history = json.loads((ws.path / "global" / "history.json").read_text(encoding="utf-8"))
    assert len(history) == ROUNDS
    for entry in history:
        assert entry["accepted"] == ["col2"]
        assert entry["rejected"] == [["col1", "refused by the site's own policy (privacy.enabled)"]]
    server_side = (ws.logs / "aggregator.log").read_text(encoding="utf-8") + json.dumps(history)
    assert "max_epsilon" not in server_side and "the site requires true" not in server_side
    assert "the site requires true" in (ws.logs / "collaborator_col1.log").read_text(encoding="utf-8")
    assert not list((tmp_path / "sites" / "col1" / "state").glob("*/last.ckpt"))
    assert not _processes_in(ws.path)


def _processes_in(folder: Path) -> list[int]:
    """Live processes whose working directory is ``folder`` (every federation process runs there)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(proc / "cwd").resolve() == folder.resolve():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _history(ws: Workspace) -> list[dict[str, object]]:
    import json

    path = ws.path / "global" / "history.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    except ValueError:  # being replaced right now
        return []


def _wait_for_round(ws: Workspace, server_round: int, deadline: float, alive) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    while time.monotonic() < deadline:
        history = _history(ws)
        if len(history) >= server_round:
            return history
        assert alive(), "the aggregator exited early"
        time.sleep(0.5)
    raise AssertionError(f"round {server_round} did not finish in time; history {_history(ws)}")


def test_a_sigkilled_collaborator_is_left_out_of_its_round_and_rejoins(gan_federation: dict[str, object],
                                                                      mri2d: dict[str, Path], tmp_path: Path) -> None:
    """OpenFL's straggler policy from round_timeout_s / min_sites: col2 is SIGKILLed at the start of
    round 2; round 2 ends round_timeout_s after its first task with col1 alone; col2, restarted,
    takes part in round 3 with the local state it had on disk."""
    import os
    import signal

    from fedsynth.checkpoint import load_checkpoint
    from fedsynth.processes import ProcessGroup

    config = tiny_config("autoencoder", federation__rounds=3, federation__local_steps=2, federation__min_sites=1,
                         federation__round_timeout_s=20.0)
    ws = _workspace_with_module_pki(tmp_path, "autoencoder", _sites(mri2d), gan_federation, config=config)
    policy = yaml.safe_load((ws.path / "plan" / "plan.yaml").read_text(encoding="utf-8"))["straggler_handling_policy"]
    assert policy == {"template": "fedsynth.federated.openfl.stragglers.RoundTimeoutPolicy",
                      "settings": {"round_timeout_s": 20.0, "min_sites": 1}}
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def collaborator(group: ProcessGroup, name: str, tag: str = ""):  # type: ignore[no-untyped-def]
        return group.start(f"collaborator {name}{tag}", [fx(), "collaborator", "start", "-n", name], ws.path,
                           ws.logs / f"collaborator_{name}{tag}.log", env)

    deadline = time.monotonic() + 300
    with ProcessGroup() as group:
        agg = group.start("aggregator", [sys.executable, "-m", "fedsynth.federated.openfl", "aggregator", "--bind", "127.0.0.1"],
                          ws.path, ws.logs / "aggregator.log", env)
        col1, col2 = collaborator(group, "col1"), collaborator(group, "col2")
        _wait_for_round(ws, 1, deadline, agg.alive)
        os.killpg(col2.popen.pid, signal.SIGKILL)  # round 2 has just started
        col2.popen.wait(timeout=10)
        killed_at = time.monotonic()
        history = _wait_for_round(ws, 2, deadline, agg.alive)
        assert history[1]["accepted"] == ["col1"]
        assert time.monotonic() - killed_at < 20.0 + 30.0  # the round timeout, not forever
        col2_again = collaborator(group, "col2", "-restarted")
        group.wait_all([agg, col1, col2_again], deadline=deadline)
    history = _history(ws)
    assert [sorted(h["accepted"]) for h in history] == [["col1", "col2"], ["col1"], ["col1", "col2"]]  # type: ignore[arg-type]
    state = load_checkpoint(next((ws.path / "local_state" / "fedsynth" / "col2").glob("*/last.ckpt")))
    assert state["step"] == 4 and state["round"] == 3  # rounds 1 and 3, 2 local steps each: its own state survived
    assert "Identified stragglers: ['col2']" in (ws.logs / "aggregator.log").read_text(encoding="utf-8")


def test_a_killed_aggregator_resumes_from_the_last_completed_round(gan_federation: dict[str, object],
                                                                   mri2d: dict[str, Path], tmp_path: Path) -> None:
    """The aggregator is SIGKILLed after round 1; restarted with the same plan it resumes from
    local_state/tensor.db (GlobalModel from global/last.ckpt), the collaborators reconnect by
    themselves, and the federation ends after the last round."""
    import os
    import signal

    from fedsynth.checkpoint import checkpoint_info
    from fedsynth.processes import ProcessGroup

    config = tiny_config("autoencoder", federation__rounds=3, federation__local_steps=2, federation__round_timeout_s=120.0)
    ws = _workspace_with_module_pki(tmp_path, "autoencoder", _sites(mri2d), gan_federation, config=config)
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    aggregator = [sys.executable, "-m", "fedsynth.federated.openfl", "aggregator", "--bind", "127.0.0.1"]
    deadline = time.monotonic() + 300
    with ProcessGroup() as group:
        agg = group.start("aggregator", aggregator, ws.path, ws.logs / "aggregator.log", env)
        cols = [group.start(f"collaborator {n}", [fx(), "collaborator", "start", "-n", n], ws.path,
                            ws.logs / f"collaborator_{n}.log", env) for n in ("col1", "col2")]
        _wait_for_round(ws, 1, deadline, agg.alive)
        os.killpg(agg.popen.pid, signal.SIGKILL)
        agg.popen.wait(timeout=10)
        again = group.start("aggregator (restarted)", aggregator, ws.path, ws.logs / "aggregator_restarted.log", env)
        group.wait_all([again, *cols], deadline=deadline)
    history = _history(ws)
    assert [h["round"] for h in history] == [1, 2, 3]
    assert all(sorted(h["accepted"]) == ["col1", "col2"] for h in history)  # type: ignore[arg-type]
    assert checkpoint_info(ws.path / "global" / "last.ckpt")["round"] == 3
    # "start over", as docs/federation-openfl.md says: aggregator state and global/ go, save/init.pbuf stays,
    # and the sites drop their state folders
    (ws.path / "local_state" / "tensor.db").unlink()
    shutil.rmtree(ws.path / "global")
    shutil.rmtree(ws.path / "local_state" / "fedsynth")
    assert (ws.path / "save" / "init.pbuf").is_file()
    run_federation(ws, timeout=FEDERATION_TIMEOUT)
    assert [h["round"] for h in _history(ws)] == [1, 2, 3]  # a fresh federation, ended by itself
    state = next((ws.path / "local_state" / "fedsynth" / "col1").glob("*/last.ckpt"))
    from fedsynth.checkpoint import load_checkpoint

    assert load_checkpoint(state)["step"] == 6  # 3 rounds x 2 steps: the sites started over too
