"""The ``fedsynth`` command line. Each sub-command is a thin call into the library.

User errors (:class:`FedsynthError`) are printed as one line-block without a traceback and
exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fedsynth.commands import COMMANDS, command
from fedsynth.errors import FedsynthError
from fedsynth.data.manifest import construct_csv
from fedsynth.errors import CheckpointError
from fedsynth.families import families, family
from fedsynth.families import family_names
from fedsynth.io import atomic_write_text, check_output_path

#: modules that add sub-commands: each defines ``add_commands(subparsers)`` and uses ``@command``
_EXTENSIONS: list[str] = ["fedsynth.pki", "fedsynth.federated.cli", "fedsynth.metrics.cli", "fedsynth.federated.templates"]


# --------------------------------------------------------------------------- core commands


def _at_least(flag: str, value: int | float | None, minimum: int | float) -> None:
    if value is not None and value < minimum:
        raise FedsynthError(f"{flag} must be >= {minimum}, got {value}")


@command("init-config")
def _init_config(args: argparse.Namespace) -> None:
    from fedsynth.config import default_config, render_yaml

    out = check_output_path(args.output, folder=False)
    if out.exists() and not args.overwrite:
        raise FedsynthError(f"-o {out}: the file exists; pass --overwrite to replace it")
    _at_least("--image-size", args.image_size, 8)
    _at_least("--channels", args.channels, 1)
    _at_least("--num-classes", args.num_classes, 0)
    if args.conditioning == "class" and args.num_classes < 2:
        raise FedsynthError("--conditioning class needs --num-classes N (N >= 2: the number of Label values)")
    if args.conditioning != "class" and args.num_classes:
        if args.conditioning == "text":
            raise FedsynthError("--conditioning text and --num-classes exclude each other (put the class into the prompt)")
        args.conditioning = "class"
    spec = family(args.family)
    if args.conditioning not in spec.conditioning:
        flag = "--num-classes" if args.conditioning == "class" else f"--conditioning {args.conditioning}"
        able = [name for name, f in families().items() if args.conditioning in f.conditioning]
        raise FedsynthError(f"{flag}: the {args.family} family supports --conditioning {' / '.join(spec.conditioning)} "
                            f"only ({args.conditioning}: {', '.join(able) or 'no family'})")
    cfg = default_config(args.family, args.spatial_dims, args.image_size, args.channels, args.num_classes,
                         args.latent, text=args.conditioning == "text")
    atomic_write_text(out, render_yaml(cfg))
    print(f"wrote {args.output}")


@command("construct-csv")
def _construct_csv(args: argparse.Namespace) -> None:
    n = construct_csv(args.input_dir, args.output, channel_ids=args.channels_id, labels_from_folders=args.labels_from_folders)
    print(f"wrote {args.output} ({n} rows)")


@command("train")
def _train(args: argparse.Namespace) -> None:
    from fedsynth.local import TrainRequest, train

    _at_least("--devices", args.devices, 1)
    _at_least("--epochs", args.epochs, 1)
    check_output_path(args.output, folder=True)
    train(TrainRequest(args.config, args.data, args.output, args.val_data, args.epochs, args.resume, args.devices,
                       overwrite=args.overwrite))
    print(f"run written to {args.output}")


@command("generate")
def _generate(args: argparse.Namespace) -> None:
    import torch

    from fedsynth.models import model_from_checkpoint
    from fedsynth.engine import BEST, LAST, resolve_device
    from fedsynth.generation import sample, write_images

    _at_least("-n/--num-images", args.num_images, 1)
    _at_least("--steps", args.steps, 1)
    _at_least("--guidance-scale", args.guidance_scale, 0)
    check_output_path(args.output, folder=True)
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        run = Path(args.run)
        ckpt = run / BEST if (run / BEST).is_file() else run / LAST
        if not ckpt.is_file():
            raise CheckpointError(f"no checkpoint in run folder {run} (looked for {BEST} and {LAST}); train first or pass --checkpoint")
    prompts = _prompts(args)
    model = model_from_checkpoint(ckpt, device=resolve_device(args.device), weights=args.weights)
    labels = torch.tensor([args.label]) if args.label is not None else None
    if args.format == "png" and model.spatial_dims != 2:
        raise FedsynthError(f"--format png: {ckpt} is a {model.spatial_dims}D model; PNG holds 2D images, use nii.gz")
    try:
        images = sample(model, args.num_images, seed=args.seed, labels=labels, prompts=prompts, sampler=args.sampler,
                        steps=args.steps, guidance_scale=args.guidance_scale)
    except ValueError as err:
        raise FedsynthError(f"cannot generate from {ckpt}: {err}") from None
    fmt = args.format or ("png" if model.spatial_dims == 2 else "nii.gz")
    paths = write_images(images, args.output, image_format=fmt, labels=labels, prompts=prompts)
    print(f"wrote {len(paths)} images and grid.png to {args.output}")


def _prompts(args: argparse.Namespace) -> list[str] | None:
    """``--prompt`` (repeatable) or ``--prompts-file`` (one prompt per line; blank lines skipped)."""
    if args.prompts_file is None:
        return args.prompt
    path = Path(args.prompts_file)
    if not path.is_file():
        raise FedsynthError(f"--prompts-file {path}: file not found")
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
    except UnicodeDecodeError:
        raise FedsynthError(f"--prompts-file {path}: not UTF-8 text") from None
    prompts = [ln for ln in lines if ln]
    if not prompts:
        raise FedsynthError(f"--prompts-file {path}: no prompts (one per line)")
    if len(prompts) not in (1, args.num_images):
        raise FedsynthError(f"--prompts-file {path}: {len(prompts)} prompts for -n {args.num_images} images; "
                            "give one prompt, or one per image")
    return prompts


@command("info")
def _info(args: argparse.Namespace) -> None:
    from fedsynth.checkpoint import checkpoint_info

    print(json.dumps(checkpoint_info(args.checkpoint), indent=2))


@command("build-dataset")
def _build_dataset(args: argparse.Namespace) -> None:
    from fedsynth.data.brains import build_brain_dataset, summary

    _at_least("--image-size", args.image_size, 8)
    for size in args.volume_sizes:
        _at_least("--volume-sizes", size, 8)
    csvs = build_brain_dataset(args.output, image_size=args.image_size, volume_sizes=tuple(args.volume_sizes))
    print(summary(csvs))


@command("demo")
def _demo(args: argparse.Namespace) -> None:
    from fedsynth.demo import run_demo

    import json

    _at_least("--steps", args.steps, 1)
    _at_least("--first-stage-steps", args.first_stage_steps, 1)
    paths = run_demo(args.output, family=args.family, steps=args.steps, first_stage_steps=args.first_stage_steps,
                     precision=args.precision)
    for k, v in paths.items():
        print(f"{k}: {v}")
    report = json.loads(paths["report"].read_text(encoding="utf-8"))
    floor = report["real_vs_real"]
    print(f"held-out precision {report['precision']:.2f}, recall {report['recall']:.2f} "
          f"({report['encoder']} encoder, {report['samples']} samples vs {report['held_out_images']} held-out slices; "
          f"real training slices score {floor['precision']:.2f} / {floor['recall']:.2f})")
    print(f"look at the samples: {paths['grid']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsynth", description="Federated synthesis of medical images.")
    sub = parser.add_subparsers(dest="command", required=True)


    p = sub.add_parser("init-config", help="write a complete, commented config that trains as is")
    p.add_argument("--family", required=True, choices=family_names())
    p.add_argument("--spatial-dims", type=int, choices=[2, 3], default=2)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=0)
    text_families = ", ".join(n for n, f in families().items() if "text" in f.conditioning)
    latent_families = ", ".join(n for n, f in families().items() if "latent" in f.options)
    p.add_argument("--conditioning", choices=["none", "class", "text"], default="none",
                   help=f"class: on the CSV's Label (with --num-classes); text: on its Prompt column ({text_families})")
    p.add_argument("--latent", action="store_true", help=f"{latent_families}: latent diffusion (first-stage "
                                                         "autoencoder trained first, from the same config)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")

    p = sub.add_parser("construct-csv", help="write a GaNDLF-style CSV for a folder of images")
    p.add_argument("--input-dir", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--channels-id", nargs="+", default=None, help="substrings naming each channel's file")
    p.add_argument("--labels-from-folders", action="store_true", help="class = sub-folder name")

    p = sub.add_parser("train", help="train locally (one process, or N DDP processes)")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--data", required=True, help="training CSV")
    p.add_argument("-o", "--output", required=True, help="run folder")
    p.add_argument("--val-data", default=None)
    p.add_argument("--epochs", type=int, default=None, help="override training.epochs")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.ckpt")
    again.add_argument("--overwrite", action="store_true", help="start again in a run folder that holds a run")
    p.add_argument("--devices", type=int, default=1, help="processes (DDP: gloo on CPU, nccl on GPU)")

    p = sub.add_parser("generate", help="sample images from a run or checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder (uses best.ckpt, else last.ckpt)")
    src.add_argument("--checkpoint", help="checkpoint file")
    p.add_argument("-n", "--num-images", type=int, default=16)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--label", type=int, default=None, help="class to generate (conditional models)")
    texts = p.add_mutually_exclusive_group()
    texts.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                       help="text-conditional models: the prompt (repeat it for one prompt per image)")
    texts.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default=None)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (diffusion)")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["png", "nii.gz", "nii"], default=None)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema",
                   help="ema: the checkpoint's EMA of the generating groups when it has one (default); raw: trained weights")

    p = sub.add_parser("info", help="print a checkpoint's metadata as JSON")
    p.add_argument("checkpoint")

    p = sub.add_parser("build-dataset", help="write the real brain-MRI data set (2D slices in 3 planes, train/held-out "
                                             "and per-site CSVs, small 3D set) from what installs offline")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--image-size", type=int, default=64, help="2D slice size")
    p.add_argument("--volume-sizes", type=int, nargs="*", default=[32, 64], help="3D volume sizes")

    p = sub.add_parser("demo", help="train and generate on real brain MRI slices that install offline")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--family", choices=[*family_names(), "latent-diffusion"], default="latent-diffusion")
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps (latent diffusion: of the UNet)")
    p.add_argument("--first-stage-steps", type=int, default=600, help="latent-diffusion: autoencoder steps first")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast where the CPU/GPU computes bf16 natively, else fp32")

    for module in _EXTENSIONS:
        importlib.import_module(module).add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = COMMANDS[args.command](args)
    except FedsynthError as err:
        print(f"fedsynth {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedsynth {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    # `python -m fedsynth.cli` runs this file as __main__; use the imported module so that
    # extensions register their commands in the same table.
    from fedsynth.cli import main as _main

    sys.exit(_main())
