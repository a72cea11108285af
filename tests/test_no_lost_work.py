"""Nothing a user has is lost: ``--overwrite`` replaces a run only once the new one has trained,
a failed start leaves the folder as it was, one writer per run folder, a resume trains on the data
it started with, and ``generate`` replaces an earlier generation only when asked and only once the
new images are written (a full disk included)."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_config

from fedsynth.cli import main
from fedsynth.data.images import save_image

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]  # trains, spawns processes


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the hash of its content."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def setup(tmp_path: Path, mri2d: dict[str, Path]) -> tuple[Path, Path, Path]:
    """(config, data CSV, run folder) of a one-step GAN run."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config("gan", training__max_steps=1, training__sample_every=1).to_dict()),
                   encoding="utf-8")
    return cfg, mri2d["mni152"], tmp_path / "run"


def _train(cfg: Path, data: Path, run: Path, *extra: str) -> int:
    return main(["train", "-c", str(cfg), "--data", str(data), "-o", str(run), *extra])


def test_overwrite_with_bad_inputs_keeps_the_old_run(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    cfg, data, run = setup
    assert _train(cfg, data, run) == 0
    before = _tree(run)
    assert "last.ckpt" in before
    assert _train(cfg, tmp_path / "missing.csv", run, "--overwrite") == 2  # a CSV that is not there
    assert _tree(run) == before
    diverging = tmp_path / "diverging.yaml"
    bad = tiny_config("gan", training__max_steps=1, training__learning_rate=1e30).to_dict()
    diverging.write_text(yaml.safe_dump(bad), encoding="utf-8")
    assert _train(diverging, data, run, "--overwrite") == 2  # diverges before its first checkpoint
    assert _tree(run) == before, "a failed --overwrite changed the run it was to replace"


def test_overwrite_replaces_the_run_once_the_new_one_has_trained(setup: tuple[Path, Path, Path]) -> None:
    cfg, data, run = setup
    assert _train(cfg, data, run) == 0
    first = _tree(run)["last.ckpt"]
    assert _train(cfg, data, run, "--overwrite", "--seed", "7") == 0
    after = _tree(run)
    assert after["last.ckpt"] != first and not (run / ".replaced").exists() and ".fedsynth.lock" not in after


def test_a_failed_first_start_leaves_no_folder(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, data, run = setup
    diverging = tmp_path / "diverging.yaml"
    diverging.write_text(yaml.safe_dump(tiny_config("gan", training__max_steps=1, training__learning_rate=1e30).to_dict()),
                         encoding="utf-8")
    assert _train(diverging, data, run) == 2
    assert not run.exists()


def test_a_second_writer_is_refused_with_the_holders_pid(setup: tuple[Path, Path, Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    cfg, data, run = setup
    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom fedsynth.io import FolderLock\n"
                               f"FolderLock({str(run)!r}, 'fedsynth train').acquire()\nprint('locked', flush=True)\n"
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert _train(cfg, data, run) == 2
        assert f"in use by PID {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert _train(cfg, data, run) == 0  # the lock died with its holder


def test_resume_on_other_images_is_refused_naming_them(setup: tuple[Path, Path, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    cfg, data, run = setup
    assert _train(cfg, data, run) == 0
    moved = tmp_path / "moved.csv"  # the same images under other paths: the same data
    lines = data.read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], lines[1:]
    cols = header.split(",")
    i = cols.index("Channel_0")
    absolute = [",".join(c if k != i else str((data.parent / c).resolve()) for k, c in enumerate(r.split(","))) for r in rows]
    moved.write_text("\n".join([header, *absolute]) + "\n", encoding="utf-8")
    assert _train(cfg, moved, run, "--resume", "--max-steps", "2") == 0
    changed = tmp_path / "changed.csv"
    other = tmp_path / "other.nii.gz"
    save_image(np.random.default_rng(0).random((1, 32, 32), dtype=np.float32), other)
    first = absolute[0].split(",")
    first[i] = str(other)
    changed.write_text("\n".join([header, ",".join(first), *absolute[1:]]) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert _train(cfg, changed, run, "--resume", "--max-steps", "3") == 2
    assert "training data differ" in capsys.readouterr().err


def test_generate_keeps_an_earlier_generation_unless_asked(setup: tuple[Path, Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg, data, run = setup
    assert _train(cfg, data, run) == 0
    out = tmp_path / "gen"
    argv = ["generate", "--run", str(run), "-n", "3", "-o", str(out)]
    assert main(argv) == 0
    before = _tree(out)
    capsys.readouterr()
    assert main([*argv, "--seed", "5"]) == 2 and "--overwrite" in capsys.readouterr().err
    assert _tree(out) == before
    assert main([*argv, "--seed", "5", "-n", "2", "--overwrite"]) == 0
    after = _tree(out)
    assert after != before and "synthetic_0002.png" not in after and not list(out.glob(".fedsynth-*"))


def _no_bigger_files(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_generate_on_a_full_disk_changes_nothing(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    cfg, data, run = setup
    assert _train(cfg, data, run) == 0
    out = tmp_path / "gen"
    assert main(["generate", "--run", str(run), "-n", "2", "-o", str(out)]) == 0
    before = _tree(out)
    done = subprocess.run([sys.executable, "-m", "fedsynth", "generate", "--run", str(run), "-n", "4", "-o", str(out),
                           "--overwrite", "--seed", "3"], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
                          preexec_fn=lambda: _no_bigger_files(120), env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "cannot write" in done.stderr, done.stderr
    assert _tree(out) == before and not list(out.glob(".fedsynth-*"))


def test_one_process_writes_a_site_state_folder(tmp_path: Path, mri2d: dict[str, Path]) -> None:
    """A second site process on the same state folder is refused; inside one process the lock is shared."""
    from fedsynth.federated.site import Site

    config = tiny_config("gan")
    site = Site(config, mri2d["mni152"], tmp_path / "state", site_id="a")
    again = Site(config, mri2d["mni152"], tmp_path / "state", site_id="a")  # e.g. a cache rebuilt in the worker
    probe = ("import sys\nsys.path.insert(0, 'tests')\nfrom conftest import tiny_config\n"
             "from fedsynth.errors import OutputError\nimport fedsynth.federated.site as s\ns.LOCK_WAIT_S = 1.0\nfrom fedsynth.federated.site import Site\n"
             f"try:\n    Site(tiny_config('gan'), {str(mri2d['mni152'])!r}, {str(tmp_path / 'state')!r}, site_id='b')\n"
             "except OutputError as err:\n    print('refused:', err)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert "refused:" in done.stdout and "in use by PID" in done.stdout and "site 'a'" in done.stdout, done.stdout + done.stderr
    del site, again
    import gc

    gc.collect()
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert "refused:" not in done.stdout and done.returncode == 0, done.stdout + done.stderr
