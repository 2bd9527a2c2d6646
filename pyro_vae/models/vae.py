"""The variational autoencoder as a Pyro model and guide.

The model and the guide are ordinary Pyro functions (the methods
:meth:`VAE.model` and :meth:`VAE.guide`), so anything in ``pyro.infer`` (SVI
with any ELBO, importance sampling, the evaluator in
:mod:`pyro_vae.evaluation`) runs on them unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..components.guides import GuideHead
from ..components.likelihoods import Likelihood
from ..components.priors import Prior
from ..errors import PyroVAEError
from .plate import data_plate

__all__ = ["VAE"]


class VAE(nn.Module):
    r"""A variational autoencoder (Kingma & Welling, 2014; Rezende et al., 2014).

    Generative story, for each data point n = 1..N::

        z_n ~ p(z)                      prior
        x_n ~ p(x | decoder(z_n))       likelihood

    Inference network (the guide)::

        z_n ~ q(z | x_n) = head(encoder(x_n))

    Trained by maximizing ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)) <= log p(x).

    The prior, likelihood, guide head and networks are passed in; any objects
    with the interfaces of :mod:`pyro_vae._typing` will do.

    References:
        Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
        Rezende, Mohamed & Wierstra, "Stochastic Backpropagation and Approximate
        Inference in Deep Generative Models", ICML 2014.
    """

    def __init__(
        self,
        *,
        prior: Prior,
        likelihood: Likelihood,
        encoder: nn.Module,
        guide_head: GuideHead,
        decoder: nn.Module,
    ) -> None:
        super().__init__()
        if prior.latent_dim != guide_head.latent_dim:
            raise PyroVAEError(
                f"the prior is over {prior.latent_dim} latent dimensions but the guide over "
                f"{guide_head.latent_dim}; build both with the same latent_dim"
            )
        self.prior = prior
        self.prior.bind(encoder=encoder, guide_head=guide_head, data_dim=likelihood.data_dim)
        self.likelihood = likelihood
        self.encoder = encoder
        self.guide_head = guide_head
        self.decoder = decoder

    # The one latent site (the NamesLatents ability).
    latent_sites = ("z",)

    @property
    def latent_dim(self) -> int:
        return self.prior.latent_dim

    def model(self, x: torch.Tensor | None, *, num_data: int | None = None) -> None:
        """p(x, z) for a minibatch ``x`` [M, D] of a data set of ``num_data`` points.

        ``x=None`` draws ``num_data`` new points, z ~ p(z) and x ~ p(x | z) (for ``pyro.infer.Predictive``).
        """
        pyro.module("prior", self.prior)
        pyro.module("decoder", self.decoder)
        pyro.module("likelihood", self.likelihood)
        with data_plate(x, num_data):
            z = pyro.sample("z", self.prior())  # [..., M, d]
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        """q(z | x) for the same minibatch, amortized by the encoder."""
        pyro.module("encoder", self.encoder)
        pyro.module("guide_head", self.guide_head)
        with data_plate(x, num_data):
            pyro.sample("z", self.guide_head(self.encoder(x)))  # [..., M, d]

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(z | x) as a distribution with batch shape [N] (no Pyro bookkeeping)."""
        return self.guide_head(self.encoder(x))

    @torch.no_grad()
    def posterior_means(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """E_q[z | x] in closed form: ``{"z": [N, d]}``."""
        return {"z": self.posterior(x).mean}

    @torch.no_grad()
    def decode(self, latents: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The mean of p(x | z) [N, D] for ``{"z": [N, d]}``."""
        if set(latents) != {"z"}:
            raise PyroVAEError(
                f"a VAE decodes its one latent site 'z', got {', '.join(sorted(latents)) or 'none'}"
            )
        return self.likelihood(self.decoder(latents["z"])).mean

    @torch.no_grad()
    def sample_latents(self, num: int) -> dict[str, torch.Tensor]:
        """``num`` draws z ~ p(z): ``{"z": [num, d]}``."""
        return {"z": self.prior().sample((num,))}

    def check_data(self, x: torch.Tensor) -> None:
        """Refuse data outside the likelihood's support or of the wrong size (a PyroVAEError)."""
        self.likelihood.check_data(x)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z) at the posterior mean of q(z | x): [N, D]."""
        return self.decode(self.posterior_means(x))

    @torch.no_grad()
    def sample(self, num_samples: int, *, mean: bool = True) -> torch.Tensor:
        """New data made by decoding z ~ p(z): the mean of p(x|z), or a draw from it ([num_samples, D])."""
        z = self.prior().sample((num_samples,))
        px = self.likelihood(self.decoder(z))
        return px.mean if mean else px.sample()
