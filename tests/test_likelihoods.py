"""Known-answer tests of the likelihoods and their distributions against scipy, torch and numerical integrals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch
from torch.nn import functional as F

from pyro_vae import LIKELIHOODS
from pyro_vae.components import distributions as vae_dist
from pyro_vae.components.likelihoods import ContinuousBernoulli, DiscretizedLogistic, Laplace, StudentT

D = 5
LEVELS = torch.arange(256, dtype=torch.float64) / 255  # [256]


def cb_unnormalized(x: float, lam: float) -> float:
    return lam**x * (1 - lam) ** (1 - x)


def logistic_pmf(levels: np.ndarray, loc: float, scale: float) -> np.ndarray:
    """The discretized logistic's pmf straight from scipy's CDF at the bin edges (survival side above loc)."""
    logistic = scipy.stats.logistic(loc, scale)
    lo, hi = levels - 1 / 510, levels + 1 / 510
    mass = np.where(levels > loc, logistic.sf(lo) - logistic.sf(hi), logistic.cdf(hi) - logistic.cdf(lo))
    mass = np.where(levels == 0, logistic.cdf(hi), mass)
    return np.where(levels == 1, logistic.sf(lo), mass)


# Bernoulli


def test_independent_bernoulli_is_torchs_bernoulli_as_one_event(float64):
    logits = torch.randn(3, 7, D, requires_grad=True) * 20  # large |logits| too
    x = torch.bernoulli(torch.full((3, 7, D), 0.4))
    ours = vae_dist.IndependentBernoulli(logits, validate_args=True)
    torch_dist = torch.distributions.Independent(torch.distributions.Bernoulli(logits=logits), 1)
    assert ours.batch_shape == (3, 7) and ours.event_shape == (D,)
    expected = torch_dist.log_prob(x)
    torch.testing.assert_close(ours.log_prob(x), expected, rtol=1e-12, atol=1e-12)
    (grad_ours,) = torch.autograd.grad(ours.log_prob(x).sum(), logits)
    (grad_torch,) = torch.autograd.grad(expected.sum(), logits)
    torch.testing.assert_close(grad_ours, grad_torch)
    torch.testing.assert_close(ours.mean, torch.sigmoid(logits))
    expanded = vae_dist.IndependentBernoulli(logits[0]).expand((3, 7))
    assert type(expanded) is vae_dist.IndependentBernoulli and expanded.batch_shape == (3, 7)
    first = torch.distributions.Independent(torch.distributions.Bernoulli(logits=logits[0]), 1)
    torch.testing.assert_close(expanded.log_prob(x), first.log_prob(x))
    with pytest.raises(ValueError):
        ours.log_prob(torch.full((3, 7, D), 0.5))  # not binary


# Continuous Bernoulli


def test_continuous_bernoulli_matches_torch_and_a_numerical_integral(float64):
    logits = torch.tensor([-12.0, -4.6, -1.0, -0.05, 0.0, 1e-4, 0.3, 2.0, 9.0])
    x = torch.tensor([0.0, 0.1, 0.9, 0.5, 0.25, 1.0, 0.7, 0.33, 0.95])
    log_p = ContinuousBernoulli(data_dim=len(x))(logits).base_dist.log_prob(x)
    torch.testing.assert_close(log_p, torch.distributions.ContinuousBernoulli(logits=logits).log_prob(x))
    lam = torch.sigmoid(logits).tolist()
    expected = [
        math.log(cb_unnormalized(xi, li) / scipy.integrate.quad(cb_unnormalized, 0, 1, args=(li,))[0])
        for xi, li in zip(x.tolist(), lam, strict=True)
    ]
    torch.testing.assert_close(log_p, torch.tensor(expected), rtol=1e-9, atol=1e-9)
    assert ContinuousBernoulli(data_dim=len(x))(logits).log_prob(x) == pytest.approx(sum(expected))


@pytest.mark.parametrize("lam", [0.5, 0.5 - 1e-4, 0.5 + 1e-4, 0.5 - 1e-2, 0.5 + 1e-2, 0.01, 0.99])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_continuous_bernoulli_density_integrates_to_one(lam, dtype):
    """Inside, at the edges of and outside torch's Taylor window (0.499, 0.501) around lambda = 1/2."""
    p = vae_dist.ContinuousBernoulli(logits=torch.logit(torch.tensor(lam, dtype=torch.float64)).to(dtype))
    x = torch.linspace(0, 1, 20001, dtype=torch.float64)
    density = p.log_prob(x.to(dtype)).exp().double().numpy()
    tolerance = 1e-9 if dtype == torch.float64 else 1e-6
    assert scipy.integrate.simpson(density, x=x.numpy()) == pytest.approx(1.0, abs=tolerance)
    mean = scipy.integrate.simpson(x.numpy() * density, x=x.numpy())
    assert p.mean.item() == pytest.approx(mean, abs=tolerance)


def test_continuous_bernoulli_stays_normalized_at_large_logits():
    """Torch's float32 normalizer saturates at |logit| ~ 16 (0.63 nats too low at 30); ours follows float64."""
    logits = torch.tensor([-80.0, -30.0, -16.5, -0.09, 0.0, 0.11, 16.5, 30.0, 80.0], requires_grad=True)
    x = torch.tensor([0.0, 0.02, 0.5, 0.3, 0.6, 0.8, 0.99, 1.0, 0.97])
    log_p = vae_dist.ContinuousBernoulli(logits=logits).log_prob(x)
    eta = logits.detach().double()
    exact = eta * x.double() - torch.where(eta == 0, 0.0, torch.log(torch.expm1(eta) / eta))
    torch.testing.assert_close(log_p.double(), exact, rtol=1e-6, atol=1e-5)
    log_p.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_continuous_bernoulli_samples_follow_its_cdf():
    logits = torch.tensor([-40.0, -3.0, 0.0, 5e-4, 0.5, 25.0])
    p = vae_dist.ContinuousBernoulli(logits=logits)
    u = torch.linspace(0.01, 0.99, 7).unsqueeze(-1)  # [7, 1]
    x = p.icdf(u)  # [7, 6]
    assert ((x >= 0) & (x <= 1)).all()
    # The closed-form CDF in float64: F(x) = expm1(eta x) / expm1(eta), F(x) = x at eta = 0.
    eta, xd = logits.double(), x.double()
    cdf = torch.where(eta == 0, xd, torch.expm1(eta * xd) / torch.expm1(eta))
    torch.testing.assert_close(cdf, u.double().expand_as(cdf), rtol=0, atol=1e-4)
    draws = p.sample((20000,))
    torch.testing.assert_close(draws.mean(0), p.mean, rtol=0, atol=0.01)


def test_continuous_bernoulli_check_data():
    likelihood = ContinuousBernoulli(data_dim=3)
    likelihood.check_data(torch.tensor([[0.0, 0.5, 1.0]]))
    with pytest.raises(
        ValueError, match=r"continuous-bernoulli likelihood needs values in \[0, 1\].*1\.5.*rescale"
    ):
        likelihood.check_data(torch.tensor([[0.0, 1.5, -0.25]]))


# Laplace and Student-t


def test_laplace_matches_scipy(float64):
    out = torch.randn(4, 2 * D)
    x = 3 * torch.randn(4, D)
    p = Laplace(data_dim=D, min_scale=1e-2)(out)
    loc, scale = out[:, :D], F.softplus(out[:, D:]) + 1e-2
    expected = scipy.stats.laplace(loc.numpy(), scale.numpy()).logpdf(x.numpy()).sum(-1)
    torch.testing.assert_close(p.log_prob(x), torch.as_tensor(expected))
    torch.testing.assert_close(p.mean, loc)


@pytest.mark.parametrize("df", [1.5, 3.0, 30.0])
def test_student_t_matches_scipy(float64, df):
    out = torch.randn(4, 2 * D)
    x = 3 * torch.randn(4, D)
    p = StudentT(data_dim=D, df=df)(out)
    loc, scale = out[:, :D], F.softplus(out[:, D:]) + 1e-3
    expected = scipy.stats.t(df, loc.numpy(), scale.numpy()).logpdf(x.numpy()).sum(-1)
    torch.testing.assert_close(p.log_prob(x), torch.as_tensor(expected))
    torch.testing.assert_close(p.mean, loc)


@pytest.mark.parametrize("cls", [Laplace, StudentT])
def test_learned_scales_respect_their_floor(cls):
    out = torch.cat([torch.zeros(2, D), torch.full((2, D), -1e4)], dim=-1)
    scale = cls(data_dim=D, min_scale=0.05)(out).base_dist.scale
    assert (scale >= 0.05).all() and torch.allclose(scale, torch.tensor(0.05))
    with pytest.raises(ValueError, match="min_scale must be positive"):
        cls(data_dim=D, min_scale=0.0)


def test_student_t_rejects_df_without_a_mean():
    with pytest.raises(ValueError, match="df must exceed 1"):
        StudentT(data_dim=D, df=1.0)


@pytest.mark.parametrize("cls", [Laplace, StudentT])
def test_real_valued_likelihoods_check_data(cls):
    likelihood = cls(data_dim=2)
    likelihood.check_data(torch.tensor([[-1e3, 0.5], [7.0, 0.0]]))
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        likelihood.check_data(torch.tensor([[0.0, float("inf")]]))


# Discretized logistic


@pytest.mark.parametrize("loc", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("scale", [0.005, 0.05, 0.5])
def test_discretized_logistic_matches_scipy_cdf_at_bin_edges(float64, loc, scale):
    log_p = vae_dist.DiscretizedLogistic(torch.tensor(loc), torch.tensor(scale)).log_prob(LEVELS)  # [256]
    expected = np.log(logistic_pmf(LEVELS.numpy(), loc, scale))
    torch.testing.assert_close(log_p, torch.as_tensor(expected), rtol=1e-8, atol=1e-9)


def test_discretized_logistic_edge_levels_own_the_tails(float64):
    p = vae_dist.DiscretizedLogistic(torch.tensor(0.02), torch.tensor(0.1))
    logistic = scipy.stats.logistic(0.02, 0.1)
    assert p.log_prob(torch.tensor(0.0)).exp().item() == pytest.approx(logistic.cdf(1 / 510), rel=1e-10)
    assert p.log_prob(torch.tensor(1.0)).exp().item() == pytest.approx(logistic.sf(1 - 1 / 510), rel=1e-10)


@pytest.mark.parametrize(
    "loc,scale",
    [
        (0.5, math.exp(-7)),
        (0.5, 0.01),
        (0.0, 0.3),
        (1.0, 0.3),
        (-3.0, 0.05),
        (4.0, 0.05),
        (0.5, 100.0),
        (0.37, 1e-3),
    ],
)
def test_discretized_logistic_pmf_sums_to_one(float64, loc, scale):
    log_p = vae_dist.DiscretizedLogistic(torch.tensor(loc), torch.tensor(scale)).log_prob(LEVELS)
    assert torch.isfinite(log_p).all()
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_discretized_logistic_float32_extremes_are_finite_with_finite_gradients():
    loc = torch.tensor([-5.0, 0.5, 0.5, 6.0, 0.2], requires_grad=True)
    log_scale = torch.tensor([-7.0, -7.0, 3.0, -7.0, -7.0], requires_grad=True)
    x = torch.tensor([1.0, 200 / 255, 0.0, 0.0, 0.8])  # levels far from loc, in the middle and at the edges
    log_p = vae_dist.DiscretizedLogistic(loc, log_scale.exp()).log_prob(x)
    assert torch.isfinite(log_p).all()
    log_p.sum().backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(log_scale.grad).all()
    reference = vae_dist.DiscretizedLogistic(loc.detach().double(), log_scale.detach().double().exp())
    torch.testing.assert_close(log_p.double(), reference.log_prob(x.double()), rtol=1e-5, atol=1e-4)


def test_discretized_logistic_samples_lie_on_the_grid_with_the_pmf_as_histogram():
    p = vae_dist.DiscretizedLogistic(torch.tensor([0.01, 0.5, 0.97]), torch.tensor([0.03, 0.003, 0.05]))
    draws = p.sample((40000,))  # [40000, 3]
    assert draws.shape == (40000, 3)
    assert vae_dist.eight_bit.check(draws).all()
    levels = torch.round(draws * 255).long()
    histogram = torch.stack([torch.bincount(levels[:, j], minlength=256) for j in range(3)], -1) / 40000
    pmf = p.log_prob(LEVELS.float().unsqueeze(-1)).exp()  # [256, 3]
    torch.testing.assert_close(histogram, pmf, rtol=0, atol=0.01)
    torch.testing.assert_close(draws.mean(0), p.mean, rtol=0, atol=1e-3)  # half a bin is 2e-3
    torch.testing.assert_close((pmf * LEVELS.float().unsqueeze(-1)).sum(0), p.mean, rtol=0, atol=1e-5)


def test_discretized_logistic_expands_and_validates():
    p = vae_dist.DiscretizedLogistic(torch.tensor([0.2, 0.7]), torch.tensor(0.1), validate_args=True)
    x = torch.tensor([[0.0, 255.0], [10.0, 250.0], [51.0, 178.0]]) / 255  # [3, 2]
    expanded = p.expand((3, 2))
    assert expanded.batch_shape == (3, 2) and type(expanded) is vae_dist.DiscretizedLogistic
    torch.testing.assert_close(expanded.log_prob(x), p.log_prob(x))
    with pytest.raises(ValueError):
        p.log_prob(torch.tensor([0.5, 0.5]))  # 127.5 / 255 is between levels
    with pytest.raises(ValueError):
        vae_dist.DiscretizedLogistic(torch.tensor(0.5), torch.tensor(-1.0), validate_args=True)


def test_bits_per_dimension_is_the_nll_in_bits(float64):
    """Away from the edges p(k/255) ~ pdf(k/255) / 255, so bits/dim = -log2 pdf + log2 255 on the 0..255 scale."""
    likelihood = DiscretizedLogistic(data_dim=D)
    out = torch.cat([torch.full((1, D), 0.5), torch.full((1, D), math.log(0.1))], dim=-1)
    x = torch.tensor([[60.0, 100.0, 128.0, 150.0, 200.0]]) / 255
    bits_per_dim = -likelihood(out).log_prob(x).item() / (D * math.log(2))
    pdf_bits = -scipy.stats.logistic(0.5, 0.1).logpdf(x.numpy()).mean() / math.log(2)
    assert bits_per_dim == pytest.approx(pdf_bits + math.log2(255), abs=1e-3)


def test_discretized_logistic_log_scale_floor():
    out = torch.cat([torch.zeros(1, D), torch.full((1, D), -1e4)], dim=-1)
    scale = DiscretizedLogistic(data_dim=D, min_log_scale=-5.0)(out).base_dist.scale
    torch.testing.assert_close(scale, torch.full((1, D), math.exp(-5.0)))
    torch.testing.assert_close(
        DiscretizedLogistic(data_dim=D)(out).base_dist.scale.min(), torch.tensor(math.exp(-7.0))
    )


def test_discretized_logistic_check_data():
    likelihood = DiscretizedLogistic(data_dim=256)
    likelihood.check_data(LEVELS.float().unsqueeze(0))
    bad = LEVELS.float().clone().unsqueeze(0)
    bad[0, 3], bad[0, 7] = 0.5 / 255, 1.2
    with pytest.raises(
        ValueError, match=r"discretized-logistic likelihood needs 8-bit images scaled by /255.*0\.00196"
    ):
        likelihood.check_data(bad)


@pytest.mark.parametrize("name", LIKELIHOODS.names())
def test_each_likelihood_handles_binary_data(name):
    """0 and 1 are in every support, so the binary contract tests of test_model.py apply to all of them."""
    cls = LIKELIHOODS.get(name)
    likelihood = cls(data_dim=D)
    x = torch.bernoulli(torch.full((4, D), 0.5))
    likelihood.check_data(x)
    assert torch.isfinite(likelihood(torch.randn(4, cls.outputs_per_dim * D)).log_prob(x)).all()
