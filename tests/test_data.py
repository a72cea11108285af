"""CSV manifests and image reading: real files, clear errors naming the CSV row."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import tiny_config

from fedsynth.cli import main
from fedsynth.data import ImageDataset, construct_csv, load_datasets, read_image, read_manifest, split_by_subject
from fedsynth.errors import DataError


def _slice_files(mri2d: dict[str, Path], n: int = 3) -> list[Path]:
    return [r.channels[0] for r in read_manifest(mri2d["mni152"])[:n]]


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "data.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_manifest_reads_real_slices(mri2d: dict[str, Path]) -> None:
    records = read_manifest(mri2d["all"], expected_channels=1, num_classes=2)
    assert {r.subject_id for r in records} >= {"mni152"}
    assert all(r.label in (0, 1) for r in records)
    cfg = tiny_config("gan")
    train, val = load_datasets(cfg, str(mri2d["mni152"]))
    image, label, prompt = train[0]
    assert prompt is None  # no Prompt column
    assert tuple(image.shape) == (1, 32, 32) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert val is None


def test_split_is_by_subject(mri2d: dict[str, Path]) -> None:
    records = read_manifest(mri2d["all"])
    if len({r.subject_id for r in records}) < 2:
        pytest.skip("needs Colin27 (mricron-data)")
    train, val = split_by_subject(records, 0.5, seed=0)
    assert {r.subject_id for r in train}.isdisjoint({r.subject_id for r in val})


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("Subject,Channel_0\na,{f}\n", "missing column 'SubjectID'"),
        ("SubjectID,Image\na,{f}\n", "no 'Channel_0' column"),
        ("SubjectID,Channel_0,Channel_2\na,{f},{f}\n", "without gaps"),
        ("SubjectID,Channel_0\na,/nonexistent/x.nii.gz\n", "row 1 (SubjectID 'a'): Channel_0 file not found"),
        ("SubjectID,Channel_0\na,{f}\n,{f}\n", "row 2: empty SubjectID"),
        ("SubjectID,Channel_0,Label\na,{f},cat\n", "Label must be an integer class, got 'cat'"),
        ("SubjectID,Channel_0,Label\na,{f},7\n", "Label 7 is outside [0, 1]"),
        ("SubjectID,Channel_0\n", "no data rows"),
        ("SubjectID,Channel_0,Channel_1\na,{f},{f}\n", "has 2 Channel_* column(s) but the config says channels: 1"),
    ],
)
def test_bad_manifest_errors_name_the_row(tmp_path: Path, mri2d: dict[str, Path], content: str, expected: str) -> None:
    f = _slice_files(mri2d, 1)[0]
    with pytest.raises(DataError) as err:
        read_manifest(_csv(tmp_path, content.format(f=f)), expected_channels=1, num_classes=2 if "Label" in content else 0)
    assert expected in str(err.value)
    assert "data.csv" in str(err.value)


def test_conditional_config_needs_label_column(tmp_path: Path, mri2d: dict[str, Path]) -> None:
    f = _slice_files(mri2d, 1)[0]
    with pytest.raises(DataError, match="no 'Label' column"):
        read_manifest(_csv(tmp_path, f"SubjectID,Channel_0\na,{f}\n"), num_classes=2)


def test_unreadable_image_and_wrong_dimension(tmp_path: Path, mri2d: dict[str, Path], mri3d: dict[str, Path]) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not an image at all")
    cfg = tiny_config("gan")
    with pytest.raises(DataError, match="cannot read image .*broken.nii.gz"):
        ImageDataset(read_manifest(_csv(tmp_path, f"SubjectID,Channel_0\na,{bad}\n")), cfg, train=True)
    vol = read_manifest(mri3d["mni152"])[0].channels[0]
    with pytest.raises(DataError, match=r"row 1 \(SubjectID 'v'\).*3D .*spatial_dims: 2"):
        ImageDataset(read_manifest(_csv(tmp_path, f"SubjectID,Channel_0\nv,{vol}\n")), cfg, train=True)


def test_formats_png_nrrd_dicom(tmp_path: Path, mri2d: dict[str, Path]) -> None:
    src = _slice_files(mri2d, 1)[0]
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(src)))
    u8 = sitk.GetImageFromArray((array * 255).astype(np.uint8))
    sitk.WriteImage(u8, str(tmp_path / "s.png"))
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "s.nrrd"))
    dcm_dir = tmp_path / "dicom"
    dcm_dir.mkdir()
    vol = sitk.GetImageFromArray(np.stack([array * 1000] * 4).astype(np.int16))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i in range(4):
        sl = vol[:, :, i]
        for tag, value in {"0020|000e": "1.2.826.0.1.3680043.2.1125.1.1", "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
                           "0008|0060": "MR", "0020|0013": str(i + 1), "0020|0032": f"0\\0\\{i}",
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0008|0018": f"1.2.826.0.1.3680043.2.1125.1.1.{i + 1}"}.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(dcm_dir / f"{i:03d}.dcm"))
        writer.Execute(sl)
    assert read_image(tmp_path / "s.png").shape == (1, 32, 32)
    assert read_image(tmp_path / "s.nrrd").shape == (1, 32, 32)
    assert read_image(dcm_dir).shape == (1, 4, 32, 32)


def test_construct_csv_with_label_folders(tmp_path: Path, mri2d: dict[str, Path]) -> None:
    files = _slice_files(mri2d, 4)
    for i, f in enumerate(files):
        cls = tmp_path / "in" / ("lower" if i < 2 else "upper")
        cls.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, cls / f.name)
    out = tmp_path / "data.csv"
    assert main(["construct-csv", "--input-dir", str(tmp_path / "in"), "-o", str(out), "--labels-from-folders"]) == 0
    records = read_manifest(out, num_classes=2)
    assert len(records) == 4 and sorted(r.label for r in records) == [0, 0, 1, 1]


def test_construct_csv_multichannel_subjects(tmp_path: Path, mri2d: dict[str, Path]) -> None:
    files = _slice_files(mri2d, 2)
    for subject in ("s1", "s2"):
        (tmp_path / "in" / subject).mkdir(parents=True)
        shutil.copy(files[0], tmp_path / "in" / subject / f"{subject}_t1.nii.gz")
        shutil.copy(files[1], tmp_path / "in" / subject / f"{subject}_t2.nii.gz")
    n = construct_csv(tmp_path / "in", tmp_path / "d.csv", channel_ids=["t1", "t2"])
    assert n == 2
    assert read_manifest(tmp_path / "d.csv", expected_channels=2)[0].channels[1].name.endswith("t2.nii.gz")
    with pytest.raises(DataError, match="input directory not found"):
        construct_csv(tmp_path / "missing", tmp_path / "x.csv")


SPLITS_OF_FOLDER = ["train", "held_out", "train", "gap", "train"]


def _build_dataset_folder(tmp_path: Path, mri2d: dict[str, Path]) -> Path:
    """A folder laid out as ``fedsynth build-dataset`` writes it: ``slices/mni152/`` and the ``slices.csv``
    index (written by build-dataset's own writer) recording each slice's split."""
    from fedsynth.data.brains import SliceRow, write_slice_index

    out = tmp_path / "brains"
    (out / "slices" / "mni152").mkdir(parents=True)
    rows = []
    for i, (f, split) in enumerate(zip(_slice_files(mri2d, len(SPLITS_OF_FOLDER)), SPLITS_OF_FOLDER, strict=True)):
        path = out / "slices" / "mni152" / f"mni152_axial_{i}.nii.gz"
        shutil.copy(f, path)
        rows.append(SliceRow(path, "mni152", "mni152", "axial", float(i), split, "middle"))
    write_slice_index(out, rows)
    return out


@pytest.mark.parametrize("split", ["train", "held_out", "gap"])
def test_construct_csv_selects_the_split_build_dataset_recorded(tmp_path: Path, mri2d: dict[str, Path], split: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    folder = _build_dataset_folder(tmp_path, mri2d) / "slices" / "mni152"
    out = tmp_path / f"{split}.csv"
    assert main(["construct-csv", "--input-dir", str(folder), "--split", split, "-o", str(out)]) == 0
    expected = [f"mni152_axial_{i}" for i, s in enumerate(SPLITS_OF_FOLDER) if s == split]
    assert f"({len(expected)} rows, split {split})" in capsys.readouterr().out
    assert [r.subject_id for r in read_manifest(out)] == expected
    # without --split every image is listed, held-out and gap slices too
    assert construct_csv(folder, tmp_path / "all.csv") == len(SPLITS_OF_FOLDER)


@pytest.mark.parametrize(("case", "expected"), [
    ("unknown_split", ["--split 'trian': expected one of train, held_out, gap"]),
    ("no_index", ["--split train: no split information for", "no slices.csv", "`fedsynth build-dataset` writes one"]),
    ("unlisted_image", ["--split train:", "extra.nii.gz is not listed in", "slices.csv, so its split is unknown"]),
    ("empty_split", ["--split gap: none of the images under", "is in split 'gap' of"]),
])
def test_construct_csv_split_errors_name_the_value(tmp_path: Path, mri2d: dict[str, Path], case: str,
                                                   expected: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    brains = _build_dataset_folder(tmp_path, mri2d)
    folder, split = brains / "slices" / "mni152", "train"
    if case == "unknown_split":
        split = "trian"
    elif case == "no_index":
        folder = tmp_path / "own"
        folder.mkdir()
        shutil.copy(_slice_files(mri2d, 1)[0], folder / "a.nii.gz")
    elif case == "unlisted_image":
        shutil.copy(_slice_files(mri2d, 1)[0], folder / "extra.nii.gz")
    else:
        folder, split = brains / "slices" / "train_only", "gap"
        folder.mkdir()
        (brains / "slices" / "mni152" / "mni152_axial_0.nii.gz").rename(folder / "mni152_axial_0.nii.gz")
        (brains / "slices.csv").write_text((brains / "slices.csv").read_text().replace("slices/mni152/mni152_axial_0.",
                                                                                         "slices/train_only/mni152_axial_0."))
    with pytest.raises(DataError) as err:
        construct_csv(folder, tmp_path / "x.csv", split=split)
    assert all(part in str(err.value) for part in expected), str(err.value)
    assert main(["construct-csv", "--input-dir", str(folder), "--split", split, "-o", str(tmp_path / "x.csv")]) == 2
    printed = capsys.readouterr().err
    assert printed.count("error:") == 1 and all(part in printed for part in expected), printed
    assert not (tmp_path / "x.csv").exists()
