"""``fedsynth audit``: membership-inference attacks on real checkpoints trained on real brain slices."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedsynth.cli import main


def _halves(source: Path, out: Path) -> tuple[Path, Path]:
    """Interleaved slices of one brain as members / non-members (disjoint images, one distribution)."""
    rows = list(csv.reader(source.open(encoding="utf-8")))
    paths = []
    for name, part in (("members", rows[1::2]), ("non_members", rows[2::2])):
        path = out / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(rows[0])
            writer.writerows([r[0], str((source.parent / r[1]).resolve()), *r[2:]] for r in part)
        paths.append(path)
    return paths[0], paths[1]


def _trained(family: str, members: Path, steps: int, out: Path) -> Path:
    from conftest import tiny_config

    from fedsynth.data import load_datasets
    from fedsynth.engine import build_engine

    config = tiny_config(family, **{"data__val_fraction": 0.0, "training__batch_size": 12, "training__epochs": steps})
    train, _ = load_datasets(config, str(members))
    engine = build_engine(config, None)
    engine.fit(train, max_steps=steps)
    return engine.save(out / f"{family}.ckpt")


@pytest.mark.parametrize("family", ["diffusion", "gan", "autoencoder"])
def test_audit_runs_the_family_attacks(family: str, mri2d: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    members, non_members = _halves(mri2d["mni152"], tmp_path)
    ckpt = _trained(family, members, 2, tmp_path)
    rc = main(["audit", "--checkpoint", str(ckpt), "--members", str(members), "--non-members", str(non_members),
               "--samples", "8", "--bootstrap", "20", "--noise-draws", "1", "-o", str(tmp_path / "a.json")])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads((tmp_path / "a.json").read_text(encoding="utf-8"))
    own = {"diffusion": "denoising_loss_mean", "gan": "discriminator", "autoencoder": "reconstruction"}[family]
    assert {own, "nearest_sample"} <= set(report["attacks"])
    for attack in report["attacks"].values():
        assert 0 <= attack["auc"] <= 1 and attack["auc_ci95"][0] <= attack["auc_ci95"][1]
        assert attack["fpr_0.01"]["fpr_reached"] <= 0.01 and attack["fpr_0.01"]["epsilon_lower_bound"] >= 0
    s = report["summary"]
    assert s["accountant_epsilon"] is None and s["members"] == s["non_members"] == 12
    assert "empirical epsilon >=" in out and "accountant's epsilon: none" in out


def test_audit_bad_inputs_fail_cleanly(mri2d: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    members, non_members = _halves(mri2d["mni152"], tmp_path)
    ckpt = _trained("gan", members, 1, tmp_path)
    assert main(["audit", "--checkpoint", str(ckpt), "--members", str(members), "--non-members", str(members)]) == 2
    assert "list the same image file" in capsys.readouterr().err
    assert main(["audit", "--checkpoint", str(ckpt), "--members", str(members), "--non-members", str(non_members),
                 "--timesteps", "2"]) == 2
    assert "[0, 1]" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.xfail(reason="open (issue 24 item 3): with interleaved neighbouring slices as non-members, a GAN "
                          "trained 1500 steps on 12 slices measured AUC 0.52 [0.31, 0.74]; the control needs "
                          "non-members that are not near-copies of members, or a stronger overfit", strict=False)
def test_audit_catches_an_overfit_model(mri2d: dict[str, Path], tmp_path: Path) -> None:
    """The control: a GAN trained for many epochs on 12 slices is caught (AUC clearly above 0.5)."""
    from fedsynth.metrics.audit import AuditOptions, audit

    members, non_members = _halves(mri2d["mni152"], tmp_path)
    ckpt = _trained("gan", members, 1500, tmp_path)
    report = audit(ckpt, members, non_members, AuditOptions(samples=64, bootstrap=200))
    assert report["summary"]["auc"] > 0.75 and report["summary"]["auc_ci95"][0] > 0.5, report["summary"]
