"""Entry point of the fedsynth MLCube (``mlcube/mlcube.yaml``): maps each task onto the fedsynth CLI.

MLCube's docker runner starts the image as ``<entrypoint> TASK --name=/mlcube_ioN/... ...``,
one ``--name=path`` per parameter of the task in ``mlcube.yaml``. This module turns those
paths into a ``fedsynth`` command line and runs it in-process, so errors read exactly as the
CLI's (one line, no traceback, exit status 2):

- ``train``:    ``--config FILE --data CSV|DIR --parameters FILE --run DIR``
  -> ``fedsynth train -c FILE --data CSV -o DIR [options]``
- ``generate``: ``--checkpoint FILE|RUN_DIR --parameters FILE --images DIR``
  -> ``fedsynth generate --checkpoint FILE | --run RUN_DIR -o DIR [options]``
- ``evaluate``: ``--real CSV|DIR --synthetic DIR|CSV --parameters FILE --report FILE --report_png FILE``
  -> ``fedsynth evaluate --real CSV --synthetic DIR -o FILE --png FILE [options]``

``--parameters`` names a YAML file with one optional section per task holding further
options of that ``fedsynth`` sub-command, spelt as its long option with ``_`` for ``-``
(``generate: {num_images: 8, seed: 1}``). A data parameter may be a CSV manifest, or a folder
holding ``data.csv`` (or a single ``*.csv``), or a folder of images (a manifest is built).

Also: ``python -m fedsynth.mlcube_entrypoint example-workspace DIR`` writes the small example
workspace (real brain-MRI slices, a tiny config) that ``mlcube/workspace`` holds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from fedsynth import cli
from fedsynth.data.manifest import construct_csv, read_manifest, write_manifest
from fedsynth.errors import DataError, FedsynthError
from fedsynth.io import atomic_write_text

#: per task: the fedsynth sub-command, and its options that the parameters file may not set: the
#: paths (the cube's parameters set them, and only those are mounted in the container)
TASKS: dict[str, tuple[str, frozenset[str]]] = {
    "train": ("train", frozenset({"config", "data", "output", "val_data"})),
    "generate": ("generate", frozenset({"run", "checkpoint", "output"})),
    "evaluate": ("evaluate", frozenset({"real", "synthetic", "output", "png", "config", "checkpoint", "train"})),
}


def _subparser(command: str) -> argparse.ArgumentParser | None:
    """The ``fedsynth <command>`` parser, or None when this installation has no such sub-command."""

    for action in cli.build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command)
    return None


def task_options(task: str, parameters_file: str | Path) -> list[str]:
    """The extra ``fedsynth`` options that ``parameters_file`` sets for ``task``, as CLI arguments.

    Raises :class:`FedsynthError` naming the file for an unknown section or option, and when this
    installation lacks the task's sub-command.
    """
    import yaml

    path = Path(parameters_file)
    if not path.is_file():
        raise FedsynthError(f"parameters file not found: {path} (MLCube parameter 'parameters'; "
                            "an empty file or '{}' means no extra options)")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise FedsynthError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(doc, dict):
        raise FedsynthError(f"{path}: expected a mapping of task name to options, got {type(doc).__name__}")
    unknown_tasks = sorted(set(doc) - set(TASKS))
    if unknown_tasks:
        raise FedsynthError(f"{path}: unknown task section(s) {unknown_tasks}; expected some of {sorted(TASKS)}")
    section = doc.get(task) or {}
    if not isinstance(section, dict):
        raise FedsynthError(f"{path}: section '{task}' must be a mapping of option to value, got {section!r}")
    command, reserved = TASKS[task]
    parser = _subparser(command)
    if parser is None:
        raise FedsynthError(f"this fedsynth installation has no 'fedsynth {command}' sub-command, "
                            f"which the MLCube task '{task}' runs; install a fedsynth release that has it")
    allowed = {a.dest: a for a in parser._actions
               if any(s.startswith("--") for s in a.option_strings) and a.dest not in reserved | {"help"}}
    argv: list[str] = []
    for key, value in section.items():
        if str(key) in reserved:
            raise FedsynthError(f"{path}: option '{key}' in section '{task}' names a path, which the parameters file "
                                "may not set: inside the MLCube only the task's parameters in mlcube.yaml are mounted")
        action = allowed.get(str(key))
        if action is None:
            raise FedsynthError(f"{path}: unknown option '{key}' in section '{task}' "
                                f"(options of 'fedsynth {command}' it may set: {sorted(allowed)})")
        flag = next(s for s in action.option_strings if s.startswith("--"))
        if action.nargs == 0:  # store_true / store_false
            if not isinstance(value, bool):
                raise FedsynthError(f"{path}: '{task}.{key}' is a switch: write true or false, got {value!r}")
            if value != bool(action.default):
                argv.append(flag)
        elif value is not None:
            argv += [flag, *(map(str, value) if isinstance(value, list) else [str(value)])]
    return argv


def resolve_manifest(path: str | Path, parameter: str, scratch: Path) -> Path:
    """A CSV manifest for the data parameter ``parameter``: the CSV itself, a folder's CSV, or one built.

    Every image the CSV names must lie inside the folder mounted for it (the CSV's folder);
    a path that does not exist raises :class:`DataError` with that hint.
    """

    p = Path(path)
    if p.is_dir():
        csvs = sorted(p.glob("*.csv"))
        if (p / "data.csv").is_file():
            csv = p / "data.csv"
        elif len(csvs) == 1:
            csv = csvs[0]
        elif csvs:
            raise DataError(f"MLCube parameter '{parameter}': folder {p} holds several CSVs "
                            f"{[c.name for c in csvs]} and no data.csv; name one, e.g. {parameter}=<folder>/{csvs[0].name}")
        else:
            csv = scratch / f"{parameter}.csv"
            construct_csv(p, csv)
            return csv
    elif p.is_file():
        csv = p
    else:
        raise DataError(f"MLCube parameter '{parameter}': {p} not found (expected a CSV manifest or a folder of images)")
    for record in read_manifest(csv, check_files=False):
        for file in record.channels:
            if not file.exists():
                raise DataError(f"{record.where()}: image not found: {file}. In the MLCube only the CSV's folder "
                                f"is mounted: keep the images under it and write their paths relative to the CSV")
    return csv


def run_task(task: str, args: argparse.Namespace) -> int:
    """Run one MLCube task through :func:`fedsynth.cli.main`; returns its exit status."""

    extra = task_options(task, args.parameters)  # also checks that the sub-command exists
    with tempfile.TemporaryDirectory(prefix="fedsynth-mlcube-") as tmp:
        scratch = Path(tmp)
        if task == "train":
            data = resolve_manifest(args.data, "data", scratch)
            argv = ["train", "-c", args.config, "--data", str(data), "-o", args.run]
        elif task == "generate":
            source = ["--run", args.checkpoint] if Path(args.checkpoint).is_dir() else ["--checkpoint", args.checkpoint]
            argv = ["generate", *source, "-o", args.images]
        else:
            real = resolve_manifest(args.real, "real", scratch)
            argv = ["evaluate", "--real", str(real), "--synthetic", args.synthetic, "-o", args.report,
                    "--png", args.report_png]
        return cli.main([*argv, *extra])


def build_example_workspace(out_dir: str | Path, *, count: int = 12) -> dict[str, Path]:
    """Write the example workspace: tiny GAN ``config.yaml``, ``parameters.yaml`` and real MRI slices.

    ``data/train.csv`` holds 2D 32x32 axial slices of the MNI152 brain, ``data/real.csv`` slices
    of a second brain (Colin27 when installed, else other MNI152 slices) for ``evaluate``; image
    paths in the CSVs are relative to ``data/`` so the folder can be mounted anywhere.
    """
    from fedsynth.config import default_config, render_yaml
    from fedsynth.demo import available_volumes, write_slices

    out = Path(out_dir)
    data = out / "data"
    names = available_volumes()
    sources = {"train": (names[0], count), "real": (names[-1], count if len(names) > 1 else count + 3)}
    csvs: dict[str, Path] = {}
    for split, (name, n) in sources.items():
        rows = write_slices(name, data / "images" / f"{split}_{name}", image_size=32, count=n, spatial_dims=2)
        csvs[split] = data / f"{split}.csv"
        write_manifest(csvs[split], [(s, [Path(f).relative_to(data) for f in files], label) for s, files, label in rows])
    config = default_config("gan", 2, 32)
    config.model = config.model.model_copy(update={"latent_dim": 16, "generator_channels": 32, "discriminator_channels": 16})
    config.training.epochs, config.training.batch_size = 1, 8
    config.training.progress, config.training.tensorboard = False, False
    atomic_write_text(out / "config.yaml", render_yaml(config))
    atomic_write_text(out / "parameters.yaml", _EXAMPLE_PARAMETERS)
    return {"config": out / "config.yaml", "parameters": out / "parameters.yaml", **csvs}


_EXAMPLE_PARAMETERS = """\
# Extra options of each task's fedsynth sub-command (long option name, '_' for '-').
# See `fedsynth train --help`, `fedsynth generate --help`, `fedsynth evaluate --help`.
train:
  epochs: 1
generate:
  num_images: 8
  seed: 0
evaluate: {}
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsynth-mlcube", description="fedsynth MLCube tasks (see mlcube/mlcube.yaml)")
    sub = parser.add_subparsers(dest="task", required=True)
    p = sub.add_parser("train", help="train on a CSV manifest or image folder")
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--data", required=True, help="training CSV, or a folder with data.csv or images")
    p.add_argument("--parameters", required=True, help="YAML of extra fedsynth options per task")
    p.add_argument("--run", required=True, help="output run folder (checkpoints, config, logs)")
    p = sub.add_parser("generate", help="sample images from a checkpoint or run folder")
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or run folder (best.ckpt, else last.ckpt)")
    p.add_argument("--parameters", required=True)
    p.add_argument("--images", required=True, help="output folder of generated images")
    p = sub.add_parser("evaluate", help="compare synthetic images with real ones")
    p.add_argument("--real", required=True, help="real CSV, or a folder with data.csv or images")
    p.add_argument("--synthetic", required=True, help="folder (or CSV) of synthetic images")
    p.add_argument("--parameters", required=True)
    p.add_argument("--report", required=True, help="output JSON report")
    p.add_argument("--report_png", required=True, help="output PNG report")
    p = sub.add_parser("example-workspace", help="write the example workspace (not an MLCube task)")
    p.add_argument("output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.task == "example-workspace":
            for key, path in build_example_workspace(args.output).items():
                print(f"{key}: {path}")
            return 0
        return run_task(args.task, args)
    except FedsynthError as err:
        print(f"fedsynth mlcube {args.task}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
