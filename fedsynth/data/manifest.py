"""GaNDLF-style CSV manifests: ``SubjectID, Channel_0..N[, Label][, Prompt]``, one row per image.

``Prompt`` is free text describing the image (text-conditional models train on it).

Several rows may share a SubjectID (e.g. slices of one volume): train/validation splits are
made by subject so no subject appears on both sides. Relative paths are resolved against the
CSV's own folder.

The duplicate rule: rows sharing a SubjectID are the same subject's images *by design* only when
they point at different files. Two rows with the same channel files are an error (a copied row
would be trained on twice), and so is one file listed under two SubjectIDs (the subject-level
split would put the same image on both sides). "The same file" is the same file on disk: paths
are compared after resolving symbolic links and ``..``, and hard links by device and inode. The CSV is read as UTF-8; a UTF-8 byte-order mark
(as Excel writes) is accepted, any other encoding is an error naming the row and byte.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedsynth.errors import DataError
from fedsynth.io import atomic_path

_CHANNEL = re.compile(r"^Channel_(\d+)$")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".tif", ".tiff", ".dcm", ".jpg", ".jpeg", ".bmp")


@dataclass(frozen=True)
class Record:
    """One image of the manifest: its subject, channel files, optional label and CSV row."""

    subject_id: str
    channels: tuple[Path, ...]
    label: int | None
    row: int  # 1-based data row number in the CSV (the header is row 0)
    source: str  # the CSV path, for messages
    prompt: str | None = None  # the Prompt column (free text), if the CSV has one

    def where(self) -> str:
        return f"{self.source}, row {self.row} (SubjectID '{self.subject_id}')"


def read_manifest(path: str | Path, *, expected_channels: int | None = None, num_classes: int = 0,
                  check_files: bool = True, require_prompt: bool = False) -> list[Record]:
    """Parse and validate a CSV manifest; every problem raises :class:`DataError` naming the row.

    ``require_prompt`` (text-conditional configs): the CSV must have a ``Prompt`` column with a
    non-empty prompt in every row.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a data CSV; write one for a folder of images with "
                        f"`fedsynth construct-csv --input-dir {path} -o data.csv`")
    if not path.is_file():
        raise DataError(f"data CSV not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        data = path.read_bytes()
        line = data[: err.start].count(b"\n")
        raise DataError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} in line {line + 1}, "
                        f"{'the header' if line == 0 else f'row {line}'}); save the CSV as UTF-8") from None
    with io.StringIO(text, newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if "SubjectID" not in header:
            raise DataError(f"{path}: missing column 'SubjectID' (header is {header}); expected SubjectID, Channel_0..N[, Label]")
        channel_cols = sorted((int(m.group(1)), h) for h in header if (m := _CHANNEL.match(h)))
        if not channel_cols:
            raise DataError(f"{path}: no 'Channel_0' column (header is {header}); expected SubjectID, Channel_0..N[, Label]")
        indices = [i for i, _ in channel_cols]
        if indices != list(range(len(indices))):
            raise DataError(f"{path}: channel columns must be Channel_0..Channel_{len(indices) - 1} without gaps, got {[h for _, h in channel_cols]}")
        if expected_channels is not None and len(channel_cols) != expected_channels:
            raise DataError(f"{path}: has {len(channel_cols)} Channel_* column(s) but the config says channels: {expected_channels}")
        has_label = "Label" in header
        has_prompt = "Prompt" in header
        if require_prompt and not has_prompt:
            raise DataError(f"{path}: the config is text-conditional (a text block) but the CSV has no 'Prompt' column "
                            f"(header is {header}); add one with a description of each image")
        if num_classes > 0 and not has_label:
            raise DataError(f"{path}: the config is class-conditional (num_classes: {num_classes}) but the CSV has no 'Label' column")
        records: list[Record] = []
        seen_files: dict[Path | tuple[int, int], Record] = {}
        for row_no, raw in enumerate(reader, start=1):
            if None in raw:
                raise DataError(f"{path}, row {row_no}: {len(header) + len(raw[None])} values but the header has "
                                f"{len(header)} columns ({', '.join(header)})")
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
            subject = row.get("SubjectID", "")
            where = f"{path}, row {row_no}"
            if not subject:
                raise DataError(f"{where}: empty SubjectID")
            files = []
            for _, col in channel_cols:
                value = row.get(col, "")
                if not value:
                    raise DataError(f"{where} (SubjectID '{subject}'): empty {col}")
                file = Path(value)
                file = (file if file.is_absolute() else path.parent / file).resolve()
                if check_files and not file.exists():
                    raise DataError(f"{where} (SubjectID '{subject}'): {col} file not found: {file}")
                files.append(file)
            label = _parse_label(row.get("Label", ""), num_classes, where, subject) if has_label else None
            prompt = row.get("Prompt", "") if has_prompt else None
            if require_prompt and not prompt:
                raise DataError(f"{where} (SubjectID '{subject}'): empty Prompt; a text-conditional model needs a "
                                "description of every image")
            rec = Record(subject, tuple(files), label, row_no, str(path), prompt or None)
            for file in files:
                identity = _identity(file)
                if (other := seen_files.get(identity)) is not None and other.row != row_no:
                    same = "repeats" if other.subject_id == subject else "lists under another SubjectID"
                    alias = "" if file in other.channels else f" (the same file on disk as {_same_as(other, identity)})"
                    raise DataError(f"{rec.where()} {same} the file of row {other.row} (SubjectID '{other.subject_id}'): "
                                    f"{file}{alias}; each image must appear once (rows sharing a SubjectID must be "
                                    "different images)")
                seen_files[identity] = rec
            records.append(rec)
    if not records:
        raise DataError(f"{path}: the CSV has a header but no data rows")
    return records


def _identity(file: Path) -> Path | tuple[int, int]:
    """What makes two paths one image: the device and inode of an existing file (hard links
    included), else the resolved path."""
    try:
        st = file.stat()
    except OSError:
        return file
    return (st.st_dev, st.st_ino) if st.st_ino else file


def _same_as(other: Record, identity: Path | tuple[int, int]) -> str:
    return next((str(f) for f in other.channels if _identity(f) == identity), str(other.channels[0]))


def _parse_label(value: str, num_classes: int, where: str, subject: str) -> int | None:
    if value == "" and num_classes == 0:
        return None
    try:
        label = int(float(value))
        if float(value) != label:
            raise ValueError
    except ValueError:
        raise DataError(f"{where} (SubjectID '{subject}'): Label must be an integer class, got {value!r}") from None
    if num_classes > 0 and not 0 <= label < num_classes:
        raise DataError(f"{where} (SubjectID '{subject}'): Label {label} is outside [0, {num_classes - 1}] (num_classes: {num_classes})")
    return label


def split_by_subject(records: Sequence[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Split records into train/validation so that each subject lies on one side only."""
    if val_fraction <= 0:
        return list(records), []
    subjects = sorted({r.subject_id for r in records})
    if len(subjects) < 2:
        raise DataError(f"cannot hold out a validation split: the data has only {len(subjects)} subject(s); pass --val-data or set data.val_fraction: 0")
    rng = random.Random(seed)
    rng.shuffle(subjects)
    n_val = min(len(subjects) - 1, max(1, round(len(subjects) * val_fraction)))
    val_subjects = set(subjects[:n_val])
    return [r for r in records if r.subject_id not in val_subjects], [r for r in records if r.subject_id in val_subjects]


#: the per-image split index ``fedsynth build-dataset`` writes in its output folder (columns ``path``,
#: relative to that folder, and ``split``), and the splits it records
SPLIT_INDEX = "slices.csv"
SPLITS = ("train", "held_out", "gap")


def find_split_index(folder: str | Path) -> Path | None:
    """The nearest :data:`SPLIT_INDEX` with ``path`` and ``split`` columns in ``folder`` or a folder above it."""
    start = Path(folder).resolve()
    for candidate in (start, *start.parents):
        index = candidate / SPLIT_INDEX
        if index.is_file():
            with index.open(newline="", encoding="utf-8-sig") as fh:
                header = next(csv.reader(fh), [])
            if {"path", "split"} <= {h.strip() for h in header}:
                return index
    return None


def read_split_index(index: str | Path) -> dict[Path, str]:
    """``{resolved image path: split}`` from a :data:`SPLIT_INDEX` (paths are relative to its folder)."""
    index = Path(index)
    with index.open(newline="", encoding="utf-8-sig") as fh:
        return {(index.parent / row["path"].strip()).resolve(): (row.get("split") or "").strip()
                for row in csv.DictReader(fh) if (row.get("path") or "").strip()}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"--split {split!r}: expected one of {', '.join(SPLITS)} (the splits `fedsynth build-dataset` "
                        f"records in its {SPLIT_INDEX})")


def _select_split(rows: list[list[str]], n_channels: int, root: Path, split: str) -> list[list[str]]:
    """The rows whose every channel file lies in ``split`` of the build-dataset index above ``root``."""
    index = find_split_index(root)
    if index is None:
        raise DataError(f"--split {split}: no split information for {root}: no {SPLIT_INDEX} with 'path' and 'split' "
                        f"columns in it or any folder above it (`fedsynth build-dataset` writes one). "
                        "Leave out --split to list every image, and keep held-out images in a folder of their own")
    splits = read_split_index(index)
    kept = []
    for row in rows:
        files = [Path(f) for f in row[1:1 + n_channels]]
        unknown = [f for f in files if f not in splits]
        if unknown:
            raise DataError(f"--split {split}: {unknown[0]} is not listed in {index}, so its split is unknown")
        if all(splits[f] == split for f in files):
            kept.append(row)
    if not kept:
        raise DataError(f"--split {split}: none of the images under {root} is in split '{split}' of {index}")
    return kept


def construct_csv(input_dir: str | Path, output: str | Path, *, channel_ids: Sequence[str] | None = None,
                  labels_from_folders: bool = False, split: str | None = None) -> int:
    """Write a manifest for the images under ``input_dir``; returns the number of rows.

    Layouts understood (as GaNDLF's ``construct_csv``):
    - one sub-folder per subject holding its channel files, matched by ``channel_ids`` substrings
      (e.g. ``t1 t2``), or a single image per folder when none are given;
    - images directly in ``input_dir`` (one subject each);
    - with ``labels_from_folders``: ``input_dir/<class name>/<images>``; classes are numbered in
      sorted order of folder names.

    ``split`` (``train``, ``held_out`` or ``gap``): keep only the images of that split, as recorded
    in the :data:`SPLIT_INDEX` that ``fedsynth build-dataset`` wrote in ``input_dir`` or a folder
    above it (without it, every image is listed: held-out and gap slices too). An image the index
    does not list, or no index at all, is an error.
    """
    root = Path(input_dir)
    if split is not None:
        _check_split(split)
    if not root.is_dir():
        raise DataError(f"input directory not found: {root}")
    rows: list[list[str]] = []
    classes: list[str] = []
    if labels_from_folders:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"{root}: --labels-from-folders needs one sub-folder per class, found none")
        for label, cls in enumerate(classes):
            for img in _images_in(root / cls):
                rows.append([f"{cls}_{_stem(img)}", str(img.resolve()), str(label)])
    else:
        for entry in sorted(root.iterdir()):
            if entry.is_dir():
                files = _images_in(entry)
                if _is_dicom_dir(entry):
                    rows.append([entry.name, str(entry.resolve())])
                    continue
                if channel_ids:
                    chosen = []
                    for cid in channel_ids:
                        match = [f for f in files if cid in f.name]
                        if len(match) != 1:
                            raise DataError(f"{entry}: expected exactly one file containing '{cid}', found {[m.name for m in match]}")
                        chosen.append(str(match[0].resolve()))
                    rows.append([entry.name, *chosen])
                else:
                    for img in files:
                        rows.append([entry.name if len(files) == 1 else f"{entry.name}", str(img.resolve())])
            elif _is_image(entry):
                rows.append([_stem(entry), str(entry.resolve())])
    if not rows:
        raise DataError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    n_channels = len(rows[0]) - (2 if labels_from_folders else 1)
    if any(len(r) != len(rows[0]) for r in rows):
        raise DataError(f"{root}: subjects have different numbers of channel files; pass --channels-id")
    if split is not None:
        rows = _select_split(rows, n_channels, root, split)
    header = ["SubjectID", *[f"Channel_{i}" for i in range(n_channels)]] + (["Label"] if labels_from_folders else [])
    with atomic_path(Path(output)) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return len(rows)


def write_manifest(path: str | Path, rows: Sequence[tuple[str, Sequence[str | Path], int | None]],
                   prompts: Sequence[str] | None = None, columns: Mapping[str, Sequence[object]] | None = None) -> None:
    """Write ``(subject_id, channel_paths, label)`` rows (and a ``Prompt`` per row) as a manifest, atomically.

    ``columns``: further columns by name, one value per row (e.g. other tasks' labels, ``Label_plane``);
    :func:`read_manifest` ignores them.

    Paths are written relative to the CSV's folder (how :func:`read_manifest` resolves them), so
    the CSV and its images can move together.
    """
    if prompts is not None and len(prompts) != len(rows):
        raise ValueError(f"{len(prompts)} prompts for {len(rows)} manifest rows")
    base = Path(path).parent.resolve()
    n = len(rows[0][1])
    with_label = any(label is not None for _, _, label in rows)
    extra = dict(columns or {})
    for name, values in extra.items():
        if len(values) != len(rows):
            raise ValueError(f"{len(values)} values of column {name} for {len(rows)} manifest rows")
    header = (["SubjectID", *[f"Channel_{i}" for i in range(n)]] + (["Label"] if with_label else [])
              + (["Prompt"] if prompts is not None else []) + list(extra))
    with atomic_path(Path(path)) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for i, (subject, files, label) in enumerate(rows):
            rel = [os.path.relpath(Path(f).resolve(), base) for f in files]
            writer.writerow([subject, *rel] + ([label if label is not None else ""] if with_label else [])
                            + ([prompts[i]] if prompts is not None else []) + [v[i] for v in extra.values()])


def _is_image(p: Path) -> bool:
    name = p.name.lower()
    return p.is_file() and any(name.endswith(s) for s in IMAGE_SUFFIXES)


def _is_dicom_dir(p: Path) -> bool:
    files = [f for f in p.iterdir() if f.is_file()]
    return bool(files) and all(f.suffix.lower() in (".dcm", "") for f in files) and any(f.suffix.lower() == ".dcm" for f in files)


def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if _is_image(f))


def _stem(p: Path) -> str:
    name = p.name
    for s in IMAGE_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return p.stem


def content_hash(record: Record) -> str:
    """SHA-256 of a record's image content: each channel file's bytes (a DICOM folder: its files in
    name order). Renaming or moving the files leaves it unchanged; editing a voxel changes it."""
    digest = hashlib.sha256()
    for file in record.channels:
        parts = sorted(p for p in file.rglob("*") if p.is_file()) if file.is_dir() else [file]
        for part in parts:
            with part.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
            digest.update(b"\0")
    return digest.hexdigest()


def fingerprint(records: Sequence[Record]) -> dict[str, object]:
    """What a data set *is*, independent of its paths: ``{"sha256", "images", "hashes"}`` where
    ``hashes`` are the sorted 16-hex prefixes of each image's :func:`content_hash` (enough to say
    which images changed)."""
    hashes = sorted(content_hash(r)[:16] for r in records)
    return {"sha256": hashlib.sha256("\n".join(hashes).encode()).hexdigest(), "images": len(hashes), "hashes": hashes}


def fingerprint_changes(stored: dict[str, object], records: Sequence[Record]) -> str | None:
    """``None`` when ``records`` hold the data ``stored`` fingerprinted, else what changed, naming rows."""
    pairs = [(content_hash(r)[:16], r) for r in records]
    if stored.get("sha256") == hashlib.sha256("\n".join(sorted(h for h, _ in pairs)).encode()).hexdigest():
        return None
    current = dict(pairs)
    old = set(stored.get("hashes") or [])  # type: ignore[call-overload]
    added = [r for h, r in current.items() if h not in old]
    removed = len(old - set(current))
    parts = []
    if added:
        parts.append(f"{len(added)} image(s) not in it (first: {added[0].where()})")
    if removed:
        parts.append(f"{removed} of its image(s) missing")
    return "; ".join(parts) or "the images differ"

