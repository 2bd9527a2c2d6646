"""Known-answer tests for bidirectional Monte Carlo (:func:`pyro_vae.inference.bdmc`).

On a linear-Gaussian model the truth log p(x) of every simulated datum is known in closed
form: forward AIS must land below it and reverse AIS above it (on average over the data,
within Monte-Carlo margins), and the gap between them must shrink as the steps grow.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vae.errors import PyroVAEError
from pyro_vae.inference import AnnealingSettings, bdmc
from pyro_vae.inference.bdmc import simulate
from pyro_vae.inference.conditioning import per_datum_pair
from tests.test_ais import poor_guide
from tests.test_evaluation_known_answer import GaussianChain, LinearGaussian

# Known answers are compared in double precision (conftest's fixture; pyro_state clears the store and seeds).
pytestmark = pytest.mark.usefixtures("float64")


def test_simulated_data_follow_the_model():
    lg = LinearGaussian.random(2, 5, s=0.5)
    like = lg.sample_data(3)
    x, latents = simulate(per_datum_pair(lg.model, poor_guide, like), like, 4000)
    assert x.shape == (4000, 5) and latents["z"].shape == (4000, 2)
    # x | z ~ N(W z + b, s² I): the residuals have the noise's moments.
    residual = x - latents["z"] @ lg.W.T - lg.b
    assert abs(float(residual.mean())) < 0.02 and abs(float(residual.std()) - 0.5) < 0.02
    assert abs(float(latents["z"].std()) - 1.0) < 0.03


def test_lower_and_upper_sandwich_the_truth_and_the_gap_shrinks_with_more_steps():
    lg = LinearGaussian.random(2, 5, s=0.5)
    like = lg.sample_data(3)
    gaps = {}
    for num_steps in (10, 200):
        pyro.set_rng_seed(1)
        result = bdmc(
            lg.model, poor_guide, like, num_data=40, settings=AnnealingSettings(num_steps=num_steps)
        )
        truth = lg.exact_log_px(result.x)
        # Stochastic bounds: in expectation, so on the mean over data with a Monte-Carlo margin.
        assert float((result.lower - truth).mean()) < 0.02
        assert float((result.upper - truth).mean()) > -0.02
        gaps[num_steps] = float(result.gap.mean())
    assert gaps[10] > 0.5  # a short schedule leaves a wide sandwich
    assert 0 <= gaps[200] < gaps[10] / 4


def test_exact_guide_closes_the_sandwich():
    chain = GaussianChain.random()
    like = chain.sample_data(3)
    result = bdmc(chain.model, chain.exact_guide, like, num_data=6, settings=AnnealingSettings(num_steps=5))
    truth = chain.exact_log_px(result.x)
    torch.testing.assert_close(result.lower, truth, rtol=0, atol=1e-9)
    torch.testing.assert_close(result.upper, truth, rtol=0, atol=1e-9)
    summary = result.summary()
    assert set(summary) == {"num_data", "lower", "upper", "gap", "num_chains", "num_steps"}
    assert summary["num_data"] == 6


def test_chunks_of_simulated_data_start_their_reverse_chains_at_their_own_exact_latents():
    # With one step there is no transition: upper = log p(x_i, z_i) - log q(z_i | x_i) at the exact z_i.
    lg = LinearGaussian.random(2, 5, s=0.5)
    like = lg.sample_data(3)
    settings = AnnealingSettings(num_steps=1, num_chains=2)
    result = bdmc(lg.model, poor_guide, like, num_data=7, settings=settings, data_chunk_size=3)
    z, x = result.latents["z"], result.x
    log_joint = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1) + torch.distributions.Normal(
        z @ lg.W.T + lg.b, lg.s
    ).log_prob(x).sum(-1)
    log_q = torch.distributions.Normal(1.0, 2.0).log_prob(z).sum(-1)
    torch.testing.assert_close(result.upper, log_joint - log_q, rtol=0, atol=1e-9)


def test_bad_options_are_refused():
    lg = LinearGaussian.random(2, 5)
    like = lg.sample_data(3)
    with pytest.raises(PyroVAEError, match="num_data must be a positive integer"):
        bdmc(lg.model, poor_guide, like, num_data=0)
    with pytest.raises(PyroVAEError, match="non-empty tensor"):
        bdmc(lg.model, poor_guide, torch.zeros(0, 5))


def test_discrete_latent_is_refused():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(0.3 * torch.ones(x.shape[0])))

    with pytest.raises(PyroVAEError, match="bidirectional Monte Carlo moves the latents"):
        bdmc(model, guide, torch.randn(4))


def test_fast_path_gives_the_plain_paths_sandwich_for_the_same_seed():
    lg = LinearGaussian.random(2, 5, s=0.5)
    like = lg.sample_data(3)
    settings = AnnealingSettings(num_steps=20, num_chains=3, leapfrog_steps=3)
    results = []
    for fast in (True, False):
        pyro.set_rng_seed(2)
        results.append(bdmc(lg.model, poor_guide, like, num_data=6, settings=settings, fast=fast))
    fast, plain = results
    assert torch.equal(fast.x, plain.x)
    torch.testing.assert_close(fast.lower, plain.lower, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(fast.upper, plain.upper, rtol=1e-12, atol=1e-10)
