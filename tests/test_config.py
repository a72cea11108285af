"""Config validation: every bad input gets one clear error naming the file, field and value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedsynth.cli import main
from fedsynth.config import config_from_dict, default_config, load_config, render_yaml
from fedsynth.errors import ConfigError
from fedsynth.families import family as family_spec
from fedsynth.families import family_names


def _write(tmp_path: Path, data: object, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"training": {"batch_sise": 4}}, ["cfg.yaml", "training.batch_sise", "unknown key"]),
        ({"data": {"data_augmentations": []}}, ["data.data_augmentations", "unknown key"]),
        ({"training": {"batch_size": -1}}, ["training.batch_size", "greater than or equal to 1", "-1"]),
        ({"model": {"family": "vae"}}, ["model", "'vae'"]),
        ({"spatial_dims": 4}, ["spatial_dims", "4"]),
        ({"spatial_dims": 3, "image_size": [32, 32]}, ["image_size has 2 entries but spatial_dims is 3"]),
        ({"model": {"family": "gan", "loss": "wasserstein"}}, ["model.loss", "'wasserstein'"]),
        ({"model": {"family": "diffusion", "channels": [32, 64], "attention_levels": [True]}}, ["attention_levels"]),
        ({"federation": {"groups": {"generator": "private"}}}, ["federation.groups.generator", "'private'"]),
        ({"data": {"percentiles": [99, 1]}}, ["percentiles"]),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path: Path, data: dict, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    for text in expected:
        assert text in str(err.value)


def test_missing_and_unparsable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "training: [unclosed"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("family", family_names())
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_init_config_round_trips(tmp_path: Path, family: str, spatial_dims: int) -> None:
    out = tmp_path / "cfg.yaml"
    assert main(["init-config", "--family", family, "--spatial-dims", str(spatial_dims), "--image-size", "32",
                 "--num-classes", "2" if "class" in family_spec(family).conditioning else "0", "-o", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "#" in text  # commented
    cfg = load_config(out)
    assert cfg.family == family and cfg.spatial_dims == spatial_dims and cfg.image_size == [32] * spatial_dims


def test_render_yaml_is_exact(tmp_path: Path) -> None:
    cfg = default_config("diffusion", 2, 32, num_classes=3)
    assert config_from_dict(yaml.safe_load(render_yaml(cfg))) == cfg


def test_cli_reports_config_error_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write(tmp_path, {"training": {"epocs": 3}})
    csv = tmp_path / "d.csv"
    csv.write_text("SubjectID,Channel_0\n", encoding="utf-8")
    assert main(["train", "-c", str(cfg), "--data", str(csv), "-o", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "training.epocs" in err and "Traceback" not in err
