"""Files fedsynth ships next to its code (``fedsynth templates``, in :mod:`fedsynth.federated.templates`,
copies them out).

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

import importlib.resources
from pathlib import Path

from fedsynth.errors import FedsynthError

#: shipped folder -> (the data package the wheel ships it as, its folder in the repository)
DATA_PACKAGES = {
    "plans": ("fedsynth.plans", "plans"),
    "flower-site": ("fedsynth.templates.flower_site", "collaborator/flower"),
    "flower-aggregator": ("fedsynth.templates.flower_aggregator", "aggregator/flower"),
}


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
