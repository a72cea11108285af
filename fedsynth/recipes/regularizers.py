"""Discriminator regularisers for GANs."""

from __future__ import annotations

from collections.abc import Callable

import torch


def r1_penalty(discriminator: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): mean over the batch of ``||grad_x D(x)||^2`` on real images.

    Returns the penalty with a graph (call ``backward`` on ``gamma / 2 * penalty``).
    """
    real = real.detach().requires_grad_(True)
    logits = discriminator(real)
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()
