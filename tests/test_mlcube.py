"""The fedsynth MLCube (mlcube/): the real ``mlcube`` package with its docker runner parses and
describes the cube; each task's entrypoint runs natively with exactly the arguments the docker
runner would pass (computed by mlcube itself from mlcube.yaml), on the real MRI slices of the
example workspace, inside a copy of the mounted folders only; the Dockerfile is checked statically.

The mlcube-driven tests need ``pip install -r mlcube/requirements-ci.txt`` (pip < 24.1) and skip
with that reason without it; the entrypoint, example-workspace and Dockerfile tests always run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CUBE = ROOT / "mlcube"
EXAMPLE = CUBE / "workspace"
TASK_OUTPUTS = {"train": ["run"], "generate": ["images"], "evaluate": ["report", "report_png"]}

NO_RUNTIME = "mlcube/mlcube-docker not installed: pip install -r mlcube/requirements-ci.txt (needs pip < 24.1)"


@pytest.fixture(scope="module")
def runtime() -> None:
    """The MLCube runtime (mlcube with its docker runner); tests that need it skip without it."""
    pytest.importorskip("mlcube.config", reason=NO_RUNTIME)
    pytest.importorskip("mlcube_docker.docker_run", reason=NO_RUNTIME)


def _mlcube_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLCUBE_SYSTEM_SETTINGS": str(tmp_path / "mlcube_system_settings.yaml")}
    return subprocess.run([sys.executable, "-m", "mlcube", *args], capture_output=True, text=True, encoding="utf-8", errors="replace", env=env,
                          timeout=120, cwd=tmp_path)


def _effective_config(workspace: Path):
    """The resolved cube configuration, as the docker runner sees it (mlcube's own code)."""
    from mlcube.config import MLCubeConfig
    from mlcube_docker.docker_run import DockerRun

    return MLCubeConfig.create_mlcube_config(str(CUBE / "mlcube.yaml"), workspace=str(workspace),
                                             runner_cls=DockerRun, resolve=True)


def _dockerfile_entrypoint() -> list[str]:
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", (CUBE / "Dockerfile").read_text(encoding="utf-8"), re.M)
    assert match, "mlcube/Dockerfile has no exec-form ENTRYPOINT"
    return json.loads(match.group(1))


def run_in_container_view(task: str, workspace: Path, scratch: Path) -> subprocess.CompletedProcess[str]:
    """Run ``task`` as ``docker run IMAGE <args>`` would, without Docker.

    mlcube computes the mounts (host folder -> /mlcube_ioN) and the task arguments; each mounted
    folder is copied to ``scratch/mlcube_ioN`` (only those are visible, as in the container),
    the image's ENTRYPOINT runs with those arguments, and the mounts are copied back.
    """
    from mlcube.shell import Shell

    mounts, args, _ = Shell.generate_mounts_and_args(_effective_config(workspace), task)
    assert args[0] == task
    root = scratch / task
    for host, inner in mounts.items():
        shutil.copytree(host, root / inner.lstrip("/"), dirs_exist_ok=True)
    argv = [a.replace("=/mlcube_io", f"={root}/mlcube_io") for a in args]
    entry = _dockerfile_entrypoint()
    assert entry[0] == "python"
    proc = subprocess.run([sys.executable, *entry[1:], *argv], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
                          cwd=scratch)
    for host, inner in mounts.items():
        shutil.copytree(root / inner.lstrip("/"), host, dirs_exist_ok=True)
    return proc


def _assert_outputs(task: str, workspace: Path) -> None:
    outputs = _effective_config(workspace).tasks[task].parameters.outputs
    assert sorted(outputs) == sorted(TASK_OUTPUTS[task])
    for name, spec in outputs.items():
        path = workspace / spec.default
        if spec.type == "directory":
            assert path.is_dir() and any(path.iterdir()), f"{task}: output '{name}' ({path}) is empty"
        else:
            assert path.is_file() and path.stat().st_size > 0, f"{task}: output '{name}' ({path}) not written"


def _has_evaluate() -> bool:
    from fedsynth.mlcube_entrypoint import _subparser

    return _subparser("evaluate") is not None


# --------------------------------------------------------------------------- mlcube parses the cube


def test_mlcube_describes_the_cube(runtime, tmp_path: Path) -> None:
    proc = _mlcube_cli(tmp_path, "describe", f"--mlcube={CUBE}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in ("name = train, inputs = ['config', 'data', 'parameters'], outputs = ['run']",
                 "name = generate, inputs = ['checkpoint', 'parameters'], outputs = ['images']",
                 "name = evaluate, inputs = ['real', 'synthetic', 'parameters'], outputs = ['report', 'report_png']"):
        assert line in proc.stdout


def test_mlcube_show_config_docker_cpu_default_and_cuda_by_build_arg(runtime, tmp_path: Path) -> None:
    proc = _mlcube_cli(tmp_path, "show_config", f"--mlcube={CUBE}", "--platform=docker", "--resolve")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runner = yaml.safe_load(proc.stdout)["runner"]
    assert runner["runner"] == "docker" and runner["build_args"] == "--build-arg TORCH_VARIANT=cpu"
    assert (CUBE / runner["build_context"] / runner["build_file"]).resolve() == CUBE / "Dockerfile"
    proc = _mlcube_cli(tmp_path, "show_config", f"--mlcube={CUBE}", "--platform=docker", "--resolve",
                       "-Pdocker.build_args.TORCH_VARIANT=cu128", "-Pplatform.accelerator_count=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = yaml.safe_load(proc.stdout)
    assert config["runner"]["build_args"] == "--build-arg TORCH_VARIANT=cu128"
    assert config["platform"]["accelerator_count"] == 1 and "--gpus" in config["runner"]["gpu_args"]


# --------------------------------------------------------------------------- tasks, natively


@pytest.fixture(scope="module")
def trained_workspace(runtime, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, subprocess.CompletedProcess[str]]]:
    """A copy of the example workspace after the train and generate tasks."""
    tmp = tmp_path_factory.mktemp("cube")
    workspace = tmp / "workspace"
    shutil.copytree(EXAMPLE, workspace, ignore=shutil.ignore_patterns("run", "generated", "report"))
    procs = {task: run_in_container_view(task, workspace, tmp / "container") for task in ("train", "generate")}
    return workspace, procs


def test_train_and_generate_tasks_write_their_declared_outputs(trained_workspace) -> None:
    workspace, procs = trained_workspace
    for task, proc in procs.items():
        assert proc.returncode == 0, f"{task}:\n{proc.stdout}\n{proc.stderr}"
        _assert_outputs(task, workspace)
    assert (workspace / "run" / "last.ckpt").is_file()
    from fedsynth.checkpoint import checkpoint_info

    assert checkpoint_info(workspace / "run" / "last.ckpt")["epoch"] == 1  # example parameters: epochs 1
    params = yaml.safe_load((workspace / "parameters.yaml").read_text(encoding="utf-8"))
    images = sorted((workspace / "generated").glob("synthetic_*.png"))
    assert len(images) == params["generate"]["num_images"]


def test_evaluate_task_writes_report(trained_workspace, tmp_path: Path) -> None:
    if not _has_evaluate():
        pytest.skip("`fedsynth evaluate` sub-command not in this fedsynth (fedsynth.metrics missing)")
    workspace, _ = trained_workspace
    proc = run_in_container_view("evaluate", workspace, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _assert_outputs("evaluate", workspace)
    report = json.loads((workspace / "report" / "report.json").read_text(encoding="utf-8"))
    assert isinstance(report, dict) and report


# --------------------------------------------------------------------------- entrypoint errors


def _entry(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    from fedsynth.mlcube_entrypoint import main

    code = main(list(argv))
    return code, capsys.readouterr().err


def test_entrypoint_errors_name_the_parameter_file_and_value(tmp_path: Path, capsys) -> None:
    params = tmp_path / "parameters.yaml"
    params.write_text("train: {epochs: 1}\n", encoding="utf-8")
    code, err = _entry(capsys, "train", f"--config={EXAMPLE / 'config.yaml'}", f"--data={tmp_path / 'nope.csv'}",
                       f"--parameters={params}", f"--run={tmp_path / 'run'}")
    assert code == 2 and "parameter 'data'" in err and "nope.csv" in err and "Traceback" not in err

    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epoch: 1}\n", encoding="utf-8")
    code, err = _entry(capsys, "train", f"--config={EXAMPLE / 'config.yaml'}", f"--data={EXAMPLE / 'data' / 'train.csv'}",
                       f"--parameters={bad}", f"--run={tmp_path / 'run'}")
    assert code == 2 and str(bad) in err and "'epoch'" in err and "epochs" in err

    bad.write_text("evaluate: {train: ../elsewhere.csv}\n", encoding="utf-8")
    code, err = _entry(capsys, "evaluate", f"--real={EXAMPLE / 'data' / 'real.csv'}", f"--synthetic={tmp_path}",
                       f"--parameters={bad}", f"--report={tmp_path / 'r.json'}", f"--report_png={tmp_path / 'r.png'}")
    assert code == 2 and ("names a path" in err or "no 'fedsynth evaluate'" in err)

    code, err = _entry(capsys, "generate", f"--checkpoint={tmp_path / 'run' / 'last.ckpt'}", f"--parameters={params}",
                       f"--images={tmp_path / 'gen'}")
    assert code == 2 and "last.ckpt" in err

    code, err = _entry(capsys, "train", f"--config={EXAMPLE / 'config.yaml'}", f"--data={EXAMPLE / 'data'}",
                       f"--parameters={tmp_path / 'missing.yaml'}", f"--run={tmp_path / 'run'}")
    assert code == 2 and "missing.yaml" in err
    assert not (tmp_path / "run").exists()


def test_data_outside_the_mounted_folder_is_reported(tmp_path: Path) -> None:
    from fedsynth.errors import DataError
    from fedsynth.mlcube_entrypoint import resolve_manifest

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(EXAMPLE / "data" / "images" / "train_mni152" / "mni152_slice000.nii.gz", tmp_path / "outside.nii.gz")
    (data / "train.csv").write_text("SubjectID,Channel_0\ns1,../gone/outside.nii.gz\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.csv, row 1.*relative to the CSV"):
        resolve_manifest(data / "train.csv", "data", tmp_path)
    (data / "other.csv").write_text("SubjectID,Channel_0\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"several CSVs.*other\.csv.*train\.csv"):
        resolve_manifest(data, "data", tmp_path)


def test_data_folder_of_images_gets_a_manifest(tmp_path: Path) -> None:
    from fedsynth.data.manifest import read_manifest
    from fedsynth.mlcube_entrypoint import resolve_manifest

    images = tmp_path / "images"
    shutil.copytree(EXAMPLE / "data" / "images" / "train_mni152", images)
    csv = resolve_manifest(images, "data", tmp_path / "scratch")
    assert len(read_manifest(csv)) == 12
    assert resolve_manifest(EXAMPLE / "data" / "train.csv", "data", tmp_path) == EXAMPLE / "data" / "train.csv"


# --------------------------------------------------------------------------- example workspace, Dockerfile


def test_example_workspace_is_small_real_and_relocatable() -> None:
    import numpy as np

    from fedsynth.config import load_config
    from fedsynth.data.images import read_image
    from fedsynth.data.manifest import read_manifest

    files = [p for p in EXAMPLE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 300_000
    load_config(EXAMPLE / "config.yaml")
    for name in ("train.csv", "real.csv"):
        csv = EXAMPLE / "data" / name
        for row in csv.read_text(encoding="utf-8").splitlines()[1:]:
            assert not Path(row.split(",")[1]).is_absolute() and ".." not in row, f"{csv}: {row}"
        records = read_manifest(csv)
        assert len(records) >= 8
        for record in records:
            image = np.asarray(read_image(record.channels[0]))
            assert image.squeeze().shape == (32, 32) and float(image.std()) > 0.01


def test_dockerfile_installs_like_the_readme() -> None:
    text = (CUBE / "Dockerfile").read_text(encoding="utf-8")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    from packaging.requirements import Requirement

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    # the tested torch build: pinned by the README (and .ci/run), a range in the package metadata
    pin = re.search(r"pip install (torch==[\d.]+)", readme)
    assert pin, "README no longer pins torch"
    torch_pin = pin.group(1)
    torch_req = next(Requirement(d) for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    assert torch_pin.split("==")[1] in torch_req.specifier, (torch_pin, str(torch_req))
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.M), "CPU build must be the default"
    python = re.search(r"^ARG PYTHON_IMAGE=python:(\d+\.\d+)", text, re.M)
    assert python and python.group(1) == "3.11"  # requires-python
    runs = [line for line in text.splitlines() if line.startswith("RUN pip install")]
    assert len(runs) == 2, runs
    assert f'"{torch_pin}"' in runs[0] and "whl/${TORCH_VARIANT}" in runs[0]
    extras = re.search(r'pip install "\.\[([a-z,]+)\]"', runs[1])
    assert extras, runs[1]
    assert set(extras.group(1).split(",")) <= set(pyproject["project"]["optional-dependencies"])
    assert not any("torchvision" in line for line in text.splitlines() if not line.startswith("#"))
    # the README's order: the pinned torch first, then the package (editable there, a wheel in the image)
    assert re.search(rf"pip install {re.escape(torch_pin)}\b.*?pip install (-e )?\"?\.", readme, re.S), \
        "README no longer installs the torch pin before the package: update mlcube/Dockerfile to match"
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for item in source.split():
            assert (ROOT / item).exists(), f"Dockerfile copies {item}, which the repository lacks"
    module = _dockerfile_entrypoint()[-1]
    assert _dockerfile_entrypoint()[:2] == ["python", "-m"] and (ROOT / (module.replace(".", "/") + ".py")).is_file()
    ignore = (CUBE / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    assert ignore[next(i for i, line in enumerate(ignore) if not line.startswith("#"))] == "*"
