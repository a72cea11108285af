"""The ``fedsynth evaluate`` sub-command."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedsynth.commands import command, examples
from fedsynth.errors import FedsynthError
from fedsynth.io import check_new_file
from fedsynth.progress import Stages


@command("evaluate")
def _evaluate(args: argparse.Namespace) -> None:
    from fedsynth.metrics.evaluate import FIGURE, EvaluationOptions, evaluate, evaluation_stages, write_report
    from fedsynth.metrics.utility import UtilityOptions

    if args.bin_count < 2:
        raise FedsynthError(f"--bin-count must be >= 2, got {args.bin_count}")
    if not 0 < args.copy_threshold < 10:
        raise FedsynthError(f"--copy-threshold must be in (0, 10), got {args.copy_threshold}")
    if args.bootstrap < 0:
        raise FedsynthError(f"--bootstrap must be >= 0 (0: no intervals), got {args.bootstrap}")
    if args.utility_steps < 1:
        raise FedsynthError(f"--utility-steps must be >= 1, got {args.utility_steps}")
    if args.utility and not args.train:
        raise FedsynthError("--utility needs --train (the real training CSV: the classifier trained on it is the ceiling)")
    check_new_file(args.output, "-o", overwrite=args.overwrite)  # before hours of scoring, not after
    if args.png:
        check_new_file(args.png, "--png", overwrite=args.overwrite)
    utility = UtilityOptions(label=args.utility_label, steps=args.utility_steps) if args.utility else None
    options = EvaluationOptions(bin_count=args.bin_count, encoder=args.encoder, checkpoint=args.checkpoint,
                                train_csv=args.train, copy_threshold=args.copy_threshold, bootstrap=args.bootstrap,
                                seed=args.seed, utility=utility)
    # one progress display: each stage's bar with its total and ETA (on stderr); the wall time ends the command
    stages = Stages("evaluate", evaluation_stages(options, figure=bool(args.png)))
    report, real, synthetic = evaluate(args.real, args.synthetic, options, config_path=args.config, stages=stages)
    write_report(report, args.output)
    if args.png:
        from fedsynth.metrics.plots import write_png

        with stages.stage(FIGURE, 1, unit="figure") as tick:
            write_png(report, real, synthetic, Path(args.png), bin_count=args.bin_count)
            tick(1)
    print(summary_text(report))
    _print_sources(args)
    print(f"wrote {args.output}" + (f" and {args.png}" if args.png else ""))


def _print_sources(args: argparse.Namespace) -> None:
    """Name the models behind the numbers: the autoencoder checkpoint used, and the checkpoint, weights
    and sampler that made the synthetic images (their folder's ``generation.json``)."""
    import json

    from fedsynth.generation import describe_checkpoint

    if args.checkpoint:
        from fedsynth.checkpoint import load_checkpoint

        payload = load_checkpoint(args.checkpoint)
        print(f"autoencoder checkpoint: {describe_checkpoint({**payload, 'path': args.checkpoint})}, "
              f"{'EMA' if payload.get('ema') else 'raw'} weights")
    record = Path(args.synthetic) / "generation.json"
    if record.is_file():
        made = json.loads(record.read_text(encoding="utf-8"))
        if "checkpoint" in made:
            print(f"synthetic images made from {describe_checkpoint(made['checkpoint'])}, {made.get('weights')} weights, "
                  f"seed {made.get('seed')}" + (f", {made['sampler']} {made['sampling_steps']} steps" if made.get("sampler") else ""))


#: how the printed summary names each metric
_LABELS = {"encoder_fid": "encoder-FID", "kid": "KID", "frd": "FRD", "mean_ks_statistic": "mean KS",
           "mean_wasserstein": "mean W1", "precision": "precision", "recall": "recall", "density": "density",
           "coverage": "coverage"}


def _ci(pair: list[float | None] | None) -> str:
    return f"[{pair[0]:.3g}, {pair[1]:.3g}]" if pair and None not in pair else "[-]"


def summary_text(report: dict[str, Any]) -> str:
    """The printed summary: per metric the gap to the real-vs-real floor first, then the values."""
    summary = report["summary"]
    boot = summary["bootstrap"]
    counts = boot["counts"]
    lines = [f"{counts['synthetic']} synthetic vs {counts['real']} held-out real images; 95 % intervals from "
             f"{boot['replicates']} bootstrap replicates" + (f"; floor: {counts['floor']} real training images "
                                                              f"({summary['floor']['source']})" if summary["floor"] else
                                                              "; no floor (pass --train)")]
    has_floor = summary["floor"] is not None
    lines.append(f"{'metric':<18} {'gap to floor [95% CI]':<30} {'synthetic [95% CI]':<30} {'floor [95% CI]':<30} better"
                 if has_floor else f"{'metric':<18} {'synthetic [95% CI]':<30} better")
    for key, m in summary["metrics"].items():
        name = _LABELS.get(key, key)
        value = f"{m['value']:.4g} {_ci(m['ci95'])}" if m["value"] is not None else "-"
        if has_floor:
            gap = f"{m['gap']:+.4g} {_ci(m['gap_ci95'])}" if m["gap"] is not None else "-"
            floor = f"{m['floor']:.4g} {_ci(m['floor_ci95'])}" if m["floor"] is not None else "-"
            lines.append(f"{name:<18} {gap:<30} {value:<30} {floor:<30} {m['better']}")
        else:
            lines.append(f"{name:<18} {value:<30} {m['better']}")
    if "utility" in report:
        u = report["utility"]
        arms = ", ".join(f"{k} {v['balanced_accuracy']['value']:.3f} {_ci(v['balanced_accuracy']['ci95'])}"
                         for k, v in u["arms"].items())
        gap = u["balanced_accuracy_gap_to_real_same_count"]
        lines.append(f"utility ({u['task']['label']}, {u['task']['classes']} classes, chance "
                     f"{u['task']['chance_balanced_accuracy']:.2f}): balanced accuracy on held-out real: {arms}; "
                     f"synthetic - same-count real {gap['value']:+.3f} {_ci(gap['ci95'])}")
    mem = report["memorization"]
    lines.append(f"near-copies {mem['near_copies']} of {report['synthetic']['count']}; "
                 f"MS-SSIM synthetic {report['diversity']['ms_ssim_synthetic']['mean']:.3f} vs real "
                 f"{report['diversity']['ms_ssim_real']['mean']:.3f}")
    return "\n".join(lines)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``fedsynth evaluate``."""
    p = subparsers.add_parser("evaluate", help="score synthetic images against real ones (FRD, encoder-FID, KID, PRDC, "
                                               "MS-SSIM diversity, memorization)", **examples(
        "fedsynth evaluate --real brains/held_out.csv --synthetic samples -o report.json --png report.png",
        "fedsynth evaluate --real held_out.csv --synthetic samples --train train.csv -o report.json   (with the floor)",
        "fedsynth evaluate --real held_out.csv --synthetic samples --encoder autoencoder --checkpoint runs/ae/last.ckpt "
        "-o report.json"))
    p.add_argument("--real", required=True, help="CSV manifest of real images")
    p.add_argument("--synthetic", required=True, help="folder of synthetic images (e.g. from fedsynth generate) or a CSV")
    p.add_argument("-o", "--output", required=True, help="report JSON")
    p.add_argument("--png", default=None, help="also write sample grids and feature histograms here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report (-o) or figure (--png)")
    p.add_argument("--config", default=None, help="experiment config giving image_size/normalisation (default: "
                                                  "the checkpoint's, else inferred from the first real image)")
    p.add_argument("--checkpoint", default=None, help="autoencoder checkpoint: reconstruction SSIM/PSNR on the real "
                                                      "images (and the encoder for --encoder autoencoder)")
    p.add_argument("--encoder", choices=["random-conv", "autoencoder"], default="random-conv",
                   help="feature encoder for encoder-FID/KID/PRDC")
    p.add_argument("--train", default=None, help="CSV of the training images: the real-vs-real floor (training vs "
                                                 "--real images) and memorization (default for memorization: --real)")
    p.add_argument("--bin-count", type=int, default=32, help="radiomics intensity bins (images are in [0, 1])")
    p.add_argument("--copy-threshold", type=float, default=0.5,
                   help="flag a synthetic image whose nearest-training distance is below this fraction of the "
                        "median real-vs-real nearest distance")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates for the 95 %% intervals (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap, the floor subset and the utility classifiers")
    p.add_argument("--utility", action="store_true", help="train on synthetic, test on real: a small MONAI classifier "
                                                          "trained on the synthetic images vs on real ones (needs --train "
                                                          "and labels)")
    p.add_argument("--utility-label", default="Label", metavar="NAME",
                   help="label column for --utility: Label_NAME, else NAME (build-dataset writes Label_plane and "
                        "Label_plane_third); a synthetic manifest without it uses its Label")
    p.add_argument("--utility-steps", type=int, default=300, help="classifier training steps per arm")
