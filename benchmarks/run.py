"""fedsynth benchmark suite: every figure is a ratio measured side by side in one run.

    python benchmarks/run.py            # full suite (tens of minutes on 2 CPU cores), writes benchmarks/RESULTS.md
    python benchmarks/run.py --quick    # CI smoke (under ~2 minutes): small steps, no external scripts
    python benchmarks/run.py --quick -o /tmp/RESULTS.md --external   # also run the other scripts' --quick modes

Sections:
1. engine step vs a hand-written PyTorch loop calling the same ``model.training_step``;
2. quality (``benchmarks/quality.py``): each family with its recipe on the real 64x64 data set of
   ``fedsynth build-dataset``, scored on the **held-out** slices with the real-vs-real floor row;
   DDIM-50 vs DDPM-1000 on a subset;
3. federated (Flower) vs centralized vs single-site on two non-IID sites (one brain each), same
   total steps, scored on each held-out set; DP at epsilon 8 vs no DP (``--only federated``);
4. the other developers' scripts, when present: ``federation_overhead.py`` (Flower overhead and
   bytes per round), ``openfl_overhead.py``, ``dp_overhead.py``; their output is quoted.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXTERNAL = {
    "federation_overhead.py": "Flower overhead and bytes per round",
    "openfl_overhead.py": "OpenFL overhead",
    "dp_overhead.py": "DP overhead",
}


def machine() -> str:
    """One line describing the machine and software."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU run)"
    return (f"{cpu}, {os.cpu_count()} logical cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); load average {load:.1f} at start (machine shared with other jobs)")


def _config(family: str, quick: bool, timesteps: int = 1000, **training: Any):  # type: ignore[no-untyped-def]
    from fedsynth.config import config_from_dict

    models = {
        "gan": {"family": "gan", "latent_dim": 32, "generator_channels": 32, "discriminator_channels": 16},
        "autoencoder": {"family": "autoencoder", "channels": [16, 32], "latent_channels": 2},
        "diffusion": {"family": "diffusion", "channels": [16, 32], "num_train_timesteps": timesteps, "sampling_steps": 50,
                      "num_head_channels": 16},
    }
    return config_from_dict({
        "spatial_dims": 2, "image_size": 32, "seed": 0, "model": models[family],
        "training": {"epochs": 1, "batch_size": 8, "progress": False, "tensorboard": False, "sample_every": 10_000,
                     "learning_rate": 5e-4, **training},
    }, f"benchmark {family}")


# --------------------------------------------------------------------------- 1. engine vs hand loop


def bench_engine(data: dict[str, Path], quick: bool, work: Path) -> list[str]:
    """Seconds per step: Engine.fit vs a hand loop over the same loader and the same training_step."""
    import torch

    from fedsynth.data import load_datasets, make_loader
    from fedsynth.engine import Engine, seed_everything
    from fedsynth.models import build_model

    families = ["gan"] if quick else ["gan", "autoencoder", "diffusion"]
    epochs, repeats = (1, 2) if quick else (2, 3)
    rows = ["| family | steps | hand loop s/step | engine s/step | engine / hand | engine + run dir / hand |",
            "|---|---|---|---|---|---|"]
    for family in families:
        config = _config(family, quick)
        train, _ = load_datasets(config, str(data["all"]))
        hand: list[float] = []
        eng: list[float] = []
        eng_dir: list[float] = []
        steps = 0

        def hand_loop(n_epochs: int) -> float:
            nonlocal steps
            seed_everything(0)
            model = build_model(config)
            optimizers = model.configure_optimizers(config.training)
            loader = make_loader(train, config.training.batch_size, shuffle=True, seed=config.seed)
            t0, steps = time.perf_counter(), 0
            for epoch in range(n_epochs):
                loader.sampler.set_epoch(epoch)
                train.set_epoch(epoch)
                model.train()
                for batch in loader:
                    model.training_step(batch, optimizers)
                    steps += 1
            return (time.perf_counter() - t0) / steps

        def engine_fit(n_epochs: int, run_dir: Path | None = None) -> float:
            seed_everything(0)
            engine = Engine(build_model(config), config, run_dir=run_dir, device=torch.device("cpu"))
            t0 = time.perf_counter()
            engine.fit(train, epochs=n_epochs)
            return (time.perf_counter() - t0) / engine.state.step

        hand_loop(1), engine_fit(1)  # warm-up (allocator, MONAI lazy imports) outside the timings
        for rep in range(repeats):  # alternate the order so machine load hits both alike
            first, second = (hand_loop, engine_fit) if rep % 2 == 0 else (engine_fit, hand_loop)
            a, b = first(epochs), second(epochs)
            hand.append(a if first is hand_loop else b)
            eng.append(b if first is hand_loop else a)
            if not quick:
                eng_dir.append(engine_fit(epochs, work / f"engine_{family}_{rep}"))
        h, e = statistics.median(hand), statistics.median(eng)
        d = f"{statistics.median(eng_dir) / h:.3f}" if eng_dir else "(full run only)"
        rows.append(f"| {family} | {steps} x {repeats} | {h:.4f} | {e:.4f} | **{e / h:.3f}** | {d} |")
    return ["## 1. Engine step vs hand-written PyTorch loop", "",
            f"Same model, same loader (2D 32x32 real MRI slices, both sites, batch 8), same `model.training_step`; "
            f"{epochs} epochs per measurement after one warm-up epoch each, median of {repeats} repeats in alternating order. 'run dir' = the engine also "
            "writes metrics.csv and last.ckpt every epoch.", "", *rows, ""]


# --------------------------------------------------------------------------- 4. other scripts


def bench_external(quick: bool, run_external: bool, timeout: int) -> list[str]:
    """Run the other developers' scripts (their ``--quick`` when ``quick``) and quote their output."""
    lines = ["## 4. Federation, bytes per round and DP overhead (other scripts)", ""]
    for script, what in EXTERNAL.items():
        path = HERE / script
        if not path.is_file():
            lines += [f"- {what}: `benchmarks/{script}` not present in this checkout; skipped.", ""]
            continue
        if quick and not run_external:
            lines += [f"- {what}: `benchmarks/{script}` skipped in --quick (pass --external, or run the full suite).", ""]
            continue
        cmd = [sys.executable, str(path)] + (["--quick"] if quick else [])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
            status = f"rc {proc.returncode}"
            text = proc.stdout.strip() or proc.stderr.strip()[-2000:]
        except subprocess.TimeoutExpired:
            status, text = f"timed out after {timeout} s", ""
        lines += [f"### {what}: `python benchmarks/{script}{' --quick' if quick else ''}` ({status}, "
                  f"{time.perf_counter() - t0:.0f} s)", "", "```", text, "```", ""]
    return lines


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: tiny step counts, no external scripts")
    parser.add_argument("-o", "--output", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--external", action="store_true", help="in --quick, also run the other scripts' --quick")
    parser.add_argument("--external-quick", action="store_true", help="in the full suite, run the other scripts with "
                                                                      "their --quick (when time is short)")
    parser.add_argument("--external-timeout", type=int, default=900, help="seconds per external script")
    parser.add_argument("--only", nargs="*", choices=["engine", "quality", "federated", "text", "external"],
                        default=None)
    parser.add_argument("--work", default=None, help="keep runs and data here (default: a temporary folder)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))

    import quality as q

    from fedsynth.demo import build_demo_dataset
    from fedsynth.io import atomic_write_text

    started = time.perf_counter()
    header = machine()
    only = set(args.only or ["engine", "quality", "federated", "text", "external"])
    sections: list[str] = []
    budget = q.Budget.quick() if args.quick else q.Budget()
    grids = HERE / "quality" if not args.quick else Path(args.output).resolve().parent / "quality"
    with tempfile.TemporaryDirectory(prefix="fedsynth-bench-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = build_demo_dataset(work / "demo-data", image_size=32, count=24, spatial_dims=2)
        shared: dict[str, Any] = {}

        def quality_data(size: int | None = None) -> Any:
            key = f"data{size or budget.image_size}"
            if key not in shared:
                shared[key] = q.prepare(work, budget, size)
            return shared[key]

        def quality_section() -> list[str]:
            lines, shared["encoder"] = q.bench_quality(work, budget, quality_data(), grids)
            return lines

        def federated_section() -> list[str]:
            return q.bench_federated(work, budget, quality_data(budget.fed_image_size))

        steps = [("engine", lambda: bench_engine(data, args.quick, work)),
                 ("quality", quality_section),
                 ("federated", federated_section),
                 ("text", lambda: q.bench_text(work, budget, quality_data(budget.text_image_size), grids)),
                 ("external", lambda: bench_external(args.quick or args.external_quick, args.external or not args.quick,
                                                    args.external_timeout))]
        for name, fn in steps:
            if name in only:
                t0 = time.perf_counter()
                sections += fn()
                sections.append(f"_(section took {time.perf_counter() - t0:.0f} s)_\n")
                print(f"[bench] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    command = "python benchmarks/run.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    text = "\n".join([
        "# fedsynth benchmark results", "",
        f"Command: `{command}`  ", f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
        f"Machine: {header}  ", f"Total time: {time.perf_counter() - started:.0f} s", "",
        "Every figure in bold is a ratio of two measurements taken in this same run. Absolute seconds depend on the "
        "machine and its load; compare ratios. Data: real brain MRI (MNI152 via nilearn, Colin27 via mricron-data); "
        "section 1 uses 24 axial slices per brain at 32x32, sections 2-4 the held-out split of `fedsynth build-dataset`.",
        "", *sections])
    atomic_write_text(Path(args.output), text + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
