"""The losses the model families train on, as small functions of tensors.

Each family's ``training_step`` and ``validation_step`` call these, and so do the tests that
check per-sample gradients under differential privacy, so a test can never drift from the loss
the model actually minimises. The R1 gradient penalty is a regulariser and lives in
:mod:`fedsynth.recipes.regularizers`.

The non-saturating adversarial losses are written with ``softplus`` rather than MONAI's
``PatchAdversarialLoss(criterion="bce")``: that one applies a sigmoid and then ``BCELoss``, which
clamps the log at -100 (a logit of -120 scores 100 instead of 120) and rounds differently, so
it is not the same loss.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

AdversarialLoss = Literal["nonsaturating", "hinge"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor,
                       kind: AdversarialLoss = "nonsaturating") -> torch.Tensor:
    """Discriminator loss on real and fake logits: ``softplus(-r) + softplus(f)`` or hinge."""
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor, kind: AdversarialLoss = "nonsaturating") -> torch.Tensor:
    """Generator loss on the discriminator's logits for fakes: ``softplus(-f)`` or hinge ``-f``."""
    if kind == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()


def patch_logits(logits: torch.Tensor) -> torch.Tensor:
    """One logit per image from a patch discriminator's map: the mean over its patches."""
    return logits.flatten(1).mean(1)


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute (L1) reconstruction error."""
    return F.l1_loss(reconstruction, target)


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) summed over latent elements per sample, averaged over the batch."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1)
    return kl.flatten(1).sum(1).mean()


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of a denoiser's prediction, computed in float32."""
    return F.mse_loss(prediction.float(), target.float())
