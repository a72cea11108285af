"""The user's path, end to end: a CLI that explains itself, training that says what it will run and
shows it, generation that records what it used, and sample grids worth looking at."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from fedsynth.cli import build_parser, main


def _parsers(parser: argparse.ArgumentParser, name: str = "fedsynth") -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += _parsers(sub, f"{name} {sub_name}")
    return found


def test_every_option_of_every_command_has_help_and_every_command_examples() -> None:
    missing, no_examples = [], []
    for name, parser in _parsers(build_parser()):
        if "examples:" not in (parser.epilog or ""):
            no_examples.append(name)
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            if not action.help:
                missing.append(f"{name} {action.option_strings or action.dest}")
    assert missing == []
    assert no_examples == []


def test_version_and_did_you_mean(capsys: pytest.CaptureFixture[str]) -> None:
    from fedsynth import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"fedsynth {__version__}"
    with pytest.raises(SystemExit):
        main(["init-config", "--family", "gn", "--image-size", "32", "-o", "x.yaml"])
    assert "did you mean 'gan'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["trian"])
    assert "did you mean 'train'?" in capsys.readouterr().err


def test_unknown_config_key_suggests_the_field() -> None:
    from fedsynth.config import config_from_dict
    from fedsynth.errors import ConfigError

    with pytest.raises(ConfigError, match=r"training.max_step': unknown key \(did you mean 'max_steps'\?\)"):
        config_from_dict({"training": {"max_step": 3}})
    with pytest.raises(ConfigError, match=r"did you mean 'prob'"):
        config_from_dict({"data": {"augmentations": [{"name": "flip", "prb": 0.5}]}})


def test_written_config_says_how_to_validate_it(tmp_path: Path) -> None:
    assert main(["init-config", "--family", "gan", "--image-size", "32", "-o", str(tmp_path / "c.yaml")]) == 0
    assert "# Validate with: fedsynth validate -c THIS_FILE --data data.csv" in (tmp_path / "c.yaml").read_text()


def _write(config: object, path: Path) -> Path:
    from fedsynth.config import render_yaml

    path.write_text(render_yaml(config), encoding="utf-8")  # type: ignore[arg-type]
    return path


def test_train_overrides_are_validated_like_the_config(tmp_path: Path, mri2d: dict[str, Path],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write(tiny_config("gan"), tmp_path / "c.yaml")
    code = main(["train", "-c", str(cfg), "--data", str(mri2d["mni152"]), "-o", str(tmp_path / "run"), "--seed", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and "field 'seed'" in err and "--seed -1" in err
    code = main(["validate", "-c", str(cfg), "--data", str(mri2d["mni152"]), "--batch-size", "0"])
    assert code == 2 and "training.batch_size" in capsys.readouterr().err


def test_validate_reports_images_model_memory_and_plan(tmp_path: Path, mri2d: dict[str, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write(tiny_config("diffusion", training__max_steps=7), tmp_path / "c.yaml")
    assert main(["validate", "-c", str(cfg), "--data", str(mri2d["mni152"]), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "24 row(s) read and checked" in out and "config image_size [32, 32]" in out
    assert "model, UNet: unet" in out and "parameters" in out
    assert "memory of one training step" in out and "GiB needed per process" in out
    assert "stage 1/1 UNet: 7 steps = 2 epoch(s) of 6 batch(es) of 4 (24 images)" in out
    assert "ready to train" in out and "fedsynth validate: done in" in out
    assert not (tmp_path / "run").exists()


def test_validate_fails_with_exit_2_on_a_bad_row(tmp_path: Path, mri2d: dict[str, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write(tiny_config("gan"), tmp_path / "c.yaml")
    from fedsynth.data.manifest import read_manifest, write_manifest

    records = read_manifest(mri2d["mni152"])
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(records[0].channels[0].read_bytes()[:200])  # a truncated copy of a real slice
    bad = tmp_path / "bad.csv"
    write_manifest(bad, [*((r.subject_id, [r.channels[0]], r.label) for r in records), ("ghost", [broken], 0)])
    assert main(["validate", "-c", str(cfg), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "row 25 (SubjectID 'ghost')" in err and "fedsynth validate: error" in err


def test_three_d_grid_shows_three_planes_at_a_readable_size() -> None:
    from fedsynth.generation import image_grid

    volumes = np.zeros((2, 1, 16, 16, 16), np.float32)
    volumes[:, :, 8, :, :] = 1.0  # the plane through the centre of axis 0: a line in the other two views
    grid = image_grid(volumes, columns=1)
    side = 128  # 16 px upscaled 8x (nearest)
    assert grid.shape == (1, 2 * (side + 2) + 2, 3 * side + 4 + 4)
    tile = grid[0, 2:2 + side, 2:2 + 3 * side + 4]
    assert tile[:, :side].min() == 1.0  # axial: the plane itself
    assert tile[:, side + 2: 2 * side + 2].mean() == pytest.approx(1 / 16)  # coronal: one row of 16, 8 px tall
    assert tile[:, side:side + 2].min() == 0.5  # the grey line between two planes of one volume


def test_plots_spread_real_images_over_the_whole_set() -> None:
    from fedsynth.metrics.plots import spread

    assert spread(100, 5).tolist() == [0, 25, 50, 74, 99]
    assert spread(3, 16).tolist() == [0, 1, 2]


@pytest.mark.slow
def test_generate_names_checkpoint_weights_and_sampler(tmp_path: Path, mri2d: dict[str, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write(tiny_config("diffusion", training__max_steps=3, training__epochs=1), tmp_path / "c.yaml")
    run = tmp_path / "run"
    assert main(["train", "-c", str(cfg), "--data", str(mri2d["mni152"]), "--val-data", str(mri2d["colin27"]),
                 "-o", str(run), "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert (run / "samples" / "final.png").is_file() and "fedsynth train: done in" in out
    assert main(["generate", "--run", str(run), "-n", "2", "--steps", "2", "-o", str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    assert "--run: using last.ckpt" in out and "step 2, epoch 0" in out and "sampler ddim, sampling steps 2" in out
    record = json.loads((tmp_path / "g" / "generation.json").read_text())
    assert record["checkpoint"]["path"] == str((run / "last.ckpt").resolve()) and record["checkpoint"]["step"] == 2
    assert record["weights"] == "ema" and record["seed"] == 0 and record["sampling_steps"] == 2
    assert len(record["checkpoint"]["sha256"]) == 64
    assert main(["generate", "--run", str(run), "--best", "-n", "1", "--steps", "2", "-o", str(tmp_path / "b")]) == 0
    assert "using best.ckpt" in capsys.readouterr().out
