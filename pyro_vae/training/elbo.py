"""The ELBO per data point of a data set: the figure the training history records after each epoch."""

from __future__ import annotations

import pyro
import torch
from pyro import poutine

from .._typing import VAEModel
from ..objectives import make_loss

__all__ = ["mean_elbo", "negative_elbo_sum"]


def mean_elbo(vae: VAEModel, x: torch.Tensor, *, num_particles: int = 1, batch_size: int = 1024) -> float:
    """The ELBO per data point of ``x`` [N, D], in nats, estimated with ``num_particles`` samples each."""
    return -float(negative_elbo_sum(vae, x, num_particles=num_particles, batch_size=batch_size)) / x.shape[0]


def negative_elbo_sum(
    vae: VAEModel, x: torch.Tensor, *, num_particles: int, batch_size: int = 1024
) -> torch.Tensor:
    """-sum over the points of ``x`` of their ELBO estimates: float64 [], on x's device.

    Each chunk is scored as the whole data set (no ``num_data``), so its loss
    is the sum over its points; chunks of ``batch_size`` bound the memory.
    """
    loss = make_loss("elbo", num_particles=num_particles)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    with torch.no_grad(), poutine.block(), pyro.validation_enabled(False):
        for chunk in x.split(batch_size):
            total += loss.differentiable_loss(vae.model, vae.guide, chunk).double()
    return total
