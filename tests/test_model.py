"""The VAE as a Pyro model and guide: site names, shapes, plate scaling, and every registered component."""

from __future__ import annotations

import itertools

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from pyro_vae import (
    GUIDES,
    LIKELIHOODS,
    NETWORKS,
    PRIORS,
    VAE,
    ModelConfig,
    build_vae,
)
from pyro_vae.models import data_plate

DATA_DIM, LATENT_DIM, IMAGE_SHAPE = 64, 3, (8, 8)


def small_vae(**overrides) -> VAE:
    config = ModelConfig(
        data_dim=DATA_DIM, latent_dims=(LATENT_DIM,), hidden_dims=(16,), image_shape=IMAGE_SHAPE, **overrides
    )
    return build_vae(config)


def binary_data(n: int = 10) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, DATA_DIM), 0.4))


def test_sites_and_shapes():
    vae = small_vae()
    x = binary_data(10)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    model_sites = [n for n, s in model_trace.nodes.items() if s["type"] == "sample"]
    guide_sites = [n for n, s in guide_trace.nodes.items() if s["type"] == "sample"]
    assert model_sites == ["data", "z", "x"]  # "data" is the plate's subsample site
    assert guide_sites == ["data", "z"]
    z, obs = model_trace.nodes["z"], model_trace.nodes["x"]
    assert z["fn"].batch_shape == (10,) and z["fn"].event_shape == (LATENT_DIM,)
    assert obs["fn"].batch_shape == (10,) and obs["fn"].event_shape == (DATA_DIM,)
    assert obs["is_observed"] and torch.equal(obs["value"], x)
    assert guide_trace.nodes["z"]["fn"].has_rsample
    assert [f.name for f in z["cond_indep_stack"]] == ["data"]
    # The guide's sample is the model's z.
    assert torch.equal(z["value"], guide_trace.nodes["z"]["value"])


def test_parameters_are_registered_by_role():
    vae = small_vae()
    x = binary_data(4)
    with poutine.trace(param_only=True) as model_params:
        vae.model(x)
    with poutine.trace(param_only=True) as guide_params:
        vae.guide(x)
    model_names = set(model_params.trace.nodes)
    guide_names = set(guide_params.trace.nodes)
    assert model_names and guide_names and not model_names & guide_names
    assert all(name.startswith("decoder$$$") for name in model_names)
    assert {name.split("$$$")[0] for name in guide_names} == {"encoder", "guide_head"}
    n_params = sum(p.numel() for p in vae.parameters())
    traced = sum(s["value"].numel() for t in (model_params, guide_params) for s in t.trace.nodes.values())
    assert traced == n_params


def test_minibatch_scale_is_num_data_over_batch():
    vae = small_vae()
    x = binary_data(10)
    trace = poutine.trace(vae.model).get_trace(x, num_data=250)
    assert trace.nodes["x"]["scale"] == pytest.approx(25.0)
    assert trace.nodes["z"]["scale"] == pytest.approx(25.0)
    with pytest.raises(ValueError, match="cannot be smaller than the minibatch"):
        vae.model(x, num_data=5)


def test_scaled_minibatch_losses_average_to_the_full_data_loss():
    """With a fixed (deterministic) guide, (N/M) * minibatch loss averaged over a partition is the full loss."""
    vae = small_vae()
    x = binary_data(40)
    fixed_z = torch.randn(40, LATENT_DIM)

    def fixed_guide(batch, *, index, num_data=None):
        with data_plate(batch, num_data):
            pyro.sample("z", dist.Delta(fixed_z[index]).to_event(1))

    def model(batch, *, index, num_data=None):
        vae.model(batch, num_data=num_data)

    elbo = Trace_ELBO()
    full = elbo.loss(model, fixed_guide, x, index=torch.arange(40))
    parts = [
        elbo.loss(model, fixed_guide, x[idx], index=idx, num_data=40) for idx in torch.randperm(40).split(10)
    ]
    assert sum(parts) / len(parts) == pytest.approx(full, rel=1e-5)
    # ...and it is exactly -(sum_n log p(x_n, z_n)) computed from the distributions themselves.
    with torch.no_grad():
        log_joint = vae.prior().log_prob(fixed_z) + vae.likelihood(vae.decoder(fixed_z)).log_prob(x)
    assert full == pytest.approx(-float(log_joint.sum()), rel=1e-5)


@pytest.mark.parametrize(
    "prior,likelihood,guide,network",
    list(itertools.product(PRIORS.names(), LIKELIHOODS.names(), GUIDES.names(), NETWORKS.names())),
)
def test_every_registered_combination_builds_and_runs(prior, likelihood, guide, network):
    vae = small_vae(prior=prior, likelihood=likelihood, guide=guide, network=network)
    x = binary_data(6)
    loss = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1).differentiable_loss(
        vae.model, vae.guide, x
    )
    assert torch.isfinite(loss)
    loss.backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in vae.parameters() if p.requires_grad
    )
    assert vae.sample(5).shape == (5, DATA_DIM)
    assert vae.reconstruct(x).shape == x.shape


def test_mismatched_latent_sizes_are_rejected():
    vae = small_vae()
    with pytest.raises(ValueError, match="same latent_dim"):
        VAE(
            prior=PRIORS.get("standard-normal")(latent_dim=LATENT_DIM + 1),
            likelihood=vae.likelihood,
            encoder=vae.encoder,
            guide_head=vae.guide_head,
            decoder=vae.decoder,
        )


def test_build_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'; choose one of: bernoulli"):
        small_vae(likelihood="poisson")
    with pytest.raises(ValueError, match="the bernoulli likelihood takes no option"):
        small_vae(likelihood="bernoulli", likelihood_options={"scale": 0.5})
    with pytest.raises(ValueError, match="vamp prior mixes the guide"):
        build_vae(ModelConfig(data_dim=DATA_DIM, latent_dims=(4, 2), prior="vamp"))
    with pytest.raises(ValueError, match="use --guide diagonal"):
        build_vae(ModelConfig(data_dim=DATA_DIM, latent_dims=(4, 2), inference="ladder", guide="iaf"))
    with pytest.raises(ValueError, match="inference must be one of bottom-up, ladder"):
        ModelConfig(data_dim=DATA_DIM, inference="top-down")
    assert small_vae(likelihood="gaussian", likelihood_options={"scale": 0.5}).likelihood.scale == 0.5


class _Bare(torch.nn.Module):
    """A built-in model seen through the contract alone: its model and guide, none of its abilities."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def model(self, x, *, num_data=None):
        return self.inner.model(x, num_data=num_data)

    def guide(self, x, *, num_data=None):
        return self.inner.guide(x, num_data=num_data)


@pytest.mark.parametrize(
    "latent_dims,inference", [((3,), "bottom-up"), ((4, 2), "bottom-up"), ((4, 2), "ladder")]
)
def test_explicit_abilities_agree_with_the_ones_derived_from_model_and_guide(latent_dims, inference):
    from pyro_vae.models import abilities

    config = ModelConfig(data_dim=DATA_DIM, latent_dims=latent_dims, hidden_dims=(16,), inference=inference)
    vae, x = build_vae(config), binary_data(6)
    bare = _Bare(vae)
    sites = abilities.latent_sites(vae, x)
    assert sites == abilities.latent_sites(bare, x) == tuple(vae.latent_sites)
    # The guide's first site has a closed-form mean; later ones are Monte-Carlo averages over the same draws.
    first = sites[0] if inference == "bottom-up" else sites[-1]
    pyro.set_rng_seed(1)
    explicit = abilities.posterior_means(vae, x)
    pyro.set_rng_seed(1)
    derived = abilities.posterior_means(bare, x)
    torch.testing.assert_close(explicit, derived)
    posterior_first = vae.posterior(x).mean if len(latent_dims) == 1 else None
    if posterior_first is not None:
        torch.testing.assert_close(explicit[first], posterior_first)
    for given in (explicit, {sites[-1]: explicit[sites[-1]]}):
        torch.testing.assert_close(vae.decode(given), abilities.decode(bare, given, like=x))
    # The ladder's reconstruct takes z1's mean given one draw of the layers above, so only bottom-up compares.
    if inference == "bottom-up":
        torch.testing.assert_close(vae.reconstruct(x), vae.decode({sites[0]: explicit[sites[0]]}))
    pyro.set_rng_seed(2)
    drawn = vae.sample_latents(5)
    pyro.set_rng_seed(2)
    torch.testing.assert_close(vae.sample(5), vae.decode(drawn))
    assert {k: v.shape for k, v in drawn.items()} == {
        k: v.shape for k, v in abilities.sample_latents(bare, 5, like=x).items()
    }
    vae.check_data(x)
    abilities.check_data(bare, x)
    for model in (vae, bare):
        with pytest.raises(ValueError, match=r"binary|support"):
            abilities.check_data(model, torch.full((2, DATA_DIM), 0.5))
