"""Pyro's own idioms on the package's models: Predictive draws, and JitTrace_ELBO without our warnings."""

from __future__ import annotations

import warnings

import pyro
import pytest
import torch
from pyro.infer import SVI, JitTrace_ELBO, Predictive

from pyro_vae import ModelConfig, PyroVAEError, build_vae, data_plate

D = 8


@pytest.mark.parametrize("latent_dims", [(2,), (3, 2)], ids=["one-layer", "two-layer"])
def test_prior_predictive_draws_new_data(latent_dims):
    vae = build_vae(ModelConfig(data_dim=D, latent_dims=latent_dims, hidden_dims=(8,)))
    draws = Predictive(vae.model, num_samples=3)(None, num_data=5)
    top = f"z{len(latent_dims)}" if len(latent_dims) > 1 else "z"
    assert draws["x"].shape == (3, 5, D) and draws[top].shape == (3, 5, latent_dims[-1])
    # Bernoulli draws: binary, and not all alike (the decoder's logits start near 0).
    assert set(draws["x"].unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("latent_dims", [(2,), (3, 2)], ids=["one-layer", "two-layer"])
def test_posterior_predictive_decodes_the_guides_draws(latent_dims):
    pyro.set_rng_seed(0)
    vae = build_vae(ModelConfig(data_dim=D, latent_dims=latent_dims, hidden_dims=(8,)))
    x = torch.bernoulli(torch.full((4, D), 0.5))
    posterior = Predictive(vae.guide, num_samples=6)(x)  # z ~ q(z | x), [6, 4, d] per site
    replicated = Predictive(vae.model, posterior_samples=posterior)(None, num_data=4)["x"]
    assert replicated.shape == (6, 4, D)
    # The draws are new data given each posterior z, not the observed x (what obs=x would have returned).
    assert not torch.equal(replicated, x.expand(6, 4, D))
    # ...and they follow p(x | z) at those z: the mean of many replicates approaches decode's mean.
    sites = vae.latent_sites
    first = {name: posterior[name][0] for name in sites}
    repeated = {name: posterior[name][:1].expand(4000, *posterior[name].shape[1:]) for name in sites}
    many = Predictive(vae.model, posterior_samples=repeated)
    mean = many(None, num_data=4)["x"].mean(0)
    torch.testing.assert_close(mean, vae.decode(first), atol=0.05, rtol=0)


def test_generating_needs_a_number_of_points():
    vae = build_vae(ModelConfig(data_dim=D, latent_dims=(2,), hidden_dims=(8,)))
    with pytest.raises(PyroVAEError, match="needs num_data"):
        vae.model(None)
    with pytest.raises(PyroVAEError, match="cannot be smaller than the minibatch"):
        with data_plate(torch.zeros(5, D), 3):
            pass


def test_jit_trace_elbo_gives_no_warning_from_our_code():
    vae = build_vae(ModelConfig(data_dim=D, latent_dims=(2,), hidden_dims=(8,)))
    x = torch.bernoulli(torch.full((16, D), 0.5))
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), loss=JitTrace_ELBO())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            svi.step(x, num_data=100)
    ours = [w for w in caught if "pyro_vae" in w.filename]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
