"""Guide heads q(z | x): from encoder features to a distribution over z.

The encoder network (see :mod:`pyro_vae.nets`) maps a data point to features
``h = f_phi(x)``; a guide head maps ``h [..., H]`` to a reparameterized
:class:`pyro.distributions.Distribution` with ``event_shape == [latent_dim]``.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive, Permute
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn
from torch.distributions.transforms import Transform
from torch.nn import functional as F

from ..errors import PyroVAEError
from ..registry import Registry
from .linear import Linear

__all__ = [
    "GUIDES",
    "DiagonalNormal",
    "FlowDistribution",
    "GuideHead",
    "InverseAutoregressiveFlow",
    "LowRankNormal",
]

GUIDES: Registry = Registry("guide")


class GuideHead(nn.Module):
    """Base class of the registered guide heads: ``Head(feature_dim=H, latent_dim=d)(h)`` is q(z|x)."""

    def __init__(self, *, feature_dim: int, latent_dim: int) -> None:
        super().__init__()
        if feature_dim < 1 or latent_dim < 1:
            raise PyroVAEError(
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
        self.loc = Linear(feature_dim, latent_dim)
        self.raw_scale = Linear(feature_dim, latent_dim)

    def forward(self, features: torch.Tensor) -> dist.Distribution:
        loc = self.loc(features)  # [..., d]
        scale = F.softplus(self.raw_scale(features)) + 1e-5  # [..., d]
        return dist.Normal(loc, scale).to_event(1)


@GUIDES.register("low-rank")
class LowRankNormal(GuideHead):
    """Gaussian with low-rank-plus-diagonal covariance N(mu(x), W(x) W(x)^T + diag(D(x))).

    A rank-``rank`` factor W [d, rank] lets q(z|x) express correlations between
    latent dimensions at O(d rank) cost per data point; z = mu + W eps_1 +
    sqrt(D) eps_2 with eps_1 ~ N(0, I_rank), eps_2 ~ N(0, I_d) keeps it
    reparameterized, and log q uses the Woodbury identity and the matrix
    determinant lemma (O(d rank^2)), as in
    :class:`torch.distributions.LowRankMultivariateNormal`.

    References:
        Rezende, Mohamed & Wierstra, "Stochastic Backpropagation and Approximate
        Inference in Deep Generative Models", ICML 2014 (rank-one covariance).
        Ong, Nott & Smith, "Gaussian Variational Approximation With a Factor
        Covariance Structure", JCGS 27(3), 2018.
    """

    def __init__(self, *, feature_dim: int, latent_dim: int, rank: int = 2) -> None:
        super().__init__(feature_dim=feature_dim, latent_dim=latent_dim)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= latent_dim:
            raise PyroVAEError(
                f"rank must be an integer between 1 and latent_dim={latent_dim}, got {rank!r}; "
                "a rank above latent_dim adds nothing a full covariance could not express"
            )
        self.rank = rank
        self.loc = Linear(feature_dim, latent_dim)
        self.cov_factor = Linear(feature_dim, latent_dim * rank)
        self.raw_cov_diag = Linear(feature_dim, latent_dim)

    def forward(self, features: torch.Tensor) -> dist.Distribution:
        loc = self.loc(features)  # [..., d]
        cov_factor = self.cov_factor(features).unflatten(-1, (self.latent_dim, self.rank))  # [..., d, rank]
        cov_diag = F.softplus(self.raw_cov_diag(features)) + 1e-5  # [..., d]
        return dist.LowRankMultivariateNormal(loc, cov_factor, cov_diag)


class FlowDistribution(dist.TransformedDistribution):
    """A :class:`pyro.distributions.TransformedDistribution` with a point summary as its ``mean``.

    The mean of a flow has no closed form; ``mean`` here is the image of the
    base distribution's mean under the flow (for a Gaussian base, the image of
    its mode and coordinatewise median), which is what ``VAE.reconstruct``
    needs: a deterministic code for x.
    """

    @property
    def mean(self) -> torch.Tensor:
        z = self.base_dist.mean
        for transform in self.transforms:
            z = transform(z)
        return z


@GUIDES.register("iaf")
class InverseAutoregressiveFlow(GuideHead):
    r"""Inverse autoregressive flow on a diagonal Gaussian, each step conditioned on the encoder features.

    With h = encoder(x) and eps ~ N(0, I)::

        z_0 = mu_0(h) + sigma_0(h) * eps
        z_t = sigma_t * z_{t-1} + (1 - sigma_t) * m_t,     t = 1..T (T = num_flows)
        [m_t, s_t] = MADE_t(z_{t-1}, h),  sigma_t = sigmoid(s_t + 2)

        log q(z_T | x) = log N(eps; 0, I) - sum_i log sigma_0,i - sum_t sum_i log sigma_t,i

    (the "numerically stable" update of Kingma et al. 2016, eq. 14, with h as the
    MADE's context, as in the paper). Because (m_t, s_t)_i depend only on
    z_{t-1, <i} and h, every step is one vectorized network pass and its Jacobian
    is triangular: sampling costs T passes, and the log-density of a sample just
    drawn comes from the same pass (the transforms cache their last input and
    log-scale, ``cache_size=1``; the plates' ``.expand`` shares the transforms,
    so the cache survives). Evaluating ``log_prob`` at any other z inverts the
    flow, which takes d sequential passes per step: exact but slow. Between
    steps the order of the latent dimensions is reversed, as in the paper, so
    every dimension can depend on every other after two steps; the reversal is
    fixed, so a saved state dict rebuilds the same flow.

    References:
        Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling, "Improved
        Variational Inference with Inverse Autoregressive Flow", NeurIPS 2016.
        Germain, Gregor, Murray & Larochelle, "MADE: Masked Autoencoder for
        Distribution Estimation", ICML 2015.
    """

    def __init__(
        self, *, feature_dim: int, latent_dim: int, num_flows: int = 2, hidden_dim: int | None = None
    ) -> None:
        super().__init__(feature_dim=feature_dim, latent_dim=latent_dim)
        if isinstance(num_flows, bool) or not isinstance(num_flows, int) or num_flows < 1:
            raise PyroVAEError(
                f"num_flows must be a positive integer, got {num_flows!r}; use the diagonal guide for no flow"
            )
        # Pyro's default MADE width; a MADE layer narrower than d cannot connect every output.
        hidden_dim = 10 * latent_dim if hidden_dim is None else hidden_dim
        if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < latent_dim:
            raise PyroVAEError(
                f"hidden_dim must be an integer of at least latent_dim={latent_dim}, got {hidden_dim!r}"
            )
        self.num_flows = num_flows
        self.hidden_dim = hidden_dim
        self.base = DiagonalNormal(feature_dim=feature_dim, latent_dim=latent_dim)
        # Identity order inside each MADE and a reversal between steps, as in the paper
        # (Pyro's default is a random order per MADE).
        order = torch.arange(latent_dim)
        self.flows = nn.ModuleList(
            ConditionalAffineAutoregressive(
                ConditionalAutoRegressiveNN(latent_dim, feature_dim, [hidden_dim], permutation=order),
                stable=True,
            )
            for _ in range(num_flows)
        )
        self.register_buffer("reverse", order.flip(0), persistent=False)

    def forward(self, features: torch.Tensor) -> dist.Distribution:
        transforms: list[Transform] = []
        for t, flow in enumerate(self.flows):
            if t > 0:
                transforms.append(Permute(self.reverse))
            # A fresh conditioned transform per call: its cache holds this call's sample only.
            transforms.append(flow.condition(features))  # MADE context h [..., H], broadcast over particles
        return FlowDistribution(self.base(features), transforms)
