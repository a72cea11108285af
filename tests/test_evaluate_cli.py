"""``fedsynth evaluate``: report + PNG from a generation folder or CSV, 2D and 3D, and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsynth.cli import main
from fedsynth.data.manifest import read_manifest
from fedsynth.generation import write_images
from fedsynth.metrics import infer_config, load_real


def _as_generated(csv: Path, out: Path, image_format: str) -> Path:
    """Real images of ``csv`` written as ``fedsynth generate`` writes samples (with manifest.csv)."""
    real = load_real(csv, infer_config(csv))
    write_images(torch.from_numpy(real.images), out, image_format=image_format)
    return out


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["evaluate", *map(str, argv)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_evaluate_2d_generation_folder_writes_report_and_png(mri2d: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    synthetic = _as_generated(mri2d["colin27"], tmp_path / "generated", "png")
    report_path, png = tmp_path / "out" / "report.json", tmp_path / "out" / "report.png"
    rc, out, err = _run(capsys, "--real", mri2d["mni152"], "--synthetic", synthetic, "-o", report_path, "--png", png)
    assert rc == 0, err
    assert "encoder-FID" in out and "FRD" in out
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["real"]["count"] == 24 and report["synthetic"]["count"] == 24
    assert report["encoder"]["name"] == "random-conv" and "random-init" in report["encoder"]["description"]
    assert report["radiomics"]["bin_count"] == 32 and report["radiomics"]["frd"] > 0
    assert set(report["radiomics"]["first_order"]["Mean"]) >= {"wasserstein", "ks_statistic", "ks_pvalue"}
    for key in ("encoder_fid", "precision", "recall", "density", "coverage"):
        assert isinstance(report[key], float)
    assert report["preprocessing"]["image_size"] == [32, 32]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list((tmp_path / "out").glob(".*tmp"))  # atomic writes leave nothing behind


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_evaluate_3d_csv_and_folder_without_manifest(mri3d: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    synthetic = _as_generated(mri3d["colin27"], tmp_path / "gen3d", "nii.gz")
    rc, _, err = _run(capsys, "--real", mri3d["mni152"], "--synthetic", synthetic / "manifest.csv", "-o", tmp_path / "a.json",
                      "--png", tmp_path / "a.png")
    assert rc == 0, err
    (synthetic / "manifest.csv").unlink()  # a bare folder of images works too (grid.png is skipped)
    rc, _, err = _run(capsys, "--real", mri3d["mni152"], "--synthetic", synthetic, "-o", tmp_path / "b.json")
    assert rc == 0, err
    a, b = json.loads((tmp_path / "a.json").read_text(encoding="utf-8")), json.loads((tmp_path / "b.json").read_text(encoding="utf-8"))
    assert a["synthetic"]["count"] == b["synthetic"]["count"] == 8
    assert a["real"]["shape"] == [1, 16, 16, 16]
    assert a["encoder_fid"] == pytest.approx(b["encoder_fid"])


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_evaluate_with_autoencoder_checkpoint(mri2d: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import tiny_config

    from fedsynth.data import load_datasets
    from fedsynth.engine import build_engine

    config = tiny_config("autoencoder")
    train, _ = load_datasets(config, str(mri2d["mni152"]))
    engine = build_engine(config, None)
    engine.fit(train, max_steps=3)
    ckpt = engine.save(tmp_path / "ae.ckpt")
    synthetic = _as_generated(mri2d["colin27"], tmp_path / "gen", "png")
    rc, _, err = _run(capsys, "--real", mri2d["mni152"], "--synthetic", synthetic, "-o", tmp_path / "r.json",
                      "--checkpoint", ckpt, "--encoder", "autoencoder", "--train", mri2d["mni152"])
    assert rc == 0, err
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert report["encoder"]["name"] == "autoencoder" and str(ckpt) in report["encoder"]["description"]
    assert 0 < report["reconstruction"]["psnr"] < 100 and -1 <= report["reconstruction"]["ssim"] <= 1
    assert report["preprocessing"]["config"].endswith("(checkpoint)")


@pytest.mark.parametrize("case", ["missing", "empty_dir", "text_file", "one_image", "wrong_dims", "encoder_no_ckpt",
                                  "bad_bins", "bad_real_csv"])
def test_evaluate_bad_inputs_fail_cleanly(case: str, mri2d: dict[str, Path], mri3d: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    real, synthetic, extra = mri2d["mni152"], mri2d["colin27"], []
    expected = ""
    if case == "missing":
        synthetic, expected = tmp_path / "nope", "no such folder or CSV"
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        synthetic, expected = tmp_path / "empty", "holds no images"
    elif case == "text_file":
        synthetic = tmp_path / "x.txt"
        synthetic.write_text("hello", encoding="utf-8")
        expected = "expected a folder of images or a CSV"
    elif case == "one_image":
        rows = read_manifest(mri2d["colin27"])[:1]
        synthetic = tmp_path / "one.csv"
        synthetic.write_text(f"SubjectID,Channel_0\n{rows[0].subject_id},{rows[0].channels[0]}\n", encoding="utf-8")
        expected = "at least 2 are needed"
    elif case == "wrong_dims":
        synthetic, expected = mri3d["colin27"], "spatial_dims"
    elif case == "encoder_no_ckpt":
        extra, expected = ["--encoder", "autoencoder"], "needs --checkpoint"
    elif case == "bad_bins":
        extra, expected = ["--bin-count", "1"], "--bin-count"
    elif case == "bad_real_csv":
        real = tmp_path / "bad.csv"
        real.write_text("Subject,File\na,b\n", encoding="utf-8")
        expected = "missing column 'SubjectID'"
    out = tmp_path / "report.json"
    rc, _, err = _run(capsys, "--real", real, "--synthetic", synthetic, "-o", out, *extra)
    assert rc == 2
    assert expected in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_png_shows_both_sets(mri2d: dict[str, Path], tmp_path: Path) -> None:
    from fedsynth.metrics import evaluate_sets
    from fedsynth.metrics.plots import write_png

    config = infer_config(mri2d["mni152"])
    real, other = load_real(mri2d["mni152"], config), load_real(mri2d["colin27"], config)
    report = evaluate_sets(real, other)
    write_png(report, real, other, tmp_path / "r.png")
    import matplotlib.image as mpimg

    pixels = mpimg.imread(tmp_path / "r.png")
    assert pixels.shape[0] >= 800 and pixels.shape[1] >= 1100 and np.ptp(pixels) > 0.5


def test_evaluate_reports_intervals_floor_gap_and_utility(mri2d: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """--train adds the real-vs-real floor and the gap to it (leading the report and the printout);
    --utility trains on synthetic / tests on real next to the real ceiling (labels from the CSVs)."""
    import csv as csvmod

    rows = list(csvmod.reader(mri2d["mni152"].open(encoding="utf-8")))
    for name, part in (("train", rows[1::2]), ("held", rows[2::2])):  # interleaved slices: two disjoint halves
        with (tmp_path / f"{name}.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csvmod.writer(fh)
            writer.writerow(rows[0])
            writer.writerows([r[0], str((mri2d["mni152"].parent / r[1]).resolve()), *r[2:]] for r in part)
    from fedsynth.data.manifest import read_manifest

    colin = load_real(mri2d["colin27"], infer_config(mri2d["colin27"]))
    by_row = {r.row: r.label for r in read_manifest(mri2d["colin27"])}
    synthetic = tmp_path / "gen"  # another brain's slices, written as a class-conditional generation would
    write_images(torch.from_numpy(colin.images), synthetic, image_format="png",
                 labels=torch.tensor([by_row[r] for r in colin.rows]))
    rc, out, err = _run(capsys, "--real", tmp_path / "held.csv", "--synthetic", synthetic, "-o", tmp_path / "r.json",
                        "--train", tmp_path / "train.csv", "--bootstrap", "30", "--utility", "--utility-steps", "20")
    assert rc == 0, err
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert next(iter(report)) == "summary"
    fid = report["summary"]["metrics"]["encoder_fid"]
    assert fid["ci95"][0] <= fid["ci95"][1] and fid["gap"] == pytest.approx(fid["value"] - fid["floor"])
    assert fid["gap_ci95"][0] > 0  # another brain is farther from the held-out slices than the training slices are
    assert report["summary"]["floor"]["count"] == 12 and report["summary"]["bootstrap"]["replicates"] == 30
    assert "gap to floor" in out.splitlines()[1]
    arms = report["utility"]["arms"]
    assert set(arms) == {"synthetic", "real_same_count", "real"}
    assert arms["real"]["train_count"] == 12 and report["utility"]["task"]["columns"]["synthetic"] == "Label"
    assert all(0 <= a["balanced_accuracy"]["value"] <= 1 for a in arms.values())


def test_utility_label_column_errors_name_the_file(mri2d: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    synthetic = _as_generated(mri2d["colin27"], tmp_path / "gen", "png")
    rc, _, err = _run(capsys, "--real", mri2d["mni152"], "--synthetic", synthetic, "-o", tmp_path / "r.json",
                      "--train", mri2d["mni152"], "--bootstrap", "0", "--utility", "--utility-label", "plane")
    assert rc == 2 and "no 'Label_plane' or 'plane' column" in err and "mni152.csv" in err
    rc, _, err = _run(capsys, "--real", mri2d["mni152"], "--synthetic", synthetic, "-o", tmp_path / "r.json",
                      "--utility")
    assert rc == 2 and "--utility needs --train" in err


def test_evaluate_shows_its_stages_with_totals(mri2d: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """One progress display on stderr: the plan, then each named stage's bar with its total; the
    command ends with its wall time. Evaluating in-process (evaluate_sets) shows nothing."""
    from fedsynth.metrics import evaluate as ev

    csv = mri2d["mni152"]
    rc, out, err = _run(capsys, "--real", csv, "--synthetic", csv, "--train", csv, "-o", tmp_path / "r.json",
                        "--png", tmp_path / "r.png", "--bootstrap", "3", "--utility", "--utility-steps", "2")
    assert rc == 0, err
    names = [ev.LOADING, ev.RADIOMICS, ev.ENCODER, ev.INTERVALS, ev.DIVERSITY, ev.MEMORIZATION, ev.UTILITY, ev.FIGURE]
    assert f"evaluate: {len(names)} stages: {', '.join(names)}" in err
    for i, name in enumerate(names, 1):
        assert f"evaluate {i}/{len(names)} {name}" in err, name
    assert "72/72" in err  # loading: 24 images in each of the three CSVs
    assert "3/3" in err and "6/6" in err  # bootstrap replicates, utility steps (3 classifiers x 2)
    assert out.strip().splitlines()[-1].startswith("fedsynth evaluate: done in")
    assert ev.evaluation_stages(ev.EvaluationOptions(bootstrap=0, checkpoint="ae.ckpt"), loading=False) == [
        ev.RADIOMICS, ev.ENCODER, ev.DIVERSITY, ev.MEMORIZATION, ev.RECONSTRUCTION]
    real = load_real(csv, infer_config(csv))
    ev.evaluate_sets(real, real, ev.EvaluationOptions(bootstrap=2, use_pyradiomics=False))
    assert "evaluate" not in capsys.readouterr().err
