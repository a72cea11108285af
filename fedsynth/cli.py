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
from typing import Any

from fedsynth import __version__
from fedsynth.commands import COMMANDS, Parser, Stopwatch, command, examples
from fedsynth.data.manifest import construct_csv
from fedsynth.errors import CheckpointError, FedsynthError
from fedsynth.families import families, family, family_names
from fedsynth.io import atomic_write_text, check_new_file, check_output_path
from fedsynth.progress import bar

#: modules that add sub-commands: each defines ``add_commands(subparsers)`` and uses ``@command``
_EXTENSIONS: list[str] = ["fedsynth.pki", "fedsynth.federated.cli", "fedsynth.metrics.cli", "fedsynth.metrics.audit_cli",
                         "fedsynth.federated.templates", "fedsynth.ledger_cli"]


# --------------------------------------------------------------------------- core commands


def _at_least(flag: str, value: int | float | None, minimum: int | float) -> None:
    if value is not None and value < minimum:
        raise FedsynthError(f"{flag} must be >= {minimum}, got {value}")


@command("init-config")
def _init_config(args: argparse.Namespace) -> None:
    from fedsynth.config import default_config, render_yaml

    out = check_new_file(args.output, overwrite=args.overwrite)
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
    check_new_file(args.output, overwrite=args.overwrite)
    n = construct_csv(args.input_dir, args.output, channel_ids=args.channels_id, labels_from_folders=args.labels_from_folders,
                      split=args.split)
    print(f"wrote {args.output} ({n} rows{f', split {args.split}' if args.split else ''})")


@command("train")
def _train(args: argparse.Namespace) -> None:
    from fedsynth.local import TrainRequest, train

    _at_least("--devices", args.devices, 1)
    _at_least("--epochs", args.epochs, 1)
    check_output_path(args.output, folder=True)
    overrides = _overrides(args)
    if overrides:
        from fedsynth.config import load_config, with_overrides

        with_overrides(load_config(args.config), overrides, _override_source(args))  # refused here, before anything starts
    train(TrainRequest(args.config, args.data, args.output, args.val_data, args.epochs, args.resume, args.devices,
                       overwrite=args.overwrite, overrides=overrides, ledger=args.ledger))
    print(f"run written to {args.output}")


#: ``train``/``validate`` options that override a config field (flag -> dotted field)
OVERRIDES = {"max_steps": "training.max_steps", "seed": "seed", "precision": "training.precision",
             "batch_size": "training.batch_size", "first_stage_steps": "model.first_stage_steps"}


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {field: getattr(args, name) for name, field in OVERRIDES.items() if getattr(args, name) is not None}


def _override_source(args: argparse.Namespace) -> str:
    given = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name in OVERRIDES if getattr(args, name) is not None]
    return f"{args.config} with {' '.join(given)}"


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-steps", type=int, default=None, help="override training.max_steps (optimiser steps)")
    p.add_argument("--seed", type=int, default=None, help="override seed")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="override training.precision")
    p.add_argument("--batch-size", type=int, default=None, help="override training.batch_size (per process)")
    p.add_argument("--first-stage-steps", type=int, default=None,
                   help="latent diffusion: override model.first_stage_steps (the autoencoder trained first; "
                        "--max-steps counts the UNet's steps only)")


@command("validate")
def _validate(args: argparse.Namespace) -> None:
    from fedsynth.preflight import preflight

    overrides = _overrides(args)
    if overrides:
        from fedsynth.config import load_config, with_overrides

        with_overrides(load_config(args.config), overrides, _override_source(args))
    done = preflight(args.config, args.data, args.val_data, overrides)
    print("\n".join(done.lines))
    print(f"OK: ready to train (fedsynth train -c {args.config} --data {args.data} -o RUN_DIR)")


@command("generate")
def _generate(args: argparse.Namespace) -> None:
    import torch

    from fedsynth.checkpoint import load_checkpoint
    from fedsynth.engine import resolve_device
    from fedsynth.generation import (
        checkpoint_provenance,
        describe_checkpoint,
        previous_generation,
        sample,
        sampling_settings,
        write_images,
    )
    from fedsynth.models import model_from_checkpoint

    _at_least("-n/--num-images", args.num_images, 1)
    _at_least("--steps", args.steps, 1)
    _at_least("--guidance-scale", args.guidance_scale, 0)
    check_output_path(args.output, folder=True)
    earlier = previous_generation(Path(args.output))
    if earlier and not args.overwrite:
        raise FedsynthError(f"-o {args.output}: holds an earlier generation ({', '.join(earlier[:3])}"
                            f"{', ...' if len(earlier) > 3 else ''}); pass --overwrite to replace it, or choose a new folder")
    ckpt = _run_checkpoint(args)
    prompts = _prompts(args)
    payload = load_checkpoint(ckpt)
    try:
        model = model_from_checkpoint(payload, device=resolve_device(args.device), weights=args.weights)
    except CheckpointError as err:
        raise CheckpointError(str(err).replace("<checkpoint>", str(ckpt))) from None
    labels = torch.tensor([args.label]) if args.label is not None else None
    if args.format == "png" and model.spatial_dims != 2:
        raise FedsynthError(f"--format png: {ckpt} is a {model.spatial_dims}D model; PNG holds 2D images, use nii.gz")
    source = checkpoint_provenance(ckpt, payload)
    ema = payload.get("ema") or {}
    weights = model.weights_loaded
    weights_note = (f"EMA of {', '.join(ema.get('groups') or [])} (decay {ema.get('decay')})" if weights == "ema"
                    else "raw (the checkpoint has no EMA)" if args.weights == "ema" else "raw (--weights raw)")
    settings = sampling_settings(model, args.sampler, args.steps, args.guidance_scale,
                                 conditioned=labels is not None or prompts is not None)
    print(f"checkpoint: {describe_checkpoint(source)}")
    print(f"weights: {weights_note}")
    print("sampling: " + ", ".join([f"seed {args.seed}", *(f"{k.replace('_', ' ')} {v}" for k, v in settings.items())]))
    try:
        images = sample(model, args.num_images, seed=args.seed, labels=labels, prompts=prompts, sampler=args.sampler,
                        steps=args.steps, guidance_scale=args.guidance_scale, progress=True)
    except ValueError as err:
        raise FedsynthError(f"cannot generate from {ckpt}: {err}") from None
    fmt = args.format or ("png" if model.spatial_dims == 2 else "nii.gz")
    provenance = {"checkpoint": source, "weights": weights, "seed": args.seed, **settings,
                  "label": args.label, "device": str(model.device)}
    paths = write_images(images, args.output, image_format=fmt, labels=labels, prompts=prompts, provenance=provenance)
    print(f"wrote {len(paths)} images, grid.png, manifest.csv and generation.json (what made them) to {args.output}")


def _run_checkpoint(args: argparse.Namespace) -> Path:
    """The checkpoint ``generate`` samples from: ``--checkpoint``, or the run folder's ``last.ckpt``
    (``best.ckpt`` with ``--best``/``--which best``), saying which and why."""
    from fedsynth.engine import BEST, LAST

    if args.checkpoint:
        if args.best or args.which != "last":
            raise FedsynthError("--best / --which choose a checkpoint inside --run; --checkpoint names the file itself")
        return Path(args.checkpoint)
    run = Path(args.run)
    which = "best" if args.best else args.which
    chosen, other = (run / BEST, run / LAST) if which == "best" else (run / LAST, run / BEST)
    if not chosen.is_file():
        hint = f"; {other.name} is there (--which {other.stem})" if other.is_file() else "; train first or pass --checkpoint"
        raise CheckpointError(f"no checkpoint in run folder {run} (looked for {chosen.name}){hint}")
    if which == "best":
        from fedsynth.checkpoint import load_checkpoint

        print(f"--run: using {BEST} (lowest validation loss, a loss and not a sample-quality score)")
        if other.is_file():
            best, last = load_checkpoint(chosen), load_checkpoint(other)
            if best["step"] < last["step"]:
                print(f"note: {BEST} (step {best['step']}) is older than {LAST} (step {last['step']})")
    else:
        print(f"--run: using {LAST} (the newest weights; --best for {BEST})" if other.is_file()
              else f"--run: using {LAST}")
    return chosen


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
    from fedsynth.data.brains import available_volumes

    shown = bar(len(available_volumes()) * (1 + len(args.volume_sizes)), "build-dataset", unit="volume")

    def progress(done: str) -> None:
        shown.set_postfix_str(done)
        shown.update(1)

    try:
        csvs = build_brain_dataset(args.output, image_size=args.image_size, volume_sizes=tuple(args.volume_sizes),
                                   progress=progress)
    finally:
        shown.close()
    print(summary(csvs))


@command("demo")
def _demo(args: argparse.Namespace) -> None:
    from fedsynth.demo import run_demo

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
    parser = Parser(prog="fedsynth", description="Federated synthesis of medical images.", **examples(
        "fedsynth init-config --family gan --image-size 64 -o cfg.yaml",
        "fedsynth validate -c cfg.yaml --data train.csv",
        "fedsynth train -c cfg.yaml --data train.csv -o runs/gan",
        "fedsynth generate --run runs/gan -n 16 -o samples",
        "fedsynth <command> --help    (each command's options and examples)"))
    parser.add_argument("--version", action="version", version=f"fedsynth {__version__}",
                        help="print fedsynth's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init-config", help="write a complete, commented config that trains as is", **examples(
        "fedsynth init-config --family gan --image-size 64 -o cfg.yaml",
        "fedsynth init-config --family diffusion --latent --image-size 64 -o ldm.yaml",
        "fedsynth init-config --family diffusion --latent --conditioning text -o txt.yaml",
        "fedsynth init-config --family stylegan --spatial-dims 3 --image-size 32 -o sg3d.yaml"))
    p.add_argument("--family", required=True, choices=family_names(), help="model family: " + ", ".join(family_names()))
    p.add_argument("--spatial-dims", type=int, choices=[2, 3], default=2, help="2D slices or 3D volumes (default 2)")
    p.add_argument("--image-size", type=int, required=True, help="side length images are brought to (>= 8)")
    p.add_argument("--channels", type=int, default=1, help="image channels = Channel_* columns of the CSV (default 1)")
    p.add_argument("--num-classes", type=int, default=0, help="class-conditional on the CSV's Label (>= 2; default 0: none)")
    text_families = ", ".join(n for n, f in families().items() if "text" in f.conditioning)
    latent_families = ", ".join(n for n, f in families().items() if "latent" in f.options)
    p.add_argument("--conditioning", choices=["none", "class", "text"], default="none",
                   help=f"class: on the CSV's Label (with --num-classes); text: on its Prompt column ({text_families})")
    p.add_argument("--latent", action="store_true", help=f"{latent_families}: latent diffusion (first-stage "
                                                         "autoencoder trained first, from the same config)")
    p.add_argument("-o", "--output", required=True, help="config file to write (YAML)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")

    p = sub.add_parser("construct-csv", help="write a GaNDLF-style CSV for a folder of images", **examples(
        "fedsynth construct-csv --input-dir subjects --channels-id _t1 _t2 -o train.csv",
        "fedsynth construct-csv --input-dir classes --labels-from-folders -o labelled.csv",
        "fedsynth construct-csv --input-dir brains/slices/mni152 --split train -o train.csv   (build-dataset's split)"))
    p.add_argument("--input-dir", required=True, help="folder of images (one sub-folder per subject, or files)")
    p.add_argument("-o", "--output", required=True, help="CSV to write")
    p.add_argument("--channels-id", nargs="+", default=None, help="substrings naming each channel's file")
    p.add_argument("--labels-from-folders", action="store_true", help="class = sub-folder name")
    p.add_argument("--split", default=None, metavar="NAME",
                   help="a folder `fedsynth build-dataset` wrote: only the images of split NAME (train, held_out or "
                        "gap) as its slices.csv records them; without it every image is listed, held-out ones too")
    p.add_argument("--overwrite", action="store_true", help="replace an existing CSV")

    p = sub.add_parser("validate", help="check a config against its data without training (images, model, memory, plan)",
                       **examples("fedsynth validate -c cfg.yaml --data brains/train.csv",
                                  "fedsynth validate -c cfg.yaml --data train.csv --val-data held_out.csv --batch-size 32",
                                  description="Reads and checks every CSV row and image, compares the stored image sizes "
                                              "with the config, builds the model and counts its parameters per group, "
                                              "estimates the memory of one training step (measured on a 2-example step, "
                                              "scaled to the batch) against the free memory, and prints what `fedsynth "
                                              "train` would run. Exits 2 on any problem."))
    p.add_argument("-c", "--config", required=True, help="experiment YAML")
    p.add_argument("--data", required=True, help="training CSV")
    p.add_argument("--val-data", default=None, help="validation CSV (default: data.val_fraction of --data)")
    _add_overrides(p)

    p = sub.add_parser("train", help="train locally (one process, or N DDP processes)", **examples(
        "fedsynth train -c cfg.yaml --data train.csv --val-data held_out.csv -o runs/gan",
        "fedsynth train -c cfg.yaml --data train.csv -o runs/gan --epochs 40 --resume",
        "fedsynth train -c cfg.yaml --data train.csv -o runs/quick --max-steps 200 --batch-size 8 --precision bf16",
        "fedsynth train -c cfg.yaml --data train.csv -o runs/ddp --devices 2"))
    p.add_argument("-c", "--config", required=True, help="experiment YAML (fedsynth init-config writes one)")
    p.add_argument("--data", required=True, help="training CSV")
    p.add_argument("-o", "--output", required=True, help="run folder")
    p.add_argument("--val-data", default=None, help="validation CSV: validation loss and best.ckpt")
    p.add_argument("--epochs", type=int, default=None, help="override training.epochs")
    _add_overrides(p)
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.ckpt")
    again.add_argument("--overwrite", action="store_true", help="start again in a run folder that holds a run")
    p.add_argument("--devices", type=int, default=1, help="processes (DDP: gloo on CPU, nccl on GPU)")
    p.add_argument("--ledger", default=None, help="the site's lifetime privacy ledger folder (default: $FEDSYNTH_LEDGER): "
                                                  "the run is checked against its budget and recorded in it")

    p = sub.add_parser("generate", help="sample images from a run or checkpoint", **examples(
        "fedsynth generate --run runs/gan -n 16 -o samples                (last.ckpt, EMA weights)",
        "fedsynth generate --run runs/gan --best -n 16 -o samples_best    (best.ckpt)",
        "fedsynth generate --checkpoint runs/fl/global/last.ckpt --weights raw -o samples",
        "fedsynth generate --run runs/ldm --sampler ddim --steps 100 --seed 1 -o samples",
        "fedsynth generate --run runs/txt -n 8 --prompt \"coronal T1 slice, middle\" --guidance-scale 3 -o samples"))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder: samples from its last.ckpt (--best / --which best: best.ckpt)")
    src.add_argument("--checkpoint", help="checkpoint file")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--which", choices=["last", "best"], default="last",
                      help="with --run: last.ckpt (newest, default) or best.ckpt (lowest validation loss)")
    pick.add_argument("--best", action="store_true", help="with --run: same as --which best")
    p.add_argument("-n", "--num-images", type=int, default=16, help="images to generate (default 16)")
    p.add_argument("-o", "--output", required=True, help="output folder (images, grid.png, manifest.csv, generation.json)")
    p.add_argument("--label", type=int, default=None, help="class to generate (conditional models)")
    texts = p.add_mutually_exclusive_group()
    texts.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                       help="text-conditional models: the prompt (repeat it for one prompt per image)")
    texts.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default=None, help="diffusion sampler (default: the config's)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (diffusion; default: the config's)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance for --label/--prompt (diffusion; default: the config's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default 0)")
    p.add_argument("--format", choices=["png", "nii.gz", "nii"], default=None, help="image format (default: png in 2D, nii.gz in 3D)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to sample (auto: cuda if available)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema",
                   help="ema: the checkpoint's EMA of the generating groups when it has one (default); raw: trained weights")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier generation in -o (only once the new one "
                                                            "is written)")

    p = sub.add_parser("info", help="print a checkpoint's metadata as JSON", **examples(
        "fedsynth info runs/gan/last.ckpt", "fedsynth info runs/fl/global/last.ckpt"))
    p.add_argument("checkpoint", help="checkpoint file (.ckpt)")

    p = sub.add_parser("build-dataset", help="write the real brain-MRI data set (2D slices in 3 planes, train/held-out "
                                             "and per-site CSVs, small 3D set) from what installs offline", **examples(
        "fedsynth build-dataset -o brains --image-size 64",
        "fedsynth build-dataset -o brains32 --image-size 32 --volume-sizes 32"))
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--image-size", type=int, default=64, help="2D slice size")
    p.add_argument("--volume-sizes", type=int, nargs="*", default=[32, 64], help="3D volume sizes")

    p = sub.add_parser("demo", help="train and generate on real brain MRI slices that install offline", **examples(
        "fedsynth demo -o demo", "fedsynth demo -o demo_quick --steps 300 --first-stage-steps 200",
        "fedsynth demo -o demo_gan --family gan --precision fp32"))
    p.add_argument("-o", "--output", required=True, help="output folder (data, run, generated samples, report)")
    p.add_argument("--family", choices=[*family_names(), "latent-diffusion"], default="latent-diffusion",
                   help="what to train (default latent-diffusion)")
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps (latent diffusion: of the UNet)")
    p.add_argument("--first-stage-steps", type=int, default=600, help="latent-diffusion: autoencoder steps first")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast where the CPU/GPU computes bf16 natively, else fp32")

    for module in _EXTENSIONS:
        importlib.import_module(module).add_commands(sub)
    return parser


#: commands that can run for minutes: they end with their wall time
LONG_COMMANDS = ("train", "validate", "generate", "evaluate", "build-dataset", "demo", "federate")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    watch = Stopwatch()
    try:
        result = COMMANDS[args.command](args)
        if args.command.split()[0] in LONG_COMMANDS:
            print(f"fedsynth {args.command}: done in {watch}")
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
