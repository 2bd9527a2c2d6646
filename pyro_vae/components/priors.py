"""Priors p(z) over the latent code.

A prior is a ``torch.nn.Module`` whose ``forward()`` returns a
:class:`pyro.distributions.Distribution` with ``event_shape == [latent_dim]``
and an empty batch shape; the model's data plate broadcasts it over data
points. Learned priors keep their parameters in the module, so the optimizer
finds them through ``pyro.module``.
"""

from __future__ import annotations

import math
import warnings

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.distributions.transforms import AffineAutoregressive
from pyro.nn import AutoRegressiveNN
from torch import nn
from torch.distributions import constraints
from torch.nn import functional as F

from ..errors import PyroVAEError
from ..registry import Registry

__all__ = [
    "PRIORS",
    "EqualWeightMixture",
    "LearnedNormal",
    "MaskedAutoregressiveFlow",
    "Mixture",
    "Prior",
    "StandardNormal",
    "VampPrior",
]

PRIORS: Registry = Registry("prior")


class Prior(nn.Module):
    """Base class of the registered priors: ``Prior(latent_dim=d)()`` is p(z)."""

    def __init__(self, *, latent_dim: int) -> None:
        super().__init__()
        if latent_dim < 1:
            raise PyroVAEError(f"latent_dim must be a positive integer, got {latent_dim}")
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


# Floor on learned prior scales: a learned prior can follow an unused latent dimension's posterior
# towards a point mass, and the floor keeps log p(z) bounded while it does.
_MIN_SCALE = 1e-3


def _raw_scale(scale: float, shape: tuple[int, ...]) -> torch.Tensor:
    """The unconstrained value r with softplus(r) + _MIN_SCALE == scale."""
    return torch.full(shape, math.log(math.expm1(scale - _MIN_SCALE)))


def _positive_int(owner: str, name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PyroVAEError(f"the {owner} prior's {name} must be a positive integer, got {value!r}")


@PRIORS.register("learned-normal")
class LearnedNormal(Prior):
    r"""Diagonal Gaussian N(mu, diag sigma^2) with learned mean and scale, starting at N(0, I).

    sigma = softplus(rho) + 1e-3; the floor keeps log p(z) bounded if the prior
    follows an unused latent dimension towards a point mass. With a single
    stochastic layer a learned Gaussian prior adds no expressive power (the
    decoder can absorb any affine map of z), but it is the baseline that the
    richer priors are compared with, and the building block of hierarchical ones.
    """

    def __init__(self, *, latent_dim: int) -> None:
        super().__init__(latent_dim=latent_dim)
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.raw_scale = nn.Parameter(_raw_scale(1.0, (latent_dim,)))

    def forward(self) -> dist.Distribution:
        scale = F.softplus(self.raw_scale) + _MIN_SCALE
        return dist.Normal(self.loc, scale).to_event(1)


@PRIORS.register("mixture")
class Mixture(Prior):
    r"""Mixture of K diagonal Gaussians with learned weights, means and scales.

    p(z) = sum_k pi_k N(z; mu_k, diag sigma_k^2), pi = softmax(a),
    sigma_k = softplus(rho_k) + 1e-3.

    Initialization: equal weights; means drawn from N(0, 0.5^2 I) so the
    components start apart (identical components would get identical gradients
    and stay one Gaussian); scales sqrt(1 - 0.5^2), so the mixture's covariance
    starts near I, like N(0, I).

    References:
        Dilokthanakul et al., "Deep Unsupervised Clustering with Gaussian Mixture
        Variational Autoencoders", arXiv:1611.02648, 2016.
        Tomczak & Welling, "VAE with a VampPrior", AISTATS 2018 (the "MoG" baseline).
    """

    _INIT_MEAN_SPREAD = 0.5

    def __init__(self, *, latent_dim: int, num_components: int = 10) -> None:
        super().__init__(latent_dim=latent_dim)
        _positive_int("mixture", "num_components", num_components)
        self.num_components = num_components
        spread = self._INIT_MEAN_SPREAD
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.loc = nn.Parameter(spread * torch.randn(num_components, latent_dim))  # [K, d]
        self.raw_scale = nn.Parameter(_raw_scale(math.sqrt(1 - spread**2), (num_components, latent_dim)))

    def forward(self) -> dist.Distribution:
        scale = F.softplus(self.raw_scale) + _MIN_SCALE  # [K, d]
        components = dist.Normal(self.loc, scale).to_event(1)  # batch [K], event [d]
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)


class EqualWeightMixture(TorchDistribution):
    r"""(1/K) sum_k q_k(z) for K distributions of any family, stacked as the batch [K] of ``components``.

    log p(z) = logsumexp_k log q_k(z) - log K; a sample picks k uniformly and
    draws from q_k. ``MixtureSameFamily`` does the same for families whose
    ``expand`` and broadcasting it relies on; this class asks only for
    ``log_prob`` and ``sample`` (it scores z [..., d] as [..., K, d]).
    Its batch shape is empty; Pyro's plates expand it through
    :class:`~pyro.distributions.torch_distribution.ExpandedDistribution`.
    """

    arg_constraints: dict = {}  # noqa: RUF012 (torch reads it from the class)

    def __init__(self, components: dist.Distribution, *, validate_args: bool | None = None) -> None:
        if len(components.batch_shape) != 1:
            raise PyroVAEError(
                "EqualWeightMixture needs its components stacked along one batch dimension [K], "
                f"got batch shape {tuple(components.batch_shape)}"
            )
        self.components = components
        super().__init__(torch.Size(), components.event_shape, validate_args=validate_args)

    @property
    def num_components(self) -> int:
        return self.components.batch_shape[0]

    @constraints.dependent_property
    def support(self) -> constraints.Constraint:
        return self.components.support

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        component_dim = -1 - len(self.event_shape)
        # Expanded, not broadcast: conditional flows need their inputs' batch to match their context's.
        value = value.unsqueeze(component_dim)
        value = value.expand(*value.shape[:component_dim], self.num_components, *self.event_shape)
        log_q = self.components.log_prob(value)  # [..., K]
        return log_q.logsumexp(-1) - math.log(self.num_components)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
        sample_shape = torch.Size(sample_shape)
        with torch.no_grad():
            # Draws every component and keeps one: K times the work, but only generation samples p(z).
            draws = self.components.sample(sample_shape)  # [*sample_shape, K, *event]
            k = torch.randint(self.num_components, sample_shape, device=draws.device)
            index = k.reshape(sample_shape + (1,) * (1 + len(self.event_shape)))
            index = index.expand((*sample_shape, 1, *self.event_shape))
            return draws.gather(len(sample_shape), index).squeeze(len(sample_shape))

    @property
    def mean(self) -> torch.Tensor:
        return self.components.mean.mean(-1 - len(self.event_shape))


@PRIORS.register("vamp")
class VampPrior(Prior):
    r"""VampPrior: the guide's posterior averaged over K learned pseudo-inputs, (1/K) sum_k q(z | u_k).

    p(z) = (1/K) sum_k q_phi(z | u_k), with pseudo-inputs u_k in data space
    learned with the rest of the model. It approximates the aggregate posterior
    (1/N) sum_n q(z | x_n), the prior that maximizes the ELBO, and couples prior
    and encoder: the encoder's weights get gradients from log p(z) as well as
    from the guide.

    The pseudo-inputs are the only parameters of this module; the encoder and
    guide head arrive through :meth:`bind` and are held outside the module tree,
    so the VAE registers and saves them once, under its own ``encoder`` and
    ``guide_head``.

    Initialization: u_k ~ N(0.5, 0.01^2) elementwise, the paper's recipe (it uses
    mean 0.05 for MNIST); ``pseudo_input_mean`` / ``pseudo_input_std`` change it
    for data on another scale. The paper clips pseudo-inputs to the data range
    with a hardtanh; here they are unconstrained, because the data's range
    depends on the likelihood, and p(z) is a proper density for any u_k.

    With a diagonal-Gaussian guide p(z) is a ``MixtureSameFamily``; with any
    other guide family (low-rank, flows) an :class:`EqualWeightMixture`.

    References:
        Tomczak & Welling, "VAE with a VampPrior", AISTATS 2018, arXiv:1705.07120.
    """

    def __init__(
        self,
        *,
        latent_dim: int,
        num_components: int = 50,
        pseudo_input_mean: float = 0.5,
        pseudo_input_std: float = 0.01,
    ) -> None:
        super().__init__(latent_dim=latent_dim)
        _positive_int("vamp", "num_components", num_components)
        if not pseudo_input_std >= 0:
            raise PyroVAEError(f"the vamp prior's pseudo_input_std must be >= 0, got {pseudo_input_std!r}")
        self.num_components = num_components
        self.pseudo_input_mean = float(pseudo_input_mean)
        self.pseudo_input_std = float(pseudo_input_std)
        # A tuple, which nn.Module does not scan: (encoder, guide_head) once bound, else empty.
        self._inference: tuple[nn.Module, ...] = ()
        self.pseudo_inputs: nn.Parameter | None
        self.register_parameter("pseudo_inputs", None)  # [K, D], created by bind, where D arrives

    def bind(self, *, encoder: nn.Module, guide_head: nn.Module, data_dim: int) -> None:
        _positive_int("vamp", "data_dim", data_dim)
        head_dim = getattr(guide_head, "latent_dim", self.latent_dim)
        if head_dim != self.latent_dim:
            raise PyroVAEError(
                f"the vamp prior is over {self.latent_dim} latent dimensions but the guide head over "
                f"{head_dim}; build both with the same latent_dim"
            )
        if self.pseudo_inputs is None:
            init = self.pseudo_input_mean + self.pseudo_input_std * torch.randn(self.num_components, data_dim)
            self.pseudo_inputs = nn.Parameter(init)
        elif self.pseudo_inputs.shape[-1] != data_dim:
            raise PyroVAEError(
                f"this vamp prior's pseudo-inputs have {self.pseudo_inputs.shape[-1]} values each, "
                f"but it is now bound to data of {data_dim}; build a new prior for new data"
            )
        self._inference = (encoder, guide_head)

    def forward(self) -> dist.Distribution:
        if self.pseudo_inputs is None or not self._inference:
            raise RuntimeError(
                "the vamp prior is defined through the guide, so it has no distribution until it is bound "
                "to an encoder and guide head: build it inside a VAE (build_vae or VAE(prior=...)) or call "
                "prior.bind(encoder=..., guide_head=..., data_dim=...) first"
            )
        encoder, guide_head = self._inference
        q = guide_head(encoder(self.pseudo_inputs))  # batch [K], event [d]
        if isinstance(q, dist.Independent) and isinstance(q.base_dist, dist.Normal):
            weights = dist.Categorical(logits=self.pseudo_inputs.new_zeros(self.num_components))
            return dist.MixtureSameFamily(weights, q)
        return EqualWeightMixture(q)


@PRIORS.register("flow")
class MaskedAutoregressiveFlow(Prior):
    r"""Masked autoregressive flow on N(0, I): p(z) = N(f(z); 0, I) |det df/dz|, starting at N(0, I).

    f = f_L o ... o f_1 (L = ``num_flows``, f_1 applied to z first), each an affine autoregressive map
    u_i = z_i exp(s_i(z_<i)) + m_i(z_<i) whose shift m and log-scale s come
    from one MADE network (one hidden layer of ``hidden_dim`` units), so
    log |det df_l/dz| = sum_i s_i. Successive layers use reversed variable
    orders, the permutation between MAF layers.

    Direction: the prior scores the guide's z at every training step and
    samples only to generate, so f runs from z to the base (MAF, Papamakarios
    et al. 2017): log p(z) is one vectorized network pass per layer, and a
    sample is d passes per layer (Pyro's ``AffineAutoregressive`` used through
    ``.inv``). The opposite choice (IAF) makes scoring cost d passes per layer.

    The MADE output layer starts at zero, so every layer starts as the identity
    and p(z) as N(0, I); log-scales are clipped to [-5, 3] (Pyro's default).
    Pyro's transforms cache their last input and output; fresh transform objects
    are made on every call, so a cache never outlives the parameters it was
    computed with. With ``latent_dim == 1`` each layer is a learned affine map
    and p(z) a Gaussian.

    References:
        Papamakarios, Pavlakou & Murray, "Masked Autoregressive Flow for Density
        Estimation", NeurIPS 2017.
        Germain et al., "MADE: Masked Autoencoder for Distribution Estimation", ICML 2015.
        Kingma et al., "Improved Variational Inference with Inverse Autoregressive Flow", NeurIPS 2016.
    """

    def __init__(self, *, latent_dim: int, num_flows: int = 2, hidden_dim: int = 64) -> None:
        super().__init__(latent_dim=latent_dim)
        _positive_int("flow", "num_flows", num_flows)
        _positive_int("flow", "hidden_dim", hidden_dim)
        if hidden_dim < latent_dim:
            raise PyroVAEError(
                f"the flow prior's hidden_dim ({hidden_dim}) must be at least latent_dim ({latent_dim}) "
                "for the masked network to connect every variable; give a larger hidden_dim"
            )
        self.num_flows = num_flows
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))
        order = torch.arange(latent_dim)
        networks = []
        with warnings.catch_warnings():
            # Pyro suggests an affine map when latent_dim == 1; that is what a 1-d MADE layer is.
            warnings.filterwarnings("ignore", message=".*input_dim = 1", category=UserWarning)
            for layer in range(num_flows):
                made = AutoRegressiveNN(
                    latent_dim, [hidden_dim], permutation=order if layer % 2 == 0 else order.flip(0)
                )
                nn.init.zeros_(made.layers[-1].weight)
                nn.init.zeros_(made.layers[-1].bias)
                networks.append(made)
        self.networks = nn.ModuleList(networks)

    def forward(self) -> dist.Distribution:
        base = dist.Normal(self.loc, self.scale).to_event(1)
        # Sampling order base -> z applies f_L^{-1} first; each .inv scores by the network's cheap direction.
        transforms = [AffineAutoregressive(made).inv for made in reversed(self.networks)]
        return dist.TransformedDistribution(base, transforms)
