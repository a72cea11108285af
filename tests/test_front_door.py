"""The front door loads no torch: ``fedsynth --help``, ``init-config``, ``construct-csv`` and config validation
import neither torch nor MONAI (each checked in a fresh interpreter, as a user's shell runs it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "monai", "numpy", "SimpleITK", "flwr", "openfl", "opacus", "scipy")

PROBE = '''
import json, sys
{body}
print("HEAVY=" + json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r}))))
'''


def _heavy_modules_after(body: str, tmp_path: Path) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE.format(body=body, heavy=HEAVY)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("HEAVY="))
    return json.loads(line[len("HEAVY="):])


@pytest.mark.parametrize("body", [
    "import fedsynth.config",
    "from fedsynth.cli import build_parser; build_parser().format_help()",
    "from fedsynth.cli import main\n"
    "for name in ['train', 'generate', 'evaluate', 'federate', 'certs', 'templates']:\n"
    "    try:\n        main([name, '--help'])\n    except SystemExit:\n        pass",
    "from fedsynth.cli import main\n"
    "assert main(['init-config', '--family', 'diffusion', '--latent', '--image-size', '32', '-o', 'c.yaml']) == 0",
    "from fedsynth.config import default_config, load_config, render_yaml\n"
    "from fedsynth.families import family_names\n"
    "for name in family_names():\n"
    "    open('x.yaml', 'w').write(render_yaml(default_config(name, 2, 32)))\n"
    "    assert load_config('x.yaml').family == name\n"
    "    open('x.yaml', 'w').write(render_yaml(default_config(name, 3, 16)))\n"
    "    assert load_config('x.yaml').spatial_dims == 3",
    "import pathlib\nfrom fedsynth.cli import main\n"
    "pathlib.Path('b/slices').mkdir(parents=True)\n"
    "pathlib.Path('b/slices/a.png').write_bytes(b'')\n"
    "pathlib.Path('b/slices.csv').write_text('path,split\\nslices/a.png,train\\n')\n"
    "assert main(['construct-csv', '--input-dir', 'b/slices', '--split', 'train', '-o', 't.csv']) == 0",
], ids=["import-config", "help", "sub-command-help", "init-config", "validate-every-family", "construct-csv-split"])
def test_front_door_imports_no_torch(body: str, tmp_path: Path) -> None:
    assert _heavy_modules_after(body, tmp_path) == []


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_building_a_model_is_what_loads_torch(tmp_path: Path) -> None:
    """The registry's model reference resolves on use (the control: the probe can see torch)."""
    assert "torch" in _heavy_modules_after("from fedsynth.families import family\nfamily('gan').model", tmp_path)
