"""A model from its configuration: the registry names and sizes of a :class:`~pyro_vae.config.ModelConfig`."""

from __future__ import annotations

import inspect
from typing import Any

from ..components.guides import GUIDES
from ..components.likelihoods import LIKELIHOODS
from ..components.nets import NETWORKS, activation_class
from ..components.priors import PRIORS
from ..config import ModelConfig
from ..errors import PyroVAEError
from .hierarchical import HierarchicalVAE
from .vae import VAE

__all__ = ["build_vae"]


def _build(registry, name: str, *, options: dict | None = None, **required):  # type: ignore[no-untyped-def]
    component = registry.get(name)
    options = dict(options or {})
    accepted = inspect.signature(component).parameters
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        raise PyroVAEError(
            f"the {name} {registry.kind} takes no option(s) {', '.join(unknown)}; "
            f"its options are: {', '.join(k for k in accepted if k not in required) or 'none'}"
        )
    return component(**required, **options)


def _parts(config: ModelConfig, *, extra_features: int = 0) -> tuple[Any, Any, Any, Any]:
    """The likelihood, encoder, decoder and guide head that ``config`` names: what every model shares.

    ``extra_features`` widens the guide head's input beyond the encoder's features (a mixture VAE's
    guide q(z | x, c) reads a one-hot c beside them).
    """
    network_options = {} if config.activation is None else {"activation": config.activation}
    likelihood = _build(
        LIKELIHOODS, config.likelihood, options=dict(config.likelihood_options), data_dim=config.data_dim
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
        feature_dim=encoder.out_dim + extra_features,
        latent_dim=config.latent_dim,
    )
    return likelihood, encoder, decoder, guide_head


def build_vae(config: ModelConfig) -> VAE | HierarchicalVAE:
    """The model that ``config`` describes, with freshly initialized weights.

    One latent size gives a :class:`VAE` (site ``"z"``); several give a
    :class:`~pyro_vae.models.hierarchical.HierarchicalVAE` with sites ``"z1"`` (next to
    x) ... ``"zL"`` (under the prior), inferred ``config.inference``-wise.
    """
    hierarchical = len(config.latent_dims) > 1
    if hierarchical and config.prior == "vamp":
        raise PyroVAEError(
            "the vamp prior mixes the guide's q(z|x) at pseudo-inputs, which a hierarchical guide does not "
            "give for its top layer; use another prior with several latent layers"
        )
    if hierarchical and config.inference == "ladder" and config.guide != "diagonal":
        raise PyroVAEError("ladder inference builds its own Gaussian layers; use --guide diagonal with it")
    likelihood, encoder, decoder, guide_head = _parts(config)
    prior = _build(
        PRIORS, config.prior, options=dict(config.prior_options), latent_dim=config.latent_dims[-1]
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
        layer_hidden_dims=config.layer_hidden_dims,
        hidden_depth=len(config.hidden_dims),
        activation=activation_class(config.activation or "softplus"),
        inference=config.inference,
        top_down=config.top_down,
        init=config.layer_init,
    )
