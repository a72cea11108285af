"""Example-level DP through the one engine, on real MRI slices: accounting, clipping, the DP-GAN
pattern, empty Poisson batches, the budget stop, checkpoints and resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_config

from fedsynth.checkpoint import checkpoint_info, load_checkpoint
from fedsynth.data.dataset import load_datasets, make_loader
from fedsynth.engine import LAST, build_engine
from fedsynth.errors import CheckpointError, ConfigError
from fedsynth.models import model_from_checkpoint
from fedsynth.models.base import Batch

opacus = pytest.importorskip("opacus")
from opacus.accountants import PRVAccountant, RDPAccountant  # noqa: E402
from opacus.grad_sample import GradSampleModule  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402

from fedsynth.privacy import PrivacyLedger  # noqa: E402

DP = {"enabled": True, "noise_multiplier": 1.1, "max_grad_norm": 1.0}


def _engine(cfg, csv, run_dir=None):
    train, _ = load_datasets(cfg, str(csv))
    return build_engine(cfg, run_dir), train


def test_epsilon_equals_opacus_accountant(mri2d) -> None:
    cfg = tiny_config("autoencoder", model={"family": "autoencoder", "channels": [8, 16], "latent_channels": 2,
                                            "adversarial_weight": 0.1}, privacy=DP)
    engine, train = _engine(cfg, mri2d["mni152"])
    engine.fit(train, epochs=5, max_steps=4)
    q = cfg.training.batch_size / len(train)
    ref = RDPAccountant()
    for _ in range(4):  # three private groups step per batch, but it is one mechanism per batch
        ref.step(noise_multiplier=1.1, sample_rate=q)
    assert engine.privacy.ledger.history == [(1.1, q, 4)]
    assert engine.privacy.report()["epsilon"] == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-12)
    assert engine.state.metrics["epsilon"] == engine.privacy.report()["epsilon"]


def test_prv_ledger_equals_opacus() -> None:
    ledger = PrivacyLedger("prv", 1e-5)
    ref = PRVAccountant()
    for _ in range(20):
        ledger.step(0.9, 0.05)
        ref.step(noise_multiplier=0.9, sample_rate=0.05)
    assert ledger.epsilon == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)


def test_clipped_per_example_gradients_within_bound(mri2d) -> None:
    """Batch of one real image at a time, no noise: the applied gradient is that image's clipped one."""
    cfg = tiny_config("autoencoder", model={"family": "autoencoder", "channels": [8, 16], "latent_channels": 2,
                                            "adversarial_weight": 0.1},
                      privacy={"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 0.05})
    engine, train = _engine(cfg, mri2d["mni152"])
    engine.loader(train, train=True)  # make_private
    opts = engine.optimizers
    assert all(isinstance(opts[g], DPOptimizer) for g in ("encoder", "decoder", "discriminator"))
    for opt in opts.values():
        opt.noise_multiplier = 0.0
    images = next(iter(make_loader(train, 4, shuffle=False, seed=0))).images
    for i in range(len(images)):
        engine.train_step(Batch(images[i:i + 1]))
        per_group = {g: math.sqrt(sum(float((p.grad * opt.expected_batch_size).pow(2).sum()) for p in opt.params))
                     for g, opt in opts.items()}
        joint = math.sqrt(sum(v**2 for v in per_group.values()))
        for g, norm in per_group.items():
            assert norm <= 0.05 / math.sqrt(3) * (1 + 1e-4), (g, norm)
        assert joint <= 0.05 * (1 + 1e-4)
        assert joint > 0.05 * 0.9, "the bound was not reached: clipping was not exercised"


def test_dp_gan_generator_has_no_per_sample_machinery_and_trains(mri2d) -> None:
    cfg = tiny_config("gan", privacy=DP)
    engine, train = _engine(cfg, mri2d["mni152"])
    g_before = engine.model.get_weights(["generator"])
    engine.fit(train, epochs=1, max_steps=4)
    model = engine.model
    assert isinstance(model.net("discriminator"), GradSampleModule)
    assert not isinstance(model.net("generator"), GradSampleModule)
    assert isinstance(engine.optimizers["discriminator"], DPOptimizer)
    assert not isinstance(engine.optimizers["generator"], DPOptimizer)
    assert all(getattr(p, "grad_sample", None) is None for p in model.plain_net("generator").parameters())
    g_after = model.get_weights(["generator"])
    assert any(not np.array_equal(g_before[k], g_after[k]) for k in g_before), "the generator did not train"
    keys = model.get_weights().keys()
    assert not any("_module" in k for k in keys)
    assert set(keys) == set(g_before) | {k for k in keys if k.startswith("discriminator/")}


def test_empty_poisson_batch_is_a_noise_only_accounted_step(mri2d) -> None:
    cfg = tiny_config("diffusion", privacy=DP)
    engine, train = _engine(cfg, mri2d["mni152"])
    engine.loader(train, train=True)
    model = engine.model
    before = model.get_weights(["unet"])
    empty = Batch(torch.zeros(0, 1, 32, 32))
    assert engine.train_step(empty) == {}
    assert engine.privacy.ledger.steps == 1
    after = model.get_weights(["unet"])
    assert any(not np.array_equal(before[k], after[k]) for k in before), "an empty batch must still add noise"
    images = next(iter(make_loader(train, 3, shuffle=False, seed=0))).images
    out = engine.train_step(Batch(images))  # the step after an empty one works
    assert math.isfinite(out["loss"]) and engine.privacy.ledger.steps == 2
    collate = engine.privacy._private_loader.collate_fn
    assert len(collate([])) == 0


def test_budget_stop_before_exceeding_target(mri2d) -> None:
    cfg = tiny_config("gan", privacy={**DP, "target_epsilon": 3.0})
    engine, train = _engine(cfg, mri2d["mni152"])
    state = engine.fit(train, epochs=100)
    ledger = engine.privacy.ledger
    assert state.epoch < 100 and ledger.steps > 0
    assert ledger.epsilon <= 3.0
    sigma, q, _ = ledger.history[-1]
    assert ledger.epsilon_of(ledger.history + [(sigma, q, 1)]) > 3.0, "stopped earlier than needed"
    assert engine.privacy.can_step() is not None and "target_epsilon" in engine.privacy.can_step()


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_target_epsilon_calibrates_noise(mri2d) -> None:
    cfg = tiny_config("gan", privacy={"enabled": True, "target_epsilon": 8.0, "epochs": 3})
    engine, train = _engine(cfg, mri2d["mni152"])
    state = engine.fit(train, epochs=3)
    assert state.epoch == 3, "calibrated noise must let the planned epochs run"
    assert 6.0 < engine.privacy.ledger.epsilon <= 8.0


def test_checkpoint_and_resume_keep_epsilon_continuous(mri2d, tmp_path) -> None:
    cfg = tiny_config("gan", privacy=DP, training__epochs=3)
    straight, train = _engine(cfg, mri2d["mni152"], tmp_path / "straight")
    straight.fit(train, epochs=3)
    first, train = _engine(cfg, mri2d["mni152"], tmp_path / "split")
    first.fit(train, epochs=2)
    payload = load_checkpoint(tmp_path / "split" / LAST)
    assert payload["privacy"]["epsilon"] == first.privacy.ledger.epsilon > 0
    info = checkpoint_info(tmp_path / "split" / LAST)
    assert info["privacy_epsilon"] == first.privacy.ledger.epsilon and info["privacy_delta"] == 1e-5
    second, train = _engine(cfg, mri2d["mni152"], tmp_path / "split")
    second.resume(tmp_path / "split" / LAST)
    assert second.privacy.ledger.history == first.privacy.ledger.history
    second.fit(train, epochs=3)
    assert second.privacy.ledger.history == straight.privacy.ledger.history
    assert second.privacy.ledger.epsilon == straight.privacy.ledger.epsilon
    a, b = straight.model.get_weights(), second.model.get_weights()
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a), "resume under DP is not exact"


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_wrapping_happens_once(mri2d) -> None:
    cfg = tiny_config("gan", privacy=DP)
    engine, train = _engine(cfg, mri2d["mni152"])
    engine.fit(train, epochs=1, max_steps=2)
    gsm = engine.model.net("discriminator")
    train2, _ = load_datasets(cfg, str(mri2d["mni152"]))  # a new dataset object: make_private again
    engine.fit(train2, epochs=2, max_steps=4)
    assert engine.model.net("discriminator") is gsm and not isinstance(gsm._module, GradSampleModule)
    assert not isinstance(engine.optimizers["discriminator"].original_optimizer, DPOptimizer)
    assert engine.privacy.ledger.steps == 4


def test_batchnorm_discriminator_is_replaced_and_reloads(mri2d, tmp_path, caplog) -> None:
    cfg = tiny_config("gan", model={"family": "gan", "latent_dim": 16, "generator_channels": 32,
                                    "discriminator_channels": 16, "discriminator_norm": "batch"}, privacy=DP)
    engine, train = _engine(cfg, mri2d["mni152"], tmp_path)
    assert any("BatchNorm replaced by GroupNorm" in m for m in engine.privacy.messages)
    engine.fit(train, epochs=1, max_steps=2)
    model = model_from_checkpoint(tmp_path / LAST)
    assert model.config.model.discriminator_norm == "group"


@pytest.mark.parametrize(("privacy", "message"), [
    ({"enabled": True, "noise_multiplier": 1.0, "groups": ["generator"]}, "leaves out 'discriminator'"),
    ({"enabled": True, "noise_multiplier": 1.0, "groups": ["critic"]}, "unknown group 'critic'"),
])
def test_privacy_group_errors(privacy, message) -> None:
    from fedsynth.models import build_model
    from fedsynth.privacy import make_privacy_plugin

    cfg = tiny_config("gan", privacy=privacy)
    with pytest.raises(ConfigError, match=message):
        make_privacy_plugin(cfg, build_model(cfg))


def test_privacy_needs_noise_or_budget() -> None:
    with pytest.raises(ConfigError, match="noise_multiplier or target_epsilon"):
        tiny_config("gan", privacy={"enabled": True})


def test_resume_with_other_accountant_is_refused() -> None:
    ledger = PrivacyLedger("prv", 1e-5)
    with pytest.raises(CheckpointError, match="'rdp' accountant"):
        ledger.load_state_dict({"accountant": "rdp", "history": [[1.0, 0.1, 3]]})


def test_dp_under_bf16_autocast(mri2d) -> None:
    cfg = tiny_config("gan", privacy=DP, training__precision="bf16")
    engine, train = _engine(cfg, mri2d["mni152"])
    state = engine.fit(train, epochs=1, max_steps=2)
    assert state.step == 2 and engine.privacy.ledger.steps == 2
    assert all(p.dtype == torch.float32 for p in engine.model.parameters())


def test_conditional_dp_gan_generator_step_ignores_the_real_batch(mri2d) -> None:
    """The generator step uses a fixed-size fake batch with random labels, and still runs on an
    empty Poisson batch, so it is a function of the private discriminator only."""
    cfg = tiny_config("gan", num_classes=2, privacy=DP)
    engine, train = _engine(cfg, mri2d["all"])
    engine.loader(train, train=True)
    model = engine.model
    assert model.fakes.size == cfg.training.batch_size and not model.r1.on
    g_before, d_before = model.get_weights(["generator"]), model.get_weights(["discriminator"])
    out = engine.train_step(Batch(torch.zeros(0, 1, 32, 32), torch.zeros(0, dtype=torch.long)))
    assert set(out) == {"g_loss"} and engine.privacy.ledger.steps == 1
    g_after, d_after = model.get_weights(["generator"]), model.get_weights(["discriminator"])
    assert any(not np.array_equal(g_before[k], g_after[k]) for k in g_before)
    assert any(not np.array_equal(d_before[k], d_after[k]) for k in d_before)  # noise-only D step
    batch = next(iter(make_loader(train, 3, shuffle=False, seed=0)))
    out = engine.train_step(batch)
    assert math.isfinite(out["d_loss"]) and math.isfinite(out["g_loss"]) and engine.privacy.ledger.steps == 2


def test_privacy_package_knows_no_family() -> None:
    """What a family needs under DP is declared on its groups (GroupSpec, PrivacySpec): the privacy
    package names no family, network or training detail of one."""
    import re
    from pathlib import Path

    import fedsynth.privacy

    family_words = re.compile(r"\b(gan|stylegan|discriminator|generator|autoencoder|vq|vqvae|diffusion|unet|latent|"
                              r"fake|r1)s?\b", re.IGNORECASE)
    for path in Path(fedsynth.privacy.__file__).parent.glob("*.py"):
        found = family_words.search(path.read_text(encoding="utf-8"))
        assert found is None, f"{path.name} names '{found.group(0) if found else ''}'"
