"""The README's quick start runs as written.

Its bash blocks (everything under ``## Quick start``: ``fedsynth demo``, ``build-dataset`` and the
steps by hand) are read from README.md itself, so a changed README runs its new commands: comments
stripped, ``\\`` continuations joined, then run in order in one temporary folder by bash with the
``fedsynth`` console script, changed only by :data:`SHRINK`. After each command, what the README
says it writes is checked.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

#: every change made to the README's commands, to make them tiny (old -> new, whole words): each
#: entry must still match a command, so the table cannot go stale
SHRINK: list[tuple[str, str]] = [
    ("fedsynth demo -o demo", "fedsynth demo -o demo --steps 2 --first-stage-steps 2"),  # 3.5 min as written
    ("--image-size 64", "--image-size 32"),
    ("--epochs 20", "--epochs 20 --max-steps 2"),
    ("--epochs 40 --resume", "--epochs 40 --max-steps 4 --resume"),
    ("--devices 2", "--devices 2 --max-steps 2"),  # DDP stays: two gloo processes on CPU
]


@dataclass
class Command:
    """One command of the README: as written (comment stripped, continuations joined) and its comment."""

    line: int  # README line it starts on
    text: str
    comment: str = ""


def _split_comment(line: str) -> tuple[str, str]:
    """``(code, comment)``: a ``#`` outside quotes at the start of a word starts the comment."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1:].strip()
    return line, ""


def quick_start_commands(text: str) -> list[Command]:
    """The commands of every bash block under ``## Quick start``, in order."""
    start = text.index("\n## Quick start")
    end = text.find("\n## ", start + 1)
    section_end = len(text) if end < 0 else end
    commands: list[Command] = []
    for block in re.finditer(r"^```bash\n(.*?)^```", text[start:section_end], re.S | re.M):
        first = text.count("\n", 0, start + block.start(1)) + 1
        pending: Command | None = None
        for offset, raw in enumerate(block.group(1).splitlines()):
            code, comment = _split_comment(raw)
            if pending is None and not code.strip():  # a comment line: the previous command's comment goes on
                if commands and comment:
                    commands[-1].comment += " " + comment
                continue
            if pending is None:
                pending = Command(first + offset, "")
            code = code.rstrip()
            pending.comment = " ".join(filter(None, [pending.comment, comment]))
            if code.endswith("\\"):
                pending.text += code[:-1] + " "
                continue
            pending.text = shlex.join(shlex.split(pending.text + code))
            commands.append(pending)
            pending = None
        assert pending is None, f"README.md line {pending.line}: a continuation with no end"
    return commands


def shrink(command: str, used: set[int] | None = None) -> str:
    for i, (old, new) in enumerate(SHRINK):
        command, n = re.subn(rf"(?<!\S){re.escape(old)}(?!\S)", new, command)
        if n and used is not None:
            used.add(i)
    return command


def _argv(command: str) -> list[str]:
    return shlex.split(command)


def _parse(argv: list[str]) -> Any:
    from fedsynth.cli import build_parser

    assert argv[0] == "fedsynth", argv
    return build_parser().parse_args(argv[1:])


def _number(comment: str, pattern: str) -> int | None:
    found = re.search(pattern, comment)
    return int(found.group(1).replace(",", "")) if found else None


def _colin27() -> bool:
    from fedsynth.data.brains import available_volumes

    return "ch2" in available_volumes()


# --------------------------------------------------------------------------- what each command writes


@dataclass
class Ran:
    args: Any
    out: str
    comment: str
    cwd: Path
    state: dict[str, Any]


def _check_demo(r: Ran) -> None:
    from fedsynth.cli import build_parser

    folder = r.cwd / r.args.output
    generated = folder / "generated"
    report = json.loads((folder / "demo_report.json").read_text(encoding="utf-8"))
    images = sorted(generated.glob("synthetic_*.png"))
    assert report["samples"] == len(images) == _number(r.comment, r"([\d,]+) samples")
    assert report["steps"] == r.args.steps
    assert (generated / "grid.png").stat().st_size > 0 and (generated / "manifest.csv").is_file()
    assert f"{Path(r.args.output) / 'generated' / 'grid.png'}" in r.out  # "the grid path"
    defaults = build_parser().parse_args(["demo", "-o", "x"])  # the step counts the README names are the defaults
    assert _number(r.comment, r"([\d,]+)-step autoencoder") in (None, defaults.first_stage_steps)
    assert _number(r.comment, r"([\d,]+) UNet") in (None, defaults.steps)


def _check_ls(r: Ran) -> None:
    listed = r.out.split()
    named = re.findall(r"[\w.]+\.(?:png|csv|json)", r.comment)
    assert named and all(name in listed for name in named), (named, listed)


def _check_build_dataset(r: Ran) -> None:
    import csv

    from fedsynth.data.images import read_image
    from fedsynth.data.manifest import read_manifest

    folder = r.cwd / r.args.output
    named = {Path(name).name for name in re.findall(r"[\w/]+\.csv", r.comment)}
    assert {"train.csv", "held_out.csv"} <= named, r.comment
    for name in named:
        if name.startswith("colin27") and not _colin27():
            continue
        assert (folder / name).is_file(), f"the README says build-dataset writes {name}"
    with (folder / "slices.csv").open(encoding="utf-8") as fh:
        index = list(csv.DictReader(fh))
    if _colin27():
        assert _number(r.comment, r"([\d,]+) slices") in (None, len(index))
    assert {row["split"] for row in index} == {"train", "held_out", "gap"}
    first = read_manifest(folder / "train.csv")[0].channels[0]
    assert read_image(first).shape == (1, r.args.image_size, r.args.image_size)


def _check_init_config(r: Ran) -> None:
    from fedsynth.config import load_config

    cfg = load_config(r.cwd / r.args.output)
    assert cfg.family == r.args.family and list(cfg.image_size) == [r.args.image_size] * 2


def _check_construct_csv(r: Ran) -> None:
    from fedsynth.data.manifest import IMAGE_SUFFIXES, find_split_index, read_manifest, read_split_index

    folder = (r.cwd / r.args.input_dir).resolve()
    images = [p.resolve() for p in folder.iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES)]
    listed = {rec.channels[0] for rec in read_manifest(r.cwd / r.args.output)}
    if r.args.split is None:
        assert listed == set(images)
        return
    index = find_split_index(folder)
    assert index is not None
    splits = read_split_index(index)
    assert listed == {p for p in images if splits[p] == r.args.split} and listed
    if r.args.split == "train":  # no held-out slice leaks into a training CSV
        held_out = {rec.channels[0] for rec in read_manifest(index.parent / "held_out.csv")}
        assert not listed & held_out


def _check_train(r: Ran) -> None:
    from fedsynth.checkpoint import checkpoint_info

    run = r.cwd / r.args.output
    # "A run folder holds last.ckpt, best.ckpt, metrics.csv, ... tensorboard/, samples/final.png, config.yaml"
    for name in ("last.ckpt", "metrics.csv", "config.yaml", "samples/final.png", "tensorboard"):
        assert (run / name).exists(), f"{run / name} missing"
    assert (run / "best.ckpt").is_file() == (r.args.val_data is not None)
    assert checkpoint_info(run / "last.ckpt")["step"] == r.args.max_steps
    assert "fedsynth train: done in" in r.out


def _check_validate(r: Ran) -> None:
    assert "ready to train" in r.out and "fedsynth validate: done in" in r.out


def _check_generate(r: Ran) -> None:
    from fedsynth.data.manifest import IMAGE_SUFFIXES

    folder = r.cwd / r.args.output
    images = [p for p in folder.iterdir() if p.name.startswith("synthetic_") and p.name.endswith(IMAGE_SUFFIXES)]
    assert len(images) == r.args.num_images
    assert (folder / "grid.png").stat().st_size > 0
    assert len((folder / "manifest.csv").read_text(encoding="utf-8").splitlines()) == r.args.num_images + 1
    record = json.loads((folder / "generation.json").read_text(encoding="utf-8"))
    assert record["checkpoint"]["path"] == str((r.cwd / r.args.run / "last.ckpt").resolve())  # "last.ckpt,
    assert record["weights"] == "ema" and record["count"] == r.args.num_images                 # EMA weights"
    r.state["generated"] = record


def _check_evaluate(r: Ran) -> None:
    report = json.loads((r.cwd / r.args.output).read_text(encoding="utf-8"))
    assert {"precision", "recall", "radiomics"} <= set(report)
    assert (r.cwd / r.args.png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_info(r: Ran) -> None:
    info = json.loads(r.out)
    made = r.state["generated"]["checkpoint"]  # "metadata of the checkpoint samples/ came from"
    assert (info["step"], info["created"], info["family"]) == (made["step"], made["created"], made["family"])


CHECKS: dict[str, Callable[[Ran], None]] = {
    "demo": _check_demo, "build-dataset": _check_build_dataset, "init-config": _check_init_config,
    "construct-csv": _check_construct_csv, "train": _check_train, "validate": _check_validate,
    "generate": _check_generate, "evaluate": _check_evaluate, "info": _check_info,
}


# --------------------------------------------------------------------------- tests


def _shrunk_commands() -> list[tuple[Command, str]]:
    used: set[int] = set()
    commands = [(c, shrink(c.text, used)) for c in quick_start_commands(README.read_text(encoding="utf-8"))]
    stale = [SHRINK[i] for i in range(len(SHRINK)) if i not in used]
    assert not stale, f"SHRINK entries that match no README command any more: {stale}"
    return commands


def test_quick_start_commands_parse_and_every_one_is_checked() -> None:
    """Fast: the README's quick-start commands are valid ``fedsynth`` command lines, each has an output
    check, every SHRINK entry still applies and every training command is bounded after it."""
    commands = _shrunk_commands()
    names = []
    for command, shrunk in commands:
        argv = _argv(shrunk)
        if argv[0] == "ls":
            names.append("ls")
            continue
        _parse(_argv(command.text))  # as written
        args = _parse(argv)
        names.append(args.command)
        assert args.command in CHECKS, f"README.md line {command.line}: no output check for `{command.text}`"
        if args.command == "train":
            assert args.max_steps is not None, f"README.md line {command.line}: SHRINK leaves `{command.text}` unbounded"
    assert {"demo", "ls", "build-dataset", "construct-csv", "train", "generate", "evaluate", "info"} <= set(names)


def test_shrink_matches_whole_words_only() -> None:
    assert shrink("x --image-size 640 --epochs 200") == "x --image-size 640 --epochs 200"
    assert shrink("x --image-size 64") == "x --image-size 32"


def _environment() -> tuple[dict[str, str], str]:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_TELEMETRY_ENABLED": "0"}
    # the console script as users run it; `python -m fedsynth` where this interpreter has none
    prelude = "" if (bin_dir / "fedsynth").is_file() else f'fedsynth() {{ {shlex.quote(sys.executable)} -m fedsynth "$@"; }}\n'
    return env, prelude


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_quick_start_runs_as_written(tmp_path: Path) -> None:
    pytest.importorskip("nilearn")
    env, prelude = _environment()
    state: dict[str, Any] = {}
    for command, shrunk in _shrunk_commands():
        started = time.perf_counter()
        done = subprocess.run(["bash", "-c", prelude + shrunk], cwd=tmp_path, env=env, capture_output=True,
                              text=True, encoding="utf-8", errors="replace", timeout=300)
        print(f"{time.perf_counter() - started:6.1f} s  {shrunk}")  # pytest -s shows where the time goes
        where = f"README.md line {command.line}: `{shrunk}`"
        assert done.returncode == 0, f"{where} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        argv = _argv(shrunk)
        ran = Ran(None, done.stdout, command.comment, tmp_path, state)
        try:
            if argv[0] == "ls":
                _check_ls(ran)
            else:
                ran.args = _parse(argv)
                CHECKS[ran.args.command](ran)
        except AssertionError as err:
            raise AssertionError(f"{where}: {err}\n{done.stdout[-3000:]}") from err
