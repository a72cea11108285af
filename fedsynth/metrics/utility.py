"""Downstream utility: train a small classifier on synthetic images, test it on real held-out ones.

Three arms share one recipe (MONAI ``Classifier``, a few residual conv levels; Adam; the same
number of steps and batch size; seeded) and one test set (the held-out real images):

- ``synthetic``: trained on the labelled synthetic images;
- ``real_same_count``: trained on a seeded random subset of the real training images of the
  synthetic set's size (what the synthetic set is worth against as many real images);
- ``real``: trained on every real training image (the ceiling).

Intervals bootstrap the test images (the classifiers stay fixed): they cover which real images
were held out, not the training randomness. The gaps are paired (the same test draw for both arms).

Labels: a column of the CSVs, chosen by name. ``--utility-label plane`` reads ``Label_plane``
(``fedsynth build-dataset`` writes ``Label_plane`` and ``Label_plane_third``), else a column
called ``plane``; ``Label`` is the default. A synthetic folder written by a class-conditional
``fedsynth generate`` has only ``Label`` (the class it was generated from), which is used when
its manifest lacks the named column.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsynth.errors import DataError, FedsynthError
from fedsynth.metrics import stats

if TYPE_CHECKING:
    import torch

    from fedsynth.metrics.images import ImageSet


#: the classifiers trained, each tested on the held-out real images: on the synthetic images, on as
#: many real training images, on all real training images (the ceiling)
ARMS = ("synthetic", "real_same_count", "real")


@dataclass(frozen=True)
class UtilityOptions:
    """The task (label column) and the classifier recipe."""

    label: str = "Label"
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1e-3
    channels: tuple[int, ...] = (8, 16, 32, 32)


def _csv_of(source: str) -> Path:
    path = Path(source)
    return path / "manifest.csv" if path.is_dir() else path


def label_column(header: list[str], name: str, source: Path, *, fallback: bool = False) -> str:
    """The column that holds label ``name``: ``Label_<name>``, else ``<name>`` (else ``Label`` if ``fallback``)."""
    for column in (f"Label_{name}", name) + (("Label",) if fallback else ()):
        if column in header:
            return column
    wanted = f"'Label_{name}' or '{name}'" if name != "Label" else "'Label'"
    labels = [h for h in header if h.startswith("Label")]
    raise DataError(f"{source}: no {wanted} column for --utility-label {name} (label columns: {labels or 'none'})")


def read_labels(images: ImageSet, name: str, *, fallback: bool = False) -> tuple[np.ndarray, str]:
    """Integer labels of the set's images (by CSV row) and the column they came from."""
    path = _csv_of(images.source)
    if not path.is_file():
        raise DataError(f"{images.source}: labels for --utility come from a CSV manifest; this folder has no manifest.csv")
    with io.StringIO(path.read_bytes().decode("utf-8-sig"), newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        column = label_column(header, name, path, fallback=fallback)
        values = {row_no: {(k or "").strip(): (v or "").strip() for k, v in raw.items()}.get(column, "")
                  for row_no, raw in enumerate(reader, start=1)}
    labels = []
    for row in images.rows:
        value = values.get(row, "")
        try:
            label = int(value)
        except ValueError:
            raise DataError(f"{path}, row {row}: {column} must be a class number (0, 1, ...), got {value!r}") from None
        if label < 0:
            raise DataError(f"{path}, row {row}: {column} must be >= 0, got {label}")
        labels.append(label)
    return np.asarray(labels, dtype=np.int64), column


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, options: UtilityOptions,
                     seed: int, tick: Callable[[int], None] | None = None) -> torch.nn.Module:
    """A MONAI ``Classifier`` trained for ``options.steps`` Adam steps on seeded random batches (CPU);
    ``tick(1)`` after each step."""
    import torch
    from monai.networks.nets import Classifier

    spatial = images.shape[2:]
    depth = len(options.channels)
    while depth > 1 and min(spatial) // 2**depth < 2:  # keep at least 2 pixels per axis at the bottom
        depth -= 1
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(seed)
        net = Classifier(in_shape=images.shape[1:], classes=num_classes, channels=options.channels[:depth],
                         strides=(2,) * depth)
        optimizer = torch.optim.Adam(net.parameters(), lr=options.learning_rate)
        x, y = torch.from_numpy(images).float(), torch.from_numpy(labels)
        generator = torch.Generator().manual_seed(seed)
        net.train()
        for _ in range(options.steps):
            pick = torch.randint(0, len(x), (min(options.batch_size, len(x)),), generator=generator)
            loss = torch.nn.functional.cross_entropy(net(x[pick] * 2 - 1), y[pick])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if tick is not None:
                tick(1)
    net.eval()
    return net


def predict(net: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Predicted class of each image."""
    import torch

    with torch.no_grad():
        out = [net(torch.from_numpy(images[i:i + batch_size]).float() * 2 - 1).argmax(1).numpy()
               for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def utility(train: ImageSet, synthetic: ImageSet, test: ImageSet, options: UtilityOptions, *,
            replicates: int = 200, seed: int = 0, tick: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Accuracy and balanced accuracy on ``test`` of the three arms, with bootstrap intervals;
    ``tick(1)`` after each classifier training step (``len(ARMS) * options.steps`` in all)."""
    y_train, col_train = read_labels(train, options.label)
    y_test, col_test = read_labels(test, options.label)
    y_syn, col_syn = read_labels(synthetic, options.label, fallback=True)
    known = set(y_train.tolist())
    if unknown := sorted(set(y_syn.tolist()) - known):
        raise DataError(f"{_csv_of(synthetic.source)}: {col_syn} has class(es) {unknown} that no real training image "
                        f"has ({col_train} classes: {sorted(known)}); are the synthetic labels of the same task?")
    if len(np.unique(y_syn)) < 2:
        raise FedsynthError(f"{_csv_of(synthetic.source)}: every synthetic image has {col_syn} {int(y_syn[0])}; a "
                            "classifier needs at least two classes (generate each class, list them in one CSV)")
    num_classes = int(max(y_train.max(), y_test.max(), y_syn.max())) + 1
    subset = np.sort(np.random.default_rng(seed + 2).permutation(len(train))[:len(synthetic)])
    arms = dict(zip(ARMS, [(synthetic.images, y_syn), (train.images[subset], y_train[subset]), (train.images, y_train)],
                    strict=True))
    predictions = {name: predict(train_classifier(x, y, num_classes, options, seed, tick), test.images)
                   for name, (x, y) in arms.items()}

    def replicate(i: np.ndarray) -> dict[str, float]:
        out = {}
        for name, pred in predictions.items():
            out[f"{name}.accuracy"] = stats.accuracy(y_test[i], pred[i])
            out[f"{name}.balanced_accuracy"] = stats.balanced_accuracy(y_test[i], pred[i])
        return out

    draws = stats.bootstrap(replicate, [len(test)], replicates, seed) if replicates > 0 else {}
    result: dict[str, Any] = {"arms": {}}
    for name, pred in predictions.items():
        entry: dict[str, Any] = {"train_count": len(arms[name][1])}
        for metric in ("accuracy", "balanced_accuracy"):
            value = getattr(stats, metric)(y_test, pred)
            entry[metric] = {"value": value, "ci95": stats.interval(draws[f"{name}.{metric}"]) if draws else None}
        result["arms"][name] = entry
    for ref in ("real_same_count", "real"):
        gap = draws["synthetic.balanced_accuracy"] - draws[f"{ref}.balanced_accuracy"] if draws else None
        result[f"balanced_accuracy_gap_to_{ref}"] = {
            "value": result["arms"]["synthetic"]["balanced_accuracy"]["value"] - result["arms"][ref]["balanced_accuracy"]["value"],
            "ci95": stats.interval(gap) if gap is not None else None}
    result.update({
        "task": {"label": options.label, "columns": {"train": col_train, "test": col_test, "synthetic": col_syn},
                 "classes": num_classes, "test_count": len(test), "chance_balanced_accuracy": 1 / len(np.unique(y_test)),
                 "class_counts": {"train": np.bincount(y_train, minlength=num_classes).tolist(),
                                  "synthetic": np.bincount(y_syn, minlength=num_classes).tolist(),
                                  "test": np.bincount(y_test, minlength=num_classes).tolist()}},
        "classifier": {"network": "monai.networks.nets.Classifier", "channels": list(options.channels),
                       "steps": options.steps, "batch_size": options.batch_size, "optimizer": "Adam",
                       "learning_rate": options.learning_rate, "seed": seed, "device": "cpu"},
        "intervals": "percentile bootstrap over the test images (classifiers fixed); gaps paired on the same draw",
    })
    return result
