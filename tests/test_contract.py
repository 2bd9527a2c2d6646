"""The contract over the registries: every registered component trains by SVI and is scored by log p(x).

For every registered prior, likelihood, guide and network (each with the
others at their defaults, and a few pairs), every registered loss, and the
hierarchical models, :func:`check_trains_and_scores` builds the model with
``build_vae``, takes real ``pyro.infer.SVI`` steps (the loss is finite, every
parameter moves) and then estimates log p(x) by importance sampling (finite,
and above the ELBO of the same samples, as Jensen's inequality puts it); the
model's prior samples and reconstructions have the data's shape. The
cases are read from the registries, so a newly registered component is tested
without anyone listing it.
"""

from __future__ import annotations

import math

import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI
from torch import nn

from pyro_vae import (
    GUIDES,
    LIKELIHOODS,
    LOSSES,
    NETWORKS,
    PRIORS,
    ModelConfig,
    build_vae,
    evaluate_bounds,
    make_loss,
)

# Tiny everything: 16 values per datum, seen as a 4x4 image by the conv network.
DATA_DIM, IMAGE_SHAPE, NUM_DATA = 16, (4, 4), 12
DEFAULTS = ModelConfig(data_dim=DATA_DIM)


def config(**fields: object) -> ModelConfig:
    base = {"data_dim": DATA_DIM, "latent_dims": (3,), "hidden_dims": (8,), "image_shape": IMAGE_SHAPE}
    return ModelConfig(**{**base, **fields})  # type: ignore[arg-type]


def data_for(likelihood: str) -> torch.Tensor:
    """Data in the likelihood's support: binary for a Bernoulli, 8-bit grey levels k / 255 otherwise."""
    if LIKELIHOODS.get(likelihood).binary_data:
        return torch.bernoulli(torch.full((NUM_DATA, DATA_DIM), 0.4))
    return torch.randint(0, 256, (NUM_DATA, DATA_DIM)).float() / 255


def check_trains_and_scores(vae: nn.Module, x: torch.Tensor, *, loss: str = "elbo") -> None:
    """Real SVI steps move every parameter with finite losses; then a finite log p(x) >= ELBO.

    Two steps, not one: a flow prior's MADE output layers start at zero (each
    layer the identity), so the first step's gradient reaches only them.
    """
    before = {name: p.detach().clone() for name, p in vae.named_parameters()}
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), loss=make_loss(loss, num_particles=2))
    values = [svi.step(x) for _ in range(2)]
    assert all(math.isfinite(v) for v in values), f"the {loss} loss went {values}"
    unmoved = [name for name, p in vae.named_parameters() if torch.equal(p.detach(), before[name])]
    assert not unmoved, f"parameters SVI did not move: {unmoved}"
    bounds = evaluate_bounds(vae.model, vae.guide, x, num_samples=20)
    assert bounds.log_px.shape == (NUM_DATA,) and torch.isfinite(bounds.log_px).all()
    # log (1/K) sum_k w_k >= (1/K) sum_k log w_k for the same K samples: exact, up to rounding.
    assert (bounds.elbo <= bounds.log_px + 1e-9).all()
    # The built-in models' own pictures: data from the prior and reconstructions, both [N, D].
    assert vae.sample(5).shape == (5, DATA_DIM) and vae.reconstruct(x).shape == x.shape


def _cases() -> dict[str, dict[str, object]]:
    """Each registered component once with the others at their defaults, then a few pairs."""
    cases: dict[str, dict[str, object]] = {}
    for field, registry in (
        ("prior", PRIORS),
        ("likelihood", LIKELIHOODS),
        ("guide", GUIDES),
        ("network", NETWORKS),
    ):
        for name in registry.names():
            cases[f"{field}={name}"] = {field: name}
    pairs = [
        {"prior": "vamp", "guide": "iaf"},
        {"prior": "flow", "guide": "low-rank"},
        {"prior": "mixture", "network": "conv", "likelihood": "gaussian-learned-scale"},
        {"prior": "learned-normal", "likelihood": "discretized-logistic", "guide": "iaf", "network": "conv"},
        {"likelihood": "continuous-bernoulli", "guide": "low-rank"},
    ]
    for pair in pairs:
        cases[",".join(f"{k}={v}" for k, v in pair.items())] = pair
    return cases


CASES = _cases()

# Hierarchical models: (latent sizes, inference).
HIERARCHICAL = {
    "2 layers bottom-up": ((4, 2), "bottom-up"),
    "2 layers ladder": ((4, 2), "ladder"),
    "3 layers ladder": ((4, 3, 2), "ladder"),
}


def test_the_cases_cover_every_registered_component():
    for field, registry in (
        ("prior", PRIORS),
        ("likelihood", LIKELIHOODS),
        ("guide", GUIDES),
        ("network", NETWORKS),
    ):
        assert {case[field] for case in CASES.values() if field in case} == set(registry.names())
        assert getattr(DEFAULTS, field) in registry.names()


@pytest.mark.parametrize("case", CASES)
def test_every_registered_component_trains_and_is_scored(case):
    fields = CASES[case]
    vae = build_vae(config(**fields))
    check_trains_and_scores(vae, data_for(str(fields.get("likelihood", DEFAULTS.likelihood))))


@pytest.mark.parametrize("loss", LOSSES.names())
def test_every_registered_loss_trains_the_default_model(loss):
    check_trains_and_scores(build_vae(config()), data_for(DEFAULTS.likelihood), loss=loss)


@pytest.mark.parametrize("model", HIERARCHICAL)
def test_hierarchical_models_train_and_are_scored(model):
    latent_dims, inference = HIERARCHICAL[model]
    vae = build_vae(config(latent_dims=latent_dims, hidden_dims=(8, 8), inference=inference))
    check_trains_and_scores(vae, data_for(DEFAULTS.likelihood))


# Mean-field needs the guide to draw the latents in the model's order (top-down): the ladder guide does.
@pytest.mark.parametrize("loss", LOSSES.names())
def test_every_registered_loss_trains_a_ladder_model(loss):
    vae = build_vae(config(latent_dims=(4, 2), hidden_dims=(8, 8), inference="ladder"))
    check_trains_and_scores(vae, data_for(DEFAULTS.likelihood), loss=loss)
