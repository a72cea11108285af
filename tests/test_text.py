"""Text-conditioned diffusion on real brain slices whose prompts come from their metadata.

The slices are MNI152 (nilearn) at 32x32 with prompts like "coronal T1 slice, posterior, MNI152
template" (plane, third of the brain, volume). Covered: the tokenizer, config and CSV rules, a
learning test (right prompts denoise held-out slices better than shuffled ones), DP, exact
resume, the CLI (`init-config --conditioning text`, `generate --prompt/--prompts-file`) and a
real Flower federation whose global checkpoint generates from a prompt.
"""

from __future__ import annotations

import csv
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from fedsynth.cli import main
from fedsynth.config import load_config, save_config
from fedsynth.data import load_datasets, make_loader
from fedsynth.data.manifest import read_manifest
from fedsynth.engine import build_engine
from fedsynth.errors import ConfigError, DataError
from fedsynth.models import model_from_checkpoint
from fedsynth.models.text import BEGIN, PAD, HashTokenizer

PROMPT = "axial T1 slice, middle, MNI152 template"


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The brain data set's 32x32 MNI152 slices, train and held-out, with their Prompt column."""
    from fedsynth.data.brains import build_brain_dataset

    return build_brain_dataset(tmp_path_factory.mktemp("brains_text"), image_size=32, volumes=["mni152"],
                               volume_sizes=())


def _text_config(**overrides: object):
    base = {"text__width": 32, "text__layers": 1, "text__heads": 4, "model__attention_levels": [False, True]}
    return tiny_config("diffusion", **{**base, **overrides})


def test_tokenizer_is_deterministic_and_pads() -> None:
    tok = HashTokenizer(vocab_size=64, max_tokens=6)
    ids, mask = tok(["Axial T1 slice, middle", "axial t1 slice middle", "", "a b c d e f g h"])
    assert ids[0].tolist() == ids[1].tolist()  # case and punctuation do not matter
    assert ids[0, 0] == BEGIN and ids[0, 5] == PAD and mask[0].tolist() == [1, 1, 1, 1, 1, 0]
    assert ids[2].tolist() == [BEGIN] + [PAD] * 5 and mask[2].sum() == 1  # the empty prompt
    assert mask[3].sum() == 6  # cut to max_tokens
    assert ((ids >= 0) & (ids < 64)).all()
    assert HashTokenizer(64, 6)(["coronal"])[0].tolist() == tok(["coronal"])[0].tolist()  # same on every host


def test_config_rules() -> None:
    with pytest.raises(ConfigError, match="field 'text'.*gan family"):
        tiny_config("gan", text={})
    with pytest.raises(ConfigError, match="num_classes"):
        tiny_config("diffusion", num_classes=2, text={})
    with pytest.raises(ConfigError, match="text.width"):
        tiny_config("diffusion", text__width=30, text__heads=4)
    assert tiny_config("diffusion", text={}).conditioning == "text"
    assert tiny_config("diffusion", num_classes=2).conditioning == "class"


def test_prompt_column_is_required_and_checked(tmp_path: Path, slices: dict[str, Path]) -> None:
    rows = list(csv.DictReader(slices["train"].open(encoding="utf-8")))
    no_prompt = tmp_path / "no_prompt.csv"
    with no_prompt.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["SubjectID", "Channel_0"])
        w.writerows([r["SubjectID"], str(slices["train"].parent / r["Channel_0"])] for r in rows[:4])
    with pytest.raises(DataError, match=r"no_prompt.csv: the config is text-conditional.*'Prompt'"):
        read_manifest(no_prompt, require_prompt=True)
    empty = tmp_path / "empty_prompt.csv"
    with empty.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["SubjectID", "Channel_0", "Prompt"])
        w.writerows([r["SubjectID"], str(slices["train"].parent / r["Channel_0"]), "" if i == 2 else r["Prompt"]]
                    for i, r in enumerate(rows[:4]))
    with pytest.raises(DataError, match=r"empty_prompt.csv, row 3 \(SubjectID .*\): empty Prompt"):
        read_manifest(empty, require_prompt=True)
    assert read_manifest(slices["train"], require_prompt=True)[0].prompt.endswith("MNI152 template")


def _denoising_loss(model, loader, prompts_of) -> float:
    """Held-out denoising loss with fixed noise and timesteps; ``prompts_of`` maps each batch's prompts."""
    from fedsynth.models.base import Batch

    total, n = 0.0, 0
    for i, batch in enumerate(loader):
        gen = torch.Generator().manual_seed(100 + i)
        b = Batch(batch.images, None, prompts_of(batch.prompts))
        total += float(model._loss(model.plain_net("unet"), b, 0.0, generator=gen)) * len(b)
        n += len(b)
    return total / n


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_prompts_are_learned_held_out(tmp_path: Path, slices: dict[str, Path]) -> None:
    """After 300 steps the right prompt denoises held-out slices better than a shuffled or empty one."""
    torch.manual_seed(0)
    cfg = _text_config(training__epochs=100, training__max_steps=300, training__batch_size=16,
                       training__learning_rate=1e-3, training__ema_decay=0.0, text__prompt_dropout=0.1)
    engine = build_engine(cfg, tmp_path / "run")
    train, held_out = load_datasets(cfg, str(slices["train"]), str(slices["held_out"]))
    engine.fit(train, None, max_steps=300)
    model = engine.model
    model.eval()
    loader = make_loader(held_out, 32, shuffle=False, seed=0)
    rng = random.Random(0)
    all_prompts = sorted({r.prompt for r in held_out.records})
    with torch.no_grad():
        right = _denoising_loss(model, loader, lambda p: p)
        shuffled = _denoising_loss(model, loader, lambda p: [rng.choice([q for q in all_prompts if q != x]) for x in p])
        empty = _denoising_loss(model, loader, lambda p: [""] * len(p))
    assert right < 0.93 * shuffled, (right, shuffled, empty)
    # the empty prompt is the unconditional model (prompt dropout trains it): after 300 steps the right
    # prompt is 4-5 % better on held-out slices, depending on the thread count's summation order
    assert right < 0.97 * empty, (right, shuffled, empty)


def test_text_encoder_trains_under_dp(tmp_path: Path, slices: dict[str, Path]) -> None:
    cfg = _text_config(training__epochs=1, training__max_steps=3,
                       privacy={"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0})
    engine = build_engine(cfg, tmp_path / "run")
    before = engine.model.get_weights(["text_encoder"])
    train, _ = load_datasets(cfg, str(slices["train"]))
    engine.fit(train, None, max_steps=3)
    assert engine.privacy is not None and "text_encoder" in engine.privacy.groups
    assert engine.privacy.report()["epsilon"] > 0
    after = engine.model.get_weights(["text_encoder"])
    assert any(not np.array_equal(before[k], after[k]) for k in before), "DP step did not update the text encoder"


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_resume_is_exact(tmp_path: Path, slices: dict[str, Path]) -> None:
    from fedsynth.engine import LAST

    cfg = _text_config(training__epochs=2, training__batch_size=32)
    train, _ = load_datasets(cfg, str(slices["mni152_train"]))
    whole = build_engine(cfg, tmp_path / "whole")
    whole.fit(train, None)
    part = build_engine(cfg, tmp_path / "part")
    part.fit(train, None, max_steps=5)  # stops inside the first epoch (8 batches an epoch)
    again = build_engine(cfg, tmp_path / "part")
    again.resume(tmp_path / "part" / LAST)
    again.fit(train, None)
    a, b = whole.model.get_weights(), again.model.get_weights()
    assert a.keys() == b.keys() and any(k.startswith("text_encoder/") for k in a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_cli_latent_text_diffusion_and_generate_from_prompts(tmp_path: Path, slices: dict[str, Path],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init-config", "--family", "diffusion", "--image-size", "32", "--latent", "--conditioning", "text",
                 "-o", str(tmp_path / "full.yaml")]) == 0
    written = load_config(tmp_path / "full.yaml")
    assert written.text is not None and written.model.first_stage is not None
    assert main(["init-config", "--family", "gan", "--image-size", "32", "--conditioning", "text",
                 "-o", str(tmp_path / "gan.yaml")]) == 2
    assert "diffusion" in capsys.readouterr().err
    # the same kind of config, tiny: latent diffusion from one config, text-conditioned
    cfg = _text_config(training__epochs=1, training__max_steps=4, model__channels=[16, 32],
                       model__first_stage={"family": "autoencoder", "channels": [8, 16], "latent_channels": 2},
                       model__first_stage_steps=4)
    save_config(cfg, tmp_path / "ldm.yaml")
    run = tmp_path / "run"
    assert main(["train", "-c", str(tmp_path / "ldm.yaml"), "--data", str(slices["mni152_train"]), "-o", str(run)]) == 0
    model = model_from_checkpoint(run / "last.ckpt")
    assert model.groups() == ["unet", "autoencoder", "text_encoder"]
    out = tmp_path / "gen"
    assert main(["generate", "--run", str(run), "-n", "2", "--steps", "2", "--prompt", PROMPT, "-o", str(out)]) == 0
    rows = list(csv.DictReader((out / "manifest.csv").open(encoding="utf-8")))
    assert [r["Prompt"] for r in rows] == [PROMPT, PROMPT]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("coronal T1 slice, anterior, MNI152 template\n\nsagittal T1 slice, left, MNI152 template\n",
                            encoding="utf-8")
    assert main(["generate", "--run", str(run), "-n", "2", "--steps", "2", "--guidance-scale", "2",
                 "--prompts-file", str(prompts_file), "-o", str(out), "--overwrite"]) == 0
    rows = list(csv.DictReader((out / "manifest.csv").open(encoding="utf-8")))
    assert [r["Prompt"].split(" ")[0] for r in rows] == ["coronal", "sagittal"]
    capsys.readouterr()
    assert main(["generate", "--run", str(run), "-n", "2", "--steps", "2", "-o", str(tmp_path / "g2")]) == 2
    assert "give a prompt" in capsys.readouterr().err
    assert main(["generate", "--run", str(run), "-n", "3", "--steps", "2", "--prompts-file", str(prompts_file),
                 "-o", str(tmp_path / "g3")]) == 2
    assert "2 prompts for -n 3" in capsys.readouterr().err


def test_prompt_for_an_unconditional_model_is_refused(tmp_path: Path, mri2d: dict[str, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    save_config(tiny_config("gan", training__epochs=1, training__max_steps=1), tmp_path / "gan.yaml")
    run = tmp_path / "run"
    assert main(["train", "-c", str(tmp_path / "gan.yaml"), "--data", str(mri2d["mni152"]), "-o", str(run)]) == 0
    capsys.readouterr()
    assert main(["generate", "--run", str(run), "-n", "2", "--prompt", PROMPT, "-o", str(tmp_path / "g")]) == 2
    assert "not text-conditional" in capsys.readouterr().err


@pytest.mark.slow
def test_flower_federation_of_a_text_model_generates_from_a_prompt(tmp_path: Path, slices: dict[str, Path]) -> None:
    """Two sites over TLS on 127.0.0.1; prompts stay in each site's CSV, the text encoder is shared."""
    from fedsynth import pki
    from fedsynth.federated.flower.trial import LocalFederation, TrialRequest

    certs = tmp_path / "run" / "certs"
    pki.create_ca(certs, "test CA")
    pki.issue_server_cert(certs, certs, "server", ["127.0.0.1", "localhost"])
    for site in ("site1", "site2"):
        pki.issue_client_cert(certs, certs, site)
    train = read_manifest(slices["mni152_train"], require_prompt=True)
    half = len(train) // 2
    site_csvs = {}
    for name, part in (("site1", train[:half]), ("site2", train[half:])):
        from fedsynth.data.manifest import write_manifest

        site_csvs[name] = tmp_path / f"{name}.csv"
        write_manifest(site_csvs[name], [(r.subject_id, list(r.channels), None) for r in part],
                       prompts=[r.prompt for r in part])
    cfg = _text_config(federation__local_steps=2, federation__round_timeout_s=120.0)
    save_config(cfg, tmp_path / "cfg.yaml")
    fed = LocalFederation(TrialRequest(tmp_path / "cfg.yaml", site_csvs, tmp_path / "run", 2, timeout_s=300))
    assert fed.run()["round"] == 2
    ckpt = tmp_path / "run" / "global" / "last.ckpt"
    model = model_from_checkpoint(ckpt)
    assert "text_encoder" in model.groups()
    out = tmp_path / "samples"
    assert main(["generate", "--checkpoint", str(ckpt), "-n", "2", "--steps", "2", "--prompt", PROMPT,
                 "-o", str(out)]) == 0
    assert len(list(out.glob("*.png"))) >= 2
    shutil.rmtree(tmp_path / "run" / "certs")


def test_agreement_counts_exact_and_per_attribute() -> None:
    from fedsynth.metrics.adherence import agreement

    a = agreement(["axial T1 slice, middle, MNI152 template", "coronal T1 slice, middle, MNI152 template"],
                  ["axial T1 slice, middle, MNI152 template", "axial T1 slice, inferior, MNI152 template"])
    assert a.exact == 0.5 and a.per_attribute == [0.5, 0.5, 1.0] and a.count == 2
    with pytest.raises(ValueError, match="2 read prompts for 1"):
        agreement(["a", "b"], ["a"])


@pytest.mark.slow  # trains beyond a step or spawns processes
def test_prompt_reader_reads_held_out_real_slices_far_above_chance(slices: dict[str, Path]) -> None:
    """The adherence metric's reader, trained on real training slices, reads the prompts of real
    held-out slices; shuffled prompts score near chance (the metric can tell right from wrong)."""
    from fedsynth.config import default_config
    from fedsynth.metrics import load_real
    from fedsynth.metrics.adherence import PromptReader, shuffled

    torch.manual_seed(0)
    cfg = default_config("autoencoder", 2, 32)
    train, held = load_real(slices["train"], cfg), load_real(slices["held_out"], cfg)
    p_train = [r.prompt for r in read_manifest(slices["train"])]
    p_held = [r.prompt for r in read_manifest(slices["held_out"])]
    reader = PromptReader.fit(train.images, p_train, steps=400)
    right = reader.score(held.images, p_held)
    wrong = reader.score(held.images, shuffled(p_held))
    chance = 1 / len(set(p_train))
    assert right.exact > max(3 * chance, 0.4), right
    assert right.per_attribute[0] > 0.85, right  # the plane is unmistakable
    assert wrong.exact < right.exact / 2, (right, wrong)
    with pytest.raises(DataError, match="two distinct prompts"):
        PromptReader.fit(train.images[:4], [p_train[0]] * 4, steps=1)
