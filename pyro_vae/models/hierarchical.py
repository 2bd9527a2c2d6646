r"""Hierarchical latents: a VAE with L stochastic layers z1, ..., zL.

Generative story (top-down), for each data point::

    z_L ~ p(z_L)                                      any prior of the registry
    z_l ~ N(mu_l(z_{l+1}), diag sigma_l(z_{l+1})^2)   l = L-1, ..., 1
    x   ~ p(x | decoder(z_1))                         any likelihood of the registry

Inference, ``bottom-up`` (Burda et al., 2016, section 5)::

    q(z | x) = q(z_1 | x) q(z_2 | z_1) ... q(z_L | z_{L-1})

Inference, ``ladder`` (Sønderby et al., 2016): a deterministic upward pass
d_1 = f(x), d_l = f_l(d_{l-1}) gives each layer a Gaussian estimate
N(mu_hat_l, sigma_hat_l^2); then, top-down, q(z_L | x) = N(mu_hat_L, sigma_hat_L^2) and
q(z_l | z_{l+1}, x) combines the estimate with the generative
p(z_l | z_{l+1}) by precision weighting::

    sigma_q^-2 = sigma_hat^-2 + sigma_p^-2,   mu_q = (mu_hat sigma_hat^-2 + mu_p sigma_p^-2) sigma_q^2

so the guide shares the generative path's parameters.

Every layer is one ``pyro.sample`` site, ``"z1"`` ... ``"zL"``, inside the
data plate, so SVI, every objective and the log p(x) evaluator run unchanged.

References:
    Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
    Sønderby, Raiko, Maaløe, Sønderby & Winther, "Ladder Variational
    Autoencoders", NeurIPS 2016.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from ..components.guides import GuideHead
from ..components.likelihoods import Likelihood
from ..components.linear import Linear
from ..components.nets import MLP
from ..components.priors import Prior
from ..components.softplus import Softplus
from ..config import LAYER_INITS, TOP_DOWN
from ..errors import PyroVAEError
from .abilities import MEAN_SAMPLES, guide_means
from .plate import data_plate

__all__ = [
    "GaussianLayer",
    "HierarchicalVAE",
    "glorot_init",
]

_MIN_SCALE = 1e-5


class GaussianLayer(nn.Module):
    """A conditional diagonal Gaussian N(mu(h), diag sigma(h)^2) with an MLP body.

    Used for p(z_l | z_{l+1}) in the model and q(z_{l+1} | z_l) in the
    bottom-up guide. Leading dimensions of ``h`` (particles, data) pass through.

    ``residual=True`` adds a linear path to the mean, mu(h) = W h + head(body(h)),
    with W [out_dim, in_dim] starting as the identity on the first min(in_dim,
    out_dim) coordinates (``torch.eye(out_dim, in_dim)``): the mean depends on h
    with a Jacobian of singular values about 1 from the first step, instead of
    through a stack of layers that each shrink the signal. ``init="glorot"``
    draws every weight from the heuristic of Glorot & Bengio (2010), as Burda et
    al. (2016, section 5) did, with zero biases; ``"torch"`` keeps torch's
    default (uniform of bound 1 / sqrt(fan_in), which shrinks the signal's
    variance about threefold per layer).

    References:
        Glorot & Bengio, "Understanding the difficulty of training deep
        feedforward neural networks", AISTATS 2010.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int],
        out_dim: int,
        *,
        activation: type[nn.Module],
        residual: bool = False,
        init: str = "torch",
    ) -> None:
        super().__init__()
        if init not in LAYER_INITS:
            raise PyroVAEError(f"init must be one of {', '.join(LAYER_INITS)}, got {init!r}")
        self.body = MLP(in_dim, hidden_dims, activation=activation)
        self.loc = Linear(self.body.out_dim, out_dim)
        self.raw_scale = Linear(self.body.out_dim, out_dim)
        if init == "glorot":
            glorot_init(self)
        # Created after the other layers so that a plain layer draws the same weights as before it existed.
        self.skip: nn.Linear | None = None
        if residual:
            self.skip = Linear(in_dim, out_dim, bias=False)
            with torch.no_grad():
                self.skip.weight.copy_(torch.eye(out_dim, in_dim))

    def params(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(h)  # [..., hidden_dims[-1]]
        loc = self.loc(features)  # [..., out_dim]
        if self.skip is not None:
            loc = loc + self.skip(h)
        return loc, F.softplus(self.raw_scale(features)) + _MIN_SCALE

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        return dist.Normal(*self.params(h)).to_event(1)


def glorot_init(module: nn.Module) -> None:
    """Every ``nn.Linear`` of ``module``: weights ~ U(-a, a), a = sqrt(6 / (fan_in + fan_out)), biases 0.

    The heuristic of Glorot & Bengio (2010) that Burda et al. (2016) used; it
    keeps the variance of a signal (and of its gradient) about constant through
    tanh layers, where torch's default divides it by about 3 per layer.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class HierarchicalVAE(nn.Module):
    """A VAE with stochastic layers z1 (next to x) ... zL (under the prior); see the module docstring.

    ``down[l]`` is p(z_{l+1} | z_{l+2}) for l = 0..L-2 (0-based: ``down[0]`` gives z1
    from z2). ``bottom-up`` inference uses ``guide_head(encoder(x))`` for z1
    and ``up[l]`` for q(z_{l+2} | z_{l+1}). ``ladder`` inference uses
    ``ladder_nets[l]`` (d_{l+1} -> d_{l+2}) and ``ladder_heads[l]`` (d_{l+1} ->
    Gaussian estimate of z_{l+1}), and the model's ``down`` layers.
    """

    def __init__(
        self,
        *,
        prior: Prior,
        likelihood: Likelihood,
        encoder: nn.Module,
        guide_head: GuideHead | None,
        decoder: nn.Module,
        latent_dims: Sequence[int],
        layer_hidden_dims: Sequence[Sequence[int]] | None = None,
        hidden_depth: int = 2,
        activation: type[nn.Module] = Softplus,
        inference: str = "bottom-up",
        top_down: str = "residual",
        init: str = "glorot",
    ) -> None:
        super().__init__()
        dims = list(latent_dims)
        if len(dims) < 2:
            raise PyroVAEError("a HierarchicalVAE needs at least two latent layers; use VAE for one")
        if prior.latent_dim != dims[-1]:
            raise PyroVAEError(
                f"the prior is over {prior.latent_dim} dimensions but the top layer has {dims[-1]}"
            )
        if inference not in ("bottom-up", "ladder"):
            raise PyroVAEError(f"inference must be 'bottom-up' or 'ladder', got {inference!r}")
        if top_down not in TOP_DOWN:
            raise PyroVAEError(f"top_down must be one of {', '.join(TOP_DOWN)}, got {top_down!r}")
        if inference == "bottom-up" and (guide_head is None or guide_head.latent_dim != dims[0]):
            raise PyroVAEError(f"bottom-up inference needs a guide head for z1 with latent_dim {dims[0]}")
        # Between z_l and z_{l+1} (both directions): by default `hidden_depth` layers as wide as z_l, the
        # lower layer (Burda et al., 2016, section 5: z1 (100) -> 100 -> 100 -> z2 (50)).
        if layer_hidden_dims is None:
            layer_hidden_dims = [[dims[i]] * hidden_depth for i in range(len(dims) - 1)]
        widths = [list(w) for w in layer_hidden_dims]
        if len(widths) != len(dims) - 1 or any(not w for w in widths):
            raise PyroVAEError(
                f"{len(dims)} latent layers need {len(dims) - 1} non-empty lists of hidden widths (one "
                f"between each pair of layers, z1-z2 first), got {widths}"
            )
        self.latent_dims = dims
        self.layer_hidden_dims = widths
        self.inference = inference
        self.top_down = top_down
        self.prior = prior
        self.likelihood = likelihood
        self.encoder = encoder
        self.decoder = decoder
        residual = top_down == "residual"
        # down[i] is p(z_{i+1} | z_{i+2}); the order of creation (down, then up or ladder) fixes which
        # weights a seed gives, so it stays as it was.
        self.down = nn.ModuleList(
            GaussianLayer(
                dims[i + 1], widths[i], dims[i], activation=activation, residual=residual, init=init
            )
            for i in range(len(dims) - 1)
        )
        if inference == "bottom-up":
            self.guide_head = guide_head
            self.up = nn.ModuleList(
                GaussianLayer(dims[i], widths[i], dims[i + 1], activation=activation, init=init)
                for i in range(len(dims) - 1)
            )
        else:
            # d_1 = encoder(x) [.., H], d_{l+1} = ladder_nets[l](d_l) [.., widths[l][-1]].
            feature_dims = [encoder.out_dim] + [w[-1] for w in widths]
            self.ladder_nets = nn.ModuleList(
                MLP(feature_dims[i], widths[i], activation=activation) for i in range(len(dims) - 1)
            )
            self.ladder_heads = nn.ModuleList(
                Linear(feature_dims[i], 2 * dims[i]) for i in range(len(dims))
            )
            if init == "glorot":
                glorot_init(self.ladder_nets)
                glorot_init(self.ladder_heads)
        self.prior.bind(encoder=encoder, guide_head=guide_head, data_dim=likelihood.data_dim)

    @property
    def num_layers(self) -> int:
        return len(self.latent_dims)

    @property
    def latent_sites(self) -> tuple[str, ...]:
        """The sites ``("z1", ..., "zL")``, the layer next to x first (the NamesLatents ability)."""
        return tuple(f"z{layer}" for layer in range(1, self.num_layers + 1))

    @property
    def latent_dim(self) -> int:
        return self.latent_dims[0]

    def site_names(self) -> list[str]:
        return [f"z{i}" for i in range(1, self.num_layers + 1)]

    def model(self, x: torch.Tensor | None, *, num_data: int | None = None) -> None:
        """p(x, z1..zL) = p(zL) prod_l p(z_l | z_{l+1}) p(x | z1), top-down.

        ``x=None`` draws ``num_data`` new points through the layers (for ``pyro.infer.Predictive``).
        """
        pyro.module("prior", self.prior)
        pyro.module("down", self.down)
        pyro.module("decoder", self.decoder)
        pyro.module("likelihood", self.likelihood)
        with data_plate(x, num_data):
            z = pyro.sample(f"z{self.num_layers}", self.prior())  # [..., M, d_L]
            for layer in range(self.num_layers - 1, 0, -1):
                z = pyro.sample(f"z{layer}", self.down[layer - 1](z))  # [..., M, d_layer]
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        """q(z1..zL | x), bottom-up or ladder."""
        if self.inference == "bottom-up":
            self._bottom_up_guide(x, num_data)
        else:
            self._ladder_guide(x, num_data)

    def _bottom_up_guide(self, x: torch.Tensor, num_data: int | None) -> None:
        pyro.module("encoder", self.encoder)
        pyro.module("guide_head", self.guide_head)
        pyro.module("up", self.up)
        with data_plate(x, num_data):
            z = pyro.sample("z1", self.guide_head(self.encoder(x)))  # [..., M, d_1]
            for layer in range(2, self.num_layers + 1):
                z = pyro.sample(f"z{layer}", self.up[layer - 2](z))  # [..., M, d_layer]

    def _ladder_estimates(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # The deterministic upward pass: d_1 = encoder(x), d_l = f_l(d_{l-1}); each d_l [M, w_l] gives
        # the layer's own Gaussian estimate (mu_hat_l, sigma_hat_l), [M, d_l] each.
        d = self.encoder(x)
        estimates = []
        for layer in range(self.num_layers):
            if layer > 0:
                d = self.ladder_nets[layer - 1](d)
            loc, raw = self.ladder_heads[layer](d).chunk(2, dim=-1)
            estimates.append((loc, F.softplus(raw) + _MIN_SCALE))
        return estimates

    def _ladder_guide(self, x: torch.Tensor, num_data: int | None) -> None:
        pyro.module("encoder", self.encoder)
        pyro.module("ladder_nets", self.ladder_nets)
        pyro.module("ladder_heads", self.ladder_heads)
        pyro.module("down", self.down)  # the generative path the ladder shares
        estimates = self._ladder_estimates(x)
        with data_plate(x, num_data):
            loc, scale = estimates[-1]
            z = pyro.sample(f"z{self.num_layers}", dist.Normal(loc, scale).to_event(1))
            for layer in range(self.num_layers - 1, 0, -1):
                loc_hat, scale_hat = estimates[layer - 1]  # [M, d]
                loc_p, scale_p = self.down[layer - 1].params(z)  # [..., M, d]
                precision_hat, precision_p = scale_hat.pow(-2), scale_p.pow(-2)
                precision = precision_hat + precision_p
                loc = (loc_hat * precision_hat + loc_p * precision_p) / precision
                z = pyro.sample(f"z{layer}", dist.Normal(loc, precision.rsqrt()).to_event(1))

    @torch.no_grad()
    def posterior_mean_z1(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of z1 under the guide ([N, d_1]; by Monte Carlo over z2.. for the ladder)."""
        if self.inference == "bottom-up":
            return self.guide_head(self.encoder(x)).mean
        trace = pyro.poutine.trace(self.guide).get_trace(x)
        return trace.nodes["z1"]["fn"].mean

    @torch.no_grad()
    def posterior_means(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """E_q[z_l | x] [N, d_l] for every layer.

        Exact for the layer the guide draws first (z1 bottom-up, zL ladder); a
        later layer's mean is E_q[ E_q[z_l | x, earlier layers] ], averaged over
        :data:`~pyro_vae.models.abilities.MEAN_SAMPLES` draws of the earlier
        layers from torch's global generator.
        """
        return guide_means(self.guide, x, sites=self.latent_sites, num_samples=MEAN_SAMPLES)

    @torch.no_grad()
    def decode(self, latents: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The mean of p(x | z1) [N, D], z1 given or the mean of p(z1 | z2) ... down from the lowest layer given.

        ``latents`` holds values [N, d_l] of some layers; a layer below the
        lowest one given is set to the mean of p(z_l | z_{l+1}).
        """
        unknown = sorted(set(latents) - set(self.latent_sites))
        if unknown or not latents:
            raise PyroVAEError(
                f"a {self.num_layers}-layer VAE decodes values of {', '.join(self.latent_sites)}, got "
                f"{', '.join(sorted(latents)) or 'none'}"
            )
        z = None
        for layer in range(self.num_layers, 0, -1):
            if f"z{layer}" in latents:
                z = latents[f"z{layer}"]
            elif z is not None:
                z = self.down[layer - 1](z).mean  # the mean of p(z_layer | z_{layer+1})
        return self.likelihood(self.decoder(z)).mean

    @torch.no_grad()
    def sample_latents(self, num: int) -> dict[str, torch.Tensor]:
        """``num`` ancestral draws z_L ~ p(z_L), z_l ~ p(z_l | z_{l+1}): ``{"z1": [num, d_1], ...}``."""
        z = self.prior().sample((num,))
        latents = {f"z{self.num_layers}": z}
        for layer in range(self.num_layers - 1, 0, -1):
            z = self.down[layer - 1](z).sample()
            latents[f"z{layer}"] = z
        return latents

    def check_data(self, x: torch.Tensor) -> None:
        """Refuse data outside the likelihood's support or of the wrong size (a PyroVAEError)."""
        self.likelihood.check_data(x)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z1) at the guide's mean of z1: [N, D]."""
        return self.likelihood(self.decoder(self.posterior_mean_z1(x))).mean

    @torch.no_grad()
    def sample(self, num_samples: int, *, mean: bool = True) -> torch.Tensor:
        """New data by ancestral sampling z_L ~ p(z_L), z_l ~ p(z_l | z_{l+1}), x ~ p(x | z_1)."""
        z = self.prior().sample((num_samples,))
        for layer in range(self.num_layers - 1, 0, -1):
            z = self.down[layer - 1](z).sample()
        px = self.likelihood(self.decoder(z))
        return px.mean if mean else px.sample()
