"""Guide heads q(z | x): from encoder features to a distribution over z.

The encoder network (see :mod:`pyro_vae.nets`) maps a data point to features
``h = f_phi(x)``; a guide head maps ``h [..., H]`` to a reparameterized
:class:`pyro.distributions.Distribution` with ``event_shape == [latent_dim]``.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from .registry import Registry

__all__ = ["GUIDES", "DiagonalNormal", "GuideHead"]

GUIDES: Registry = Registry("guide")


class GuideHead(nn.Module):
    """Base class of the registered guide heads: ``Head(feature_dim=H, latent_dim=d)(h)`` is q(z|x)."""

    def __init__(self, *, feature_dim: int, latent_dim: int) -> None:
        super().__init__()
        if feature_dim < 1 or latent_dim < 1:
            raise ValueError(
                f"feature_dim and latent_dim must be positive integers, got {feature_dim} and {latent_dim}"
            )
        self.feature_dim = feature_dim
        self.latent_dim = latent_dim

    def forward(self, features: torch.Tensor) -> dist.Distribution:
        raise NotImplementedError


@GUIDES.register("diagonal")
class DiagonalNormal(GuideHead):
    """Diagonal Gaussian N(mu(x), diag sigma(x)^2), sampled as z = mu + sigma * eps.

    The reparameterization of Kingma & Welling (2014); sigma = softplus(.) + 1e-5
    keeps the scale positive without the overflow of exp.
    """

    def __init__(self, *, feature_dim: int, latent_dim: int) -> None:
        super().__init__(feature_dim=feature_dim, latent_dim=latent_dim)
        self.loc = nn.Linear(feature_dim, latent_dim)
        self.raw_scale = nn.Linear(feature_dim, latent_dim)

    def forward(self, features: torch.Tensor) -> dist.Distribution:
        loc = self.loc(features)  # [..., d]
        scale = F.softplus(self.raw_scale(features)) + 1e-5  # [..., d]
        return dist.Normal(loc, scale).to_event(1)
