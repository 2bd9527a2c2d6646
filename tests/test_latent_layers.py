"""The per-layer report: KL shares and Burda et al.'s active units, on models whose answers are known."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vae.inference import latent_layers


def two_site_model(x):
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        z2 = pyro.sample("z2", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        pyro.sample(
            "x", dist.Normal(z1.sum(-1, keepdim=True) + z2.sum(-1, keepdim=True), 1.0).to_event(1), obs=x
        )


def make_guide(shift, scale):
    """q(z1|x) = N(x * shift, scale^2) (units move with x), q(z2|x) = N(0.5, 1) (no unit moves with x)."""

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z2", dist.Normal(torch.full((3,), 0.5), 1.0).to_event(1))
            pyro.sample("z1", dist.Normal(x * shift * torch.ones(2), scale).to_event(1))

    return guide


def test_kl_shares_and_active_units_match_closed_form():
    x = torch.linspace(-2, 2, 201).unsqueeze(-1)  # [N, 1]
    layers = latent_layers(two_site_model, make_guide(0.7, 0.5), x, num_samples=200)
    assert [layer["site"] for layer in layers] == ["z1", "z2"]  # ordered by layer number, not trace order
    z1, z2 = layers
    assert (z1["dim"], z2["dim"]) == (2, 3)
    # KL(N(m, 0.5^2) || N(0, 1)) per coordinate = (0.25 + m^2 - 1)/2 - log 0.5, m = 0.7 x.
    m = 0.7 * x.squeeze(-1).double()
    expected_z1 = 2 * ((0.25 + m**2 - 1) / 2 - torch.log(torch.tensor(0.5, dtype=torch.float64)))
    assert z1["kl"] == pytest.approx(float(expected_z1.mean()), abs=0.02)
    # KL(N(0.5, 1) || N(0, 1)) = 0.125 per coordinate.
    assert z2["kl"] == pytest.approx(3 * 0.125, abs=0.02)
    # Var_x E[z1 | x] = 0.49 Var(x) >> 0.01 for both units; E[z2 | x] = 0.5 for every x.
    assert z1["active_units"] == 2 and z2["active_units"] == 0


def test_monte_carlo_noise_is_not_counted_as_activity():
    x = torch.zeros(300, 1)
    # Posterior means that do not depend on x, with a wide posterior: sample averages over K=10 draws
    # would vary by 4 / 10 = 0.4 across data points, far above the 0.01 threshold.
    layers = latent_layers(two_site_model, make_guide(0.0, 2.0), x, num_samples=10)
    assert [layer["active_units"] for layer in layers] == [0, 0]


def test_threshold_is_respected():
    x = torch.linspace(-1, 1, 101).unsqueeze(-1)  # Var(x) = 0.34; Var_x E[z1|x] = shift^2 * 0.34
    low = latent_layers(two_site_model, make_guide(0.1, 1.0), x, num_samples=20)  # 0.0034 < 0.01
    high = latent_layers(two_site_model, make_guide(0.3, 1.0), x, num_samples=20)  # 0.031 > 0.01
    assert low[0]["active_units"] == 0 and high[0]["active_units"] == 2
    assert (
        latent_layers(two_site_model, make_guide(0.3, 1.0), x, num_samples=20, threshold=0.05)[0][
            "active_units"
        ]
        == 0
    )


def per_unit_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)


def per_unit_guide(x):
    # Unit 0 moves with x (mean 0.8 x, scale 0.5); unit 1 sits at N(0.3, 0.6^2) for every x; unit 2 is the prior.
    with pyro.plate("data", x.shape[0]):
        loc = torch.cat([0.8 * x, torch.full_like(x, 0.3), torch.zeros_like(x)], -1)
        scale = torch.tensor([0.5, 0.6, 1.0]).expand_as(loc)
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def test_unit_kl_matches_the_closed_form_and_adds_up_to_the_layer():
    x = torch.linspace(-2, 2, 201).unsqueeze(-1)
    (layer,) = latent_layers(per_unit_model, per_unit_guide, x, num_samples=400)
    # KL(N(m, s^2) || N(0, 1)) = (s^2 + m^2 - 1) / 2 - log s, averaged over the data.
    m0 = 0.8 * x.squeeze(-1).double()
    expected = [
        float(((0.25 + m0**2 - 1) / 2 - torch.log(torch.tensor(0.5, dtype=torch.float64))).mean()),
        (0.36 + 0.09 - 1) / 2 - float(torch.log(torch.tensor(0.6, dtype=torch.float64))),
        0.0,
    ]
    assert layer["unit_kl"] == pytest.approx(expected, abs=0.02)
    assert sum(layer["unit_kl"]) == pytest.approx(layer["kl"], rel=1e-9, abs=1e-9)
    # Unit 1 carries information-free KL (its mean ignores x): counted as carrying KL, not as active.
    assert layer["active_units"] == 1 and layer["units_with_kl"] == 2


def test_unit_kl_is_none_where_the_guide_does_not_factorize():
    def full_covariance_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(torch.zeros(3), torch.eye(3)).expand([x.shape[0]]))

    (layer,) = latent_layers(per_unit_model, full_covariance_guide, torch.zeros(5, 1), num_samples=10)
    assert layer["unit_kl"] is None and layer["units_with_kl"] is None
