"""Models with global latents: per-datum log p(x_i | g*) at the guide's plug-in value g*, known answers.

The model of most tests is linear-Gaussian with a global offset g shared by every data point::

    g   ~ N(0, 1)                                    once, outside the data plate
    z_i ~ N(0, I_d)                                  for each data point
    x_i ~ N(W z_i + b + g, s^2 I_p)

so that log p(x_i | g) = log N(x_i; b + g, W W^T + s^2 I) in closed form. Its
guide draws g from any q(g) and z_i from the exact posterior given g; every
importance weight then equals p(x_i | g*), and the estimate must equal the
closed form at g* (the mean of q(g)) for any K and any chunking.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal

from pyro_vae import data_plate, fit, make_loss
from pyro_vae.errors import PyroVAEError
from pyro_vae.inference import evaluate_bounds, latent_layers, log_marginal
from pyro_vae.inference.conditioning import plug_in_value
from pyro_vae.io.export import to_inference_data


@pytest.fixture(autouse=True)
def float64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@dataclass(frozen=True)
class GlobalOffset:
    """g ~ N(0, 1);  z_i ~ N(0, I_d);  x_i | z_i, g ~ N(W z_i + b + g, s² I_p)."""

    W: torch.Tensor  # (p, d)
    b: torch.Tensor  # (p,)
    s: float
    # q(g): the guide's distribution of the global offset.
    q_g: dist.Distribution
    # The local guide's scale relative to the exact posterior's (1: exact, every weight equal to p(x_i | g)).
    widen: float = 1.0

    @classmethod
    def random(
        cls, q_g: dist.Distribution, *, d: int = 2, p: int = 5, s: float = 0.7, widen: float = 1.0
    ) -> GlobalOffset:
        g = torch.Generator().manual_seed(3)
        return cls(torch.randn(p, d, generator=g), torch.randn(p, generator=g), s, q_g, widen)

    def sample_data(self, n: int, *, offset: float = 0.4) -> torch.Tensor:
        g = torch.Generator().manual_seed(4)
        z = torch.randn(n, self.W.shape[1], generator=g)
        return z @ self.W.T + self.b + offset + self.s * torch.randn(n, self.W.shape[0], generator=g)

    def model(self, x: torch.Tensor) -> None:
        g = pyro.sample("g", dist.Normal(0.0, 1.0))  # []
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([self.W.shape[1]]).to_event(1))  # (..., N, d)
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b + g.unsqueeze(-1), self.s).to_event(1), obs=x)

    def posterior(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z | x, g) = N(Σ Wᵀ (x - b - g) / s², Σ), Σ = (I + WᵀW / s²)⁻¹: loc (..., N, d), scale_tril (d, d)."""
        cov = torch.linalg.inv(torch.eye(self.W.shape[1]) + self.W.T @ self.W / self.s**2)
        loc = (x - self.b - g.unsqueeze(-1)) @ self.W / self.s**2 @ cov
        return loc, self.widen * torch.linalg.cholesky(cov)

    def guide(self, x: torch.Tensor) -> None:
        g = pyro.sample("g", self.q_g)
        loc, scale_tril = self.posterior(x, g)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale_tril))

    def log_px_given(self, x: torch.Tensor, g: float) -> torch.Tensor:
        cov = self.W @ self.W.T + self.s**2 * torch.eye(self.W.shape[0])
        return MultivariateNormal(self.b + g, covariance_matrix=cov).log_prob(x)  # (N,)


def test_log_px_is_the_closed_form_at_the_guides_mean():
    lg = GlobalOffset.random(dist.Normal(0.37, 0.2))
    x = lg.sample_data(40)
    bounds = evaluate_bounds(lg.model, lg.guide, x, num_samples=10, iwae_ks=[1, 10])
    exact = lg.log_px_given(x, 0.37)
    torch.testing.assert_close(bounds.log_px, exact, rtol=0, atol=1e-9)
    torch.testing.assert_close(bounds.elbo, exact, rtol=0, atol=1e-9)  # exact local guide: ELBO = log p
    assert bounds.conditional_on == ("g",)
    assert bounds.summary()["conditional_on"] == ["g"]
    # Not the same number at another g: the plug-in value is the one used.
    assert (lg.log_px_given(x, 0.0) - bounds.log_px).abs().max() > 1e-2


def test_every_chunking_uses_the_same_plug_in_value():
    lg = GlobalOffset.random(dist.Normal(-0.8, 1.5))
    x = lg.sample_data(11)
    exact = lg.log_px_given(x, -0.8)
    chunked = log_marginal(lg.model, lg.guide, x, num_samples=9, chunk_size=4, data_chunk_size=3)
    torch.testing.assert_close(chunked, exact, rtol=0, atol=1e-9)


def test_ordinary_models_are_conditional_on_nothing():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, math.sqrt(0.5)))

    x = torch.randn(6)
    bounds = evaluate_bounds(model, guide, x, num_samples=5)
    torch.testing.assert_close(bounds.log_px, dist.Normal(0.0, math.sqrt(2.0)).log_prob(x), rtol=0, atol=1e-9)
    assert bounds.conditional_on == () and bounds.summary()["conditional_on"] == []


@pytest.mark.parametrize(
    "make_q_g, g_star",
    [
        (lambda: dist.Cauchy(0.6, 0.3), 0.6),  # no mean: its median, icdf(0.5)
        (lambda: dist.Delta(torch.tensor(-0.25)), -0.25),  # a point estimate (MAP guide)
        (lambda: dist.Normal(torch.tensor([1.1]), 0.3).to_event(1), 1.1),  # an event dimension
    ],
    ids=["cauchy", "delta", "event-shaped"],
)
def test_plug_in_value_is_the_mean_or_the_median(make_q_g, g_star):
    q_g = make_q_g()  # built here, in float64
    lg = GlobalOffset.random(q_g)
    model, guide = _with_event_shaped_offset(lg) if q_g.event_shape else (lg.model, lg.guide)
    x = lg.sample_data(8)
    log_px = log_marginal(model, guide, x, num_samples=4)
    torch.testing.assert_close(log_px, lg.log_px_given(x, g_star), rtol=0, atol=1e-9)


def _with_event_shaped_offset(lg: GlobalOffset):
    """The same model with g of shape [1] (event dim 1)."""

    def model(x):
        g = pyro.sample("g", dist.Normal(torch.zeros(1), 1.0).to_event(1))  # [1]
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([lg.W.shape[1]]).to_event(1))
            pyro.sample("x", dist.Normal(z @ lg.W.T + lg.b + g, lg.s).to_event(1), obs=x)

    def guide(x):
        g = pyro.sample("g", lg.q_g)
        loc, scale_tril = lg.posterior(x, g.squeeze(-1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale_tril))

    return model, guide


def test_plug_in_value_of_a_discrete_site_is_in_its_support():
    assert float(plug_in_value(dist.Bernoulli(torch.tensor(0.8)))) == 1.0  # not its mean 0.8
    assert float(plug_in_value(dist.Bernoulli(torch.tensor(0.2)))) == 0.0
    assert float(plug_in_value(dist.Normal(torch.tensor(2.0), 5.0))) == 2.0
    value = plug_in_value(dist.Cauchy(torch.tensor([0.5, -1.0]), 1.0).to_event(1))
    torch.testing.assert_close(value, torch.tensor([0.5, -1.0]))


def test_sequential_globals_take_their_plug_in_values_in_order():
    """g1 ~ q(g1) = N(0.3, 0.1), g2 ~ q(g2 | g1) = N(g1 + 0.5, 0.1): g2* = g1* + 0.5, offset g1* + g2*."""
    lg = GlobalOffset.random(dist.Normal(0.0, 1.0))

    def model(x):
        g1 = pyro.sample("g1", dist.Normal(0.0, 1.0))
        g2 = pyro.sample("g2", dist.Normal(g1, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([lg.W.shape[1]]).to_event(1))
            pyro.sample(
                "x", dist.Normal(z @ lg.W.T + lg.b + (g1 + g2).unsqueeze(-1), lg.s).to_event(1), obs=x
            )

    def guide(x):
        g1 = pyro.sample("g1", dist.Normal(0.3, 0.1))
        g2 = pyro.sample("g2", dist.Normal(g1 + 0.5, 0.1))
        loc, scale_tril = lg.posterior(x, g1 + g2)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale_tril))

    x = lg.sample_data(7)
    bounds = evaluate_bounds(model, guide, x, num_samples=6)
    torch.testing.assert_close(bounds.log_px, lg.log_px_given(x, 0.3 + 0.8), rtol=0, atol=1e-9)
    assert bounds.conditional_on == ("g1", "g2")


def test_a_global_in_its_own_plate():
    """mu_k ~ N(0, 1) in a plate of 3 outside the data plate; z_i ~ N(0, I_3); x_i ~ N(z_i + mu, I_3)."""
    loc = torch.tensor([0.5, -1.0, 2.0])

    def model(x):
        with pyro.plate("components", 3):
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))  # [3]
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
            pyro.sample("x", dist.Normal(z + mu, 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("components", 3):
            mu = pyro.sample("mu", dist.Normal(loc, 0.1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal((x - mu) / 2, math.sqrt(0.5)).to_event(1))  # exact given mu

    x = torch.randn(12, 3)
    bounds = evaluate_bounds(model, guide, x, num_samples=5)
    exact = dist.Normal(loc, math.sqrt(2.0)).to_event(1).log_prob(x)  # x_i | mu* ~ N(mu*, 2 I)
    torch.testing.assert_close(bounds.log_px, exact, rtol=0, atol=1e-9)
    assert bounds.conditional_on == ("mu",)


def test_globals_cost_no_draws_from_the_random_stream():
    """A global g with q(g) = Cauchy(0.6, 0.3) (whose median is found by sampling) against g = 0.6 written in."""
    lg = GlobalOffset.random(dist.Cauchy(0.6, 0.3), widen=1.5)  # inexact: the weights vary with the draws
    x = lg.sample_data(5)

    def fixed_model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([lg.W.shape[1]]).to_event(1))
            pyro.sample("x", dist.Normal(z @ lg.W.T + lg.b + 0.6, lg.s).to_event(1), obs=x)

    def fixed_guide(x):
        loc, scale_tril = lg.posterior(x, torch.tensor(0.6))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale_tril))

    runs = []
    for model, guide in ((lg.model, lg.guide), (fixed_model, fixed_guide)):
        pyro.set_rng_seed(7)
        bounds = evaluate_bounds(model, guide, x, num_samples=30, chunk_size=7)
        runs.append((bounds.elbo, bounds.log_px, torch.rand(3)))
    for with_global, written_in in zip(*runs, strict=True):
        torch.testing.assert_close(with_global, written_in, rtol=0, atol=1e-12)


def test_latent_layers_report_the_local_sites_only():
    lg = GlobalOffset.random(dist.Normal(0.37, 0.2))
    x = lg.sample_data(30)
    layers = latent_layers(lg.model, lg.guide, x, num_samples=50)
    assert [layer["site"] for layer in layers] == ["z"]
    # KL(p(z | x, g*) || N(0, I)) in closed form, averaged over the data.
    loc, scale_tril = lg.posterior(x, torch.tensor(0.37))
    posterior = MultivariateNormal(loc, scale_tril=scale_tril)
    prior = MultivariateNormal(torch.zeros(2), torch.eye(2))
    expected = float(torch.distributions.kl_divergence(posterior, prior).mean())
    assert layers[0]["kl"] == pytest.approx(expected, abs=0.1)


def test_export_draws_the_local_sites_at_the_plug_in_value():
    lg = GlobalOffset.random(dist.Normal(0.37, 0.2))
    x = lg.sample_data(6)
    idata = to_inference_data(lg.model, lg.guide, x, num_samples=20, seed=0)
    assert list(idata.posterior.data_vars) == ["z"]
    assert idata.attrs["conditional_on"] == "g"
    exact = lg.log_px_given(x, 0.37).numpy()
    assert abs(idata.sample_stats["log_px"].values - exact).max() < 1e-9


# ---- What the evaluators refuse, with a sentence ---------------------------------------------------------


def test_an_observed_site_outside_the_data_plate_is_refused():
    lg = GlobalOffset.random(dist.Normal(0.37, 0.2))

    def model(x):
        lg.model(x)
        pyro.sample("anchor", dist.Normal(0.0, 1.0), obs=torch.tensor(0.1))  # one term for the data set

    with pytest.raises(PyroVAEError, match=r"observes 'anchor' outside pyro.plate\('data', ...\)"):
        evaluate_bounds(model, lg.guide, lg.sample_data(4), num_samples=3)


def test_a_batch_dimension_in_no_plate_is_refused():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(3, 1), 1.0))  # [3, N]: the 3 is in no plate
            pyro.sample("x", dist.Normal(z.sum(-2), 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(3, 1), 1.0))

    with pytest.raises(PyroVAEError, match=r"site 'z' has batch shape \[3, 2\].*left of every plate"):
        evaluate_bounds(model, guide, torch.randn(5), num_samples=3)


def test_a_global_with_a_batch_dimension_in_no_plate_is_refused():
    def model(x):
        g = pyro.sample("g", dist.Normal(torch.zeros(3), 1.0))  # [3] outside every plate
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(g.sum(-1), 1.0), obs=x)

    def guide(x):
        pyro.sample("g", dist.Normal(torch.zeros(3), 1.0))

    with pytest.raises(PyroVAEError, match=r'in the model: at site "g", invalid log_prob shape'):
        evaluate_bounds(model, guide, torch.randn(5), num_samples=3)


def test_the_iwae_loss_refuses_global_latents():
    lg = GlobalOffset.random(dist.Normal(0.37, 0.2))
    with pytest.raises(PyroVAEError, match=r"global latent site\(s\) 'g'.*use loss='elbo' \(--loss elbo\)"):
        make_loss("iwae", num_particles=3).differentiable_loss(lg.model, lg.guide, lg.sample_data(4))


# ---- Training such a model by SVI, then evaluating it -----------------------------------------------------


class GlobalOffsetVAE(nn.Module):
    """A linear VAE with a global offset, as a user would write it.

    Generative story::

        g   ~ N(0, 1)                      once
        z_i ~ N(0, I)                      for each data point
        x_i ~ N(W z_i + b + g, 0.5^2 I)

    Guide::

        g   ~ N(m, softplus(r)^2)          m, r learned
        z_i ~ N(A x_i + a, diag softplus(c)^2)
    """

    def __init__(self, *, data_dim: int, latent_dim: int = 2) -> None:
        super().__init__()
        self.decoder = nn.Linear(latent_dim, data_dim)
        self.encoder = nn.Linear(data_dim, latent_dim)
        self.raw_scale = nn.Parameter(torch.zeros(latent_dim))
        self.g_loc = nn.Parameter(torch.tensor(0.0))
        self.g_raw_scale = nn.Parameter(torch.tensor(-1.0))
        self.latent_dim = latent_dim

    def model(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        pyro.module("vae", self)
        g = pyro.sample("g", dist.Normal(x.new_tensor(0.0), 1.0))  # [] or [K, 1] under a particle plate
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z) + g.unsqueeze(-1), 0.5).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        pyro.module("vae", self)
        pyro.sample("g", dist.Normal(self.g_loc, nn.functional.softplus(self.g_raw_scale)))
        with data_plate(x, num_data):
            scale = nn.functional.softplus(self.raw_scale)
            pyro.sample("z", dist.Normal(self.encoder(x), scale).to_event(1))


def test_fit_trains_a_model_with_a_global_latent_and_the_evaluator_reports_it():
    x = GlobalOffset.random(dist.Normal(0.0, 1.0)).sample_data(64, offset=2.0)
    vae = GlobalOffsetVAE(data_dim=5)
    result = fit(vae, x, epochs=3, batch_size=16, lr=0.05, progress=False)
    assert math.isfinite(result.final.train_elbo)
    assert (
        float(vae.g_loc.detach()) > 0.0
    )  # the global offset of the data is 2: its mean has moved towards it
    bounds = evaluate_bounds(vae.model, vae.guide, x, num_samples=20)
    assert bounds.conditional_on == ("g",) and torch.isfinite(bounds.log_px).all()
