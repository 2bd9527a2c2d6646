r"""The Gaussian-mixture VAE: the mixture component as a discrete latent site, summed out by enumeration.

The ``mixture`` prior of :mod:`pyro_vae.components.priors` marginalizes its
component inside ``MixtureSameFamily``; here the component is a site of its own,
``c``, marked ``infer={"enumerate": "parallel"}`` in the model and the guide, so
``TraceEnum_ELBO`` sums over it exactly (:mod:`pyro_vae.objectives.enum`, chosen
by ``make_loss("elbo")``), the evaluators sum it out of log p(x) exactly
(:mod:`pyro_vae.inference.traces`), and q(c | x) can be read, pictured and exported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from ..components.guides import GuideHead
from ..components.likelihoods import Likelihood
from ..components.linear import Linear
from ..config import ModelConfig
from ..errors import PyroVAEError
from .abilities import MEAN_SAMPLES
from .build import _parts as _shared_parts
from .plate import data_plate

__all__ = [
    "GMVAE",
    "GaussianComponents",
    "MixtureVAE",
    "build_mixture_vae",
    "mixed_guide_means",
    "with_component",
]


class GaussianComponents(nn.Module):
    r"""The mixture prior as two factors: p(c) = Categorical(pi) and p(z | c) = N(mu_c, diag sigma_c^2).

    The means start spread out, mu_c ~ N(0, I) (with equal means every component
    would get the same posterior and stay so); sigma_c = softplus(.) + 1e-4
    starts near 1. With ``learn_weights=False`` (the default, as in
    Dilokthanakul et al., 2016) pi is uniform and fixed: learned weights tend to
    let one component take all the data.
    """

    def __init__(self, *, num_components: int, latent_dim: int, learn_weights: bool = False) -> None:
        super().__init__()
        if num_components < 2 or latent_dim < 1:
            raise PyroVAEError(
                f"a mixture needs at least 2 components and a positive latent_dim, got {num_components} "
                f"and {latent_dim}"
            )
        self.num_components = num_components
        self.latent_dim = latent_dim
        logits = torch.zeros(num_components)
        if learn_weights:
            self.logits = nn.Parameter(logits)
        else:
            self.register_buffer("logits", logits)
        self.loc = nn.Parameter(torch.randn(num_components, latent_dim))  # [C, d]
        # softplus(0.5413) = 1: unit scales at the start.
        self.raw_scale = nn.Parameter(torch.full((num_components, latent_dim), 0.5413))  # [C, d]

    def weights(self) -> dist.Categorical:
        """p(c): a Categorical over the C components, batch shape []."""
        return dist.Categorical(logits=self.logits)

    def forward(self, c: torch.Tensor) -> dist.Distribution:
        """p(z | c) for component indices ``c`` [...] (an enumerated [C, 1, ..., 1] too): batch [...], event [d]."""
        scale = F.softplus(self.raw_scale) + 1e-4
        return dist.Normal(self.loc[c], scale[c]).to_event(1)  # [..., d]


def with_component(features: torch.Tensor, c: torch.Tensor, num_components: int) -> torch.Tensor:
    """Encoder features [..., M, H] and the one-hot component [..., M, C] side by side: [..., M, H + C].

    ``c`` may be a draw [..., M] or all components at once, [C, 1, ..., 1] under
    enumeration; the two broadcast against each other.
    """
    onehot = F.one_hot(c, num_components).to(features.dtype)  # [..., C]
    batch = torch.broadcast_shapes(features.shape[:-1], onehot.shape[:-1])
    return torch.cat([features.expand(*batch, -1), onehot.expand(*batch, -1)], dim=-1)


@torch.no_grad()
def mixed_guide_means(
    guide_head: GuideHead, features: torch.Tensor, assignment: dist.Categorical, num_components: int
) -> torch.Tensor:
    """E_q[z | x] = sum_c q(c | x) E_q[z | x, c] from encoder features [N, H] and q(c | x) (batch [N]): [N, d].

    A guide head without a closed-form mean (a flow) is averaged over
    :data:`~pyro_vae.models.abilities.MEAN_SAMPLES` draws per component.
    """
    every = torch.arange(num_components, device=features.device).unsqueeze(-1)  # [C, 1]
    q_z = guide_head(with_component(features, every, num_components))  # batch [C, N]
    try:
        means = q_z.mean  # [C, N, d]
    except NotImplementedError:
        means = q_z.rsample((MEAN_SAMPLES,)).mean(0)
    probs = assignment.probs.T.unsqueeze(-1)  # [C, N, 1]
    return (probs * means).sum(0)


class MixtureVAE(nn.Module):
    r"""A VAE whose prior is a Gaussian mixture with the component c as a latent site (a GMVAE).

    Generative story, for each data point n = 1..N::

        c_n ~ Categorical(pi)                      which component
        z_n | c_n ~ N(mu_{c_n}, diag sigma_{c_n}^2)   the latent, from that component
        x_n ~ p(x | decoder(z_n))                  any registered likelihood

    Inference network (the guide)::

        c_n ~ q(c | x_n) = Categorical(softmax(classifier(encoder(x_n))))
        z_n ~ q(z | x_n, c_n) = head([encoder(x_n), onehot(c_n)])

    c is marked ``infer={"enumerate": "parallel"}`` in both, so the ELBO
    sum_c q(c|x) E_q(z|x,c)[log p(x, z, c) - log q(z|x, c) - log q(c|x)] is
    computed with the sum over c exact (TraceEnum_ELBO), and log p(x) =
    log sum_c p(c) ∫ p(z | c) p(x | z) dz is estimated per component.

    The abilities: ``latent_sites`` is ``("z",)`` (the continuous space that
    pictures draw); ``discrete_sites`` is ``("c",)``, read with
    :meth:`component_probs`; ``posterior_means`` is sum_c q(c|x) E[z | x, c].

    References:
        Dilokthanakul, Mediano, Garnelo, Lee, Salimbeni, Arulkumaran & Shanahan,
        "Deep Unsupervised Clustering with Gaussian Mixture Variational
        Autoencoders", arXiv:1611.02648, 2016.
        Kingma, Rezende, Mohamed & Welling, "Semi-Supervised Learning with Deep
        Generative Models", NeurIPS 2014 (the guide's q(c | x)).
    """

    latent_sites = ("z",)
    discrete_sites = ("c",)

    def __init__(
        self,
        *,
        components: GaussianComponents,
        likelihood: Likelihood,
        encoder: nn.Module,
        guide_head: GuideHead,
        decoder: nn.Module,
    ) -> None:
        super().__init__()
        num, feature_dim = components.num_components, getattr(encoder, "out_dim", None)
        if feature_dim is not None and guide_head.feature_dim != feature_dim + num:
            raise PyroVAEError(
                f"the guide head takes {guide_head.feature_dim} features, but q(z | x, c) gives it the "
                f"encoder's {feature_dim} and a one-hot c of {num}; build it with feature_dim={feature_dim + num}"
            )
        if guide_head.latent_dim != components.latent_dim:
            raise PyroVAEError(
                f"the components are over {components.latent_dim} latent dimensions but the guide over "
                f"{guide_head.latent_dim}; build both with the same latent_dim"
            )
        self.components = components
        self.likelihood = likelihood
        self.encoder = encoder
        self.classifier = Linear(guide_head.feature_dim - num, num)
        self.guide_head = guide_head
        self.decoder = decoder

    @property
    def num_components(self) -> int:
        return self.components.num_components

    @property
    def latent_dim(self) -> int:
        return self.components.latent_dim

    def model(self, x: torch.Tensor | None, *, num_data: int | None = None) -> None:
        """p(x, z, c) for a minibatch ``x`` [M, D] of ``num_data`` points (``x=None`` draws new points)."""
        pyro.module("components", self.components)
        pyro.module("decoder", self.decoder)
        pyro.module("likelihood", self.likelihood)
        with data_plate(x, num_data):
            c = pyro.sample(
                "c", self.components.weights(), infer={"enumerate": "parallel"}
            )  # [M] or [C, 1, 1]
            z = pyro.sample("z", self.components(c))  # [..., M, d]
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        """q(c | x) q(z | x, c) for the same minibatch, amortized by the encoder."""
        pyro.module("encoder", self.encoder)
        pyro.module("classifier", self.classifier)
        pyro.module("guide_head", self.guide_head)
        with data_plate(x, num_data):
            h = self.encoder(x)  # [M, H]
            c = pyro.sample("c", self.assignment(h), infer={"enumerate": "parallel"})  # [M] or [C, 1, 1]
            pyro.sample("z", self.guide_head(with_component(h, c, self.num_components)))  # [..., M, d]

    def assignment(self, features: torch.Tensor) -> dist.Categorical:
        """q(c | x) from encoder features [..., H]: batch shape [...]."""
        return dist.Categorical(logits=self.classifier(features))

    @torch.no_grad()
    def component_probs(self, x: torch.Tensor) -> torch.Tensor:
        """q(c | x) [N, C]: each data point's posterior probabilities of the components."""
        return self.assignment(self.encoder(x)).probs

    @torch.no_grad()
    def posterior_means(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """E_q[z | x] = sum_c q(c | x) E_q[z | x, c]: ``{"z": [N, d]}``."""
        h = self.encoder(x)  # [N, H]
        return {"z": mixed_guide_means(self.guide_head, h, self.assignment(h), self.num_components)}

    @torch.no_grad()
    def decode(self, latents: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The mean of p(x | z) [N, D] for ``{"z": [N, d]}``."""
        if set(latents) != {"z"}:
            raise PyroVAEError(
                f"a mixture VAE decodes its continuous site 'z', got {', '.join(sorted(latents)) or 'none'}"
            )
        return self.likelihood(self.decoder(latents["z"])).mean

    @torch.no_grad()
    def sample_components(self, num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``num`` ancestral draws c ~ p(c), z ~ p(z | c): ([num] component indices, [num, d] latents)."""
        c = self.components.weights().sample((num,))
        return c, self.components(c).sample()

    @torch.no_grad()
    def sample_component(self, component: int, num: int) -> torch.Tensor:
        """``num`` draws z ~ p(z | c = component): [num, d] (a grid of samples per component decodes them)."""
        if not 0 <= component < self.num_components:
            raise PyroVAEError(f"component must lie in 0..{self.num_components - 1}, got {component}")
        c = torch.full((num,), component, dtype=torch.long, device=self.components.loc.device)
        return self.components(c).sample()  # type: ignore[no-any-return]

    @torch.no_grad()
    def sample_latents(self, num: int) -> dict[str, torch.Tensor]:
        """``num`` draws z ~ sum_c p(c) p(z | c): ``{"z": [num, d]}``."""
        return {"z": self.sample_components(num)[1]}

    def check_data(self, x: torch.Tensor) -> None:
        """Refuse data outside the likelihood's support or of the wrong size (a PyroVAEError)."""
        self.likelihood.check_data(x)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z) at the posterior mean of z: [N, D]."""
        return self.decode(self.posterior_means(x))

    @torch.no_grad()
    def sample(self, num_samples: int, *, mean: bool = True) -> torch.Tensor:
        """New data from z ~ p(z): the mean of p(x | z), or a draw from it ([num_samples, D])."""
        px = self.likelihood(self.decoder(self.sample_latents(num_samples)["z"]))
        return px.mean if mean else px.sample()


def _parts(config: ModelConfig, *, num_components: int, learn_weights: bool) -> dict[str, Any]:
    """The components, likelihood, networks and guide head of a mixture VAE described by ``config``."""
    if len(config.latent_dims) != 1:
        raise PyroVAEError(
            f"a mixture VAE has one continuous latent layer, got latent sizes {list(config.latent_dims)}"
        )
    likelihood, encoder, decoder, guide_head = _shared_parts(config, extra_features=num_components)
    components = GaussianComponents(
        num_components=num_components, latent_dim=config.latent_dim, learn_weights=learn_weights
    )
    return {
        "components": components,
        "likelihood": likelihood,
        "encoder": encoder,
        "guide_head": guide_head,
        "decoder": decoder,
    }


def build_mixture_vae(
    config: ModelConfig, *, num_components: int = 10, learn_weights: bool = False
) -> MixtureVAE:
    """A :class:`MixtureVAE` of ``num_components`` with the likelihood, networks and guide head of ``config``.

    ``config``'s one latent size is the size of z; its prior is not used (the
    components are the prior). Freshly initialized weights.
    """
    return MixtureVAE(**_parts(config, num_components=num_components, learn_weights=learn_weights))


class GMVAE(MixtureVAE):
    """A :class:`MixtureVAE` built from sizes and registry names, as the command line builds a user's class.

    ``pyro-vae train --model pyro_vae.models.mixture:GMVAE --model-option num_components=10`` (any
    constructor keyword below as ``--model-option KEY=VALUE``); the run folder rebuilds it from these.
    """

    def __init__(
        self,
        *,
        data_dim: int,
        image_shape: Sequence[int] | None = None,
        num_components: int = 10,
        latent_dim: int = 10,
        hidden_dims: int | Sequence[int] = (400,),
        likelihood: str = "bernoulli",
        network: str = "mlp",
        guide: str = "diagonal",
        activation: str | None = None,
        learn_weights: bool = False,
    ) -> None:
        hidden = (hidden_dims,) if isinstance(hidden_dims, int) else tuple(hidden_dims)
        config = ModelConfig(
            data_dim=data_dim,
            latent_dims=(latent_dim,),
            hidden_dims=hidden,
            likelihood=likelihood,
            network=network,
            guide=guide,
            activation=activation,
            image_shape=None if image_shape is None else tuple(image_shape),
        )
        super().__init__(**_parts(config, num_components=num_components, learn_weights=learn_weights))
