"""Objectives: IWAE equals the evaluator's bound, closed-form and Monte-Carlo KL agree, beta weighs the KL."""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_vae import LOSSES, ModelConfig, TrainConfig, build_vae, evaluate_bounds, fit, make_loss
from pyro_vae.objectives import LatentWeight, scale_latents
from pyro_vae.training.loop import warmup_weight


def small_vae():
    return build_vae(ModelConfig(data_dim=16, latent_dims=(3,), hidden_dims=(8,)))


@pytest.fixture
def x():
    return torch.bernoulli(torch.full((7, 16), 0.3))


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_is_finite_differentiable_and_scales_minibatches(name, x):
    vae = small_vae()
    loss = make_loss(name, num_particles=4)
    pyro.set_rng_seed(1)
    full = loss.differentiable_loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(1)
    scaled = loss.differentiable_loss(vae.model, vae.guide, x, num_data=70)
    assert torch.isfinite(full) and full.requires_grad
    # A minibatch of 7 out of 70 points: the same samples, every per-datum term times 10.
    torch.testing.assert_close(scaled, 10 * full, rtol=1e-5, atol=1e-4)
    returned = loss.loss_and_grads(vae.model, vae.guide, x)
    assert isinstance(returned, torch.Tensor) and not returned.requires_grad
    assert all(p.grad is not None for p in vae.parameters())


def test_iwae_loss_equals_the_evaluators_iwae_k_on_the_same_samples(x):
    vae = small_vae()
    pyro.set_rng_seed(4)
    loss = make_loss("iwae", num_particles=50).loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(4)
    bounds = evaluate_bounds(vae.model, vae.guide, x, num_samples=50, chunk_size=50, data_chunk_size=7)
    assert loss == pytest.approx(-float(bounds.iwae[50].sum()), rel=1e-6)


def test_iwae_with_one_particle_is_the_elbo(x):
    vae = small_vae()
    pyro.set_rng_seed(2)
    iwae_1 = make_loss("iwae", num_particles=1).loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(2)
    elbo = float(make_loss("elbo", num_particles=1).differentiable_loss(vae.model, vae.guide, x).detach())
    assert iwae_1 == pytest.approx(elbo, rel=1e-6)


def test_iwae_bound_tightens_with_k(x):
    vae = small_vae()
    values = {}
    for k in (1, 10, 200):
        pyro.set_rng_seed(0)
        values[k] = (
            sum(make_loss("iwae", num_particles=k).loss(vae.model, vae.guide, x) for _ in range(20)) / 20
        )
    assert values[1] > values[10] > values[200]  # losses are negative bounds


def test_analytic_and_monte_carlo_kl_agree_in_expectation(x):
    vae = small_vae()
    k = 20000
    pyro.set_rng_seed(0)
    mean_field = float(make_loss("mean-field", num_particles=k).differentiable_loss(vae.model, vae.guide, x))
    pyro.set_rng_seed(0)
    monte_carlo = float(make_loss("elbo", num_particles=k).differentiable_loss(vae.model, vae.guide, x))
    # The closed-form KL removes only Monte-Carlo noise: with 20000 particles the two agree to ~0.1 nats.
    assert mean_field == pytest.approx(monte_carlo, abs=0.15)
    # ...and the KL used is exactly torch's closed form.
    q = vae.posterior(x)
    kl = torch.distributions.kl_divergence(q, vae.prior().expand([7])).sum()
    pyro.set_rng_seed(0)
    trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=trace)).get_trace(x)
    log_lik = model_trace.nodes["x"]["fn"].log_prob(x).sum()
    pyro.set_rng_seed(0)
    one = float(make_loss("mean-field", num_particles=1).differentiable_loss(vae.model, vae.guide, x))
    assert one == pytest.approx(float(kl - log_lik), rel=1e-5)


def test_mean_field_warns_where_no_closed_form_kl_exists():
    def model(x):
        mix = dist.MixtureSameFamily(
            dist.Categorical(torch.ones(2)), dist.Normal(torch.tensor([-1.0, 1.0]), torch.ones(2))
        )
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", mix)
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x, 1.0))

    x = torch.randn(5)
    loss = make_loss("mean-field", num_particles=2)
    with pytest.warns(UserWarning, match=r"no closed-form KL\(Normal \|\| MixtureSameFamily\).*'z'"):
        value = loss.differentiable_loss(model, guide, x)
    assert torch.isfinite(value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss.differentiable_loss(model, guide, x)  # warns once only


@pytest.mark.parametrize("beta", [0.0, 0.25, 4.0])
def test_beta_weighs_only_the_latent_terms(beta, x):
    vae = small_vae()
    weight = LatentWeight(beta)
    pyro.set_rng_seed(3)
    value = float(
        make_loss("elbo").differentiable_loss(
            scale_latents(vae.model, weight), scale_latents(vae.guide, weight), x
        )
    )
    pyro.set_rng_seed(3)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    z = guide_trace.nodes["z"]
    log_lik = model_trace.nodes["x"]["fn"].log_prob(x).sum()
    latent = model_trace.nodes["z"]["fn"].log_prob(z["value"]).sum() - z["fn"].log_prob(z["value"]).sum()
    assert value == pytest.approx(-float(log_lik + beta * latent), rel=1e-5)


def test_warmup_schedule():
    assert [warmup_weight(s, beta=2.0, warmup_steps=4) for s in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert warmup_weight(0, beta=0.7, warmup_steps=0) == 0.7


def test_fit_with_beta_and_warmup_differs_from_plain_fit(x):
    data = torch.bernoulli(torch.full((64, 16), 0.3))
    params = []
    for beta, warmup in ((1.0, 0), (1.0, 2), (0.2, 0)):
        pyro.set_rng_seed(0)
        vae = small_vae()
        result = fit(vae, data, epochs=3, batch_size=16, beta=beta, warmup_epochs=warmup, progress=False)
        assert math.isfinite(result.final.train_elbo)
        params.append(torch.cat([p.detach().flatten() for p in vae.parameters()]))
    assert not torch.equal(params[0], params[1]) and not torch.equal(params[0], params[2])


def test_config_rejects_beta_with_iwae_and_bad_values():
    with pytest.raises(ValueError, match="iwae bound does not have"):
        TrainConfig(loss="iwae", beta=0.5)
    with pytest.raises(ValueError, match="beta must be a non-negative number"):
        TrainConfig(beta=-1.0)
    with pytest.raises(ValueError, match="warmup_epochs must be a non-negative integer"):
        TrainConfig(warmup_epochs=-2)
    with pytest.raises(ValueError, match="unknown loss 'renyi'; choose one of: elbo, iwae, mean-field"):
        make_loss("renyi")
