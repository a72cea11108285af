"""Membership-inference audit of a released model (``fedsynth audit``); see docs/privacy.md.

Given the images a model was trained on (members) and images of the same distribution it never
saw (non-members), each attack gives every image a score, higher meaning "I guess it was trained
on". An attack is as good as its ROC: AUC 0.5 = guessing; TPR at a low FPR = how many training
images it exposes while rarely accusing an outsider. The attacks a privacy reviewer runs:

- the family's own per-image score, what training drove down for its training images:
  diffusion: the denoising loss at several intermediate timesteps (fixed noise, a few draws) and
  their log-mean (latent diffusion also: its first stage's reconstruction error); GAN and
  style-based GAN: the discriminator's logit; autoencoder: the reconstruction error through the
  deterministic latent (and its patch discriminator's mean logit if it has one);
- every family: the distance from each image to its nearest generated sample (a model that
  copies its training images puts samples next to them).

Each attack reports AUC and TPR at 1 % and 0.1 % FPR with percentile-bootstrap intervals
(members and non-members resampled separately), and the **empirical epsilon lower bound** the
outcome implies: ``eps >= ln((TPR - delta) / FPR)`` with TPR and FPR at the conservative ends of
exact (Clopper-Pearson) intervals, Bonferroni-corrected over every attack and FPR, so that picking
the strongest one does not inflate it. The accountant's epsilon from the checkpoint's privacy
record stands beside it: a lower bound above the accountant's epsilon means the DP claim is broken.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsynth.checkpoint import checkpoint_info
from fedsynth.data.dataset import ImageDataset
from fedsynth.data.manifest import read_manifest
from fedsynth.errors import DataError, FedsynthError
from fedsynth.metrics import stats
from fedsynth.models.base import SynthesisModel, to_model_range

#: target false-positive rates of the report
FPRS = (0.01, 0.001)


@dataclass(frozen=True)
class AuditOptions:
    """Attack settings."""

    samples: int = 256  # generated images for the nearest-neighbour attack (0: skip it)
    timesteps: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)  # diffusion: fractions of num_train_timesteps
    noise_draws: int = 4  # diffusion: noise draws averaged per image and timestep
    sampler: str | None = None  # diffusion sampling for the nearest-neighbour attack (default: the config's)
    steps: int | None = None
    bootstrap: int = 200
    seed: int = 0
    batch_size: int = 32


@dataclass(frozen=True)
class Candidates:
    """Images to be classified as member or not, preprocessed as in training, with their conditions."""

    images: torch.Tensor
    labels: torch.Tensor | None
    prompts: list[str] | None
    ids: list[str]
    files: list[tuple[str, ...]]
    source: str


def load_candidates(csv: str | Path, model: SynthesisModel, flag: str) -> Candidates:
    """Read a CSV through the training data pipeline of the model's config."""
    config = model.config
    records = read_manifest(csv, expected_channels=config.channels, num_classes=config.num_classes,
                            require_prompt=config.text is not None)
    dataset = ImageDataset(records, config, train=False)
    if len(dataset) < 2:
        raise DataError(f"{flag} {csv}: {len(dataset)} usable image(s); an attack needs at least 2")
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).float()
    labels = torch.tensor([r.label for r in dataset.records]) if config.num_classes else None
    prompts = [r.prompt or "" for r in dataset.records] if config.text is not None else None
    return Candidates(images, labels, prompts, [r.subject_id for r in dataset.records],
                      [tuple(str(Path(f).resolve()) for f in r.channels) for r in dataset.records], str(csv))


def _batches(c: Candidates, size: int) -> list[tuple[torch.Tensor, torch.Tensor | None, list[str] | None]]:
    return [(c.images[s:s + size], None if c.labels is None else c.labels[s:s + size],
             None if c.prompts is None else c.prompts[s:s + size]) for s in range(0, len(c.images), size)]


@torch.no_grad()
def diffusion_losses(model: Any, c: Candidates, options: AuditOptions) -> dict[str, np.ndarray]:
    """Per image and timestep: the denoising loss averaged over fixed noise draws (attack score = -loss).

    The noise of draw ``k`` depends on the image's position in its set only through one seeded
    stream per set, so members and non-members are scored with identically distributed noise.
    """
    unet = model.plain_net("unet")
    total = model.cfg.num_train_timesteps
    out: dict[str, np.ndarray] = {}
    for fraction in options.timesteps:
        t_value = min(total - 1, max(0, round(fraction * total)))
        losses = []
        for x, labels, prompts in _batches(c, options.batch_size):
            x0 = model._to_sample_space(x.to(model.device))
            context = model._text_context(prompts, 0.0)
            class_labels = model._class_inputs(labels.to(model.device) if labels is not None else None, 0.0)
            t = torch.full((len(x0),), t_value, dtype=torch.long, device=x0.device)
            per_image = torch.zeros(len(x0))
            for k in range(options.noise_draws):
                gen = torch.Generator(device=x0.device).manual_seed(options.seed * 1000 + k)
                noise = torch.randn(x0.shape, generator=gen, device=x0.device)
                x_t = model.train_scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
                pred = unet(x_t, timesteps=t, context=context, class_labels=class_labels)
                target = (noise if model.cfg.prediction_type == "epsilon" else x0 if model.cfg.prediction_type == "sample"
                          else model.train_scheduler.get_velocity(x0, noise, t))
                per_image += ((pred.float() - target.float()) ** 2).flatten(1).mean(1).cpu()
            losses.append(per_image / options.noise_draws)
        out[f"denoising_loss_t{t_value}"] = torch.cat(losses).numpy()
    return out


def log_mean(losses: dict[str, np.ndarray]) -> np.ndarray:
    """Per image, the mean over timesteps of the log loss (the log of the geometric mean).

    Denoising losses differ by an order of magnitude between timesteps (the noise is hardest to
    predict when there is least of it) and the timesteps with the largest losses are the least
    informative; a plain mean is their score. In logs every timestep counts by its relative change,
    which is what training drives down for a member.
    """
    return np.mean([np.log(np.maximum(v, 1e-12)) for v in losses.values()], 0)


@torch.no_grad()
def reconstruction_errors(autoencoder: Any, c: Candidates, size: int) -> np.ndarray:
    """Mean squared reconstruction error per image (data range), through the deterministic latent
    (the KL posterior's mean, or the VQ-quantised code): a sampled latent would only add noise to
    every score, members' and non-members' alike, and make the score depend on the random state."""
    errors = []
    for x, _, _ in _batches(c, size):
        recon = autoencoder.decode_latent(autoencoder.encode_latent(x.to(autoencoder.device)))
        errors.append(((recon.float().cpu() - x) ** 2).flatten(1).mean(1))
    return torch.cat(errors).numpy()


@torch.no_grad()
def discriminator_logits(model: Any, c: Candidates, patch: bool = False) -> np.ndarray:
    """The discriminator's score of each image, one image per forward (a style-based discriminator's
    minibatch statistics must not mix members with non-members)."""
    net = model.plain_net("discriminator")
    scores = []
    for i in range(len(c.images)):
        x = to_model_range(c.images[i:i + 1].to(model.device))
        if patch:  # the autoencoder's patch discriminator: mean of its last map
            scores.append(float(net(x)[-1].float().mean()))
        else:
            labels = c.labels[i:i + 1].to(model.device) if c.labels is not None else None
            scores.append(float(net(x, labels).float().reshape(-1)[0]))
    return np.asarray(scores)


def nearest_sample_distance(samples: torch.Tensor, c: Candidates) -> np.ndarray:
    """RMS pixel distance from each candidate image to its nearest generated sample."""
    a = c.images.flatten(1).double()
    b = samples.flatten(1).double()
    d2 = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T
    return (d2.clamp_min(0).min(1).values / a.shape[1]).sqrt().numpy()


def _generate(model: SynthesisModel, members: Candidates, non_members: Candidates, options: AuditOptions) -> torch.Tensor:
    from fedsynth.generation import sample

    n = options.samples
    labels = torch.arange(n) % model.config.num_classes if model.config.num_classes else None
    prompts = None
    if members.prompts is not None and non_members.prompts is not None:
        pool = [p for pair in zip(members.prompts, non_members.prompts, strict=False) for p in pair]  # both sets' conditions alike
        prompts = [pool[i % len(pool)] for i in range(n)]
    with torch.random.fork_rng(devices=[]):
        return sample(model, n, seed=options.seed, labels=labels, prompts=prompts, sampler=options.sampler,
                      steps=options.steps)


def attack_scores(model: SynthesisModel, members: Candidates, non_members: Candidates,
                  options: AuditOptions) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """``{attack: (member scores, non-member scores, description)}``, every score oriented higher = member."""
    from fedsynth.models.autoencoder import AutoencoderModel
    from fedsynth.models.diffusion import DiffusionModel
    from fedsynth.models.gan import GanModel

    model.eval()
    out: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
    if isinstance(model, DiffusionModel):
        lm, ln = diffusion_losses(model, members, options), diffusion_losses(model, non_members, options)
        for key in lm:
            out[key] = (-lm[key], -ln[key], f"minus the denoising loss at timestep {key.rsplit('t', 1)[1]} "
                                             f"(mean of {options.noise_draws} fixed noise draws)")
        out["denoising_loss_mean"] = (-log_mean(lm), -log_mean(ln),
                                      "minus the mean over the timesteps of the log denoising loss")
        first = model.first_stage()
        if isinstance(first, AutoencoderModel):
            out["first_stage_reconstruction"] = (-reconstruction_errors(first, members, options.batch_size),
                                                 -reconstruction_errors(first, non_members, options.batch_size),
                                                 "minus the first-stage autoencoder's reconstruction MSE")
    elif isinstance(model, GanModel):  # the style-based GAN is one too
        out["discriminator"] = (discriminator_logits(model, members), discriminator_logits(model, non_members),
                                "the discriminator's logit (realness)")
    elif isinstance(model, AutoencoderModel):
        out["reconstruction"] = (-reconstruction_errors(model, members, options.batch_size),
                                 -reconstruction_errors(model, non_members, options.batch_size),
                                 "minus the reconstruction MSE")
        if "discriminator" in model.nets:
            out["patch_discriminator"] = (discriminator_logits(model, members, patch=True),
                                          discriminator_logits(model, non_members, patch=True),
                                          "the patch discriminator's mean logit")
    if options.samples > 0:
        samples = _generate(model, members, non_members, options)
        out["nearest_sample"] = (-nearest_sample_distance(samples, members), -nearest_sample_distance(samples, non_members),
                                 f"minus the RMS distance to the nearest of {options.samples} generated samples")
    return out


def evaluate_attack(members: np.ndarray, non_members: np.ndarray, *, replicates: int, seed: int, delta: float,
                    level: float) -> dict[str, Any]:
    """AUC and TPR at each FPR in :data:`FPRS` with bootstrap intervals, and the epsilon bound at each FPR."""

    def replicate(im: np.ndarray, i_n: np.ndarray) -> dict[str, float]:
        m, n = members[im], non_members[i_n]
        out = {"auc": stats.roc_auc(m, n)}
        out.update({f"tpr@{f}": stats.tpr_at_fpr(m, n, f)["tpr"] for f in FPRS})
        return out

    draws = stats.bootstrap(replicate, [len(members), len(non_members)], replicates, seed) if replicates > 0 else {}
    result: dict[str, Any] = {"auc": stats.roc_auc(members, non_members),
                              "auc_ci95": stats.interval(draws["auc"]) if draws else None}
    for f in FPRS:
        at = stats.tpr_at_fpr(members, non_members, f)
        bound = stats.epsilon_lower_bound(int(at["true_positives"]), int(at["members"]), int(at["false_positives"]),
                                          int(at["non_members"]), delta=delta, level=level)
        result[f"fpr_{f:g}"] = {"tpr": at["tpr"], "tpr_ci95": stats.interval(draws[f"tpr@{f}"]) if draws else None,
                                "fpr_reached": at["fpr"], "true_positives": at["true_positives"],
                                "false_positives": at["false_positives"], "epsilon_lower_bound": bound["epsilon"],
                                "tpr_low": bound["tpr_low"], "fpr_high": bound["fpr_high"]}
    return result


def audit(checkpoint: str | Path, members_csv: str | Path, non_members_csv: str | Path,
          options: AuditOptions | None = None, *, weights: str = "ema") -> dict[str, Any]:
    """Run every attack that applies to the checkpoint's family; returns the JSON-able report."""
    from fedsynth.metrics.evaluate import _clean
    from fedsynth.models import model_from_checkpoint

    opt = options or AuditOptions()
    started = time.perf_counter()
    info = checkpoint_info(checkpoint)
    model = model_from_checkpoint(checkpoint, device="cpu", weights=weights)
    members = load_candidates(members_csv, model, "--members")
    non_members = load_candidates(non_members_csv, model, "--non-members")
    shared = sorted(set(members.files) & set(non_members.files))
    if shared:  # the same image on both sides would score as its own non-member
        raise DataError(f"--members {members_csv} and --non-members {non_members_csv} list the same image file(s), e.g. "
                        f"{shared[0][0]} ({len(shared)} in all): an image cannot be both")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opt.seed)
        scores = attack_scores(model, members, non_members, opt)
    if not scores:
        raise FedsynthError(f"{checkpoint}: no attack applies to a {info['family']} checkpoint with --samples 0")
    delta = float(info["privacy_delta"] or 0.0)
    tests = len(scores) * len(FPRS)
    level = 1 - (1 - stats.LEVEL) / tests  # Bonferroni: the strongest of several attacks is not a free pick
    attacks = {}
    for name, (m, n, description) in scores.items():
        attacks[name] = {"description": description, **evaluate_attack(m, n, replicates=opt.bootstrap, seed=opt.seed,
                                                                        delta=delta, level=level)}
    strongest = max(attacks, key=lambda a: attacks[a]["auc"])
    bound_at = max(((a, f) for a in attacks for f in FPRS), key=lambda af: attacks[af[0]][f"fpr_{af[1]:g}"]["epsilon_lower_bound"])
    empirical = attacks[bound_at[0]][f"fpr_{bound_at[1]:g}"]["epsilon_lower_bound"]
    accountant = info["privacy_epsilon"]
    verdict = ("the attacks break the accountant's epsilon: the DP guarantee does not hold for this model"
               if accountant is not None and empirical > accountant else
               "no attack beats chance at the 95 % level" if attacks[strongest]["auc_ci95"] and
               (attacks[strongest]["auc_ci95"][0] or 0) <= 0.5 else
               "the model leaks membership: an attacker tells training images from others better than chance")
    summary = {
        "verdict": verdict,
        "strongest_attack": strongest, "auc": attacks[strongest]["auc"], "auc_ci95": attacks[strongest]["auc_ci95"],
        **{f"tpr_at_fpr_{f:g}": attacks[strongest][f"fpr_{f:g}"]["tpr"] for f in FPRS},
        "empirical_epsilon_lower_bound": empirical,
        "empirical_epsilon_from": {"attack": bound_at[0], "fpr": bound_at[1]},
        "accountant_epsilon": accountant, "accountant_delta": info["privacy_delta"],
        "members": len(members.images), "non_members": len(non_members.images),
        "smallest_nonzero_fpr": 1 / len(non_members.images),
    }
    notes = []
    if len(non_members.images) < 1 / min(FPRS):
        notes.append(f"{len(non_members.images)} non-members: FPRs below {1 / len(non_members.images):.3g} cannot be "
                     "observed, so TPR at those FPRs counts only images scored above every non-member; the epsilon "
                     "bound accounts for it (Clopper-Pearson), use more non-members for a tighter one")
    report = {
        "summary": summary, "attacks": attacks,
        "checkpoint": {"path": str(checkpoint), "family": info["family"], "epoch": info["epoch"], "step": info["step"],
                       "weights": weights, "privacy_epsilon": accountant, "privacy_delta": info["privacy_delta"]},
        "members": {"source": members.source, "count": len(members.images)},
        "non_members": {"source": non_members.source, "count": len(non_members.images)},
        "method": {"orientation": "every score is higher for a suspected member",
                   "intervals": f"{stats.LEVEL:.0%} percentile bootstrap, {opt.bootstrap} replicates, members and "
                                f"non-members resampled separately, seed {opt.seed}",
                   "epsilon": "eps >= max(ln((TPR_low - delta) / FPR_high), ln((TNR_low - delta) / FNR_high)) at the "
                              "threshold of each target FPR, Clopper-Pearson ends at level "
                              f"{level:.4f} (95 % Bonferroni-corrected over {tests} attack x FPR tests); delta = "
                              "the accountant's (0 without DP)",
                   "timesteps": list(opt.timesteps), "noise_draws": opt.noise_draws, "samples": opt.samples},
        "notes": notes,
        "seconds": time.perf_counter() - started,
    }
    return dict(_clean(report))


def summary_text(report: dict[str, Any]) -> str:
    """What ``fedsynth audit`` prints."""
    s = report["summary"]

    def ci(pair: list[float | None] | None) -> str:
        return f"[{pair[0]:.3f}, {pair[1]:.3f}]" if pair and None not in pair else "[-]"

    accountant = f"{s['accountant_epsilon']:.3g}" if s["accountant_epsilon"] is not None else "none (trained without DP)"
    lines = [f"{s['verdict']}",
             f"strongest attack {s['strongest_attack']}: AUC {s['auc']:.3f} {ci(s['auc_ci95'])}; "
             + "; ".join(f"TPR {s[f'tpr_at_fpr_{f:g}']:.3f} at FPR {f:g}" for f in FPRS),
             f"empirical epsilon >= {s['empirical_epsilon_lower_bound']:.3g} ({s['empirical_epsilon_from']['attack']} at "
             f"FPR {s['empirical_epsilon_from']['fpr']:g}); accountant's epsilon: {accountant}",
             f"{s['members']} members vs {s['non_members']} non-members"]
    for name, a in report["attacks"].items():
        lines.append(f"  {name:<28} AUC {a['auc']:.3f} {ci(a['auc_ci95'])}  "
                     + "  ".join(f"TPR@{f:g} {a[f'fpr_{f:g}']['tpr']:.3f} {ci(a[f'fpr_{f:g}']['tpr_ci95'])}" for f in FPRS))
    return "\n".join(lines)

