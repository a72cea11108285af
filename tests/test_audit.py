"""``fedsynth audit``: membership-inference attacks on real checkpoints trained on real brain slices."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
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


# ----------------------------------------------------------------------------- the controls
#
# Members, non-members and the negative control's training set are one slice per slab of the same
# brains, slabs taken along every plane's axis in world coordinates on a 24 mm cycle (the cycle of
# fedsynth build-dataset's split): members at 7 mm into each cycle, non-members at 19 mm, the other
# model's slices at 13 mm. Every non-member is 12 mm from the nearest member (about two pixels at
# 32x32, where neighbouring 1 mm slices are nearly the same image), and every "other" slice is 6 mm
# from a member and 6 mm from a non-member. Sagittal slices are taken on one side of the midline
# only: the hemispheres are near mirror images, so x = +7 and x = -7 would be near copies.

CONTROL_CYCLE_MM = 24.0
CONTROL_SLABS_MM = {"members": 7.0, "non_members": 19.0, "others": 13.0}
#: an autoencoder that memorises: a 4x4x1 latent (16 numbers for a 32x32 image) can index a few dozen
#: training images but not describe a new one
MEMORISING_AE = {"family": "autoencoder", "channels": [8, 16, 32, 32], "latent_channels": 1}
CONTROL_STEPS = 400


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Train and attack on one thread: these networks are tiny, and on a busy machine two threads wait on
    each other at every operation (measured: 1.3 s against 0.1 s per training step of the control)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def slabs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"members", "non_members", "others"}`` CSVs of 32x32 slices of MNI152 (+ Colin27 when installed)."""
    from fedsynth.data.brains import available_volumes, volume_slices
    from fedsynth.data.manifest import write_manifest

    out = tmp_path_factory.mktemp("slabs")
    volumes = ["mni152"]
    if "ch2bet" in available_volumes() and os.environ.get("FEDSYNTH_TEST_NO_COLIN27") != "1":
        volumes.append("ch2bet")  # one version of Colin27 only: ch2 and ch2bet are the same anatomy
    rows = [r for v in volumes for r in volume_slices(v, out / v, image_size=32)]
    csvs = {}
    for name, offset in CONTROL_SLABS_MM.items():
        chosen = [r for r in rows if abs(r.position_mm % CONTROL_CYCLE_MM - offset) < 0.5
                  and (r.plane != "sagittal" or r.position_mm > 0)]
        csvs[name] = out / f"{name}.csv"
        write_manifest(csvs[name], [(r.path.name.split(".")[0], [r.path], None) for r in chosen])
    return csvs


def _memorising_autoencoder(train_csv: Path, steps: int, out: Path) -> Path:
    """The overfitting recipe: all images in one batch, ``steps`` epochs of it; ``steps=0``: fresh weights."""
    from conftest import tiny_config

    from fedsynth.data import load_datasets
    from fedsynth.engine import build_engine

    config = tiny_config("autoencoder", model=MEMORISING_AE, data__val_fraction=0.0, training__batch_size=64,
                         training__epochs=10**6, training__learning_rate=2e-3, training__sample_every=10**6)
    train, _ = load_datasets(config, str(train_csv))
    engine = build_engine(config, None)
    if steps:
        engine.fit(train, max_steps=steps)
    return engine.save(out / f"ae_{steps}.ckpt")


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_audit_catches_an_overfit_model(slabs: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The audit can fail: an autoencoder trained 400 epochs on 30 slices (15 with MNI152 alone) is caught.

    A fair control: members and non-members are the same kind of image (the same brains, planes and
    anatomical range, alternate slabs of one cycle, see ``slabs``), so only training tells them apart;
    and non-members are 12 mm from any member, so a memorised member is not also a memorised
    non-member (interleaved neighbouring slices, ~5 mm apart, made this control fail: a GAN on 12
    slices scored AUC 0.52).
    """
    ckpt = _memorising_autoencoder(slabs["members"], CONTROL_STEPS, tmp_path)
    out = tmp_path / "audit.json"
    assert main(["audit", "--checkpoint", str(ckpt), "--members", str(slabs["members"]), "--non-members",
                 str(slabs["non_members"]), "--samples", "64", "-o", str(out)]) == 0
    assert "the model leaks membership" in capsys.readouterr().out
    report = json.loads(out.read_text(encoding="utf-8"))
    own = report["attacks"]["reconstruction"]
    assert own["auc"] >= 0.8 and own["auc_ci95"][0] > 0.5, own
    s = report["summary"]
    assert s["auc"] >= 0.8 and s["auc_ci95"][0] > 0.5 and s["empirical_epsilon_lower_bound"] > 0, s


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_audit_does_not_accuse_a_model_that_never_saw_the_members(slabs: dict[str, Path], tmp_path: Path) -> None:
    """Negative controls: the same attack on the same members and non-members finds nothing in a model
    with fresh weights, nor in one overfit by the same recipe on other slices of the same brains (the
    "others" slabs, 6 mm from a member on one side and from a non-member on the other): it has memorised
    as much, but not the members, so its AUC must be chance (0.5 inside the interval)."""
    from fedsynth.metrics.audit import AuditOptions, audit

    for steps in (0, CONTROL_STEPS):
        ckpt = _memorising_autoencoder(slabs["others"], steps, tmp_path)
        report = audit(ckpt, slabs["members"], slabs["non_members"], AuditOptions(samples=64))
        own = report["attacks"]["reconstruction"]
        assert own["auc_ci95"][0] <= 0.5 <= own["auc_ci95"][1] and abs(own["auc"] - 0.5) < 0.2, (steps, own)
