"""The variational autoencoder as a Pyro model and guide.

The model and the guide are ordinary Pyro functions (the methods
:meth:`VAE.model` and :meth:`VAE.guide`), so anything in ``pyro.infer`` (SVI
with any ELBO, importance sampling, the evaluator in
:mod:`pyro_vae.evaluation`) runs on them unchanged.
"""

from __future__ import annotations

import inspect

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .config import ModelConfig
from .guides import GUIDES, GuideHead
from .likelihoods import LIKELIHOODS, Likelihood
from .nets import NETWORKS
from .priors import PRIORS, Prior

__all__ = ["VAE", "build_vae", "data_plate"]


def data_plate(x: torch.Tensor, num_data: int | None) -> pyro.plate:
    """The plate over data points: a minibatch of ``M = len(x)`` out of ``num_data``.

    Inside it every log-density is scaled by ``num_data / M``, so a minibatch
    loss is an unbiased estimate of the full-data negative ELBO. The minibatch
    itself is passed in, so the plate's indices are never used: giving them as
    ``arange(M)`` yields the same scaling as ``subsample_size=M`` without the
    random permutation of N indices that the latter draws at every call (work
    on the hot path, and a draw from the random stream that would make the
    latent samples depend on N).
    """
    batch_size = x.shape[0]
    num_data = batch_size if num_data is None else num_data
    if num_data < batch_size:
        raise ValueError(
            f"num_data ({num_data}) cannot be smaller than the minibatch ({batch_size} data points)"
        )
    return pyro.plate("data", num_data, subsample=torch.arange(batch_size, device=x.device))


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
            raise ValueError(
                f"the prior is over {prior.latent_dim} latent dimensions but the guide over "
                f"{guide_head.latent_dim}; build both with the same latent_dim"
            )
        self.prior = prior
        self.prior.bind(encoder=encoder, guide_head=guide_head, data_dim=likelihood.data_dim)
        self.likelihood = likelihood
        self.encoder = encoder
        self.guide_head = guide_head
        self.decoder = decoder

    @property
    def latent_dim(self) -> int:
        return self.prior.latent_dim

    def model(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        """p(x, z) for a minibatch ``x`` [M, D] of a data set of ``num_data`` points."""
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
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z) at the posterior mean of q(z | x): [N, D]."""
        return self.likelihood(self.decoder(self.posterior(x).mean)).mean

    @torch.no_grad()
    def sample(self, num_samples: int, *, mean: bool = True) -> torch.Tensor:
        """New data made by decoding z ~ p(z): the mean of p(x|z), or a draw from it ([num_samples, D])."""
        z = self.prior().sample((num_samples,))
        px = self.likelihood(self.decoder(z))
        return px.mean if mean else px.sample()


def _build(registry, name: str, *, options: dict | None = None, **required):  # type: ignore[no-untyped-def]
    component = registry.get(name)
    options = dict(options or {})
    accepted = inspect.signature(component).parameters
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        raise ValueError(
            f"the {name} {registry.kind} takes no option(s) {', '.join(unknown)}; "
            f"its options are: {', '.join(k for k in accepted if k not in required) or 'none'}"
        )
    return component(**required, **options)


def build_vae(config: ModelConfig) -> nn.Module:
    """The model that ``config`` describes, with freshly initialized weights.

    One latent size gives a :class:`VAE` (site ``"z"``); several give a
    :class:`~pyro_vae.hierarchical.HierarchicalVAE` with sites ``"z1"`` (next to
    x) ... ``"zL"`` (under the prior), inferred ``config.inference``-wise.
    """
    from .hierarchical import HierarchicalVAE
    from .nets import activation_class

    hierarchical = len(config.latent_dims) > 1
    if hierarchical and config.prior == "vamp":
        raise ValueError(
            "the vamp prior mixes the guide's q(z|x) at pseudo-inputs, which a hierarchical guide does not "
            "give for its top layer; use another prior with several latent layers"
        )
    if hierarchical and config.inference == "ladder" and config.guide != "diagonal":
        raise ValueError("ladder inference builds its own Gaussian layers; use --guide diagonal with it")
    network_options = {} if config.activation is None else {"activation": config.activation}
    likelihood = _build(
        LIKELIHOODS, config.likelihood, options=dict(config.likelihood_options), data_dim=config.data_dim
    )
    prior = _build(
        PRIORS, config.prior, options=dict(config.prior_options), latent_dim=config.latent_dims[-1]
    )
    encoder, decoder = NETWORKS.get(config.network)(
        data_dim=config.data_dim,
        latent_dim=config.latent_dim,
        hidden_dims=config.hidden_dims,
        decoder_out_dim=likelihood.outputs_per_dim * config.data_dim,
        image_shape=config.image_shape,
        **network_options,
    )
    guide_head = _build(
        GUIDES,
        config.guide,
        options=dict(config.guide_options),
        feature_dim=encoder.out_dim,
        latent_dim=config.latent_dim,
    )
    if not hierarchical:
        return VAE(
            prior=prior, likelihood=likelihood, encoder=encoder, guide_head=guide_head, decoder=decoder
        )
    return HierarchicalVAE(
        prior=prior,
        likelihood=likelihood,
        encoder=encoder,
        guide_head=guide_head if config.inference == "bottom-up" else None,
        decoder=decoder,
        latent_dims=config.latent_dims,
        hidden_depth=len(config.hidden_dims),
        activation=activation_class(config.activation or "softplus"),
        inference=config.inference,
    )
