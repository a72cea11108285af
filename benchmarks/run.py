"""fedsynth benchmark suite: every figure is a ratio measured side by side in one run.

    python benchmarks/run.py            # full suite (tens of minutes on 2 CPU cores), writes benchmarks/RESULTS.md
    python benchmarks/run.py --quick    # CI smoke (under ~2 minutes): small steps, no external scripts
    python benchmarks/run.py --quick -o /tmp/RESULTS.md --external   # also run the other scripts' --quick modes

Sections:
1. engine step vs a hand-written PyTorch loop calling the same ``model.training_step``;
2. DDIM-S vs DDPM-1000 sampling: time and quality (encoder-FID / FRD from ``fedsynth.metrics``);
3. federated (Flower, ``fedsynth federate flower``) vs centralized vs single-site quality on two
   non-identical real sites (MNI152 and Colin27 brain slices), same epochs per image;
DP. GAN image quality at target epsilon 1 and 8 (Opacus, calibrated noise) vs no DP, section 3's settings
   (``--only dp``; runs between sections 3 and 4);
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


# --------------------------------------------------------------------------- 2. DDIM vs DDPM


def _fit(config, csv: Path, epochs: int):  # type: ignore[no-untyped-def]
    """Build the engine (with the privacy plugin when ``config.privacy.enabled``) and train it."""
    from fedsynth.data import load_datasets
    from fedsynth.local import build_engine

    train, _ = load_datasets(config, str(csv))
    engine = build_engine(config, None)
    engine.fit(train, epochs=epochs)
    return engine


def _train(config, csv: Path, epochs: int):  # type: ignore[no-untyped-def]
    return _fit(config, csv, epochs).model


def _quality(real, images) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from fedsynth.metrics import ImageSet, evaluate_sets
    from fedsynth.metrics.evaluate import EvaluationOptions

    report = evaluate_sets(real, ImageSet(images.numpy(), [], "samples"), EvaluationOptions(max_pairs=100))
    return {"fid": report["encoder_fid"], "frd": report["radiomics"]["frd"], "precision": report["precision"],
            "recall": report["recall"], "coverage": report["coverage"]}


def bench_sampling(data: dict[str, Path], real, quick: bool) -> list[str]:  # type: ignore[no-untyped-def]
    from fedsynth.generation import sample

    # --quick keeps CI fast with a 50-step schedule (DDPM-50 vs DDIM-10); the full run is DDPM-1000 vs DDIM-50
    epochs, n, s, t = (1, 4, 10, 50) if quick else (10, 6, 50, 1000)
    config = _config("diffusion", quick, timesteps=t)
    model = _train(config, data["all"], epochs)
    out = {}
    for sampler, steps in (("ddpm", t), ("ddim", s)):
        t0 = time.perf_counter()
        images = sample(model, n, seed=0, sampler=sampler, steps=steps)
        out[sampler] = {"s": time.perf_counter() - t0, **_quality(real, images)}
    p, i = out["ddpm"], out["ddim"]
    rows = ["| sampler | steps | seconds | encoder-FID | FRD | precision | coverage |", "|---|---|---|---|---|---|---|",
            f"| DDPM | {t} | {p['s']:.1f} | {p['fid']:.3g} | {p['frd']:.3g} | {p['precision']:.2f} | {p['coverage']:.2f} |",
            f"| DDIM | {s} | {i['s']:.1f} | {i['fid']:.3g} | {i['frd']:.3g} | {i['precision']:.2f} | {i['coverage']:.2f} |"]
    return [f"## 2. DDIM-{s} vs DDPM-{t} sampling", "",
            f"Diffusion UNet [16, 32], {t} training timesteps, trained {epochs} epochs on both sites' slices; "
            f"{n} images each, same seed; quality against all {len(real)} real slices (random-conv encoder).", "", *rows, "",
            f"**DDPM-{t} / DDIM-{s} time: {p['s'] / i['s']:.1f}x**; encoder-FID DDIM / DDPM: **{i['fid'] / p['fid']:.2f}**; "
            f"FRD DDIM / DDPM: **{i['frd'] / p['frd']:.2f}**.", ""]


# --------------------------------------------------------------------------- 3. federated vs centralized vs single-site


def _flower(config, data: dict[str, Path], rounds: int, work: Path) -> tuple[Any, str]:  # type: ignore[no-untyped-def]
    from fedsynth.checkpoint import model_from_checkpoint
    from fedsynth.config import save_config

    config.federation.rounds = rounds
    config.federation.local_epochs = 1
    config.federation.min_sites = 2
    save_config(config, work / "federated.yaml")
    # not ``python -m fedsynth.cli``: as __main__ it is a second module whose command table the extensions never fill
    cmd = [sys.executable, "-c", "import sys; from fedsynth.cli import main; sys.exit(main())", "federate", "flower", "-c", str(work / "federated.yaml"),
           "--site", f"site1={data['mni152']}", "--site", f"site2={data['colin27']}", "-o", str(work / "flower"),
           "--no-evaluate", "--timeout", "1500"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    if proc.returncode != 0:
        return None, f"`fedsynth federate flower` failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}"
    ckpt = work / "flower" / "global" / "last.ckpt"
    return model_from_checkpoint(ckpt), f"Flower, {rounds} rounds x 1 local epoch, {time.perf_counter() - t0:.0f} s wall"


def bench_federated(data: dict[str, Path], real, quick: bool, work: Path) -> list[str]:  # type: ignore[no-untyped-def]
    from fedsynth.generation import sample

    epochs, n = (2, 16) if quick else (10, 48)
    rows = ["| training | data | encoder-FID | FRD | precision | recall | coverage | FID / centralized |",
            "|---|---|---|---|---|---|---|---|"]
    results: dict[str, dict[str, float]] = {}
    notes = []
    plans: list[tuple[str, str, Any]] = [("centralized", "both sites pooled (all.csv)", data["all"]),
                                         ("single-site", "site 1 only (MNI152)", data["mni152"])]
    for name, desc, csv in plans:
        model = _train(_config("gan", quick), csv, epochs)
        results[name] = {**_quality(real, sample(model, n, seed=0)), "desc": desc}  # type: ignore[dict-item]
    if quick:
        notes.append("federated: skipped in --quick (a real Flower federation takes minutes); run the full suite.")
    elif (ROOT / "fedsynth" / "federated" / "flower").is_dir():
        model, how = _flower(_config("gan", quick), data, epochs, work)
        if model is None:
            notes.append(how)
        else:
            results["federated"] = {**_quality(real, sample(model, n, seed=0)), "desc": how}  # type: ignore[dict-item]
    else:
        notes.append("federated: the Flower driver (`fedsynth federate flower`) is not in this checkout; not measured.")
    base = results["centralized"]["fid"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['desc']} | {r['fid']:.3g} | {r['frd']:.3g} | {r['precision']:.2f} | "
                    f"{r.get('recall', float('nan')):.2f} | {r['coverage']:.2f} | **{r['fid'] / base:.2f}** |")
    return ["## 3. Federated vs centralized vs single-site quality", "",
            f"GAN (latent 32, G 32 / D 16 channels), 2D 32x32; {epochs} epochs per image in every setting (federated: "
            f"{epochs} rounds x 1 local epoch per site); {n} samples scored against all {len(real)} real slices of both "
            "sites (MNI152 and Colin27: two different brains and scanners). Lower FID/FRD is better.", "", *rows, "",
            *[f"- {x}" for x in notes], ""]


# --------------------------------------------------------------------------- DP: quality vs epsilon


def bench_dp(data: dict[str, Path], real, quick: bool) -> list[str]:  # type: ignore[no-untyped-def]
    """Section 3's centralized GAN trained with example-level DP at target epsilon 1 and 8 (calibrated) vs no DP."""
    from fedsynth.config import PrivacyConfig
    from fedsynth.generation import sample

    epochs, n = (2, 16) if quick else (10, 48)  # section 3's epochs and sample count
    rows = ["| training | target ε | noise multiplier | steps | spent ε (δ) | encoder-FID | FRD | precision | recall | "
            "coverage | FID / FID(no DP) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    results: dict[str, dict[str, Any]] = {}
    for name, target in (("no DP", None), ("DP ε≈8", 8.0), ("DP ε≈1", 1.0)):
        config = _config("gan", quick)
        if target is not None:
            config.privacy = PrivacyConfig(enabled=True, target_epsilon=target, epochs=epochs)
        engine = _fit(config, data["all"], epochs)
        ledger = engine.state.privacy or {}
        results[name] = {**_quality(real, sample(engine.model, n, seed=0)), "target": target, "steps": engine.state.step,
                         "epsilon": engine.privacy.report()["epsilon"] if engine.privacy is not None else None,
                         "delta": ledger.get("delta"), "sigma": ledger.get("noise_multiplier")}
    base = results["no DP"]["fid"]
    for name, r in results.items():
        eps = "∞ (no DP)" if r["epsilon"] is None else f"{r['epsilon']:.3g} ({r['delta']:.0e})"
        rows.append(f"| {name} | {'—' if r['target'] is None else r['target']} | "
                    f"{'—' if r['sigma'] is None else format(r['sigma'], '.3g')} | {r['steps']} | {eps} | {r['fid']:.4g} | "
                    f"{r['frd']:.4g} | {r['precision']:.2f} | {r['recall']:.2f} | {r['coverage']:.2f} | "
                    f"**{r['fid'] / base:.2f}** |")
    return ["## DP: image quality at ε ≈ 1, ε ≈ 8 and no DP", "",
            f"Section 3's centralized setting: GAN (latent 32, G 32 / D 16 channels, GroupNorm D), 2D 32x32, both sites "
            f"pooled ({len(real)} real slices), batch 8, {epochs} epochs; DP = `privacy.enabled: true, target_epsilon: 1.0 | 8.0, "
            f"epochs: {epochs}` (noise calibrated by the RDP accountant for {epochs} epochs of Poisson-sampled batches, "
            "max_grad_norm 1.0, on the discriminator; the generator inherits the guarantee by post-processing). "
            "Spent ε is the engine's privacy report after training. "
            f"{n} samples scored against all {len(real)} real slices; lower FID/FRD is better.", "", *rows, ""]


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
    parser.add_argument("--only", nargs="*", choices=["engine", "sampling", "federated", "dp", "external"],
                        default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    from fedsynth.demo import build_demo_dataset
    from fedsynth.io import atomic_write_text
    from fedsynth.metrics import infer_config, load_real

    started = time.perf_counter()
    header = machine()
    only = set(args.only or ["engine", "sampling", "federated", "dp", "external"])
    sections: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fedsynth-bench-") as tmp:
        work = Path(tmp)
        data = build_demo_dataset(work / "data", image_size=32, count=24, spatial_dims=2)
        real = load_real(data["all"], infer_config(data["all"]))
        steps = [("engine", lambda: bench_engine(data, args.quick, work)),
                 ("sampling", lambda: bench_sampling(data, real, args.quick)),
                 ("federated", lambda: bench_federated(data, real, args.quick, work)),
                 ("dp", lambda: bench_dp(data, real, args.quick)),
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
        "machine and its load; compare ratios. Data: real brain MRI (MNI152 via nilearn, Colin27 via mricron-data), "
        "24 axial slices per brain at 32x32.", "", *sections])
    atomic_write_text(Path(args.output), text + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
