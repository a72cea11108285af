"""A site's lifetime privacy ledger: hash-chained, composed over every run on a dataset, enforced before training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import tiny_config

from fedsynth.cli import main
from fedsynth.errors import PolicyRefused
from fedsynth.privacy.lifetime import Budget, BudgetExceeded, DatasetLedger, LedgerTampered, LifetimeGuard, check_non_private


def _fingerprint(*images: str) -> dict[str, object]:
    import hashlib

    hashes = sorted(images)
    return {"sha256": hashlib.sha256("\n".join(hashes).encode()).hexdigest(), "images": len(hashes), "hashes": hashes}


A = _fingerprint("a1", "a2", "a3")
A_SUBSET = _fingerprint("a2")
B = _fingerprint("b1", "b2")
STEP = (1.0, 0.05, 100)  # noise multiplier, sample rate, steps


def _epsilon(history: list[tuple[float, float, int]], delta: float = 1e-5) -> float:
    from fedsynth.privacy.ledger import PrivacyLedger

    return PrivacyLedger("rdp", delta).epsilon_of(history)


def test_runs_compose_per_image_across_datasets(tmp_path: Path) -> None:
    """Spends on any dataset sharing an image count; a disjoint dataset's do not; epsilon is the
    accountant's over the concatenated histories."""
    ledger = DatasetLedger(tmp_path / "ledger")
    ledger.set_budget(Budget(50.0, 1e-5))
    ledger.record("/runs/local", A, [STEP], driver="local")
    ledger.record("/state/fed-1", A_SUBSET, [STEP, (2.0, 0.1, 10)], driver="flower")
    ledger.record("/state/fed-2", B, [STEP], driver="openfl")
    report = ledger.report(set(A["hashes"]))  # type: ignore[call-overload]
    assert [r["run"] for r in report["runs"]] == ["/runs/local", "/state/fed-1"]
    assert report["lifetime_epsilon_spent"] == pytest.approx(_epsilon([STEP, STEP, (2.0, 0.1, 10)]))
    assert report["runs"][0]["epsilon"] == pytest.approx(_epsilon([STEP]))
    everything = ledger.report()
    assert everything["lifetime_epsilon_spent"] == pytest.approx(_epsilon([STEP, STEP, (2.0, 0.1, 10), STEP]))
    assert len(everything["runs"]) == 3


def test_a_crash_between_append_and_head_is_not_tampering(tmp_path: Path) -> None:
    """The head is written after the line: a process killed in between leaves one line beyond the head."""
    ledger = DatasetLedger(tmp_path)
    ledger.record("/runs/a", A, [STEP], driver="local")
    head = (tmp_path / "ledger.head").read_text(encoding="utf-8")
    ledger.record("/runs/b", A, [STEP], driver="local")
    (tmp_path / "ledger.head").write_text(head, encoding="utf-8")  # as if killed before the head update
    assert [e["run"] for e in ledger.entries()] == ["/runs/a", "/runs/b"]
    ledger.record("/runs/c", A, [STEP], driver="local")
    assert len(ledger.entries()) == 3


@pytest.mark.parametrize("tamper", ["edit", "remove", "reorder", "truncate", "delete"])
def test_a_tampered_ledger_says_so(tmp_path: Path, tamper: str) -> None:
    ledger = DatasetLedger(tmp_path)
    ledger.set_budget(Budget(10.0, 1e-5))
    ledger.record("/runs/a", A, [STEP], driver="local")
    ledger.record("/runs/b", A, [STEP], driver="local")
    lines = ledger.path.read_text(encoding="utf-8").splitlines(keepends=True)
    if tamper == "edit":  # a smaller spend, hash left as it was
        lines[1] = lines[1].replace('"history": [[1.0, 0.05, 100]]', '"history": [[1.0, 0.05, 1]]')
        assert '[[1.0, 0.05, 1]]' in lines[1]
    elif tamper == "remove":
        del lines[1]
    elif tamper == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    elif tamper == "truncate":
        del lines[-1]
    if tamper == "delete":
        ledger.path.unlink()
    else:
        ledger.path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(LedgerTampered, match="ledger"):
        ledger.report()
    with pytest.raises(LedgerTampered):
        LifetimeGuard(ledger, "/runs/c", "local", A)


def test_a_plan_past_the_budget_is_refused_before_training(tmp_path: Path) -> None:
    ledger = DatasetLedger(tmp_path)
    ledger.set_budget(Budget(8.0, 1e-5, max_epsilon_per_round=4.0))
    guard = LifetimeGuard(ledger, "/runs/a", "local", A)
    guard.check_plan(1.0, 0.05, 10)  # fits (epsilon 2.2)
    with pytest.raises(BudgetExceeded, match=r"lifetime privacy budget .* epsilon 8 .* refused before training"):
        guard.check_plan(1.0, 0.05, 10_000)  # epsilon 50
    with pytest.raises(BudgetExceeded, match="at most 4 per round"):
        guard.check_plan(1.0, 0.05, 300)  # epsilon 6.5: within the lifetime budget, not within a round's
    assert isinstance(BudgetExceeded("x"), PolicyRefused)
    # what a run spends counts for the next one, on any dataset sharing an image
    for _ in range(60):
        guard.step(1.0, 0.05)
    guard.record(epsilon_run=None)
    again = LifetimeGuard(ledger, "/runs/b", "local", A_SUBSET)
    assert again.spent() == pytest.approx(_epsilon([(1.0, 0.05, 60)]))
    left = again.steps_left(1.0, 0.05)
    assert left is not None and _epsilon([(1.0, 0.05, 60 + left)]) <= 8.0 < _epsilon([(1.0, 0.05, 61 + left)])


def test_non_private_runs_are_refused_or_void_the_guarantee(tmp_path: Path) -> None:
    ledger = DatasetLedger(tmp_path)
    check_non_private(ledger, "/runs/nodp", "local", B)  # no budget: recorded
    ledger.set_budget(Budget(5.0, 1e-5))
    with pytest.raises(BudgetExceeded, match="without differential privacy .* is refused"):
        check_non_private(ledger, "/runs/nodp2", "local", A)
    assert math.isinf(ledger.report(set(B["hashes"]))["lifetime_epsilon_spent"])  # type: ignore[call-overload]
    with pytest.raises(BudgetExceeded, match="non-private run .* void"):
        LifetimeGuard(ledger, "/runs/dp", "local", B)
    ledger.set_budget(Budget(5.0, 1e-5, allow_non_private=True))
    check_non_private(ledger, "/runs/nodp3", "local", A)
    assert [e["kind"] for e in ledger.entries()] == ["spend", "budget", "budget", "spend"]


def test_budget_and_ledger_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ledger"
    assert main(["privacy", "budget", "--ledger", str(folder), "--lifetime-epsilon", "8", "--delta", "1e-5"]) == 0
    DatasetLedger(folder).record("/runs/a", A, [STEP], driver="local")
    monkeypatch.setenv("FEDSYNTH_LEDGER", str(folder))
    capsys.readouterr()
    assert main(["privacy", "ledger", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["budget"]["lifetime_epsilon"] == 8 and report["runs"][0]["steps"] == 100
    assert main(["privacy", "ledger"]) == 0
    out = capsys.readouterr().out
    assert "hash chain intact" in out and "/runs/a" in out and f"{_epsilon([STEP]):.4g}" in out
    folder.joinpath("ledger.jsonl").write_text("{}\n", encoding="utf-8")
    assert main(["privacy", "ledger"]) == 2
    assert "does not match its hash chain" in capsys.readouterr().err
    assert main(["privacy", "budget", "--ledger", str(tmp_path / "x"), "--lifetime-epsilon", "-1", "--delta", "1e-5"]) == 2


@pytest.mark.slow
def test_local_runs_share_the_dataset_budget(tmp_path: Path, mri2d: dict[str, Path]) -> None:
    """Two private runs on one dataset (different run folders): the second is refused before it
    trains once the first spent most of the budget; a run stops at the budget; a resumed run
    keeps counting; a non-private run is refused."""
    from fedsynth.config import save_config
    from fedsynth.local import TrainRequest, run_training

    ledger = tmp_path / "ledger"
    main(["privacy", "budget", "--ledger", str(ledger), "--lifetime-epsilon", "20", "--delta", "1e-5"])
    dp = {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}
    save_config(tiny_config("autoencoder", training__max_steps=6, training__epochs=100, privacy=dp), tmp_path / "a.yaml")
    run_training(TrainRequest(str(tmp_path / "a.yaml"), str(mri2d["mni152"]), str(tmp_path / "a"), ledger=str(ledger)))
    report = DatasetLedger(ledger).report()
    assert [r["steps"] for r in report["runs"]] == [6] and report["runs"][0]["driver"] == "local"
    first = report["lifetime_epsilon_spent"]
    # a second run whose plan passes the lifetime budget never starts
    save_config(tiny_config("autoencoder", training__max_steps=100_000, training__epochs=100_000, privacy=dp), tmp_path / "b.yaml")
    with pytest.raises(BudgetExceeded, match="refused before training"):
        run_training(TrainRequest(str(tmp_path / "b.yaml"), str(mri2d["mni152"]), str(tmp_path / "b"), ledger=str(ledger)))
    assert not (tmp_path / "b" / "last.ckpt").exists()
    # resuming the first run with more steps: its new steps are added
    save_config(tiny_config("autoencoder", training__max_steps=9, training__epochs=100, privacy=dp), tmp_path / "a.yaml")
    run_training(TrainRequest(str(tmp_path / "a.yaml"), str(mri2d["mni152"]), str(tmp_path / "a"), resume=True,
                              ledger=str(ledger)))
    report = DatasetLedger(ledger).report()
    assert sum(r["steps"] for r in report["runs"]) == 9 and report["lifetime_epsilon_spent"] > first
    save_config(tiny_config("autoencoder", training__max_steps=2), tmp_path / "c.yaml")
    with pytest.raises(BudgetExceeded, match="without differential privacy"):
        run_training(TrainRequest(str(tmp_path / "c.yaml"), str(mri2d["mni152"]), str(tmp_path / "c"), ledger=str(ledger)))


@pytest.mark.slow
def test_one_ledger_across_flower_and_openfl_federations(tmp_path: Path, mri2d: dict[str, Path]) -> None:
    """site1's images in a Flower federation, then an OpenFL one (new federation ids, new state
    folders): one ledger composes both; a third federation whose first round would pass the
    site's lifetime budget is refused by site1 before it trains, and the round goes on without it."""
    pytest.importorskip("flwr")
    pytest.importorskip("openfl")
    from fedsynth.federated.flower.trial import LocalFederation
    from fedsynth.federated.openfl.trial import run_trial
    from fedsynth.federated.trial_common import TrialRequest
    from fedsynth.privacy.ledger import PrivacyLedger

    ledger = tmp_path / "site1-ledger"
    dp = {"enabled": True, "noise_multiplier": 1.2, "max_grad_norm": 1.0, "delta": 1e-5}
    sites = {"site1": mri2d["mni152"], "site2": mri2d["colin27"]}

    def policy(lifetime: float) -> dict[str, dict[str, object]]:
        return {"site1": {"ledger_dir": str(ledger), "privacy": {"require_dp": True, "lifetime_epsilon": lifetime}}}

    def config(seed: int, min_sites: int = 2):  # type: ignore[no-untyped-def]
        return tiny_config("gan", seed=seed, privacy=dp, federation={"local_steps": 2, "rounds": 2, "min_sites": min_sites,
                                                                     "round_timeout_s": 120.0})

    LocalFederation(TrialRequest(config(1), sites, tmp_path / "flower", evaluate=False, timeout_s=300,
                                 site_policies=policy(50.0))).run()
    run_trial(TrialRequest(config(2), sites, tmp_path / "openfl", timeout_s=300, site_policies=policy(50.0)))
    report = DatasetLedger(ledger).report()
    assert sorted(r["driver"] for r in report["runs"]) == ["flower", "openfl"]
    assert [r["steps"] for r in report["runs"]] == [4, 4]  # 2 rounds x 2 local steps each
    history = [(float(s), float(q), int(n)) for e in DatasetLedger(ledger).spends() for s, q, n in e["history"]]
    accountant = PrivacyLedger("rdp", 1e-5)
    assert report["lifetime_epsilon_spent"] == pytest.approx(accountant.epsilon_of(history))
    sigma, q = history[0][:2]
    # a budget between 8 steps (spent) and 10 (one more round): the next federation's first round is refused
    budget = (accountant.epsilon_of([(sigma, q, 8)]) + accountant.epsilon_of([(sigma, q, 10)])) / 2
    fed = LocalFederation(TrialRequest(config(3, min_sites=1), sites, tmp_path / "flower2", rounds=1, evaluate=False,
                                       timeout_s=300, site_policies=policy(budget)))
    fed.run()
    record = json.loads((tmp_path / "flower2" / "global" / "history.json").read_text(encoding="utf-8"))
    assert record[0]["accepted"] == ["site2"]
    assert record[0]["rejected"] == [["site1", "refused by the site's own policy (lifetime privacy budget)"]]
    after = DatasetLedger(ledger).report()
    assert sum(r["steps"] for r in after["runs"]) == 8 and after["lifetime_epsilon_spent"] <= budget
    assert [e["kind"] for e in DatasetLedger(ledger).entries()].count("budget") == 2  # the changed budget is on record
    assert "lifetime privacy budget" in (tmp_path / "flower2" / "logs" / "site1.log").read_text(encoding="utf-8")
