"""A site never persists a non-finite state: a diverged round leaves its last good checkpoint,
the site restores it and reports the failure, and the next round trains from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from fedsynth.checkpoint import load_checkpoint
from fedsynth.data import load_datasets
from fedsynth.engine import build_engine
from fedsynth.errors import TrainingDiverged
from fedsynth.federated.site import Site


def _poison(engine) -> None:  # type: ignore[no-untyped-def]
    """Make every later training step leave a NaN in the discriminator (as a diverging run does)."""
    plain = engine.model.training_step

    def step(batch, optimizers):  # type: ignore[no-untyped-def]
        out = plain(batch, optimizers)
        with torch.no_grad():
            next(engine.model.plain_net("discriminator").parameters()).view(-1)[0] = float("nan")
        return out

    engine.model.training_step = step


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in load_checkpoint(path)["weights"].items()}


def test_engine_never_checkpoints_non_finite_weights(tmp_path: Path, mri2d: dict[str, Path]) -> None:
    cfg = tiny_config("gan", training__epochs=1)
    engine = build_engine(cfg, tmp_path / "run")
    train, _ = load_datasets(cfg, str(mri2d["mni152"]))
    _poison(engine)
    with pytest.raises(TrainingDiverged, match="diverged by step 3: weight .* is not finite; nothing was saved"):
        engine.fit(train)
    assert not (tmp_path / "run" / "last.ckpt").exists()


def test_diverged_round_restores_the_last_good_state(tmp_path: Path, mri2d: dict[str, Path]) -> None:
    cfg = tiny_config("gan", federation={"rounds": 3, "local_steps": 2})
    site = Site(cfg, mri2d["mni152"], tmp_path / "state", site_id="site1")
    first = site.train_round(site.shared_weights(), 1)
    good = _weights(site.state_dir / "last.ckpt")
    assert all(np.isfinite(v).all() for v in good.values())

    _poison(site.engine)
    with pytest.raises(TrainingDiverged):
        site.train_round(first.weights, 2)
    after = _weights(site.state_dir / "last.ckpt")
    assert after.keys() == good.keys() and all(np.array_equal(after[k], good[k]) for k in good)  # not overwritten
    live = site.engine.model.get_weights()
    assert all(np.array_equal(live[k], good[k]) for k in good)  # the site holds its last good state again
    assert site.engine.state.step == 2

    third = site.train_round(first.weights, 3)  # the next round trains from it
    assert all(np.isfinite(v).all() for v in third.weights.values()) and site.engine.state.step == 4


def test_site_state_is_keyed_by_federation(tmp_path: Path, mri2d: dict[str, Path]) -> None:
    """A new federation (other config or federation_id) never continues another's local state;
    the same federation resumed with more rounds does."""
    cfg = tiny_config("gan", federation={"rounds": 2, "local_steps": 2})
    site = Site(cfg, mri2d["mni152"], tmp_path / "state", site_id="site1")
    site.train_round(site.shared_weights(), 1)
    assert site.state_dir.parent == tmp_path / "state" and (site.state_dir / "last.ckpt").is_file()
    resumed = Site(tiny_config("gan", federation={"rounds": 5, "local_steps": 2}), mri2d["mni152"], tmp_path / "state")
    assert resumed.state_dir == site.state_dir and resumed.engine.state.step == 2
    other = Site(tiny_config("gan", federation={"rounds": 2, "local_steps": 2, "federation_id": "study-2"}),
                 mri2d["mni152"], tmp_path / "state")
    assert other.state_dir == tmp_path / "state" / "study-2" and other.engine.state.step == 0


def test_a_round_of_whole_local_epochs(tmp_path: Path, mri2d: dict[str, Path]) -> None:
    """federation.local_epochs without local_steps: one round is one pass over the site's data."""
    cfg = tiny_config("gan", federation={"rounds": 2, "local_epochs": 1})
    site = Site(cfg, mri2d["mni152"], tmp_path / "state", site_id="site1")
    site.train_round(site.shared_weights(), 1)
    assert site.engine.state.epoch == 1 and site.engine.state.step == -(-site.num_samples // cfg.training.batch_size)
