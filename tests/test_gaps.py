"""Known-answer tests for the inference gaps (:func:`pyro_vae.inference.gaps`).

A linear-Gaussian model whose decoder has orthogonal columns has a diagonal Gaussian
posterior, so the family of a diagonal Normal guide holds it: the per-datum optimized guide
must recover it (ELBO* = log p(x), the approximation gap -> 0), and the amortization gap of a
deliberately wrong encoder must then be its KL(q || p(z | x)), known in closed form.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from pyro_vae.errors import PyroVAEError
from pyro_vae.inference import AnnealingSettings, GapSettings, gaps
from tests.test_evaluation_known_answer import GaussianChain, LinearGaussian

# Known answers are compared in double precision (conftest's fixture; pyro_state clears the store and seeds).
pytestmark = pytest.mark.usefixtures("float64")


def diagonal_posterior_model() -> LinearGaussian:
    """W with orthogonal columns: WᵀW is diagonal, hence so is the posterior covariance."""
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(5, 2, generator=g))
    return LinearGaussian(q * torch.tensor([2.0, 0.7]), torch.randn(5, generator=g), 0.5)


def test_optimized_guide_recovers_the_exact_posterior_and_the_gaps_add_up():
    lg = diagonal_posterior_model()
    x = lg.sample_data(20)
    truth = lg.exact_log_px(x)
    result = gaps(lg.model, lg.wrong_guide, x, settings=GapSettings(log_px_method="is", is_samples=2000))
    # The optimum is the exact posterior, where log w = log p(x) for every draw: ELBO* is exact, and the
    # approximation gap log p̂(x) - ELBO* is the importance-sampling estimate's own error, no more.
    assert ((truth - result.elbo_optimized).abs() < 1e-6).all()
    torch.testing.assert_close(result.approximation_gap, result.log_px - truth, rtol=0, atol=1e-6)
    # That error, with the wrong guide and K = 2000: 0.019-0.026 nats on average over four seeds.
    assert result.approximation_gap.abs().mean() < 0.04
    loc, cov = lg.posterior(x)
    q_loc, q_scale = lg.wrong_guide_params(x)
    kl = kl_divergence(
        Independent(Normal(q_loc, q_scale), 1), Independent(Normal(loc, cov.diagonal().sqrt()), 1)
    )
    # ELBO(encoder) = log p(x) - KL: its 1000-draw estimate is within Monte-Carlo error per datum.
    assert abs(float((result.amortization_gap - kl).mean())) < 0.05
    torch.testing.assert_close(
        result.approximation_gap + result.amortization_gap, result.log_px - result.elbo
    )
    summary = result.summary()
    assert set(summary) == {
        "num_data",
        "log_px",
        "elbo",
        "elbo_optimized",
        "approximation_gap",
        "amortization_gap",
    }


def test_exact_encoder_has_no_amortization_gap():
    lg = diagonal_posterior_model()
    x = lg.sample_data(8)

    def exact_diagonal_guide(x):
        loc, cov = lg.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, cov.diagonal().sqrt()).to_event(1))

    settings = GapSettings(optimize_steps=50, log_px_method="is", is_samples=100)
    result = gaps(lg.model, exact_diagonal_guide, x, settings=settings)
    torch.testing.assert_close(result.elbo, lg.exact_log_px(x), rtol=0, atol=1e-9)
    assert result.amortization_gap.abs().max() < 1e-3


def test_family_without_the_posterior_leaves_an_approximation_gap():
    # Correlated posterior, diagonal family: the best diagonal Normal is short of log p(x) by a KL > 0.
    g = torch.Generator().manual_seed(5)
    column = torch.randn(5, 1, generator=g)
    W = column.expand(5, 2) + 0.3 * torch.randn(5, 2, generator=g)  # nearly parallel columns
    lg = LinearGaussian(W, torch.randn(5, generator=g), 0.5)
    x = lg.sample_data(10)
    result = gaps(lg.model, lg.wrong_guide, x, settings=GapSettings(log_px_method="is", is_samples=2000))
    _, cov = lg.posterior(x)
    # The mean-field optimum has variances 1 / P_jj (P = Σ⁻¹), so KL(q* || p) = ½ (log det Σ + sum_j log P_jj).
    precision = torch.linalg.inv(cov)
    kl_optimum = 0.5 * (torch.logdet(cov) + torch.log(precision.diagonal()).sum())
    assert abs(float(result.approximation_gap.mean()) - float(kl_optimum)) < 0.03
    assert float(kl_optimum) > 0.1


def test_ais_is_the_default_log_px():
    lg = diagonal_posterior_model()
    x = lg.sample_data(4)
    result = gaps(
        lg.model,
        lg.wrong_guide,
        x,
        settings=GapSettings(optimize_steps=20),
        annealing=AnnealingSettings(num_steps=50, num_chains=4),
    )
    assert result.log_px_method == "ais"
    assert ((result.log_px - lg.exact_log_px(x)).abs() < 0.5).all()


def test_guide_with_dependent_sites_is_refused():
    chain = GaussianChain.random()
    with pytest.raises(PyroVAEError, match="depends on the draws of other latent sites"):
        gaps(chain.model, chain.inexact_guide, chain.sample_data(4))


def test_non_normal_family_is_refused():
    lg = LinearGaussian.random(2, 5)
    with pytest.raises(PyroVAEError, match=r"Normal sites only.*MultivariateNormal"):
        gaps(lg.model, lg.exact_guide, lg.sample_data(4))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"optimize_steps": 0}, "optimize_steps must be a positive integer"),
        ({"elbo_samples": 0}, "elbo_samples must be a positive integer"),
        ({"learning_rate": -1.0}, "learning_rate must be a positive number"),
        ({"log_px_method": "exact"}, "log_px_method must be one of"),
    ],
)
def test_bad_settings_are_refused(options, message):
    with pytest.raises(PyroVAEError, match=message):
        GapSettings(**options)


def test_a_given_log_px_is_used_as_it_is_and_a_wrong_one_refused():
    lg = diagonal_posterior_model()
    x = lg.sample_data(5)
    truth = lg.exact_log_px(x)
    settings = GapSettings(optimize_steps=20, elbo_samples=50)
    result = gaps(lg.model, lg.wrong_guide, x, settings=settings, log_px=truth)
    assert result.log_px_method == "given"
    torch.testing.assert_close(result.log_px, truth, rtol=0, atol=0)
    torch.testing.assert_close(result.approximation_gap, truth - result.elbo_optimized, rtol=0, atol=0)
    for wrong in (truth[:4], torch.full_like(truth, float("nan")), truth.tolist()):
        with pytest.raises(
            PyroVAEError, match="log_px must be a finite tensor of one estimate per data point"
        ):
            gaps(lg.model, lg.wrong_guide, x, settings=settings, log_px=wrong)
