"""The family registry: every registered family is complete, a new family is one module plus
one line in ``FAMILY_MODULES``, and reading the registry (configs, ``--help``) loads no torch.

The registry is read once per process (``fedsynth.config`` builds the ``model:`` union from it
when it is first imported), so the new family is registered in a fresh interpreter, before that
import, as a user's own code would do it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from fedsynth.errors import ConfigError
from fedsynth.families import FAMILY_MODULES, families, family, family_names
from fedsynth.models import build_model

ROOT = Path(__file__).resolve().parents[1]

#: a throwaway family: the GAN's networks under the tag ``tinygan``, with its own recipe and sizes
TINY_FAMILY = '''
"""A throwaway family for tests: the GAN's networks under the tag ``tinygan``."""

from __future__ import annotations

from typing import Any, Literal

from fedsynth.families import Family
from fedsynth.families import gan
from fedsynth.models.gan import GanModel


class TinyGanConfig(gan.GanConfig):
    """The GAN's config block under the tag tinygan."""

    family: Literal["tinygan"] = "tinygan"


class TinyGanModel(GanModel):
    family = "tinygan"


def recipe(spatial_dims: int, size: list[int]) -> dict[str, Any]:
    r = gan.recipe(spatial_dims, size)
    return {"model": {**r["model"], "family": "tinygan", "generator_channels": 16}, "training": r["training"]}


FAMILY = Family(name="tinygan", config=TinyGanConfig, model_ref=TinyGanModel, recipe=recipe,
                check_geometry=gan.check_geometry,
                test_model={"latent_dim": 8, "generator_channels": 16, "discriminator_channels": 8})
'''

#: runs in a fresh interpreter: register tinygan (the one line), then use it everywhere
USE_IT = '''
import sys
from pathlib import Path

import fedsynth.families as registry

registry.FAMILY_MODULES = (*registry.FAMILY_MODULES, "tiny_family")  # the one registry line

import torch
from conftest import tiny_config

from fedsynth.cli import build_parser, main
from fedsynth.config import config_from_dict, default_config, load_config
from fedsynth.errors import ConfigError
from fedsynth.models import Batch, build_model

out = Path(sys.argv[1])
assert "tinygan" in registry.family_names()
cfg = config_from_dict({"image_size": 32, "model": {"family": "tinygan"}}, "x.yaml")
assert type(cfg.model).__name__ == "TinyGanConfig"
for data, field in (({"model": {"family": "tinygan", "bogus": 1}}, "field 'model.bogus': unknown key"),
                    ({"image_size": 36, "model": {"family": "tinygan"}}, "field 'image_size'"),  # its geometry rule
                    ({"text": {}, "model": {"family": "tinygan"}}, "field 'text'")):  # its conditioning
    try:
        config_from_dict(data, "x.yaml")
        raise AssertionError(f"{data} validated")
    except ConfigError as err:
        assert field in str(err), str(err)

# init-config: a --family choice, its recipe, its conditioning; demo lists it
assert main(["init-config", "--family", "tinygan", "--image-size", "32", "-o", str(out / "c.yaml")]) == 0
written = load_config(out / "c.yaml")
assert written.model.family == "tinygan" and written.model.generator_channels == 16
assert written == default_config("tinygan", 2, 32)
assert main(["init-config", "--family", "tinygan", "--image-size", "32", "--conditioning", "text",
             "-o", str(out / "t.yaml")]) == 2
assert build_parser().parse_args(["demo", "-o", str(out / "demo"), "--family", "tinygan"]).family == "tinygan"

# tests' sizes; it builds and trains a step
model = build_model(tiny_config("tinygan"))
assert type(model).__name__ == "TinyGanModel" and model.config.model.latent_dim == 8
optimizers = model.configure_optimizers(model.config.training)
before = {k: v.copy() for k, v in model.get_weights(["generator"]).items()}
torch.manual_seed(0)
losses = model.training_step(Batch(torch.rand(4, 1, 32, 32)), optimizers)
assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
assert any((model.get_weights(["generator"])[k] != v).any() for k, v in before.items())

# its OpenFL workspace
assert main(["templates", "openfl-tinygan", "-o", str(out / "ws")]) == 0
assert "(family: tinygan)" in (out / "ws" / "plan" / "plan.yaml").read_text(encoding="utf-8")
assert load_config(out / "ws" / "plan" / "fedsynth.yaml").model.family == "tinygan"
print("tinygan ok")
'''


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_a_new_family_is_one_module_and_one_registry_line(tmp_path: Path) -> None:
    (tmp_path / "tiny_family.py").write_text(TINY_FAMILY, encoding="utf-8")
    (tmp_path / "out").mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path), str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", USE_IT, str(tmp_path / "out")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tinygan ok" in done.stdout


@pytest.mark.parametrize("name", family_names())
def test_every_registered_family_is_complete(name: str) -> None:
    """Its module, tag, config block, model class and test sizes agree, and the test config builds."""
    spec = family(name)
    assert spec.config.model_fields["family"].default == name and spec.model.family == name
    assert set(spec.conditioning) <= {"none", "class", "text"} and "none" in spec.conditioning
    model = build_model(tiny_config(name))
    assert type(model) is spec.model and model.groups()


def test_registry_lists_its_modules_once_and_names_unknown_families() -> None:
    assert len(families()) == len(FAMILY_MODULES)
    with pytest.raises(ConfigError, match=r"unknown family 'nope': expected one of \[.*'gan'"):
        family("nope")


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_a_family_module_imports_first_and_config_re_exports_its_block() -> None:
    """Family modules must not import fedsynth.config at import time (it imports them); a fresh
    interpreter that starts from a family module reaches the same classes through fedsynth.config."""
    probe = ("import fedsynth.families.gan as gan\n"
             "from fedsynth.config import AutoencoderConfig, DiffusionConfig, GanConfig, config_from_dict\n"
             "from fedsynth.families import family\n"
             "assert GanConfig is gan.GanConfig is family('gan').config\n"
             "assert {AutoencoderConfig, DiffusionConfig} == {family('autoencoder').config, family('diffusion').config}\n"
             "assert type(config_from_dict({'model': {'family': 'gan'}}).model) is GanConfig\n"
             "import fedsynth.models.gan as nets\n"
             "assert nets.GanConfig is GanConfig and family('gan').model is nets.GanModel\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
