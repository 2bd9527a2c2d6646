"""Contract tests over the registries: priors and likelihoods against torch and scipy."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from pyro_vae import LIKELIHOODS, PRIORS, ModelConfig, Registry, build_vae
from pyro_vae.components.likelihoods import Bernoulli, Gaussian, GaussianLearnedScale

D = 5


@pytest.mark.parametrize("name", PRIORS.names())
def test_prior_contract(name):
    # Built inside a VAE: priors defined through the guide (vamp) need its encoder.
    prior = build_vae(ModelConfig(data_dim=D, latent_dims=(3,), hidden_dims=(8,), prior=name)).prior
    p = prior()
    assert p.event_shape == (3,) and p.batch_shape == ()
    z = p.sample((4000,))
    assert z.shape == (4000, 3) and torch.isfinite(p.log_prob(z)).all()


def test_standard_normal_matches_scipy():
    p = PRIORS.get("standard-normal")(latent_dim=3)()
    z = torch.randn(7, 3)
    expected = scipy.stats.multivariate_normal(mean=[0, 0, 0]).logpdf(z.numpy())
    torch.testing.assert_close(p.log_prob(z), torch.as_tensor(expected, dtype=torch.float32))
    draws = p.sample((20000,))
    torch.testing.assert_close(draws.mean(0), torch.zeros(3), atol=0.05, rtol=0)
    torch.testing.assert_close(draws.std(0), torch.ones(3), atol=0.05, rtol=0)


@pytest.mark.parametrize("name", LIKELIHOODS.names())
def test_likelihood_contract(name):
    cls = LIKELIHOODS.get(name)
    likelihood = cls(data_dim=D)
    out = torch.randn(3, 4, cls.outputs_per_dim * D)  # [particles, data, outputs]
    p = likelihood(out)
    assert p.batch_shape == (3, 4) and p.event_shape == (D,)
    x = p.sample()
    likelihood.check_data(x.reshape(-1, D))
    assert torch.isfinite(p.log_prob(x)).all()


def test_bernoulli_matches_scipy():
    logits = torch.randn(6, D)
    x = torch.bernoulli(torch.sigmoid(logits))
    expected = scipy.stats.bernoulli(torch.sigmoid(logits).double().numpy()).logpmf(x.numpy()).sum(-1)
    torch.testing.assert_close(Bernoulli(data_dim=D)(logits).log_prob(x).double(), torch.as_tensor(expected))


def test_gaussian_is_scaled_squared_error():
    mean, x = torch.randn(6, D), torch.randn(6, D)
    log_p = Gaussian(data_dim=D, scale=0.3)(mean).log_prob(x).double()
    expected = scipy.stats.norm(mean.double().numpy(), 0.3).logpdf(x.double().numpy()).sum(-1)
    torch.testing.assert_close(log_p, torch.as_tensor(expected), rtol=1e-5, atol=1e-5)
    squared_error = ((x - mean) ** 2).sum(-1).double()
    torch.testing.assert_close(
        log_p, -squared_error / (2 * 0.09) - D * math.log(0.3 * math.sqrt(2 * math.pi)), rtol=1e-6, atol=1e-4
    )


def test_gaussian_learned_scale_uses_both_halves_and_a_floor():
    out = torch.randn(6, 2 * D)
    p = GaussianLearnedScale(data_dim=D, min_scale=1e-3)(out)
    torch.testing.assert_close(p.mean, out[:, :D])
    torch.testing.assert_close(p.base_dist.scale, torch.nn.functional.softplus(out[:, D:]) + 1e-3)
    very_negative = torch.full((1, 2 * D), -1e4)
    assert (GaussianLearnedScale(data_dim=D)(very_negative).base_dist.scale >= 1e-3).all()


def test_check_data_names_the_likelihood_and_the_fix():
    with pytest.raises(ValueError, match=r"bernoulli likelihood needs binary data.*0\.5.*--binarize dynamic"):
        Bernoulli(data_dim=2).check_data(torch.tensor([[0.0, 0.5], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        Gaussian(data_dim=2).check_data(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="built for 2 values per data point, but the data have 3"):
        Gaussian(data_dim=2).check_data(torch.zeros(1, 3))
    Gaussian(data_dim=2).check_data(torch.tensor([[-3.0, 0.25]]))


def test_registry_rules():
    registry: Registry = Registry("widget")

    @registry.register("round-widget")
    class Round:
        """A round widget.

        More text that is not the description.
        """

    assert registry.get("round-widget") is Round and Round.registered_name == "round-widget"
    assert registry.describe() == {"round-widget": "A round widget."}
    with pytest.raises(ValueError, match="already registered"):
        registry.register("round-widget")(type("Other", (), {"__doc__": "x"}))
    with pytest.raises(ValueError, match="needs a docstring"):
        registry.register("bare")(type("Bare", (), {}))
    with pytest.raises(ValueError, match="kebab-case"):
        registry.register("Has Space")
    with pytest.raises(ValueError, match="unknown widget 'square'; choose one of: round-widget"):
        registry.get("square")
