"""How many images a stable `fedsynth evaluate` figure needs: 95 % interval width against the count.

    fedsynth build-dataset -o /tmp/brains
    python benchmarks/interval_width.py --data /tmp/brains --sizes 16 32 64 128 256 -o /tmp/widths

For each count n: n held-out real slices (``held_out.csv``) against n "synthetic" slices, with the
training CSV as the floor, through the real CLI (``fedsynth evaluate --train ... --bootstrap``).
The synthetic stand-in is a generator with a known, modest defect: n training slices (disjoint
from the floor's draw is not needed, the floor draws its own) blurred with a Gaussian of
``--blur`` pixels, written as image files with a manifest. A table of interval widths (and of the
gap to the floor with its interval) is printed as Markdown.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

METRICS = ("encoder_fid", "kid", "frd", "mean_ks_statistic", "precision", "recall", "density", "coverage")


def _subset_csv(source: Path, out: Path, n: int, seed: int) -> None:
    rows = list(csv.reader(source.open(encoding="utf-8")))
    header, body = rows[0], rows[1:]
    pick = sorted(np.random.default_rng(seed).permutation(len(body))[:n])
    col = header.index("Channel_0")
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for i in pick:
            row = list(body[i])
            row[col] = str((source.parent / row[col]).resolve())
            writer.writerow(row)


def _blurred(train_csv: Path, out: Path, n: int, sigma: float, seed: int) -> Path:
    from scipy.ndimage import gaussian_filter

    from fedsynth.data.images import read_image, save_image
    from fedsynth.data.manifest import read_manifest, write_manifest

    records = read_manifest(train_csv)
    pick = sorted(np.random.default_rng(seed).permutation(len(records))[:n])
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in pick:
        image = read_image(records[i].channels[0]).astype(np.float32)
        blurred = gaussian_filter(image, sigma=(0,) + (sigma,) * (image.ndim - 1))
        path = out / f"synthetic_{i:05d}.nii.gz"
        save_image(blurred, path)
        rows.append((path.stem.split(".")[0], [path], None))
    write_manifest(out / "manifest.csv", rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder written by fedsynth build-dataset")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--blur", type=float, default=1.0)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("-o", "--output", required=True, help="work folder (CSVs, images, reports)")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for n in args.sizes:
        real = out / f"real_{n}.csv"
        _subset_csv(data / "held_out.csv", real, n, seed=n)
        synthetic = _blurred(data / "train.csv", out / f"synthetic_{n}", n, args.blur, seed=1000 + n)
        report = out / f"report_{n}.json"
        subprocess.run([sys.executable, "-m", "fedsynth", "evaluate", "--real", str(real), "--synthetic", str(synthetic),
                        "--train", str(data / "train.csv"), "--bootstrap", str(args.bootstrap), "-o", str(report)],
                       check=True, stdout=subprocess.DEVNULL)
        results[n] = json.loads(report.read_text(encoding="utf-8"))
        print(f"n={n}: {results[n]['seconds']:.0f} s", file=sys.stderr)
    print("| metric | " + " | ".join(f"n={n}" for n in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    for name in METRICS:
        cells = []
        for n in args.sizes:
            m = results[n]["summary"]["metrics"][name]
            lo, hi = m["ci95"]
            glo, ghi = m["gap_ci95"]
            cells.append(f"{m['value']:.3g} ±{(hi - lo) / 2:.2g}; gap {m['gap']:+.3g} [{glo:.3g}, {ghi:.3g}]")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
