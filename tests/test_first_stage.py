"""A latent-diffusion federation ships its frozen first stage with the model, checked by hash.

The server loads ``model.autoencoder_checkpoint`` on its own disk; sites are sent the first
stage's architecture and ``first_stage_sha256`` (no path), get its weights as the frozen
``autoencoder`` group of the global weights (float32 whatever the transport dtype) and refuse
weights that do not match the hash. No aggregation (client-level DP noise included) changes
the first stage; only the latent scale, which sites fix from their first batch, is averaged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from fedsynth.config import save_config
from fedsynth.errors import ConfigError, WeightsError
from fedsynth.federated.aggregation import SiteUpdate, to_transport
from fedsynth.federated.server import GlobalModel
from fedsynth.federated.site import Site
from fedsynth.local import TrainRequest, run_training
from fedsynth.models import first_stage_digest
from fedsynth.models.diffusion import LATENT_SCALE_KEY


@pytest.fixture()
def ldm_config(tmp_path: Path, mri2d: dict[str, Path]):  # type: ignore[no-untyped-def]
    ae = tiny_config("autoencoder", training__epochs=1, training__max_steps=2)
    save_config(ae, tmp_path / "ae.yaml")
    run_training(TrainRequest(str(tmp_path / "ae.yaml"), str(mri2d["mni152"]), str(tmp_path / "server" / "ae")))
    return tiny_config("diffusion", model__autoencoder_checkpoint=str(tmp_path / "server" / "ae" / "last.ckpt"),
                       model__channels=[16, 16], federation__local_steps=2, federation__rounds=2,
                       federation__transport_dtype="float16", federation__min_sites=1)


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_sites_get_the_architecture_and_hash_never_the_servers_path(ldm_config, tmp_path: Path, mri2d) -> None:  # type: ignore[no-untyped-def]
    server = GlobalModel(ldm_config, tmp_path / "server" / "run")
    sent = server.site_config.model
    assert sent.autoencoder_checkpoint is None and sent.first_stage is not None
    assert sent.first_stage_sha256 == first_stage_digest(server.model.get_weights(["autoencoder"]))
    assert server.frozen == ["autoencoder"]
    # the site host has no copy of the server's checkpoint
    shutil.move(tmp_path / "server", tmp_path / "elsewhere")
    site = Site(server.site_config, mri2d["colin27"], tmp_path / "state", site_id="site1")
    assert first_stage_digest(site.shared_weights()) != sent.first_stage_sha256  # untrained until the weights come
    sent_weights = to_transport(server.shared_weights(), "float16", server.frozen)
    assert all(v.dtype == np.float32 for k, v in sent_weights.items() if k.startswith("autoencoder/"))
    assert any(v.dtype == np.float16 for k, v in sent_weights.items() if k.startswith("unet/"))
    result = site.train_round(sent_weights, 1)
    assert first_stage_digest(result.weights) == sent.first_stage_sha256
    assert float(result.weights[LATENT_SCALE_KEY]) > 0  # fixed from the site's first batch
    server.aggregate(1, [SiteUpdate("site1", to_transport(result.weights, "float16", site.frozen), 10, {})])
    assert first_stage_digest(server.shared_weights()) == sent.first_stage_sha256
    assert float(server.shared_weights()[LATENT_SCALE_KEY]) > 0
    last = server.save()
    from fedsynth.checkpoint import checkpoint_info
    from fedsynth.models import model_from_checkpoint

    assert checkpoint_info(last)["latent_diffusion"]
    stored = model_from_checkpoint(last)  # self-contained: no path to the first stage needed
    assert first_stage_digest(stored.get_weights(["autoencoder"])) == sent.first_stage_sha256


def test_a_site_refuses_a_first_stage_that_does_not_match_the_hash(ldm_config, tmp_path: Path, mri2d) -> None:  # type: ignore[no-untyped-def]
    server = GlobalModel(ldm_config, tmp_path / "server" / "run")
    site = Site(server.site_config, mri2d["colin27"], tmp_path / "state", site_id="site1")
    weights = server.shared_weights()
    key = next(k for k in weights if k.startswith("autoencoder/") and k != LATENT_SCALE_KEY and weights[k].size > 1)
    weights[key] = weights[key] + np.float32(1e-3)
    with pytest.raises(WeightsError, match=r"site 'site1': the first stage received from the server.*sha256"):
        site.train_round(weights, 1)


def test_aggregation_never_changes_the_first_stage(ldm_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = GlobalModel(ldm_config, tmp_path / "server" / "run")
    pinned = server.site_config.model.first_stage_sha256
    update = {k: v + np.float32(0.5) if np.issubdtype(v.dtype, np.floating) else v for k, v in server.shared_weights().items()}
    server.aggregate(1, [SiteUpdate("site1", update, 10, {})])  # e.g. a buggy site, or noise
    assert first_stage_digest(server.shared_weights()) == pinned
    assert any(not np.array_equal(server.shared_weights()[k], update[k] - 0.5) for k in update if k.startswith("unet/"))


def test_local_training_refuses_a_shipped_config_without_its_weights(ldm_config, tmp_path: Path, mri2d) -> None:  # type: ignore[no-untyped-def]
    shipped = GlobalModel(ldm_config, tmp_path / "server" / "run").site_config
    save_config(shipped, tmp_path / "shipped.yaml")
    with pytest.raises(ConfigError, match="first_stage_sha256"):
        run_training(TrainRequest(str(tmp_path / "shipped.yaml"), str(mri2d["mni152"]), str(tmp_path / "local")))


def test_an_autoencoder_that_does_not_match_the_pinned_hash_is_refused(ldm_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fedsynth.models import build_model

    shipped = GlobalModel(ldm_config, tmp_path / "server" / "run").site_config.model_copy(deep=True)
    shipped.model.autoencoder_checkpoint = ldm_config.model.autoencoder_checkpoint
    shipped.model.first_stage_sha256 = "0" * 64
    with pytest.raises(WeightsError, match="model.first_stage_sha256 pins 0000"):
        build_model(shipped)
