"""Priors p(z) over the latent code.

A prior is a ``torch.nn.Module`` whose ``forward()`` returns a
:class:`pyro.distributions.Distribution` with ``event_shape == [latent_dim]``
and an empty batch shape; the model's data plate broadcasts it over data
points. Learned priors keep their parameters in the module, so the optimizer
finds them through ``pyro.module``.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from .registry import Registry

__all__ = ["PRIORS", "Prior", "StandardNormal"]

PRIORS: Registry = Registry("prior")


class Prior(nn.Module):
    """Base class of the registered priors: ``Prior(latent_dim=d)()`` is p(z)."""

    def __init__(self, *, latent_dim: int) -> None:
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim}")
        self.latent_dim = latent_dim

    def bind(self, *, encoder: nn.Module, guide_head: nn.Module, data_dim: int) -> None:
        """Called once by the VAE that owns this prior, with its inference network.

        Most priors ignore it. A prior defined through the guide (the VampPrior)
        keeps references to ``encoder`` and ``guide_head``; it must not register
        them as submodules, or their parameters would be optimized twice.
        """

    def forward(self) -> dist.Distribution:
        raise NotImplementedError


@PRIORS.register("standard-normal")
class StandardNormal(Prior):
    """Isotropic Gaussian N(0, I), the prior of Kingma & Welling (2014)."""

    def __init__(self, *, latent_dim: int) -> None:
        super().__init__(latent_dim=latent_dim)
        # Buffers, not constants: they follow the module to the GPU and into the state dict.
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)
