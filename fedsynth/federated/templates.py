"""``fedsynth templates``: copy out a Flower site's or aggregator's kit, or a family's OpenFL workspace."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from fedsynth.commands import command, examples
from fedsynth.errors import FedsynthError
from fedsynth.families import family_names
from fedsynth.federated.openfl.workspace import write_template
from fedsynth.resources import resource_dir

#: ``fedsynth templates NAME`` -> (shipped folder, sub-folder copied out); ``openfl-<family>`` for
#: every registered family is written from ``plans/workspace`` (see :func:`template_names`)
TEMPLATES = {
    "flower-site": ("flower-site", "."),
    "flower-aggregator": ("flower-aggregator", "."),
}
OPENFL_PREFIX = "openfl-"
_COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "__init__.py")


def template_names() -> list[str]:
    """What ``fedsynth templates`` writes: the Flower kits and ``openfl-<family>`` per registered family."""
    return [*TEMPLATES, *(OPENFL_PREFIX + name for name in family_names())]


def copy_template(which: str, out: Path) -> list[Path]:
    """Write template ``which`` (see :func:`template_names`) into the new or empty folder ``out``."""
    names = template_names()
    if which not in names:
        raise FedsynthError(f"unknown template '{which}': expected one of {', '.join(names)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FedsynthError(f"-o {out}: exists and is not an empty folder; choose a new one")
    if which.startswith(OPENFL_PREFIX):
        write_template(which[len(OPENFL_PREFIX):], out)
    else:
        folder, sub = TEMPLATES[which]
        shutil.copytree(resource_dir(folder) / sub, out, ignore=_COPY_IGNORE, dirs_exist_ok=True)
    written = sorted(p for p in out.rglob("*") if p.is_file())
    for path in written:
        if path.suffix == ".sh":
            path.chmod(path.stat().st_mode | 0o755)  # wheels do not keep the executable bit
    return written


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``fedsynth templates NAME -o DIR``."""
    p = subparsers.add_parser("templates", help="copy a shipped template: a Flower site or aggregator's start "
                                                "script, or a family's OpenFL workspace (from plans/workspace)",
                                **examples("fedsynth templates flower-site -o site/", "fedsynth templates flower-aggregator -o agg/",
                                           "fedsynth templates openfl-gan -o fl-gan/"))
    p.add_argument("name", choices=template_names(), help="flower-site: start-supernode.sh + data.yaml; "
                   "flower-aggregator: start-superlink.sh; openfl-FAMILY: a ready OpenFL workspace")
    p.add_argument("-o", "--output", required=True, help="new (or empty) folder to write")
    p.set_defaults(command="templates")

    @command("templates")
    def _templates(args: argparse.Namespace) -> None:
        written = copy_template(args.name, Path(args.output))
        print(f"wrote {len(written)} file(s) to {args.output}: " + ", ".join(str(p.relative_to(args.output)) for p in written))
