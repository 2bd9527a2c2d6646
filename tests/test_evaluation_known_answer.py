"""Known-answer tests for the importance-sampled log p(x) in :mod:`pyro_vae.inference`.

Every model here has a log p(x) we can compute without importance sampling:

* linear-Gaussian models (one latent site, and a two-site chain ``z1 -> z2 -> x``), whose marginal is a
  multivariate normal, checked against scipy;
* a Bernoulli decoder with a 1-D or 2-D latent, integrated on a fine grid.

With the exact posterior as guide every importance weight equals p(x), so the estimate must be exact at
any K and for any chunking. With an inexact guide the estimate must fall within a few Monte-Carlo
standard errors of the truth, and that standard error, the ELBO and IWAE-k are themselves checked
against closed forms or an independent estimate. Modelled on numpyro's ``test/infer/test_importance.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from pyro_vae.inference import evaluate_bounds, log_marginal


@pytest.fixture(autouse=True)
def float64_fresh_pyro() -> Iterator[None]:
    """Float64 by default, validation on, an empty param store and a fixed seed for every test."""
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    try:
        with pyro.validation_enabled(True):
            yield
    finally:
        torch.set_default_dtype(old_dtype)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------------
# Linear-Gaussian model:  z ~ N(0, I_d),  x | z ~ N(W z + b, s² I_p)
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearGaussian:
    """z ~ N(0, I_d);  x | z ~ N(W z + b, s² I_p).  Marginal x ~ N(b, W Wᵀ + s² I)."""

    W: torch.Tensor  # (p, d)
    b: torch.Tensor  # (p,)
    s: float

    @classmethod
    def random(cls, d: int, p: int, s: float = 1.0, seed: int = 1) -> LinearGaussian:
        g = _generator(seed)
        W = torch.randn(p, d, generator=g, dtype=torch.float64)
        b = torch.randn(p, generator=g, dtype=torch.float64)
        return cls(W, b, s)

    @property
    def latent_dim(self) -> int:
        return self.W.shape[1]

    def sample_data(self, n: int, seed: int = 1) -> torch.Tensor:
        g = _generator(seed)
        z = torch.randn(n, self.latent_dim, generator=g, dtype=self.W.dtype)
        return (
            z @ self.W.T + self.b + self.s * torch.randn(n, self.W.shape[0], generator=g, dtype=self.W.dtype)
        )

    def model(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([self.latent_dim]).to_event(1))  # (..., N, d)
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.s).to_event(1), obs=x)

    def exact_log_px(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.W @ self.W.T + self.s**2 * torch.eye(self.W.shape[0], dtype=self.W.dtype)
        return MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)  # (N,)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z | x) = N(Σ Wᵀ (x - b) / s², Σ) with Σ = (I + WᵀW / s²)⁻¹: loc (N, d) and cov (d, d)."""
        eye = torch.eye(self.latent_dim, dtype=self.W.dtype)
        cov = torch.linalg.inv(eye + self.W.T @ self.W / self.s**2)
        loc = (x - self.b) @ self.W / self.s**2 @ cov  # cov is symmetric
        return loc, cov

    def exact_guide(self, x: torch.Tensor) -> None:
        loc, cov = self.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=torch.linalg.cholesky(cov)))

    def narrow_guide(self, x: torch.Tensor) -> None:
        """The exact posterior with its scale multiplied by 0.2: heavy-tailed importance weights."""
        loc, cov = self.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=0.2 * torch.linalg.cholesky(cov)))

    def wrong_guide_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A deliberately wrong diagonal guide: posterior mean + 0.3, marginal scales x 1.5 (loc, scale)."""
        loc, cov = self.posterior(x)
        return loc + 0.3, (1.5 * cov.diagonal().sqrt()).expand_as(loc)

    def wrong_guide(self, x: torch.Tensor) -> None:
        loc, scale = self.wrong_guide_params(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def _quad(P: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """uᵀ P u over a batch: P (N, d, d), u (N, d) -> (N,)."""
    return (u.unsqueeze(-2) @ P @ u.unsqueeze(-1))[..., 0, 0]


def _gaussian_weight_moments(
    q_loc: torch.Tensor, q_cov: torch.Tensor, p_loc: torch.Tensor, p_cov: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Moments of the log weight log w = log p(z) - log q(z), z ~ q, for Gaussians p and q.

    p is the exact posterior, so log p(x, z) - log q(z) = log p(x) + log w. Returns per datum
    KL(q || p) (so E[log w] = -KL), Var_q[log w] and log E_q[w²] (= log(1 + χ²(p || q))).
    With z = μq + L ε, log w = const + ½ εᵀ M ε - εᵀ v, M = I - Lᵀ Pp L, v = Lᵀ Pp (μq - μp), hence
    Var = ½ tr(M²) + |v|². E_q[w²] = ∫ p² / q is a Gaussian integral with precision 2 Pp - Pq.
    """
    n, d = q_loc.shape
    q_cov = q_cov.expand(n, d, d)
    p_cov = p_cov.expand(n, d, d)
    q = MultivariateNormal(q_loc, covariance_matrix=q_cov)
    p = MultivariateNormal(p_loc, covariance_matrix=p_cov)
    kl = kl_divergence(q, p)

    p_prec = torch.linalg.inv(p_cov)  # (N, d, d)
    q_prec = torch.linalg.inv(q_cov)
    L = q.scale_tril
    M = torch.eye(d, dtype=q_loc.dtype) - L.mT @ p_prec @ L
    v = (L.mT @ p_prec @ (q_loc - p_loc).unsqueeze(-1)).squeeze(-1)
    var_log_w = 0.5 * (M @ M).diagonal(dim1=-2, dim2=-1).sum(-1) + v.pow(2).sum(-1)

    A = 2 * p_prec - q_prec
    assert torch.all(torch.linalg.eigvalsh(A) > 0), "the weights of this guide have infinite variance"
    h = (2 * p_prec @ p_loc.unsqueeze(-1) - q_prec @ q_loc.unsqueeze(-1)).squeeze(-1)
    log_m2 = (
        -torch.logdet(p_cov)
        + 0.5 * torch.logdet(q_cov)
        - 0.5 * torch.logdet(A)
        + 0.5 * _quad(torch.linalg.inv(A), h)
        - _quad(p_prec, p_loc)
        + 0.5 * _quad(q_prec, q_loc)
    )
    return kl, var_log_w, log_m2


def _wrong_guide_moments(lg: LinearGaussian, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    q_loc, q_scale = lg.wrong_guide_params(x)
    p_loc, p_cov = lg.posterior(x)
    return _gaussian_weight_moments(q_loc, torch.diag_embed(q_scale**2), p_loc, p_cov)


def _reference_iwae_groups(lg: LinearGaussian, x: torch.Tensor, k: int, num_groups: int) -> torch.Tensor:
    """Independent IWAE-k values for the wrong guide from closed-form log weights (no Pyro): (G, N)."""
    g = _generator(10 + k)
    q_loc, q_scale = lg.wrong_guide_params(x)  # (N, d)
    p_loc, p_cov = lg.posterior(x)
    z = q_loc + q_scale * torch.randn(num_groups, k, *q_loc.shape, generator=g, dtype=q_loc.dtype)
    log_w = (
        MultivariateNormal(p_loc, covariance_matrix=p_cov).log_prob(z)
        - torch.distributions.Normal(q_loc, q_scale).log_prob(z).sum(-1)
        + lg.exact_log_px(x)
    )  # (G, k, N)
    return torch.logsumexp(log_w, dim=1) - math.log(k)


# (d, p, s, seed). Shift 0.3 and scale x 1.5 give the wrong guide χ²(p || q) of about 0.7 (d=2) and
# 1.2 (d=3), so at K = 10⁴ the standard error of log p̂(x) is about 0.01 and 0.05 nats is ~5 of them.
LINEAR_GAUSSIANS = [pytest.param(2, 5, 1.0, 1, id="d2-p5"), pytest.param(3, 5, 1.5, 2, id="d3-p5")]


def test_reference_linear_gaussian_log_px_agrees_with_scipy_and_bayes_rule():
    lg = LinearGaussian.random(d=2, p=5)
    x = lg.sample_data(20)
    cov = (lg.W @ lg.W.T + lg.s**2 * torch.eye(5)).numpy()
    expected = scipy.stats.multivariate_normal(mean=lg.b.numpy(), cov=cov).logpdf(x.numpy())
    np.testing.assert_allclose(lg.exact_log_px(x).numpy(), expected, rtol=0, atol=1e-10)

    # log p(x) = log p(z) + log p(x | z) - log p(z | x) at any z, here z = 0.3 and z = -1.
    loc, post_cov = lg.posterior(x)
    for value in (0.3, -1.0):
        z = torch.full((20, 2), value)
        log_joint = (
            torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
            + torch.distributions.Normal(z @ lg.W.T + lg.b, lg.s).log_prob(x).sum(-1)
            - MultivariateNormal(loc, covariance_matrix=post_cov).log_prob(z)
        )
        torch.testing.assert_close(log_joint, lg.exact_log_px(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("d, p, s, seed", LINEAR_GAUSSIANS)
def test_exact_posterior_guide_gives_exact_log_px(d, p, s, seed):
    lg = LinearGaussian.random(d, p, s, seed)
    x = lg.sample_data(20)
    exact = lg.exact_log_px(x)

    pyro.set_rng_seed(0)
    log_px = log_marginal(lg.model, lg.exact_guide, x, num_samples=10)
    assert log_px.shape == (20,)
    assert log_px.dtype == torch.float64
    torch.testing.assert_close(log_px, exact, rtol=0, atol=1e-6)

    pyro.set_rng_seed(0)
    bounds = evaluate_bounds(lg.model, lg.exact_guide, x, num_samples=10, iwae_ks=[1, 2, 5, 10])
    assert bounds.num_samples == 10
    torch.testing.assert_close(bounds.log_px, exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(bounds.elbo, exact, rtol=0, atol=1e-6)
    assert set(bounds.iwae) == {1, 2, 5, 10}
    for k, iwae_k in bounds.iwae.items():
        assert iwae_k.shape == (20,), k
        torch.testing.assert_close(iwae_k, exact, rtol=0, atol=1e-6)
    assert torch.all(bounds.log_px_stderr.abs() < 1e-6)


@pytest.mark.parametrize("d, p, s, seed", LINEAR_GAUSSIANS)
def test_wrong_guide_log_px_within_standard_errors_and_elbo_matches_kl(d, p, s, seed):
    lg = LinearGaussian.random(d, p, s, seed)
    x = lg.sample_data(20)
    exact = lg.exact_log_px(x)
    num_samples = 10_000
    kl, var_log_w, log_m2 = _wrong_guide_moments(lg, x)
    assert torch.all(kl > 0.1), "the wrong guide should be clearly wrong"

    pyro.set_rng_seed(0)
    bounds = evaluate_bounds(lg.model, lg.wrong_guide, x, num_samples=num_samples)
    error = bounds.log_px - exact
    stderr = bounds.log_px_stderr
    assert torch.all(stderr > 0)
    assert (error.abs() > 4 * stderr).sum() <= 1, (error, stderr)
    assert torch.all(error.abs() < 0.05), error

    # The delta-method standard error std(w) / (sqrt(K) mean(w)) estimates sqrt(χ²(p || q) / K).
    expected_stderr = torch.sqrt(torch.expm1(log_m2) / num_samples)
    ratio = stderr / expected_stderr
    assert 0.8 < ratio.median() < 1.25, ratio
    assert torch.all((ratio > 0.5) & (ratio < 2.0)), ratio

    # E[ELBO] = log p(x) - KL(q || p(z | x)), with standard error sqrt(Var[log w] / K).
    elbo_stderr = torch.sqrt(var_log_w / num_samples)
    assert torch.all((bounds.elbo - (exact - kl)).abs() < 5 * elbo_stderr), (bounds.elbo, exact - kl)
    assert torch.all(bounds.elbo < exact - 0.05)

    pyro.set_rng_seed(1)
    log_px = log_marginal(lg.model, lg.wrong_guide, x, num_samples=num_samples)
    assert ((log_px - exact).abs() > 4 * stderr).sum() <= 1
    assert torch.all((log_px - exact).abs() < 0.05)


def test_bounds_are_ordered_and_iwae_matches_independent_estimate():
    lg = LinearGaussian.random(d=2, p=5)
    x = lg.sample_data(20)
    exact = lg.exact_log_px(x)

    pyro.set_rng_seed(0)
    bounds = evaluate_bounds(lg.model, lg.wrong_guide, x, num_samples=5000, iwae_ks=[1, 5, 50, 5000])
    elbo, iwae5, iwae50, log_px = bounds.elbo, bounds.iwae[5], bounds.iwae[50], bounds.log_px

    # With disjoint consecutive groups and 1 | 5 | 50 | K, Jensen's inequality orders them for every datum.
    tol = 1e-10
    assert torch.all(elbo <= iwae5 + tol)
    assert torch.all(iwae5 <= iwae50 + tol)
    assert torch.all(iwae50 <= log_px + tol)
    torch.testing.assert_close(bounds.iwae[1], elbo, rtol=0, atol=1e-12)
    torch.testing.assert_close(bounds.iwae[5000], log_px, rtol=0, atol=1e-10)
    # ...with clear gaps on average (about 0.7 and 0.08 nats here), and none above the truth on average.
    assert (iwae5 - elbo).mean() > 0.3
    assert (iwae50 - iwae5).mean() > 0.04
    for bound in (elbo, iwae5, iwae50, log_px):
        assert bound.mean() <= exact.mean() + 0.01

    # IWAE-k averages K / k iid groups, so it estimates E[IWAE-k]: compare with an independent estimate.
    for k in (5, 50):
        groups = _reference_iwae_groups(lg, x, k, num_groups=200_000 // k)  # (G, N)
        ref_stderr = groups.std(0) / math.sqrt(groups.shape[0])
        eval_stderr = groups.std(0) / math.sqrt(5000 // k)
        combined = torch.sqrt(eval_stderr**2 + ref_stderr**2)
        error = bounds.iwae[k] - groups.mean(0)
        assert torch.all(error.abs() < 5 * combined), (k, error, combined)
        assert torch.all(groups.mean(0) < exact), "IWAE-k is a lower bound in expectation"


def test_single_sample_log_px_is_the_elbo():
    lg = LinearGaussian.random(d=2, p=5)
    x = lg.sample_data(10)

    pyro.set_rng_seed(0)
    bounds = evaluate_bounds(lg.model, lg.wrong_guide, x, num_samples=1, diagnostics=False)
    assert bounds.num_samples == 1
    torch.testing.assert_close(bounds.log_px, bounds.elbo, rtol=0, atol=1e-12)
    assert set(bounds.iwae) == {1}
    torch.testing.assert_close(bounds.iwae[1], bounds.elbo, rtol=0, atol=1e-12)
    # One sample of a wrong guide is not the truth.
    assert torch.all(bounds.log_px != lg.exact_log_px(x))


def test_default_iwae_ks_are_powers_of_ten_times_five_up_to_num_samples():
    lg = LinearGaussian.random(d=2, p=5)
    x = lg.sample_data(5)

    pyro.set_rng_seed(0)
    bounds = evaluate_bounds(lg.model, lg.wrong_guide, x, num_samples=500)
    assert set(bounds.iwae) == {1, 5, 50, 500}
    torch.testing.assert_close(bounds.iwae[1], bounds.elbo, rtol=0, atol=1e-12)
    torch.testing.assert_close(bounds.iwae[500], bounds.log_px, rtol=0, atol=1e-10)


def test_chunked_and_unchunked_agree():
    lg = LinearGaussian.random(d=2, p=5)
    x = lg.sample_data(10)
    exact = lg.exact_log_px(x)
    K = 50  # neither chunk size divides K or N

    pyro.set_rng_seed(0)
    whole = evaluate_bounds(lg.model, lg.exact_guide, x, num_samples=K, chunk_size=K, data_chunk_size=None)
    pyro.set_rng_seed(1)
    chunked = evaluate_bounds(lg.model, lg.exact_guide, x, num_samples=K, chunk_size=7, data_chunk_size=3)
    torch.testing.assert_close(chunked.log_px, whole.log_px, rtol=0, atol=1e-9)
    torch.testing.assert_close(chunked.log_px, exact, rtol=0, atol=1e-6)
    assert set(chunked.iwae) == set(whole.iwae) == {1, 5, 50}
    for k in whole.iwae:
        torch.testing.assert_close(chunked.iwae[k], whole.iwae[k], rtol=0, atol=1e-9)
    torch.testing.assert_close(chunked.elbo, whole.elbo, rtol=0, atol=1e-9)

    pyro.set_rng_seed(0)
    lm_chunked = log_marginal(lg.model, lg.exact_guide, x, num_samples=K, chunk_size=7, data_chunk_size=3)
    torch.testing.assert_close(lm_chunked, exact, rtol=0, atol=1e-6)

    K = 1000
    pyro.set_rng_seed(0)
    whole = evaluate_bounds(lg.model, lg.wrong_guide, x, num_samples=K, chunk_size=K)
    pyro.set_rng_seed(1)
    chunked = evaluate_bounds(lg.model, lg.wrong_guide, x, num_samples=K, chunk_size=7, data_chunk_size=3)
    combined = torch.sqrt(whole.log_px_stderr**2 + chunked.log_px_stderr**2)
    assert torch.all((chunked.log_px - whole.log_px).abs() < 5 * combined)
    assert torch.all((chunked.log_px - exact).abs() < 5 * chunked.log_px_stderr)


def test_same_seed_gives_bit_identical_results():
    lg = LinearGaussian.random(d=2, p=5)
    x = lg.sample_data(10)

    def run():
        pyro.set_rng_seed(123)
        return evaluate_bounds(lg.model, lg.wrong_guide, x, num_samples=300, chunk_size=7, data_chunk_size=3)

    first, second = run(), run()
    for name in ("elbo", "log_px", "log_px_stderr", "khat", "ess"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert first.iwae.keys() == second.iwae.keys()
    for k in first.iwae:
        assert torch.equal(first.iwae[k], second.iwae[k]), k

    pyro.set_rng_seed(123)
    a = log_marginal(lg.model, lg.wrong_guide, x, num_samples=300, chunk_size=7, data_chunk_size=3)
    pyro.set_rng_seed(123)
    b = log_marginal(lg.model, lg.wrong_guide, x, num_samples=300, chunk_size=7, data_chunk_size=3)
    assert torch.equal(a, b)
    pyro.set_rng_seed(124)
    c = log_marginal(lg.model, lg.wrong_guide, x, num_samples=300, chunk_size=7, data_chunk_size=3)
    assert not torch.equal(a, c)


def test_psis_diagnostics_of_the_exact_posterior_guide_are_perfect():
    lg = LinearGaussian.random(d=2, p=5)
    x = lg.sample_data(20)
    K = 5000

    pyro.set_rng_seed(0)
    bounds = evaluate_bounds(lg.model, lg.exact_guide, x, num_samples=K)
    assert bounds.khat.shape == bounds.ess.shape == (20,)
    # Every weight equals p(x) up to rounding: there is no tail, and nothing to warn about.
    assert torch.all(torch.isfinite(bounds.khat)), bounds.khat
    assert torch.all(bounds.khat < 0.5), bounds.khat
    assert torch.all(bounds.ess > 0.99 * K) and torch.all(bounds.ess <= K * (1 + 1e-9))
    assert bounds.summary()["khat_frac_above_0_7"] == 0.0


def test_psis_diagnostics_of_a_wider_guide_are_good():
    lg = LinearGaussian.random(d=2, p=5)
    x = lg.sample_data(20)
    K = 5000

    # A guide wider than the posterior has bounded weights: k̂ is small, and ESS / K estimates
    # 1 / E[w̄²] = 1 / (1 + χ²(p || q)).
    pyro.set_rng_seed(0)
    bounds = evaluate_bounds(lg.model, lg.wrong_guide, x, num_samples=K)
    assert (bounds.khat < 0.5).double().mean() >= 0.9, bounds.khat
    _, _, log_m2 = _wrong_guide_moments(lg, x)
    torch.testing.assert_close(bounds.ess / K, torch.exp(-log_m2), rtol=0.1, atol=0)


def test_psis_diagnostics_flag_a_too_narrow_guide():
    lg = LinearGaussian.random(d=2, p=5)
    x = lg.sample_data(20)
    K = 5000

    # Scale x 0.2: the weights have a Pareto tail with k = 1 - 0.2² = 0.96 (Vehtari et al. 2024).
    pyro.set_rng_seed(0)
    bounds = evaluate_bounds(lg.model, lg.narrow_guide, x, num_samples=K)
    above = (bounds.khat > 0.7).double()
    assert above.mean() >= 0.7, bounds.khat
    assert torch.all(bounds.ess < 0.2 * K) and bounds.ess.median() < 0.05 * K, bounds.ess
    summary = bounds.summary()
    assert summary["khat_frac_above_0_7"] == pytest.approx(above.mean().item())
    assert summary["khat_max"] == pytest.approx(bounds.khat.max().item())
    assert summary["log_px"] == pytest.approx(bounds.log_px.mean().item())
    assert summary["nll"] == pytest.approx(-bounds.log_px.mean().item())
    assert summary["elbo"] == pytest.approx(bounds.elbo.mean().item())


def test_diagnostics_can_be_switched_off():
    lg = LinearGaussian.random(d=2, p=5)
    x = lg.sample_data(5)
    pyro.set_rng_seed(0)
    bounds = evaluate_bounds(lg.model, lg.exact_guide, x, num_samples=20, diagnostics=False)
    assert bounds.khat is None and bounds.ess is None
    torch.testing.assert_close(bounds.log_px, lg.exact_log_px(x), rtol=0, atol=1e-6)


def test_float32_model_still_gives_float64_log_px():
    lg = LinearGaussian.random(d=2, p=5)
    x = lg.sample_data(8)
    exact = lg.exact_log_px(x)
    torch.set_default_dtype(torch.float32)  # restored by the fixture
    lg32 = LinearGaussian(lg.W.float(), lg.b.float(), lg.s)
    pyro.set_rng_seed(0)
    log_px = log_marginal(lg32.model, lg32.exact_guide, x.float(), num_samples=10)
    assert log_px.dtype == torch.float64
    assert log_px.shape == (8,)
    torch.testing.assert_close(log_px, exact, rtol=0, atol=1e-3)


# --------------------------------------------------------------------------------------------------------
# Bernoulli decoder with a 1-D or 2-D latent, exact log p(x) by quadrature on a grid
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BernoulliDecoder:
    """z ~ N(0, I_d);  x | z ~ Bernoulli(logits = A z + c), x in {0, 1}^P.  d = 1 uses a scalar site."""

    A: torch.Tensor  # (P, d)
    c: torch.Tensor  # (P,)

    @classmethod
    def random(cls, d: int, num_pixels: int = 8, seed: int = 2) -> BernoulliDecoder:
        g = _generator(seed)
        A = 1.5 * torch.randn(num_pixels, d, generator=g, dtype=torch.float64)
        c = torch.randn(num_pixels, generator=g, dtype=torch.float64)
        return cls(A, c)

    @property
    def latent_dim(self) -> int:
        return self.A.shape[1]

    def sample_data(self, n: int, seed: int = 3) -> torch.Tensor:
        g = _generator(seed)
        z = torch.randn(n, self.latent_dim, generator=g, dtype=self.A.dtype)
        return torch.bernoulli(torch.sigmoid(z @ self.A.T + self.c), generator=g)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        if self.latent_dim == 1:
            return z.unsqueeze(-1) * self.A[:, 0] + self.c  # z: (..., N) -> (..., N, P)
        return z @ self.A.T + self.c  # z: (..., N, d) -> (..., N, P)

    def model(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            if self.latent_dim == 1:
                z = pyro.sample("z", dist.Normal(0.0, 1.0))
            else:
                z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([self.latent_dim]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.logits(z)).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        """q(z | x) = N(one Newton step from z = 0 on log p(x, z), 1.2² I).

        A scale above the prior's keeps p(z) / q(z), hence the weights, bounded.
        """
        sig = torch.sigmoid(self.c)
        hessian = torch.eye(self.latent_dim) + self.A.T @ (self.A * (sig * (1 - sig)).unsqueeze(-1))
        loc = (x - sig) @ self.A @ torch.linalg.inv(hessian)  # (N, d)
        with pyro.plate("data", x.shape[0]):
            if self.latent_dim == 1:
                pyro.sample("z", dist.Normal(loc[:, 0], 1.2))
            else:
                pyro.sample("z", dist.Normal(loc, 1.2).to_event(1))

    def grid_log_px(self, x: torch.Tensor) -> torch.Tensor:
        """log ∫ p(x | z) p(z) dz by the rectangle rule (the integrand vanishes at the grid's ends)."""
        if self.latent_dim == 1:
            axis = torch.linspace(-10.0, 10.0, 20001, dtype=torch.float64)
            z = axis.unsqueeze(-1)  # (G, 1)
        else:
            axis = torch.linspace(-8.0, 8.0, 401, dtype=torch.float64)
            z = torch.cartesian_prod(axis, axis)  # (G, 2)
        log_dz = self.latent_dim * math.log(axis[1] - axis[0])
        log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)  # (G,)
        logits = z @ self.A.T + self.c  # (G, P)
        log_lik = torch.stack(
            [torch.distributions.Bernoulli(logits=logits).log_prob(xi).sum(-1) for xi in x]
        )  # (N, G)
        return torch.logsumexp(log_lik + log_prior, dim=-1) + log_dz


def test_reference_grid_log_px_agrees_with_prior_monte_carlo():
    for d in (1, 2):
        bd = BernoulliDecoder.random(d)
        x = bd.sample_data(6)
        z = torch.randn(400_000, d, generator=_generator(4), dtype=torch.float64)
        log_lik = torch.distributions.Bernoulli(logits=z @ bd.A.T + bd.c).log_prob(x.unsqueeze(-2)).sum(-1)
        lik = log_lik.exp()  # (N, S)
        mc = lik.mean(-1).log()
        mc_stderr = lik.std(-1) / lik.mean(-1) / math.sqrt(z.shape[0])
        assert torch.all((bd.grid_log_px(x) - mc).abs() < 5 * mc_stderr + 1e-6), d


@pytest.mark.parametrize("d", [1, 2])
def test_bernoulli_decoder_log_px_matches_quadrature(d):
    bd = BernoulliDecoder.random(d)
    x = bd.sample_data(6)
    exact = bd.grid_log_px(x)

    pyro.set_rng_seed(0)
    bounds = evaluate_bounds(bd.model, bd.guide, x, num_samples=20_000)
    error = bounds.log_px - exact
    assert torch.all(bounds.log_px_stderr > 0)
    assert torch.all(error.abs() < 4 * bounds.log_px_stderr), (error, bounds.log_px_stderr)
    assert torch.all(error.abs() < 0.05), error
    assert torch.all(bounds.elbo < exact)


# --------------------------------------------------------------------------------------------------------
# Two latent sites:  z1 ~ N(0, I_2),  z2 | z1 ~ N(A z1, t² I_2),  x | z2 ~ N(B z2 + b, s² I_p)
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GaussianChain:
    """z1 ~ N(0, I);  z2 | z1 ~ N(A z1, t² I);  x | z2 ~ N(B z2 + b, s² I).

    Marginal x ~ N(b, B (A Aᵀ + t² I) Bᵀ + s² I).
    """

    A: torch.Tensor  # (2, 2)
    B: torch.Tensor  # (p, 2)
    b: torch.Tensor  # (p,)
    t: float
    s: float

    @classmethod
    def random(cls, p: int = 4, seed: int = 5) -> GaussianChain:
        g = _generator(seed)
        A = torch.randn(2, 2, generator=g, dtype=torch.float64)
        B = torch.randn(p, 2, generator=g, dtype=torch.float64)
        b = torch.randn(p, generator=g, dtype=torch.float64)
        return cls(A, B, b, t=0.5, s=0.6)

    def sample_data(self, n: int, seed: int = 6) -> torch.Tensor:
        g = _generator(seed)
        z1 = torch.randn(n, 2, generator=g, dtype=torch.float64)
        z2 = z1 @ self.A.T + self.t * torch.randn(n, 2, generator=g, dtype=torch.float64)
        return (
            z2 @ self.B.T
            + self.b
            + self.s * torch.randn(n, self.B.shape[0], generator=g, dtype=torch.float64)
        )

    def model(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(z1 @ self.A.T, self.t).to_event(1))
            pyro.sample("x", dist.Normal(z2 @ self.B.T + self.b, self.s).to_event(1), obs=x)

    def exact_log_px(self, x: torch.Tensor) -> torch.Tensor:
        eye2, eye_p = torch.eye(2), torch.eye(self.B.shape[0])
        cov = self.B @ (self.A @ self.A.T + self.t**2 * eye2) @ self.B.T + self.s**2 * eye_p
        return MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)

    def posterior_z1(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z1 | x): x | z1 ~ N(BA z1 + b, C) with C = t² B Bᵀ + s² I. Returns loc (N, 2), cov (2, 2)."""
        BA = self.B @ self.A
        C_inv = torch.linalg.inv(self.t**2 * self.B @ self.B.T + self.s**2 * torch.eye(self.B.shape[0]))
        cov = torch.linalg.inv(torch.eye(2) + BA.T @ C_inv @ BA)
        loc = (x - self.b) @ C_inv @ BA @ cov
        return loc, cov

    def posterior_z2(self, z1: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z2 | z1, x) ∝ N(z2; A z1, t² I) N(x; B z2 + b, s² I). z1: (..., N, 2) -> loc (..., N, 2)."""
        cov = torch.linalg.inv(torch.eye(2) / self.t**2 + self.B.T @ self.B / self.s**2)
        loc = (z1 @ self.A.T / self.t**2 + (x - self.b) @ self.B / self.s**2) @ cov
        return loc, cov

    def exact_guide(self, x: torch.Tensor) -> None:
        loc1, cov1 = self.posterior_z1(x)
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.MultivariateNormal(loc1, scale_tril=torch.linalg.cholesky(cov1)))
            loc2, cov2 = self.posterior_z2(z1, x)
            pyro.sample("z2", dist.MultivariateNormal(loc2, scale_tril=torch.linalg.cholesky(cov2)))

    def inexact_guide(self, x: torch.Tensor) -> None:
        """Diagonal versions of the exact factors, shifted and with scales x 1.3."""
        loc1, cov1 = self.posterior_z1(x)
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(loc1 + 0.2, 1.3 * cov1.diagonal().sqrt()).to_event(1))
            loc2, cov2 = self.posterior_z2(z1, x)
            pyro.sample("z2", dist.Normal(loc2 - 0.1, 1.3 * cov2.diagonal().sqrt()).to_event(1))


def test_reference_chain_posterior_satisfies_bayes_rule():
    chain = GaussianChain.random()
    x = chain.sample_data(10)
    loc1, cov1 = chain.posterior_z1(x)
    for value in (0.4, -0.7):
        z1 = torch.full((10, 2), value)
        z2 = torch.full((10, 2), -value / 2)
        loc2, cov2 = chain.posterior_z2(z1, x)
        log_joint = (
            torch.distributions.Normal(0.0, 1.0).log_prob(z1).sum(-1)
            + torch.distributions.Normal(z1 @ chain.A.T, chain.t).log_prob(z2).sum(-1)
            + torch.distributions.Normal(z2 @ chain.B.T + chain.b, chain.s).log_prob(x).sum(-1)
        )
        log_post = MultivariateNormal(loc1, covariance_matrix=cov1).log_prob(z1) + MultivariateNormal(
            loc2, covariance_matrix=cov2
        ).log_prob(z2)
        torch.testing.assert_close(log_joint - log_post, chain.exact_log_px(x), rtol=0, atol=1e-10)


def test_two_latent_sites_exact_guide_is_exact():
    chain = GaussianChain.random()
    x = chain.sample_data(10)

    pyro.set_rng_seed(0)
    log_px = log_marginal(chain.model, chain.exact_guide, x, num_samples=10, chunk_size=4, data_chunk_size=3)
    torch.testing.assert_close(log_px, chain.exact_log_px(x), rtol=0, atol=1e-6)


def test_two_latent_sites_inexact_guide_within_standard_errors():
    chain = GaussianChain.random()
    x = chain.sample_data(10)
    exact = chain.exact_log_px(x)

    pyro.set_rng_seed(0)
    bounds = evaluate_bounds(chain.model, chain.inexact_guide, x, num_samples=10_000)
    error = bounds.log_px - exact
    assert torch.all(bounds.log_px_stderr > 0)
    assert (error.abs() > 4 * bounds.log_px_stderr).sum() <= 1, (error, bounds.log_px_stderr)
    assert torch.all(error.abs() < 0.1), error
    assert torch.all(bounds.elbo < exact - 0.01)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_device_of_x():
    lg = LinearGaussian.random(d=2, p=5)
    x = lg.sample_data(10)
    exact = lg.exact_log_px(x)
    lg_cuda = LinearGaussian(lg.W.cuda(), lg.b.cuda(), lg.s)
    with torch.device("cuda"):
        pyro.set_rng_seed(0)
        log_px = log_marginal(lg_cuda.model, lg_cuda.exact_guide, x.cuda(), num_samples=10)
    assert log_px.device.type == "cuda"
    torch.testing.assert_close(log_px.cpu(), exact, rtol=0, atol=1e-6)
