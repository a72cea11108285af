"""Files fedsynth ships next to its code, and ``fedsynth templates``.

- ``plans/workspace/``: the OpenFL workspace template, one for every family (``fedsynth federate
  openfl`` and ``fedsynth templates openfl-<family>`` write a family's workspace from it);
- ``collaborator/flower/``: a hospital site's ``start-supernode.sh`` and ``data.yaml``;
- ``aggregator/flower/``: the aggregator host's ``start-superlink.sh``.

In the repository these folders stay where operators look for them; the wheel ships them as the
data packages ``fedsynth.plans``, ``fedsynth.templates.flower_site`` and
``fedsynth.templates.flower_aggregator`` (``package_dir`` in setup.py), found here with
:func:`importlib.resources.files`. When fedsynth is imported straight from a source checkout
(``PYTHONPATH``, or an editable install made before these packages existed) the checkout's own
folders are used.
"""

from __future__ import annotations

import argparse
import importlib.resources
import shutil
from pathlib import Path

from fedsynth.errors import FedsynthError

#: shipped folder -> (the data package the wheel ships it as, its folder in the repository)
DATA_PACKAGES = {
    "plans": ("fedsynth.plans", "plans"),
    "flower-site": ("fedsynth.templates.flower_site", "collaborator/flower"),
    "flower-aggregator": ("fedsynth.templates.flower_aggregator", "aggregator/flower"),
}
#: ``fedsynth templates NAME`` -> (shipped folder, sub-folder copied out); ``openfl-<family>`` for
#: every registered family is written from ``plans/workspace`` (see :func:`template_names`)
TEMPLATES = {
    "flower-site": ("flower-site", "."),
    "flower-aggregator": ("flower-aggregator", "."),
}
OPENFL_PREFIX = "openfl-"
_COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "__init__.py")


def _checkout_dir(folder: str) -> Path | None:
    """``folder`` of the source checkout this fedsynth is imported from, if it is one."""
    root = Path(__file__).resolve().parents[1]
    path = root / folder
    if (root / "pyproject.toml").is_file() and (path / "__init__.py").is_file():
        return path
    return None


def resource_dir(name: str) -> Path:
    """The shipped folder ``name`` (a key of :data:`DATA_PACKAGES`) as a real path."""
    package, folder = DATA_PACKAGES[name]
    checkout = _checkout_dir(folder)
    if checkout is not None:  # a source tree: its own folder, whatever else is installed
        return checkout
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        root = None
    if isinstance(root, Path) and root.is_dir():
        return root
    raise FedsynthError(f"fedsynth's {folder}/ files are missing (no package {package}): reinstall fedsynth "
                        "from its wheel or checkout (pip install fedsynth)")


def template_names() -> list[str]:
    """What ``fedsynth templates`` writes: the Flower kits and ``openfl-<family>`` per registered family."""
    from fedsynth.families import family_names

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
        from fedsynth.federated.openfl.workspace import write_template

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
    from fedsynth.cli import command

    p = subparsers.add_parser("templates", help="copy a shipped template: a Flower site or aggregator's start "
                                                "script, or a family's OpenFL workspace (from plans/workspace)")
    p.add_argument("name", choices=template_names(), help="flower-site: start-supernode.sh + data.yaml; "
                   "flower-aggregator: start-superlink.sh; openfl-FAMILY: a ready OpenFL workspace")
    p.add_argument("-o", "--output", required=True, help="new (or empty) folder to write")
    p.set_defaults(command="templates")

    @command("templates")
    def _templates(args: argparse.Namespace) -> None:
        written = copy_template(args.name, Path(args.output))
        print(f"wrote {len(written)} file(s) to {args.output}: " + ", ".join(str(p.relative_to(args.output)) for p in written))
