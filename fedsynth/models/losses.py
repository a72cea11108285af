"""The losses the model families train on, as small functions of tensors.

Each family's ``training_step`` and ``validation_step`` call these, and so do the tests that
check per-sample gradients under differential privacy, so a test can never drift from the loss
the model actually minimises. The R1 gradient penalty is a regulariser and lives in
:mod:`fedsynth.recipes.regularizers`.

The autoencoder's patch-adversarial loss is MONAI's ``PatchAdversarialLoss`` with its
least-squares criterion (per patch, after its LeakyReLU(0.05) on the logits, as in MONAI's
autoencoder tutorials): no exp or log, so nothing saturates. The GAN's losses (``model.loss``) stay written here because MONAI has no
equivalent: its ``criterion="bce"`` is a sigmoid then ``BCELoss``, which in float32 rounds
``sigmoid(20)`` to 1, scores a fake at logit 20 as 100 instead of 20 and gives it no gradient
(the saturation the non-saturating loss exists to avoid; ``softplus`` is exact), and its
``criterion="hinge"`` applies ``tanh`` first, a bounded variant rather than the hinge loss of
SAGAN/BigGAN (``tests/test_models.py`` checks both differences).

Every loss is a mean over examples (and patches) of per-example terms, so under DP it never
couples examples (``tests/test_privacy_grads.py``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss

AdversarialLoss = Literal["nonsaturating", "hinge"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]

_PATCH_ADVERSARIAL = PatchAdversarialLoss(criterion="least_squares")


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


def patch_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """A patch discriminator's least-squares loss (MONAI's): real patches towards 1 plus fake ones towards 0."""
    return (_PATCH_ADVERSARIAL(real_logits, target_is_real=True, for_discriminator=True)
            + _PATCH_ADVERSARIAL(fake_logits, target_is_real=False, for_discriminator=True))


def patch_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The least-squares loss (MONAI's) that pulls a patch discriminator's logits for fakes towards real."""
    return _PATCH_ADVERSARIAL(fake_logits, target_is_real=True, for_discriminator=False)


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
