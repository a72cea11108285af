"""Image quality on held-out real data: each family with its recipe, federated vs centralized vs
single-site, and DP at epsilon 8 vs no DP (sections of ``benchmarks/run.py``).

Every table starts with the floor: **real train vs real held-out** scored exactly like a model's
samples (same metrics, same counts). Samples are scored against the **held-out** slices of
``fedsynth build-dataset`` (no held-out slice within 4 mm of a training slice); memorization is the
share of samples nearer a training image than any held-out image is.

Trainings run as ``fedsynth train`` / ``fedsynth federate flower`` subprocesses, two at a time with
one thread each (the machine has 2 cores), so each family's step budget is fixed and its wall time
is reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLI = [sys.executable, "-c", "import sys; from fedsynth.cli import main; sys.exit(main())"]


@dataclass
class Budget:
    """Step budgets and sample counts (full run defaults; ``quick()`` for CI)."""

    image_size: int = 64
    gan_steps: int = 3000
    stylegan_steps: int = 500
    autoencoder_steps: int = 1500
    first_stage_steps: int = 600
    ldm_steps: int = 4000
    encoder_steps: int = 400
    samples: int = 500
    ddpm_subset: int = 8
    ddpm_steps: int = 1000
    fed_image_size: int = 32
    fed_steps: int = 1000
    fed_rounds: int = 5
    volumes: list[str] | None = None
    threads_per_job: int = 1
    text_image_size: int = 32
    text_first_stage_steps: int = 800
    text_steps: int = 2500
    reader_steps: int = 1500
    precision: str = "auto"
    """training precision of the quality section: ``auto`` = bf16 autocast where the CPU/GPU computes
    it natively (:func:`fedsynth.demo.fast_precision`), else fp32"""

    @classmethod
    def quick(cls) -> Budget:
        return cls(image_size=32, fed_image_size=32, gan_steps=30, stylegan_steps=10, autoencoder_steps=20, first_stage_steps=20, ldm_steps=20,
                   encoder_steps=20, samples=24, ddpm_subset=4, ddpm_steps=100, fed_steps=16, fed_rounds=2, volumes=["mni152", "ch2"],
                   text_first_stage_steps=20, text_steps=20, reader_steps=30)


@dataclass
class Data:
    csvs: dict[str, Path]
    train: Any
    held_out: Any
    site_held_out: dict[str, Any] = field(default_factory=dict)


def prepare(work: Path, budget: Budget, image_size: int | None = None) -> Data:
    """Build the real data set once and load the train / held-out sets in the evaluation geometry."""
    size = image_size or budget.image_size
    from fedsynth.config import default_config
    from fedsynth.data.brains import available_volumes, build_brain_dataset
    from fedsynth.metrics import load_real

    volumes = [v for v in (budget.volumes or available_volumes()) if v in available_volumes()]
    csvs = build_brain_dataset(work / f"data{size}", image_size=size, volumes=volumes, volume_sizes=())
    cfg = default_config("autoencoder", 2, size)
    data = Data(csvs, load_real(csvs["train"], cfg), load_real(csvs["held_out"], cfg))
    for site in ("mni152", "colin27"):
        if f"{site}_held_out" in csvs:
            data.site_held_out[site] = load_real(csvs[f"{site}_held_out"], cfg)
    return data


# --------------------------------------------------------------------------- configs


def family_config(name: str, budget: Budget, size: int | None = None, **overrides: Any) -> dict[str, Any]:
    """The recipe config (``fedsynth init-config`` defaults) for one benchmark entry, as a dict."""
    from fedsynth.config import default_config

    size = size or budget.image_size
    if name in ("gan", "stylegan"):
        cfg = default_config(name, 2, size).to_dict()
        cfg["training"].update(max_steps=budget.gan_steps if name == "gan" else budget.stylegan_steps)
    elif name == "autoencoder":
        cfg = default_config("autoencoder", 2, size).to_dict()
        cfg["training"].update(max_steps=budget.autoencoder_steps)
        if cfg["model"]["adversarial_weight"] > 0:
            cfg["model"]["adversarial_start_step"] = budget.autoencoder_steps // 2
    elif name == "latent-diffusion":
        cfg = default_config("diffusion", 2, size, latent=True).to_dict()
        cfg["model"]["first_stage_steps"] = budget.first_stage_steps
        cfg["training"].update(max_steps=budget.ldm_steps)
    elif name == "eval-encoder":  # the evaluation encoder: a different autoencoder (other widths, seed)
        cfg = default_config("autoencoder", 2, size).to_dict()
        cfg["model"].update(channels=[16, 32, 64] if size >= 64 else [16, 32], latent_channels=8,
                            adversarial_weight=0.0)
        cfg["seed"] = 7
        cfg["training"].update(max_steps=budget.encoder_steps)
    else:
        raise ValueError(name)
    cfg["training"].update(epochs=10**6, progress=False, tensorboard=False, sample_every=10**6)
    for key, value in overrides.items():
        section, _, sub = key.partition("__")
        if sub:
            cfg[section][sub] = value
        else:
            cfg[section] = value
    return cfg


def _env(budget: Budget) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(budget.threads_per_job), MKL_NUM_THREADS=str(budget.threads_per_job),
               FLWR_TELEMETRY_ENABLED="0")
    return env


def train_run(name: str, cfg: dict[str, Any], train_csv: Path, work: Path, budget: Budget) -> dict[str, Any]:
    """``fedsynth train`` in a subprocess; returns its checkpoint, wall time and steps."""
    run_dir = work / "runs" / name
    config_path = work / "configs" / f"{name}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    t0 = time.perf_counter()
    proc = subprocess.run([*CLI, "train", "-c", str(config_path), "--data", str(train_csv), "-o", str(run_dir)],
                          capture_output=True, text=True, env=_env(budget), cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"training {name} failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return {"name": name, "checkpoint": run_dir / "last.ckpt", "seconds": seconds, "run_dir": run_dir}


def flower_run(name: str, cfg: dict[str, Any], sites: dict[str, Path], work: Path, budget: Budget) -> dict[str, Any]:
    """A real 2-site Flower federation (TLS + node auth on 127.0.0.1) with ``fedsynth federate flower``."""
    run_dir = work / "runs" / name
    config_path = work / "configs" / f"{name}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    cmd = [*CLI, "federate", "flower", "-c", str(config_path), "-o", str(run_dir), "--no-evaluate", "--timeout", "5400"]
    for site, csv in sites.items():
        cmd += ["--site", f"{site}={csv}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(budget), cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"federation {name} failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return {"name": name, "checkpoint": run_dir / "global" / "last.ckpt", "seconds": time.perf_counter() - t0,
            "run_dir": run_dir}


def run_parallel(jobs: list[Any], workers: int = 2) -> list[Any]:
    """Run zero-argument callables, ``workers`` at a time; results in order (first error re-raised)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(job) for job in jobs]
        return [f.result() for f in futures]


# --------------------------------------------------------------------------- scoring


def score(real: Any, images: np.ndarray, encoder_ckpt: Path, train: Any, name: str) -> dict[str, Any]:
    """Every metric of ``fedsynth evaluate`` for ``images`` against ``real`` (held-out)."""
    from fedsynth.metrics import ImageSet, evaluate_sets
    from fedsynth.metrics.evaluate import EvaluationOptions

    opts = EvaluationOptions(encoder="autoencoder", checkpoint=str(encoder_ckpt), max_pairs=300)
    report = evaluate_sets(real, ImageSet(images.astype(np.float32), [f"{name}_{i}" for i in range(len(images))], name),
                           opts, train)
    mem = report["memorization"].get("nearer_than_held_out", {})
    return {"frd": report["radiomics"]["frd"], "kid": report["kid"]["mean"], "fid": report["encoder_fid"],
            "precision": report["precision"], "recall": report["recall"], "density": report["density"],
            "coverage": report["coverage"], "ms_ssim": report["diversity"]["ms_ssim_synthetic"]["mean"],
            "ms_ssim_real": report["diversity"]["ms_ssim_real"]["mean"], "memorized": mem.get("share"),
            "encoder": report["encoder"]["description"]}


def floor(data: Data, real: Any, n: int, encoder_ckpt: Path, seed: int = 0) -> dict[str, Any]:
    """Real train vs real held-out: ``n`` random training slices scored like samples."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(data.train), min(n, len(data.train)), replace=False)
    out = score(real, data.train.images[pick], encoder_ckpt, None, "real-train")
    out["memorized"] = None  # training images are the training set: not meaningful
    return out


def sample_checkpoint(ckpt: Path, n: int, **kwargs: Any) -> tuple[np.ndarray, float]:
    """``n`` samples (EMA weights) from a checkpoint and the seconds it took."""
    import torch

    from fedsynth.generation import sample
    from fedsynth.models import model_from_checkpoint

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = model_from_checkpoint(ckpt)
    t0 = time.perf_counter()
    images = sample(model, n, seed=123, batch_size=50, **kwargs).numpy()
    return images, time.perf_counter() - t0


def write_grid(real: np.ndarray, synthetic: np.ndarray, path: Path, n: int = 32) -> Path:
    """Left: ``n`` real held-out slices; right: ``n`` samples (8 columns each), one PNG."""
    from fedsynth.data.images import save_image
    from fedsynth.generation import image_grid

    rng = np.random.default_rng(0)
    left = image_grid(real[rng.choice(len(real), min(n, len(real)), replace=False)], columns=4)
    right = image_grid(synthetic[:n], columns=4)
    h = max(left.shape[1], right.shape[1])
    pad = lambda g: np.pad(g, ((0, 0), (0, h - g.shape[1]), (0, 0)))  # noqa: E731
    sep = np.ones((left.shape[0], h, 6), np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(np.concatenate([pad(left), sep, pad(right)], axis=2), path)
    return path


ROW = "| {name} | {steps} | {time} | {frd:.3g} | {kid:.3g} | {fid:.3g} | {precision:.2f} | {recall:.2f} | {density:.2f} | " \
      "{coverage:.2f} | {ms_ssim:.3f} | {memorized} |"
HEADER = ["| model | steps | train time | FRD ↓ | KID ↓ | encoder-FID ↓ | precision ↑ | recall ↑ | density | coverage ↑ | "
          "MS-SSIM (real {ms_real:.3f}) | memorized ↓ |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]


def row(name: str, steps: Any, seconds: float | None, m: dict[str, Any]) -> str:
    mem = "—" if m.get("memorized") is None else f"{100 * m['memorized']:.1f} %"
    return ROW.format(name=name, steps=steps, time="—" if seconds is None else f"{seconds / 60:.1f} min",
                      memorized=mem, **{k: m[k] for k in ("frd", "kid", "fid", "precision", "recall", "density",
                                                          "coverage", "ms_ssim")})


# --------------------------------------------------------------------------- sections


def bench_quality(work: Path, budget: Budget, data: Data, grids_dir: Path) -> tuple[list[str], Path]:
    """Each family with its recipe, scored on held-out slices; DDIM-50 vs DDPM-1000 on a subset."""
    csv = data.csvs["train"]
    from fedsynth.demo import fast_precision

    families = ("gan", "stylegan", "autoencoder", "latent-diffusion")
    precision = fast_precision() if budget.precision == "auto" else budget.precision
    cfgs = {k: family_config(k, budget, training__precision=precision) for k in ("eval-encoder", *families)}
    # two slots: [eval encoder -> autoencoder -> latent diffusion] and [GAN -> style-based GAN]
    def chain() -> list[dict[str, Any]]:
        done = [train_run(k, cfgs[k], csv, work, budget) for k in ("eval-encoder", "autoencoder")]
        # latent diffusion on the autoencoder family's run (the same as `model.first_stage` in one config,
        # without training a second autoencoder)
        ldm = cfgs["latent-diffusion"]
        ldm["model"]["first_stage"] = None
        ldm["model"]["autoencoder_checkpoint"] = str(done[1]["checkpoint"].resolve())
        return [*done, train_run("latent-diffusion", ldm, csv, work, budget)]

    def gans() -> list[dict[str, Any]]:
        return [train_run(k, cfgs[k], csv, work, budget) for k in ("gan", "stylegan")]

    chained, adversarial = run_parallel([chain, gans])
    runs = {r["name"]: r for r in [*chained, *adversarial]}
    encoder = runs["eval-encoder"]["checkpoint"]
    real = data.held_out
    results: dict[str, dict[str, Any]] = {"real train vs real held-out (floor)": floor(data, real, budget.samples, encoder)}
    samples: dict[str, np.ndarray] = {}
    timing: dict[str, float] = {}
    for name in families:
        images, seconds = sample_checkpoint(runs[name]["checkpoint"], budget.samples)
        samples[name], timing[name] = images, seconds
        results[name] = score(real, images, encoder, data.train, name)
        write_grid(real.images, images, grids_dir / f"{name}.png")
    # sampler comparison on a subset: same model, same seed
    sub = budget.ddpm_subset
    ddim, t_ddim = sample_checkpoint(runs["latent-diffusion"]["checkpoint"], sub, sampler="ddim", steps=50)
    ddpm, t_ddpm = sample_checkpoint(runs["latent-diffusion"]["checkpoint"], sub, sampler="ddpm", steps=budget.ddpm_steps)
    s_ddim = score(real, ddim, encoder, data.train, "ddim")
    s_ddpm = score(real, ddpm, encoder, data.train, "ddpm")

    steps = {"gan": budget.gan_steps, "stylegan": budget.stylegan_steps, "autoencoder": budget.autoencoder_steps,
             "latent-diffusion": f"{budget.ldm_steps} UNet (+ the autoencoder run)"}
    enc_desc = results["gan"]["encoder"]
    lines = ["## Quality: each family with its recipe, on held-out real slices", "",
             f"Data: `fedsynth build-dataset` — {len(data.train)} training and {len(real)} held-out real 2D T1 slices "
             f"({budget.image_size}x{budget.image_size}, axial/coronal/sagittal, MNI152 + Colin27 ch2/ch2bet/ch2better; "
             "held-out slabs at least 4 mm from any training slice). Each family trained with its `init-config` recipe "
             f"on the training split only ({precision} training, one thread per job, two jobs at a time); {budget.samples} samples each (EMA weights; latent diffusion: DDIM-50), "
             f"scored against the held-out slices. Floor row: {budget.samples} random training slices scored the same way.",
             "", f"Encoder for encoder-FID / KID / PRDC (k = 5): a separate fedsynth AutoencoderKL (channels [16, 32, 64], "
             f"8 latent channels, seed 7) trained {budget.encoder_steps} steps on the training split — *not* an ImageNet "
             f"network; its numbers compare runs of this table only ({enc_desc}). FRD: Fréchet distance of radiomic "
             "features. Memorized: share of samples nearer (RMS) a training slice than any held-out slice is.", "",
             HEADER[0].format(ms_real=results["gan"]["ms_ssim_real"]), HEADER[1]]
    for name, m in results.items():
        run = runs.get(name)
        lines.append(row(name, steps.get(name, "—"), run["seconds"] if run else None, m))
    f = results["real train vs real held-out (floor)"]
    best = min(families, key=lambda k: results[k]["frd"])
    b = results[best]
    lines += ["", f"Best family by FRD: **{best}**: FRD / floor FRD = **{b['frd'] / f['frd']:.2f}** (target ≤ 2), "
              f"precision **{b['precision']:.2f}** (target ≥ 0.6), recall **{b['recall']:.2f}** (target ≥ 0.3), "
              f"memorized **{100 * (b['memorized'] or 0):.1f} %** (target ≤ 5 %).", "",
              "Sample grids (left: real held-out slices, right: samples): " +
              ", ".join(f"[{k}](quality/{k}.png)" for k in families), "",
              f"### DDIM-50 vs DDPM-{budget.ddpm_steps} (latent diffusion, {sub} samples each, same seed)", "",
              "| sampler | seconds | FRD | encoder-FID | precision | recall |", "|---|---|---|---|---|---|",
              f"| DDIM-50 | {t_ddim:.1f} | {s_ddim['frd']:.3g} | {s_ddim['fid']:.3g} | {s_ddim['precision']:.2f} | {s_ddim['recall']:.2f} |",
              f"| DDPM-{budget.ddpm_steps} | {t_ddpm:.1f} | {s_ddpm['frd']:.3g} | {s_ddpm['fid']:.3g} | {s_ddpm['precision']:.2f} | {s_ddpm['recall']:.2f} |",
              "", f"DDPM-{budget.ddpm_steps} / DDIM-50 time: **{t_ddpm / max(t_ddim, 1e-9):.1f}x**; FRD DDIM / DDPM: "
              f"**{s_ddim['frd'] / max(s_ddpm['frd'], 1e-12):.2f}** (few samples: FRD/FID are noisy here).",
              "", "Training wall times (two jobs at a time, one thread each): " +
              ", ".join(f"{k} {v['seconds'] / 60:.1f} min" for k, v in runs.items()) + ".", ""]
    (work / "quality.json").write_text(json.dumps({k: {kk: vv for kk, vv in v.items()} for k, v in results.items()},
                                                  indent=2, default=str), encoding="utf-8")
    return lines, encoder


def bench_federated(work: Path, budget: Budget, data: Data) -> list[str]:
    """GAN recipe: Flower federation of 2 non-IID sites vs pooled vs each site alone, same total steps;
    and DP at epsilon 8 vs no DP (centralized). ``data`` at ``budget.fed_image_size``."""
    csvs = data.csvs
    size = budget.fed_image_size
    if "colin27_train" not in csvs:
        return ["## Federated vs centralized vs single-site (held-out)", "", "- needs Colin27 (mricron-data); skipped.", ""]
    encoder = train_run(f"eval-encoder-{size}", family_config("eval-encoder", budget, size), csvs["train"], work,
                        budget)["checkpoint"]
    s = budget.fed_steps
    batch = 32
    fed = family_config("gan", budget, size, training__max_steps=None)
    fed["federation"].update(rounds=budget.fed_rounds, local_steps=max(1, s // (2 * budget.fed_rounds)), local_epochs=1000,
                             min_sites=2)
    epochs_dp = max(1, round(s * batch / len(data.train)))
    dp = family_config("gan", budget, size, training__max_steps=s)
    dp["privacy"] = {"enabled": True, "target_epsilon": 8.0, "epochs": epochs_dp, "delta": 1e-5}
    jobs = [lambda: train_run("centralized", family_config("gan", budget, size, training__max_steps=s), csvs["train"], work, budget),
            lambda: train_run("single-mni152", family_config("gan", budget, size, training__max_steps=s), csvs["mni152_train"], work, budget),
            lambda: train_run("single-colin27", family_config("gan", budget, size, training__max_steps=s), csvs["colin27_train"], work, budget),
            lambda: flower_run("federated", fed, {"mni152": csvs["mni152_train"], "colin27": csvs["colin27_train"]}, work, budget),
            lambda: train_run("dp-eps8", dp, csvs["train"], work, budget)]
    runs = {r["name"]: r for r in run_parallel(jobs)}
    sets = {"pooled held-out": data.held_out, **{f"{k} held-out": v for k, v in data.site_held_out.items()}}
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for name, run in runs.items():
        images, _ = sample_checkpoint(run["checkpoint"], budget.samples)
        results[name] = {label: score(real, images, encoder, data.train, name) for label, real in sets.items()}
    floors = {label: floor(data, real, budget.samples, encoder) for label, real in sets.items()}
    lines = ["## Federated vs centralized vs single-site, and DP (held-out)", "",
             f"GAN recipe at {size}x{size}, {s} optimiser steps in total in every setting "
             f"(federated: Flower, TLS + node authentication on 127.0.0.1, {budget.fed_rounds} rounds x "
             f"{fed['federation']['local_steps']} local steps at each of 2 sites, one brain per site: MNI152 and Colin27). "
             f"{budget.samples} samples per model (server EMA for the federation), scored on each held-out set. "
             "DP: example-level DP-SGD on the discriminator, `target_epsilon: 8`, delta 1e-5, centralized, R1 off under DP.", ""]
    for label in sets:
        lines += [f"### scored on {label}", "", HEADER[0].format(ms_real=floors[label]["ms_ssim_real"]), HEADER[1],
                  row("real train vs real held-out (floor)", "—", None, floors[label])]
        for name in ("centralized", "federated", "single-mni152", "single-colin27", "dp-eps8"):
            lines.append(row(name, s, runs[name]["seconds"], results[name][label]))
        lines.append("")
    c, f_ = results["centralized"]["pooled held-out"], results["federated"]["pooled held-out"]
    lines.append(f"- federated / centralized FRD (pooled held-out): **{f_['frd'] / c['frd']:.2f}** (target ≤ 1.15); "
                 f"encoder-FID ratio **{f_['fid'] / c['fid']:.2f}**.")
    for site, other in (("mni152", "colin27"), ("colin27", "mni152")):
        label = f"{other} held-out"
        if label in results["federated"]:
            single = results[f"single-{site}"][label]["frd"]
            lines.append(f"- on {other}'s held-out data: federated FRD {results['federated'][label]['frd']:.3g} vs "
                         f"{site}-only {single:.3g} → ratio **{results['federated'][label]['frd'] / single:.2f}** (< 1: federated better).")
    d = results["dp-eps8"]["pooled held-out"]
    eps = _epsilon(runs["dp-eps8"]["checkpoint"])
    lines += [f"- DP (spent ε = {eps}) / no DP FRD: **{d['frd'] / c['frd']:.2f}**; encoder-FID ratio **{d['fid'] / c['fid']:.2f}**.",
              "", "Wall times (two jobs at a time): " + ", ".join(f"{k} {v['seconds'] / 60:.1f} min" for k, v in runs.items()) + ".", ""]
    return lines


def _epsilon(ckpt: Path) -> str:
    from fedsynth.checkpoint import checkpoint_info

    eps = checkpoint_info(ckpt).get("privacy_epsilon")
    return "n/a" if eps is None else f"{eps:.2f}"


def bench_text(work: Path, budget: Budget, data: Data, grids_dir: Path) -> list[str]:
    """Text-conditioned latent diffusion (prompts from the slices' metadata): prompt adherence read
    back by a classifier trained on real training slices, against its ceiling on real held-out
    slices and a shuffled-prompt control; distribution metrics against the held-out slices."""
    from fedsynth.data.manifest import read_manifest
    from fedsynth.metrics.adherence import PromptReader, shuffled

    size = budget.text_image_size
    csvs = data.csvs
    train_prompts = [r.prompt or "" for r in read_manifest(csvs["train"])]
    held_prompts = [r.prompt or "" for r in read_manifest(csvs["held_out"])]
    from fedsynth.config import default_config

    cfg = default_config("diffusion", 2, size, latent=True, text=True).to_dict()
    cfg["model"]["first_stage_steps"] = budget.text_first_stage_steps
    # no left-right flip: a mirrored sagittal slice is not anatomy the prompts describe
    cfg["data"]["augmentations"] = []
    cfg["training"].update(max_steps=budget.text_steps, epochs=10**6, progress=False, tensorboard=False,
                           sample_every=10**6)
    enc_cfg = family_config("eval-encoder", budget, size)
    ldm, enc = run_parallel([lambda: train_run("text-ldm", cfg, csvs["train"], work, budget),
                             lambda: train_run(f"eval-encoder-text-{size}", enc_cfg, csvs["train"], work, budget)])
    encoder = enc["checkpoint"]
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.perf_counter()
    reader = PromptReader.fit(data.train.images, train_prompts, steps=budget.reader_steps)
    reader_seconds = time.perf_counter() - t0
    n = min(budget.samples, len(held_prompts))
    prompts = held_prompts[:n] if n == len(held_prompts) else [held_prompts[i] for i in
                                                             np.random.default_rng(0).choice(len(held_prompts), n, replace=False)]
    rows: list[tuple[str, Any, dict[str, Any] | None]] = []
    ceiling = reader.score(data.held_out.images, held_prompts)
    rows.append(("real held-out slices (reader ceiling; FRD etc.: train vs held-out floor)", ceiling,
                 floor(data, data.held_out, budget.samples, encoder)))
    samples: dict[float, np.ndarray] = {}
    for scale in (1.0, 3.0):
        images, _ = sample_checkpoint(ldm["checkpoint"], n, prompts=prompts, guidance_scale=scale)
        samples[scale] = images
        rows.append((f"text LDM, guidance {scale:g}", reader.score(images, prompts),
                     score(data.held_out, images, encoder, data.train, f"text-g{scale:g}")))
    rows.append(("control: guidance-3 samples vs shuffled prompts", reader.score(samples[3.0], shuffled(prompts)), None))
    rows.append(("control: real held-out vs shuffled prompts (chance)",
                 reader.score(data.held_out.images, shuffled(held_prompts)), None))
    grid_prompts = _grid_prompts(held_prompts, 8)
    grid_path = grids_dir / "text_ldm_prompts.png"
    _prompt_grid(reader, ldm["checkpoint"], grid_prompts, data, held_prompts, grid_path)

    g1, g3 = rows[1][1], rows[2][1]
    lines = ["## Text conditioning: prompt adherence (held-out)", "",
             f"Text-conditioned latent diffusion (`init-config --family diffusion --latent --conditioning text`, "
             f"{size}x{size}, first stage {budget.text_first_stage_steps} steps, UNet + text encoder "
             f"{budget.text_steps} steps, prompt dropout 0.1, no flip augmentation) trained on the training split; "
             f"prompts are `plane T1 slice, position, volume` from `fedsynth build-dataset` "
             f"({len(set(train_prompts))} distinct prompts). {n} samples, one per held-out slice's prompt (DDIM-50).", "",
             f"Adherence: a MONAI `Classifier` trained {budget.reader_steps} steps ({reader_seconds:.0f} s) on the "
             "*real training* slices reads each image's prompt back; a sample adheres when the read prompt is its "
             "prompt (exact) or matches attribute by attribute. Its accuracy on *real held-out* slices is the ceiling; "
             "shuffled prompts give chance. Distribution metrics as in the quality table (held-out slices, "
             "evaluation autoencoder encoder).", "",
             "| images | exact ↑ | plane ↑ | position ↑ | volume ↑ | FRD ↓ | encoder-FID ↓ | precision ↑ | recall ↑ |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, agree, m in rows:
        a = agree.per_attribute + [float("nan")] * (3 - len(agree.per_attribute))
        dist = ("— | — | — | —" if m is None else
                f"{m['frd']:.3g} | {m['fid']:.3g} | {m['precision']:.2f} | {m['recall']:.2f}")
        lines.append(f"| {name} | {agree.exact:.2f} | {a[0]:.2f} | {a[1]:.2f} | {a[2]:.2f} | {dist} |")
    lines += ["", f"- exact adherence / reader ceiling: guidance 1 **{g1.exact / max(ceiling.exact, 1e-9):.2f}**, "
              f"guidance 3 **{g3.exact / max(ceiling.exact, 1e-9):.2f}**; shuffled-prompt control "
              f"**{rows[3][1].exact / max(ceiling.exact, 1e-9):.2f}**.",
              "- grid: [quality/text_ldm_prompts.png](quality/text_ldm_prompts.png) — one row per prompt, left 4 real "
              "held-out slices with that prompt, right 4 samples (guidance 3). Rows: " +
              "; ".join(f"{i + 1}. `{p}`" for i, p in enumerate(grid_prompts)),
              f"- training wall time: {ldm['seconds'] / 60:.1f} min (first stage + UNet, one thread).", ""]
    return lines


def _grid_prompts(prompts: list[str], k: int) -> list[str]:
    """``k`` distinct prompts spread evenly over the list sorted by plane (every plane appears)."""
    distinct = sorted(set(prompts), key=lambda p: (p.split(",")[0], p))
    step = max(1, len(distinct) // k)
    return distinct[::step][:k]


def _prompt_grid(reader: Any, ckpt: Path, prompts: list[str], data: Data, held_prompts: list[str], path: Path) -> Path:
    from fedsynth.data.images import save_image
    from fedsynth.generation import image_grid

    tiles = []
    for p in prompts:
        real = data.held_out.images[[i for i, q in enumerate(held_prompts) if q == p][:4]]
        if len(real) < 4:
            real = np.concatenate([real, np.zeros((4 - len(real), *data.held_out.images.shape[1:]), np.float32)])
        syn, _ = sample_checkpoint(ckpt, 4, prompts=[p], guidance_scale=3.0)
        tiles += [real, syn.astype(np.float32)]
    grid = image_grid(np.concatenate(tiles), columns=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path
