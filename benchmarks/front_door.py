"""How fast the front door opens: ``fedsynth --help`` against a bare ``import pydantic, yaml, argparse``.

    python benchmarks/front_door.py [--repeats 15]

Both commands run in fresh interpreters, alternated, on the same machine in one run; the figure
is the ratio of the medians (target: within 5x). Also times ``import fedsynth.config`` and
``init-config``, and the cost of building a model (the first import of torch) for scale.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

CASES = {
    "baseline: python -c 'import pydantic, yaml, argparse'": [sys.executable, "-c", "import pydantic, yaml, argparse"],
    "fedsynth --help": [sys.executable, "-m", "fedsynth", "--help"],
    "python -c 'import fedsynth.config'": [sys.executable, "-c", "import fedsynth.config"],
    "fedsynth init-config --family diffusion --latent": [
        sys.executable, "-m", "fedsynth", "init-config", "--family", "diffusion", "--latent", "--image-size", "32",
        "-o", "{tmp}/c.yaml", "--overwrite"],
    "for scale: build a GAN (imports torch)": [
        sys.executable, "-c", "from fedsynth.config import default_config\nfrom fedsynth.models import build_model\n"
                              "build_model(default_config('gan', 2, 32))"],
}


def measure(repeats: int) -> dict[str, float]:
    """Median wall seconds of each case, alternating the cases so that load drifts hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in CASES}
    tmp = tempfile.mkdtemp(prefix="fedsynth-front-door-")
    try:
        for _ in range(repeats):
            for name, argv in CASES.items():
                argv = [a.replace("{tmp}", tmp) for a in argv]
                start = time.perf_counter()
                subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    medians = measure(args.repeats)
    base = medians[next(iter(CASES))]
    print(f"| command | median wall (s, {args.repeats} runs) | ratio to the baseline |")
    print("|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.3f} | {seconds / base:.1f}x |")
    ratio = medians["fedsynth --help"] / base
    print(f"\nfedsynth --help is {ratio:.1f}x the bare import (target <= 5x)")


if __name__ == "__main__":
    main()
