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
from pyro_vae.errors import PyroVAEError
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


# Free bits (Kingma et al., 2016): a model whose per-layer KLs are known in closed form.
# x ~ N(z_a + z_b, 1) with p(z_a) = p(z_b) = N(0, 1), q(z_a | x) = N(2, 0.5^2) and q(z_b | x) = N(0.1, 0.9^2)
# for every x, so KL_a = log(1 / 0.5) + (0.25 + 4) / 2 - 1/2 = 2.5681 and KL_b = log(1 / 0.9) + (0.81 + 0.01) / 2 - 1/2
# = 0.0154 nats per datum; E_q[log p(x | z)] = -log(2 pi) / 2 - ((x - 2.1)^2 + 0.25 + 0.81) / 2.
_LOCS, _SCALES = {"z_a": 2.0, "z_b": 0.1}, {"z_a": 0.5, "z_b": 0.9}


def _closed_form_kl(site):
    s, m = _SCALES[site], _LOCS[site]
    return math.log(1 / s) + (s**2 + m**2) / 2 - 0.5


def _gaussian_model(x, num_data=None):
    with pyro.plate("data", num_data or x.shape[0], subsample_size=x.shape[0]):
        z_a = pyro.sample("z_a", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
        z_b = pyro.sample("z_b", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z_a + z_b, 1.0).to_event(1), obs=x)


def _gaussian_guide(x, num_data=None):
    with pyro.plate("data", num_data or x.shape[0], subsample_size=x.shape[0]):
        for site in ("z_a", "z_b"):
            loc = pyro.param(f"{site}_loc", torch.tensor(_LOCS[site]))
            pyro.sample(site, dist.Normal(loc.expand_as(x), _SCALES[site]).to_event(1))


@pytest.fixture
def gaussian_x():
    pyro.clear_param_store()
    return torch.linspace(-1.0, 3.0, 6).unsqueeze(-1)  # [6, 1]


def _expected_free_bits_loss(x, lam, num_data=None):
    # -(E_q[sum_i log p(x_i | z)] - N sum_l max(lam, KL_l)), in closed form.
    n, scale = x.shape[0], (num_data or x.shape[0]) / x.shape[0]
    expected_ll = (-0.5 * math.log(2 * math.pi) - ((x - 2.1) ** 2 + 0.25 + 0.81) / 2).sum()
    clamp = sum(max(lam, _closed_form_kl(site)) for site in _LOCS)
    return -scale * (float(expected_ll) - n * clamp)


def test_free_bits_equal_the_elbo_on_the_same_samples_when_every_layer_is_above_lambda(gaussian_x):
    # lambda = 0 is below every Monte Carlo layer KL here (KL_b's estimate over 6 x 200 draws is 0.015 +- 0.002).
    free_bits = make_loss("elbo", num_particles=200, free_bits=0.0)
    pyro.set_rng_seed(3)
    clamped = free_bits.differentiable_loss(_gaussian_model, _gaussian_guide, gaussian_x, num_data=60)
    pyro.set_rng_seed(3)
    plain = make_loss("elbo", num_particles=200).differentiable_loss(
        _gaussian_model, _gaussian_guide, gaussian_x, num_data=60
    )
    torch.testing.assert_close(clamped, plain, rtol=1e-6, atol=1e-4)


def test_free_bits_differ_from_the_elbo_by_exactly_the_clamp_of_each_layer_below_lambda(gaussian_x):
    # On the same samples: the loss rises by N (lambda - KL_l) for each layer under lambda, KL_l its
    # Monte Carlo KL from the traces; here only z_b (0.015 nats) is under lambda = 0.5, z_a (2.57) is not.
    num_data, lam = 60, 0.5
    pyro.set_rng_seed(5)
    clamped = make_loss("elbo", num_particles=100, free_bits=lam).differentiable_loss(
        _gaussian_model, _gaussian_guide, gaussian_x, num_data=num_data
    )
    pyro.set_rng_seed(5)
    guide_trace = poutine.trace(
        pyro.plate("num_particles_vectorized", 100, dim=-2)(_gaussian_guide)
    ).get_trace(gaussian_x, num_data=num_data)
    model_trace = poutine.trace(
        poutine.replay(
            pyro.plate("num_particles_vectorized", 100, dim=-2)(_gaussian_model), trace=guide_trace
        )
    ).get_trace(gaussian_x, num_data=num_data)
    kl_b = float(
        (
            guide_trace.nodes["z_b"]["fn"].log_prob(guide_trace.nodes["z_b"]["value"])
            - model_trace.nodes["z_b"]["fn"].log_prob(guide_trace.nodes["z_b"]["value"])
        )
        .mean()
        .detach()
    )
    pyro.set_rng_seed(5)
    plain = make_loss("elbo", num_particles=100).differentiable_loss(
        _gaussian_model, _gaussian_guide, gaussian_x, num_data=num_data
    )
    assert kl_b < lam
    assert float(clamped - plain) == pytest.approx(num_data * (lam - kl_b), rel=1e-5)


@pytest.mark.parametrize("lam", [0.0, 0.5, 3.0])
def test_free_bits_loss_matches_its_closed_form_in_expectation(gaussian_x, lam):
    # lambda 0: the ELBO; 0.5: z_b clamped; 3.0: both layers clamped (KL_a = 2.57 < 3).
    pyro.set_rng_seed(0)
    loss = make_loss("elbo", num_particles=20000, free_bits=lam).loss(
        _gaussian_model, _gaussian_guide, gaussian_x, num_data=30
    )
    # Monte Carlo error of the 20000-sample mean: about 30 * 0.02 nats on each term.
    assert loss == pytest.approx(_expected_free_bits_loss(gaussian_x, lam, num_data=30), abs=1.0)


def test_a_clamped_layer_gets_no_gradient_from_its_kl(gaussian_x):
    # z_b under lambda: its guide mean's gradient is the reconstruction term's alone, the same as with
    # the KL weighted by 0 (beta = 0 on z_b only would be the same objective for that layer).
    lam = 0.5
    pyro.set_rng_seed(7)
    make_loss("elbo", num_particles=50, free_bits=lam).loss_and_grads(
        _gaussian_model, _gaussian_guide, gaussian_x
    )
    clamped_grad = pyro.param("z_b_loc").grad.clone()
    pyro.param("z_b_loc").grad.zero_()
    pyro.param("z_a_loc").grad.zero_()
    pyro.set_rng_seed(7)
    # The reconstruction term alone: x's log-likelihood at the same reparameterized samples.
    guide_trace = poutine.trace(
        pyro.plate("num_particles_vectorized", 50, dim=-2)(_gaussian_guide)
    ).get_trace(gaussian_x)
    model_trace = poutine.trace(
        poutine.replay(pyro.plate("num_particles_vectorized", 50, dim=-2)(_gaussian_model), trace=guide_trace)
    ).get_trace(gaussian_x)
    (-model_trace.nodes["x"]["fn"].log_prob(gaussian_x).sum() / 50).backward()
    torch.testing.assert_close(clamped_grad, pyro.param("z_b_loc").grad, rtol=1e-5, atol=1e-6)


def test_free_bits_train_the_built_in_vae():
    vae = small_vae()
    x = torch.bernoulli(torch.full((7, 16), 0.3))
    loss = make_loss("elbo", num_particles=2, free_bits=0.25)
    value = loss.loss_and_grads(vae.model, vae.guide, x)
    assert torch.isfinite(value)
    assert all(p.grad is not None for p in vae.parameters())


def _no_latent_model(x, num_data=None):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(torch.zeros_like(x), 1.0).to_event(1), obs=x)


def _no_latent_guide(x, num_data=None):
    pass


def _global_only_model(x, num_data=None):
    shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(shift.expand_as(x), 1.0).to_event(1), obs=x)


def _global_only_guide(x, num_data=None):
    pyro.sample("shift", dist.Normal(pyro.param("shift_loc", torch.tensor(0.0)), 1.0))


def test_free_bits_refuse_bad_lambda_other_objectives_and_models_without_layers(gaussian_x):
    for bad in (-0.1, float("nan"), float("inf"), "1", True):
        with pytest.raises(PyroVAEError, match="non-negative number"):
            make_loss("elbo", free_bits=bad)
        with pytest.raises(PyroVAEError, match="free_bits"):
            TrainConfig(free_bits=bad)
    for loss in ("iwae", "mean-field"):
        with pytest.raises(PyroVAEError, match="no per-layer KL term"):
            make_loss(loss, num_particles=5, free_bits=0.5)
        with pytest.raises(PyroVAEError, match="no per-layer KL term"):
            TrainConfig(loss=loss, free_bits=0.5)
    assert TrainConfig(free_bits=0.5).free_bits == 0.5 and TrainConfig().free_bits is None
    for model, guide in ((_no_latent_model, _no_latent_guide), (_global_only_model, _global_only_guide)):
        with pytest.raises(PyroVAEError, match="the model has none"):
            make_loss("elbo", free_bits=0.5).differentiable_loss(model, guide, gaussian_x)


def test_fit_trains_with_free_bits_from_the_config():
    # lambda = 1000 nats clamps every layer from the first step, so only the reconstruction term has a
    # gradient, and the weights end elsewhere than under the plain ELBO.
    data = torch.bernoulli(torch.full((64, 16), 0.3))
    params = []
    for free_bits in (None, 1000.0):
        pyro.set_rng_seed(0)
        vae = small_vae()
        fit(
            vae,
            data,
            config=TrainConfig(epochs=2, batch_size=16, free_bits=free_bits, device="cpu"),
            progress=False,
        )
        params.append(torch.cat([p.detach().flatten() for p in vae.parameters()]))
    assert not torch.equal(params[0], params[1])
