"""``evaluate``: every metric on a real and a synthetic image set, as one JSON-able report."""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedsynth.config import ExperimentConfig
from fedsynth.errors import FedsynthError
from fedsynth.io import atomic_write_text
from fedsynth.metrics import features as feat
from fedsynth.metrics import intervals, stats
from fedsynth.metrics import radiomics as rad
from fedsynth.metrics.images import ImageSet, check_pair, infer_config, real_records, stack, synthetic_records
from fedsynth.metrics.similarity import memorization, memorization_share, pairwise_ms_ssim, reconstruction_quality
from fedsynth.metrics.utility import UtilityOptions
from fedsynth.progress import Stages

if TYPE_CHECKING:
    from fedsynth.models.autoencoder import AutoencoderModel

#: which way is better, for readers of the report
DIRECTIONS = {
    "frd": "lower", "encoder_fid": "lower", "kid": "lower", "precision": "higher", "recall": "higher",
    "density": "higher (about 1 when matched)", "coverage": "higher", "mean_ks_statistic": "lower",
    "mean_wasserstein": "lower", "ms_ssim_synthetic": "close to ms_ssim_real (much higher = mode collapse)",
}


@dataclass
class EvaluationOptions:
    """What to compute and with which settings."""

    bin_count: int = 32
    encoder: str = "random-conv"  # or "autoencoder" (needs checkpoint)
    checkpoint: str | None = None  # autoencoder checkpoint: reconstructions (+ encoder)
    train_csv: str | None = None  # training images for memorization (default: the real set)
    copy_threshold: float = 0.5
    max_pairs: int = 300
    use_pyradiomics: bool | None = None  # None = if installed
    seed: int = 0
    bootstrap: int = 200  # percentile-bootstrap replicates for the 95 % intervals (0: no intervals)
    utility: UtilityOptions | None = None  # train-on-synthetic, test-on-real (needs labels and a training set)


#: the stages of an evaluation as its progress display names them, in order
LOADING = "loading images"
RADIOMICS = "radiomic features (FRD, KS, W1)"
ENCODER = "encoder features (FID, KID, PRDC)"
INTERVALS = "bootstrap intervals"
DIVERSITY = "diversity (MS-SSIM)"
MEMORIZATION = "memorization"
RECONSTRUCTION = "reconstructions (SSIM, PSNR)"
UTILITY = "utility classifiers"
FIGURE = "figure"


def evaluation_stages(options: EvaluationOptions, *, loading: bool = True, figure: bool = False) -> list[str]:
    """The stages an evaluation with ``options`` goes through: ``loading`` the image files first
    (:func:`evaluate`; :func:`evaluate_sets` gets them loaded), a ``figure`` last (``--png``)."""
    names = [LOADING] if loading else []
    names += [RADIOMICS, ENCODER] + ([INTERVALS] if options.bootstrap > 0 else []) + [DIVERSITY, MEMORIZATION]
    names += ([RECONSTRUCTION] if options.checkpoint else []) + ([UTILITY] if options.utility is not None else [])
    return names + ([FIGURE] if figure else [])


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _load_autoencoder(path: str) -> AutoencoderModel:
    from fedsynth.models import model_from_checkpoint
    from fedsynth.models.autoencoder import AutoencoderModel

    model = model_from_checkpoint(path, device="cpu")
    if not isinstance(model, AutoencoderModel):
        raise FedsynthError(f"--checkpoint {path}: a {model.config.family} checkpoint; reconstruction metrics and the "
                            "autoencoder encoder need an autoencoder checkpoint")
    model.eval()
    return model


def evaluate_sets(real: ImageSet, synthetic: ImageSet, options: EvaluationOptions | None = None,
                  train: ImageSet | None = None, *, stages: Stages | None = None) -> dict[str, Any]:
    """Compute the report for already loaded image sets (see :func:`evaluate` for files).

    ``stages``: the progress display (:func:`evaluation_stages`); none is shown by default."""
    opt = options or EvaluationOptions()
    check_pair(real, synthetic)
    shown = stages or Stages("evaluate", evaluation_stages(opt, loading=False), enabled=False)
    started = time.perf_counter()
    spatial_dims = real.images.ndim - 2
    notes: list[str] = []
    report: dict[str, Any] = {
        "real": {"source": real.source, "count": len(real), "shape": list(real.images.shape[1:])},
        "synthetic": {"source": synthetic.source, "count": len(synthetic), "shape": list(synthetic.images.shape[1:])},
        "directions": DIRECTIONS,
    }
    if min(len(real), len(synthetic)) < 20:
        notes.append(f"few images ({len(real)} real, {len(synthetic)} synthetic): distribution metrics are noisy; "
                     "compare runs evaluated with the same counts")

    floor_rows = intervals.floor_subset(len(train), len(synthetic), opt.seed) if train is not None else None
    floor_images = train.images[floor_rows] if train is not None and floor_rows is not None else None
    featurised = len(real) + len(synthetic) + (len(floor_images) if floor_images is not None else 0)

    # radiomics
    use_pr = opt.use_pyradiomics if opt.use_pyradiomics is not None else not rad.backend().startswith("numpy")
    with shown.stage(RADIOMICS, featurised) as tick:
        names, real_f, real_failed = rad.extract(real.images, opt.bin_count, use_pr, tick)
        syn_names, syn_f, syn_failed = rad.extract(synthetic.images, opt.bin_count, use_pr, tick)
        syn_f = _aligned(names, syn_names, syn_f)
        frd_value, n_used = rad.frd(real_f, syn_f)
        floor_f = _aligned(names, *rad.extract(floor_images, opt.bin_count, use_pr, tick)[:2]) \
            if floor_images is not None else None
        comparison = rad.per_feature(names, real_f, syn_f)
    report["radiomics"] = {
        "backend": rad.backend() if use_pr else "numpy (IBSI first-order)",
        "bin_count": opt.bin_count,
        "frd": frd_value,
        "frd_features": n_used,
        "frd_definition": "Fréchet distance of radiomic features z-scored with the real set's mean/std (FRDv1 "
                          "normalisation; original image, whole-image mask)",
        "failed_extractions": {"real": real_failed, "synthetic": syn_failed},
        "first_order": comparison,
        "mean_ks_statistic": float(np.mean([v["ks_statistic"] for v in comparison.values()])),
        "mean_wasserstein": float(np.mean([v["wasserstein"] for v in comparison.values()])),
    }
    if not use_pr:
        notes.append("pyradiomics-bhklab not installed: FRD uses first-order features only (pip install fedsynth[eval])")

    # encoder features
    if opt.encoder == "autoencoder":
        if not opt.checkpoint:
            raise FedsynthError("--encoder autoencoder needs --checkpoint (an autoencoder checkpoint trained on real data)")
    elif opt.encoder != "random-conv":
        raise FedsynthError(f"unknown encoder '{opt.encoder}': expected 'random-conv' or 'autoencoder'")
    with shown.stage(ENCODER, featurised) as tick:
        encoder: torch.nn.Module = (feat.AutoencoderEncoder(_load_autoencoder(opt.checkpoint), opt.checkpoint)
                                    if opt.encoder == "autoencoder" and opt.checkpoint else
                                    feat.RandomConvEncoder(spatial_dims, real.images.shape[1]))
        real_raw = feat.embed(encoder, real.images, tick=tick)  # encoders run once
        syn_raw = feat.embed(encoder, synthetic.images, tick=tick)
        floor_raw = feat.embed(encoder, floor_images, tick=tick) if floor_images is not None else None
        real_e, syn_e = feat.standardize(real_raw, syn_raw)
        kid_mean, kid_std = feat.kid(real_e, syn_e, seed=opt.seed)
        fid = feat.frechet_distance(real_e, syn_e)
        prdc = feat.prdc(real_e, syn_e)
    report["encoder"] = {"name": encoder.name, "description": encoder.description, "feature_dim": int(real_e.shape[1]),
                         "standardized": "features z-scored with the real set's mean/std before FID/KID/PRDC"}
    report["encoder_fid"] = fid
    report["kid"] = {"mean": kid_mean, "std": kid_std}
    report.update(prdc)

    # intervals, the real-vs-real floor and the gap to it, all from the features extracted above
    floor = intervals.Features(floor_f, floor_raw) if floor_f is not None and floor_raw is not None else None
    first_order = [j for j, n in enumerate(names) if "firstorder_" in n]
    with (shown.stage(INTERVALS, opt.bootstrap, unit="replicate") if opt.bootstrap > 0 else nullcontext(None)) as tick:
        summary = intervals.summary(intervals.Features(real_f, real_raw), intervals.Features(syn_f, syn_raw), first_order,
                                    floor=floor, replicates=opt.bootstrap, seed=opt.seed, tick=tick)
    summary["floor"] = ({"source": train.source, "count": len(floor_rows), "of": len(train),
                         "definition": "training images vs the held-out real images, the same metrics at the "
                                       "synthetic count (a seeded random subset of the training images)"}
                        if train is not None and floor_rows is not None else None)
    if train is None:
        notes.append("no --train: no real-vs-real floor; a metric alone does not say how close to real data is")

    # diversity
    pairs = [min(opt.max_pairs, n * (n - 1) // 2) for n in (len(synthetic), len(real))]
    with shown.stage(DIVERSITY, sum(pairs), unit="pair") as tick:
        report["diversity"] = {"ms_ssim_synthetic": pairwise_ms_ssim(synthetic.images, opt.max_pairs, opt.seed, tick),
                               "ms_ssim_real": pairwise_ms_ssim(real.images, opt.max_pairs, opt.seed, tick)}

    # memorization: nearest neighbours, their intervals, the share nearer than held-out images
    reference = train or real
    with shown.stage(MEMORIZATION, 1 + (opt.bootstrap > 0) + (train is not None), unit="step") as tick:
        report["memorization"] = {"training_source": reference.source,
                                  **memorization(reference.images, synthetic.images, reference.ids, opt.copy_threshold)}
        tick(1)
        ratios = np.asarray(report["memorization"]["ratios"])
        if opt.bootstrap > 0:
            draws = stats.bootstrap(lambda i: {"near": float((ratios[i] < opt.copy_threshold).mean()),
                                               "closer": float((ratios[i] < 1.0).mean())}, [len(ratios)], opt.bootstrap, opt.seed)
            report["memorization"]["near_copy_fraction_ci95"] = stats.interval(draws["near"])
            report["memorization"]["closer_than_real_fraction_ci95"] = stats.interval(draws["closer"])
            tick(1)
        if train is not None:  # real = held-out images: the share of samples closer to training data than real data gets
            report["memorization"]["nearer_than_held_out"] = memorization_share(train.images, real.images, synthetic.images)
            tick(1)

    # autoencoder reconstructions
    if opt.checkpoint:
        with shown.stage(RECONSTRUCTION, len(real)) as tick:
            model = _load_autoencoder(opt.checkpoint)
            report["reconstruction"] = {"checkpoint": opt.checkpoint, **reconstruction_quality(model, real.images, tick=tick)}

    if opt.utility is not None:
        from fedsynth.metrics.utility import ARMS, utility

        if train is None:
            raise FedsynthError("--utility needs --train: the real training images are the ceiling it is compared with")
        with shown.stage(UTILITY, len(ARMS) * opt.utility.steps, unit="step") as tick:
            report["utility"] = utility(train, synthetic, real, opt.utility, replicates=opt.bootstrap, seed=opt.seed,
                                        tick=tick)
        summary["utility"] = {k: report["utility"]["arms"][k]["balanced_accuracy"] for k in report["utility"]["arms"]}

    report["notes"] = notes
    report["seconds"] = time.perf_counter() - started
    return _clean({"summary": summary, **report})


def _aligned(names: list[str], got: list[str], matrix: np.ndarray) -> np.ndarray:
    """Radiomic columns in the order of ``names`` (failed extractions can drop names; missing ones are NaN)."""
    if got == names:
        return matrix
    index = {n: i for i, n in enumerate(got)}
    return np.stack([matrix[:, index[n]] if n in index else np.full(len(matrix), np.nan) for n in names], 1)


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/Inf to None."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return _finite(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


def evaluate(real_csv: str, synthetic: str, options: EvaluationOptions | None = None, *,
             config_path: str | None = None, stages: Stages | None = None) -> tuple[dict[str, Any], ImageSet, ImageSet]:
    """Load both sets through the data pipeline and compute the report; returns ``(report, real, synthetic)``.

    ``stages``: the progress display (:func:`evaluation_stages`); none is shown by default."""
    opt = options or EvaluationOptions()
    shown = stages or Stages("evaluate", evaluation_stages(opt), enabled=False)
    if config_path is None and opt.checkpoint:
        from fedsynth.checkpoint import load_checkpoint
        from fedsynth.config import config_from_dict

        config: ExperimentConfig = config_from_dict(load_checkpoint(opt.checkpoint)["config"], opt.checkpoint)
    else:
        config = infer_config(real_csv, config_path)
    sets = [(real_records(real_csv, config), str(real_csv)), (synthetic_records(synthetic, config), str(synthetic))]
    if opt.train_csv:
        sets.append((real_records(opt.train_csv, config), str(opt.train_csv)))
    with shown.stage(LOADING, sum(len(records) for records, _ in sets)) as tick:
        real, syn, *rest = [stack(records, config, source, tick) for records, source in sets]
    train = rest[0] if rest else None
    report = evaluate_sets(real, syn, opt, train, stages=shown)
    report["preprocessing"] = {"spatial_dims": config.spatial_dims, "image_size": list(config.image_size),
                               "channels": config.channels, "normalization": config.data.normalization,
                               "resize_mode": config.data.resize_mode,
                               "config": config_path or (opt.checkpoint and f"{opt.checkpoint} (checkpoint)") or "inferred from the first real image"}
    return report, real, syn


def write_report(report: dict[str, Any], path: str | Path) -> None:
    """Write the report as indented JSON, atomically."""

    atomic_write_text(Path(path), json.dumps(report, indent=2, allow_nan=False) + "\n")
