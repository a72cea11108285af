"""The ``fedsynth evaluate`` sub-command."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsynth.commands import command
from fedsynth.errors import FedsynthError


@command("evaluate")
def _evaluate(args: argparse.Namespace) -> None:
    from fedsynth.metrics.evaluate import EvaluationOptions, evaluate, write_report

    if args.bin_count < 2:
        raise FedsynthError(f"--bin-count must be >= 2, got {args.bin_count}")
    if not 0 < args.copy_threshold < 10:
        raise FedsynthError(f"--copy-threshold must be in (0, 10), got {args.copy_threshold}")
    options = EvaluationOptions(bin_count=args.bin_count, encoder=args.encoder, checkpoint=args.checkpoint,
                                train_csv=args.train, copy_threshold=args.copy_threshold)
    report, real, synthetic = evaluate(args.real, args.synthetic, options, config_path=args.config)
    write_report(report, args.output)
    if args.png:
        from fedsynth.metrics.plots import write_png

        write_png(report, real, synthetic, Path(args.png), bin_count=args.bin_count)
    rad = report["radiomics"]
    print(f"FRD {rad['frd']:.4g} ({rad['frd_features']} features, {rad['backend']}); "
          f"encoder-FID {report['encoder_fid']:.4g} ({report['encoder']['name']}); KID {report['kid']['mean']:.4g}; "
          f"precision {report['precision']:.2f} recall {report['recall']:.2f} density {report['density']:.2f} "
          f"coverage {report['coverage']:.2f}; near-copies {report['memorization']['near_copies']}")
    print(f"wrote {args.output}" + (f" and {args.png}" if args.png else ""))


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``fedsynth evaluate``."""
    p = subparsers.add_parser("evaluate", help="score synthetic images against real ones (FRD, encoder-FID, KID, PRDC, "
                                               "MS-SSIM diversity, memorization)")
    p.add_argument("--real", required=True, help="CSV manifest of real images")
    p.add_argument("--synthetic", required=True, help="folder of synthetic images (e.g. from fedsynth generate) or a CSV")
    p.add_argument("-o", "--output", required=True, help="report JSON")
    p.add_argument("--png", default=None, help="also write sample grids and feature histograms here")
    p.add_argument("--config", default=None, help="experiment config giving image_size/normalisation (default: "
                                                  "the checkpoint's, else inferred from the first real image)")
    p.add_argument("--checkpoint", default=None, help="autoencoder checkpoint: reconstruction SSIM/PSNR on the real "
                                                      "images (and the encoder for --encoder autoencoder)")
    p.add_argument("--encoder", choices=["random-conv", "autoencoder"], default="random-conv",
                   help="feature encoder for encoder-FID/KID/PRDC")
    p.add_argument("--train", default=None, help="CSV of the training images for memorization (default: --real)")
    p.add_argument("--bin-count", type=int, default=32, help="radiomics intensity bins (images are in [0, 1])")
    p.add_argument("--copy-threshold", type=float, default=0.5,
                   help="flag a synthetic image whose nearest-training distance is below this fraction of the "
                        "median real-vs-real nearest distance")
