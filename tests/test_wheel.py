"""The wheel works outside the checkout: build it, install it into a fresh venv, run both federations.

The venv is made in a temporary folder; its ``fedsynth`` is the wheel (checked: ``fedsynth.__file__``
lies inside the venv), and it sees the dependencies already installed for the tests through a
``.pth`` file listing this interpreter's site-packages (no torch download; ``.pth`` files of those
folders, among them an editable install's finder for the checkout, are *not* run). The console
scripts of the dependencies (``fx``, ``flower-superlink``, ``flwr-clientapp``, ...) are re-pointed at
the new venv's Python, as pip would have written them there, so every process the federations
start imports the wheel. Every command runs with its working directory outside the checkout and
without ``PYTHONPATH``; a ``.pth`` probe records which fedsynth each of those processes imported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import tiny_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
#: not needed to build the wheel (and large, or private to this machine)
_NOT_COPIED = shutil.ignore_patterns(".git", ".venv", ".ci-venv", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", "runs", "tests", "benchmarks", "docs", "mlcube", "certs")
FEDERATION_TIMEOUT = 300
#: a .pth line run by every Python of the venv: at exit, note which fedsynth the process imported
_PROBE = ("import os, sys, atexit; _p = os.environ.get('FEDSYNTH_WHEEL_PROBE'); "
          "_p and atexit.register(lambda p=_p: 'fedsynth' in sys.modules and open(p, 'a').write("
          "os.path.basename(sys.argv[0]) + ' ' + str(sys.modules['fedsynth'].__file__) + chr(10)))\n")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel`` of a copy of the checkout (no build isolation: nothing is downloaded)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_COPIED)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = (tmp / "dist").glob("fedsynth-*.whl")
    return built


class Venv:
    def __init__(self, path: Path, work: Path) -> None:
        self.path, self.work = path, work
        self.bin = path / "bin"
        self.python = self.bin / "python"
        here = str(Path(sys.executable).parent)
        path_dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and d != here]
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        self.env.update(PATH=os.pathsep.join([str(self.bin), *path_dirs]), VIRTUAL_ENV=str(path),
                        FLWR_TELEMETRY_ENABLED="0", PYTHONNOUSERSITE="1")

    def run(self, *argv: str | Path, timeout: float = 120, probe: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "FEDSYNTH_WHEEL_PROBE": str(probe)} if probe else self.env
        return subprocess.run([str(a) for a in argv], cwd=self.work, env=env, capture_output=True, text=True,
                              timeout=timeout)

    def imported_fedsynth(self, probe: Path) -> dict[str, set[Path]]:
        """Program name -> the fedsynth package file(s) its processes imported (those that exited normally)."""
        found: dict[str, set[Path]] = {}
        for line in probe.read_text(encoding="utf-8").splitlines():
            program, _, path = line.partition(" ")
            found.setdefault(program, set()).add(Path(path).resolve())
        outside = {prog: paths for prog, paths in found.items()
                   if not all(p.is_relative_to(self.path.resolve()) for p in paths)}
        assert not outside, f"processes imported a fedsynth that is not the wheel's: {outside}"
        return found


def _site_packages() -> list[str]:
    """The site-packages folders this interpreter imports from (the checkout itself is never one of
    them; they may lie inside it, as CI's ``.ci-venv`` does, and their ``.pth`` files are not run)."""
    dirs = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir() and Path(d).resolve() != ROOT]


def _repoint_console_scripts(venv: Venv) -> None:
    """Copy this environment's console scripts (not fedsynth's) into the venv, run by its Python."""
    here = Path(sys.executable).parent
    interpreter = re.compile(re.escape(str(here)) + r"/python[\d.]*")
    for script in sorted(here.iterdir()):
        if not script.is_file() or script.name == "fedsynth" or (venv.bin / script.name).exists():
            continue
        try:
            lines = script.read_text(encoding="utf-8").split("\n")
        except UnicodeDecodeError:
            continue
        # pip writes "#!/env/bin/python" (or "#!/bin/sh" + an exec line naming it, for long paths)
        header = [interpreter.sub(str(venv.python), line) for line in lines[:2]]
        if lines[0].startswith("#!") and header != lines[:2]:
            target = venv.bin / script.name
            target.write_text("\n".join(header + lines[2:]), encoding="utf-8")
            target.chmod(0o755)


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    root = tmp_path_factory.mktemp("venv")
    assert not root.resolve().is_relative_to(ROOT)
    env = Venv(root / "venv", root / "work")
    env.work.mkdir()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env.path)], check=True, timeout=120)
    # installed before the .pth exists, so pip sees an empty venv (and never touches this environment)
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(env.python), "install", "--no-deps",
                           "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stdout + done.stderr
    purelib = env.run(env.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    (Path(purelib) / "_fedsynth_test_dependencies.pth").write_text("\n".join(_site_packages()) + "\n", encoding="utf-8")
    (Path(purelib) / "_fedsynth_test_probe.pth").write_text(_PROBE, encoding="utf-8")
    _repoint_console_scripts(env)
    return env


def test_wheel_ships_plans_templates_and_py_typed(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "fedsynth/py.typed" in names
    for item in (".workspace", "requirements.txt", "plan/plan.yaml", "plan/cols.yaml", "plan/data.yaml", "src/README.md"):
        assert f"fedsynth/plans/workspace/{item}" in names  # the one template every family's workspace is written from
    for item in ("flower_site/start-supernode.sh", "flower_site/data.yaml", "flower_aggregator/start-superlink.sh"):
        assert f"fedsynth/templates/{item}" in names
    assert {n.split("/")[0] for n in names} == {"fedsynth", next(n for n in names if ".dist-info/" in n).split("/")[0]}
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [line for line in zipfile.ZipFile(wheel).read(meta).decode().splitlines() if line.startswith("Requires-Dist:")]
    assert any(line.startswith("Requires-Dist: torch<2.14,>=2.8") or line.startswith("Requires-Dist: torch>=2.8,<2.14")
               for line in requires), requires


def test_installed_wheel_runs_and_finds_its_files(venv: Venv) -> None:
    done = venv.run(venv.bin / "fedsynth", "--help")
    assert done.returncode == 0, done.stderr
    assert "federate" in done.stdout and "templates" in done.stdout
    probe = ("import json, fedsynth, importlib.resources as r\n"
             "from fedsynth.federated.openfl.workspace import plans_dir, template_dir\n"
             "from fedsynth.resources import resource_dir\n"
             "print(json.dumps({'fedsynth': fedsynth.__file__, 'plans': str(plans_dir()),\n"
             "  'template': str(template_dir()), 'site': str(resource_dir('flower-site')),\n"
             "  'typed': r.files('fedsynth').joinpath('py.typed').is_file()}))")
    done = venv.run(venv.python, "-c", probe)
    assert done.returncode == 0, done.stderr
    found = {k: v if isinstance(v, bool) else Path(v) for k, v in json.loads(done.stdout).items()}
    venv_root = venv.path.resolve()
    for key in ("fedsynth", "plans", "template", "site"):
        assert found[key].resolve().is_relative_to(venv_root), f"{key}: {found[key]} is not the wheel's"
    assert (found["template"] / "plan" / "plan.yaml").is_file() and found["typed"]
    done = venv.run(venv.bin / "fedsynth", "templates", "flower-site", "-o", "site")
    assert done.returncode == 0, done.stderr
    assert os.access(venv.work / "site" / "start-supernode.sh", os.X_OK)
    done = venv.run(venv.bin / "fedsynth", "templates", "openfl-gan", "-o", "ws")  # written from the wheel's template
    assert done.returncode == 0, done.stderr
    assert "family: gan" in (venv.work / "ws" / "plan" / "fedsynth.yaml").read_text(encoding="utf-8")


def _tiny_autoencoder(venv: Venv, name: str) -> Path:
    from fedsynth.config import save_config

    path = venv.work / name
    save_config(tiny_config("autoencoder", federation__rounds=1, federation__local_steps=1,
                            federation__round_timeout_s=120.0), path)
    return path


def _sites(mri2d: dict[str, Path]) -> tuple[Path, Path]:
    return mri2d["mni152"], mri2d.get("colin27", mri2d["mni152"])


def test_federate_openfl_from_the_wheel(venv: Venv, mri2d: dict[str, Path]) -> None:
    pytest.importorskip("openfl")
    from fedsynth.checkpoint import checkpoint_info

    config = _tiny_autoencoder(venv, "openfl.yaml")
    a, b = _sites(mri2d)
    done = venv.run(venv.bin / "fedsynth", "federate", "openfl", "-c", config, "--site", f"col1={a}", "--site",
                    f"col2={b}", "--rounds", "1", "-o", "run_openfl", "--timeout", str(FEDERATION_TIMEOUT),
                    timeout=FEDERATION_TIMEOUT + 240, probe=venv.work / "openfl_imports.txt")
    assert done.returncode == 0, done.stdout + done.stderr
    # the CLI, `fx` (plan initialize, collaborators) and the aggregator (python -m) all ran the wheel
    assert {"fedsynth", "fx", "__main__.py"} <= set(venv.imported_fedsynth(venv.work / "openfl_imports.txt"))
    run = venv.work / "run_openfl"
    assert checkpoint_info(run / "global" / "last.ckpt")["round"] == 1 and (run / "global" / "history.json").is_file()


def test_federate_flower_from_the_wheel(venv: Venv, mri2d: dict[str, Path]) -> None:
    pytest.importorskip("flwr")
    from fedsynth.checkpoint import checkpoint_info

    config = _tiny_autoencoder(venv, "flower.yaml")
    a, b = _sites(mri2d)
    done = venv.run(venv.bin / "fedsynth", "federate", "flower", "-c", config, "--site", f"site1={a}", "--site",
                    f"site2={b}", "--rounds", "1", "--no-evaluate", "-o", "run_flower", "--timeout",
                    str(FEDERATION_TIMEOUT), timeout=FEDERATION_TIMEOUT + 120, probe=venv.work / "flower_imports.txt")
    assert done.returncode == 0, done.stdout + done.stderr
    # the CLI, Flower's ServerApp process (started by the SuperLink) and each site's worker ran the wheel
    assert {"fedsynth", "flwr-serverapp", "worker.py"} <= set(venv.imported_fedsynth(venv.work / "flower_imports.txt"))
    run = venv.work / "run_flower"
    assert checkpoint_info(run / "global" / "last.ckpt")["round"] == 1
