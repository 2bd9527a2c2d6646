"""A small zoo of models written as a user would write them, for the tests that take them everywhere.

Each model is an ``nn.Module`` with ``model(x, *, num_data=None)`` and
``guide(x, *, num_data=None)``, its per-datum sites inside
``pyro_vae.data_plate(x, num_data)``, its distributions written directly with
``pyro.distributions`` (no prior, likelihood or guide object of the package),
and a docstring that tells its generative story, one ``pyro.sample`` per line.
Constructors take ``data_dim`` (as ``pyro-vae train --model FILE.py:Class``
passes it) and keyword options.

The second half holds model/guide pairs that are wrong on purpose, one flaw
each, for the tests that every consumer refuses them with a sentence instead of
returning a number.

Shapes: the evaluators and ``iwae`` draw K particles in an outer plate left of
the data plate, so a per-datum latent is [..., M, d] and a global scalar latent
[..., 1] (a plain [] outside such a plate); the code broadcasts over ``...``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from pyro_vae import data_plate

__all__ = [
    "MODELS",
    "DiscreteLatent",
    "ExtraSite",
    "GlobalNoiseVAE",
    "GuideObservesData",
    "GuideWithoutDataPlate",
    "LaplaceVAE",
    "MissingLatent",
    "RenamedSite",
    "ShapeMismatch",
    "SkipVAE",
    "TwoLatents",
]


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Softplus(), nn.Linear(hidden_dim, out_dim))


def normal(params: torch.Tensor) -> dist.Distribution:
    """A diagonal Gaussian over the last dimension from [..., 2 d] network outputs (loc, raw scale)."""
    loc, raw_scale = params.chunk(2, dim=-1)
    return dist.Normal(loc, F.softplus(raw_scale) + 1e-4).to_event(1)


def cat(*tensors: torch.Tensor) -> torch.Tensor:
    """Concatenate on the last dimension, broadcasting the leading ones (a particle dimension, say)."""
    shape = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(*shape, t.shape[-1]) for t in tensors], dim=-1)


class SkipVAE(nn.Module):
    """Two stochastic layers and a skip connection from z2 to the decoder.

    Generative story, for each data point::

        z2 ~ N(0, I)
        z1 ~ N(mu(z2), diag sigma(z2)^2)
        x  ~ Bernoulli(logits = decoder(z1, z2))

    Guide, bottom-up::

        z1 ~ q(z1 | x)
        z2 ~ q(z2 | z1, x)
    """

    def __init__(self, *, data_dim: int, z1_dim: int = 4, z2_dim: int = 2, hidden_dim: int = 32) -> None:
        super().__init__()
        self.z2_dim = z2_dim
        self.p_z1 = mlp(z2_dim, hidden_dim, 2 * z1_dim)
        self.decoder = mlp(z1_dim + z2_dim, hidden_dim, data_dim)
        self.q_z1 = mlp(data_dim, hidden_dim, 2 * z1_dim)
        self.q_z2 = mlp(z1_dim + data_dim, hidden_dim, 2 * z2_dim)

    def model(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        pyro.module("p_z1", self.p_z1)
        pyro.module("decoder", self.decoder)
        with data_plate(x, num_data):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(self.z2_dim), 1.0).to_event(1))  # [..., M, d2]
            z1 = pyro.sample("z1", normal(self.p_z1(z2)))  # [..., M, d1]
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(cat(z1, z2))).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        pyro.module("q_z1", self.q_z1)
        pyro.module("q_z2", self.q_z2)
        with data_plate(x, num_data):
            z1 = pyro.sample("z1", normal(self.q_z1(x)))
            pyro.sample("z2", normal(self.q_z2(cat(z1, x))))


class GlobalNoiseVAE(nn.Module):
    """A Gaussian VAE whose noise scale is a global latent, one for the whole data set.

    Generative story::

        log_noise ~ N(-1, 0.5^2)                            once, outside the data plate
        z_n ~ N(0, I)                                       for each data point
        x_n ~ N(decoder(z_n), exp(log_noise)^2 I)

    Guide::

        log_noise ~ N(m, s^2)                               m, s learned
        z_n ~ q(z | x_n)
    """

    def __init__(self, *, data_dim: int, latent_dim: int = 2, hidden_dim: int = 32) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.decoder = mlp(latent_dim, hidden_dim, data_dim)
        self.encoder = mlp(data_dim, hidden_dim, 2 * latent_dim)
        # q(log_noise) = N(m, softplus(r)^2): its two parameters, in a module so that they are saved with it.
        self.q_noise = nn.ParameterDict(
            {"m": nn.Parameter(torch.tensor(-1.0)), "r": nn.Parameter(torch.tensor(-2.0))}
        )

    def model(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        pyro.module("decoder", self.decoder)
        log_noise = pyro.sample("log_noise", dist.Normal(x.new_tensor(-1.0), 0.5))  # [] or [K, 1]
        noise = log_noise.exp().unsqueeze(-1)  # [1] or [K, 1, 1], against [..., M, D]
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), noise).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        pyro.module("encoder", self.encoder)
        pyro.module("q_noise", self.q_noise)
        pyro.sample("log_noise", dist.Normal(self.q_noise["m"], F.softplus(self.q_noise["r"])))
        with data_plate(x, num_data):
            pyro.sample("z", normal(self.encoder(x)))


class LaplaceVAE(nn.Module):
    """A VAE with a heavy-tailed latent prior, written directly with ``pyro.sample``.

    Generative story, for each data point::

        z ~ Laplace(0, 1)^d
        x ~ Bernoulli(logits = decoder(z))

    Guide::

        z ~ N(mu(x), diag sigma(x)^2)
    """

    def __init__(self, *, data_dim: int, latent_dim: int = 3, hidden_dim: int = 32) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.decoder = mlp(latent_dim, hidden_dim, data_dim)
        self.encoder = mlp(data_dim, hidden_dim, 2 * latent_dim)

    def model(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        pyro.module("decoder", self.decoder)
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Laplace(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        pyro.module("encoder", self.encoder)
        with data_plate(x, num_data):
            pyro.sample("z", normal(self.encoder(x)))


# The models every consumer must take: name -> class.
MODELS: dict[str, type[nn.Module]] = {
    "SkipVAE": SkipVAE,
    "GlobalNoiseVAE": GlobalNoiseVAE,
    "LaplaceVAE": LaplaceVAE,
}


# ---- Pairs that are wrong on purpose: one flaw each --------------------------------------------------


class TwoLatents(nn.Module):
    """Two independent latents, the correct pair the flawed guides below depart from.

    Generative story, for each data point::

        z1 ~ N(0, I)
        z2 ~ N(0, I)
        x  ~ N(A z1 + B z2, I)

    Guide::

        z1 ~ q(z1 | x)
        z2 ~ q(z2 | x)
    """

    def __init__(self, *, data_dim: int, latent_dim: int = 2) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.a = nn.Linear(latent_dim, data_dim)
        self.b = nn.Linear(latent_dim, data_dim, bias=False)
        self.q_z1 = nn.Linear(data_dim, 2 * latent_dim)
        self.q_z2 = nn.Linear(data_dim, 2 * latent_dim)

    def prior(self, x: torch.Tensor) -> dist.Distribution:
        return dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1)

    def model(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        pyro.module("a", self.a)
        pyro.module("b", self.b)
        with data_plate(x, num_data):
            z1 = pyro.sample("z1", self.prior(x))
            z2 = pyro.sample("z2", self.prior(x))
            pyro.sample("x", dist.Normal(self.a(z1) + self.b(z2), 1.0).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        pyro.module("q_z1", self.q_z1)
        pyro.module("q_z2", self.q_z2)
        with data_plate(x, num_data):
            pyro.sample("z1", normal(self.q_z1(x)))
            pyro.sample("z2", normal(self.q_z2(x)))


class MissingLatent(TwoLatents):
    """The guide forgets z2 (the model would then draw it from its prior, and the weight miss its density)."""

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        pyro.module("q_z1", self.q_z1)
        with data_plate(x, num_data):
            pyro.sample("z1", normal(self.q_z1(x)))


class RenamedSite(TwoLatents):
    """The guide draws z2 under another name, ``w``."""

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        pyro.module("q_z1", self.q_z1)
        pyro.module("q_z2", self.q_z2)
        with data_plate(x, num_data):
            pyro.sample("z1", normal(self.q_z1(x)))
            pyro.sample("w", normal(self.q_z2(x)))


class ExtraSite(TwoLatents):
    """The guide draws a site, ``u``, that the model does not have."""

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        pyro.module("q_z1", self.q_z1)
        pyro.module("q_z2", self.q_z2)
        with data_plate(x, num_data):
            pyro.sample("z1", normal(self.q_z1(x)))
            pyro.sample("z2", normal(self.q_z2(x)))
            pyro.sample("u", dist.Normal(x.new_zeros(1), 1.0).to_event(1))


class ShapeMismatch(TwoLatents):
    """The guide's z2 forgets ``.to_event(1)``: its coordinates become a batch dimension (event_dim 0, not 1)."""

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        pyro.module("q_z1", self.q_z1)
        pyro.module("q_z2", self.q_z2)
        with data_plate(x, num_data):
            pyro.sample("z1", normal(self.q_z1(x)))
            loc, raw_scale = self.q_z2(x).chunk(2, dim=-1)
            pyro.sample("z2", dist.Normal(loc, F.softplus(raw_scale) + 1e-4))  # batch [M, d], event []


class GuideObservesData(TwoLatents):
    """The guide also draws the observed site ``x``."""

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        pyro.module("q_z1", self.q_z1)
        pyro.module("q_z2", self.q_z2)
        with data_plate(x, num_data):
            pyro.sample("z1", normal(self.q_z1(x)))
            pyro.sample("z2", normal(self.q_z2(x)))
            pyro.sample("x", dist.Normal(x, 1.0).to_event(1))


class GuideWithoutDataPlate(TwoLatents):
    """The guide draws z1 and z2 outside the data plate: one value for the whole minibatch."""

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        pyro.module("q_z1", self.q_z1)
        pyro.module("q_z2", self.q_z2)
        pyro.sample("z1", normal(self.q_z1(x.mean(0))))
        pyro.sample("z2", normal(self.q_z2(x.mean(0))))


class DiscreteLatent(nn.Module):
    """A mixture of two shifted Gaussian VAEs, its component a discrete latent the guide draws.

    Generative story, for each data point::

        c ~ Bernoulli(1/2)
        z ~ N(0, I)
        x ~ N(A z + c b, I)

    Guide::

        c ~ Bernoulli(logits = g(x))        discrete: not reparameterizable
        z ~ q(z | x)

    A valid pair for ``elbo`` (Pyro adds the score-function term for ``c``)
    and for importance sampling; ``iwae`` and ``mean-field`` differentiate
    through reparameterized samples only, so they must refuse it.
    """

    def __init__(self, *, data_dim: int, latent_dim: int = 2) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.a = nn.Linear(latent_dim, data_dim)
        self.shift = nn.Linear(1, data_dim, bias=False)  # b
        self.q_c = nn.Linear(data_dim, 1)
        self.q_z = nn.Linear(data_dim, 2 * latent_dim)

    def model(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        pyro.module("a", self.a)
        pyro.module("shift", self.shift)
        with data_plate(x, num_data):
            c = pyro.sample("c", dist.Bernoulli(x.new_tensor(0.5)))  # [..., M]
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            loc = self.a(z) + self.shift(c.unsqueeze(-1))  # [..., M, D]
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        pyro.module("q_c", self.q_c)
        pyro.module("q_z", self.q_z)
        with data_plate(x, num_data):
            pyro.sample("c", dist.Bernoulli(logits=self.q_c(x).squeeze(-1)))
            pyro.sample("z", normal(self.q_z(x)))
