"""Priors p(z): contract tests over every registered prior, and known answers for each one."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import scipy.special
import scipy.stats
import torch
from pyro import poutine
from pyro.infer import SVI
from torch import nn

from pyro_vae import PRIORS, ModelConfig, build_vae
from pyro_vae.components.priors import EqualWeightMixture, VampPrior
from pyro_vae.objectives import make_loss

DATA_DIM = 8
# Small components keep the grids cheap; any prior not named here is built with its defaults.
OPTIONS: dict[str, dict] = {
    "mixture": {"num_components": 4},
    "vamp": {"num_components": 4},
    "flow": {"hidden_dim": 16},
}


def small_vae(name: str, latent_dim: int, **options):
    config = ModelConfig(
        data_dim=DATA_DIM,
        latent_dims=(latent_dim,),
        hidden_dims=(16,),
        prior=name,
        prior_options={**OPTIONS.get(name, {}), **options},
    )
    return build_vae(config)


@torch.no_grad()
def perturb(module: nn.Module, size: float = 0.2) -> None:
    """Move every learned parameter off its initial value, so tests do not only see the initialization."""
    for p in module.parameters():
        p.add_(size * torch.randn_like(p))


def grid(latent_dim: int, *, half_width: float = 12.0, points: int) -> tuple[torch.Tensor, float]:
    """Grid points [points**latent_dim, latent_dim] on [-half_width, half_width]^d and the cell volume."""
    axis = torch.linspace(-half_width, half_width, points)
    mesh = torch.stack(torch.meshgrid(*[axis] * latent_dim, indexing="ij"), -1)
    return mesh.reshape(-1, latent_dim), float(axis[1] - axis[0]) ** latent_dim


def trapezoid(values: torch.Tensor, latent_dim: int, cell: float) -> torch.Tensor:
    """Trapezoid rule over a grid from :func:`grid` of the values [points**d, ...]."""
    points = round(values.shape[0] ** (1 / latent_dim))
    weights = torch.ones(points)
    weights[[0, -1]] = 0.5
    w = weights
    for _ in range(latent_dim - 1):
        w = torch.outer(w, weights).reshape(-1)
    return (w.reshape((-1,) + (1,) * (values.dim() - 1)) * values).sum(0) * cell


# ------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", PRIORS.names())
def test_shapes_samples_and_plate_expansion(name):
    prior = small_vae(name, 3).prior
    p = prior()
    assert p.event_shape == (3,) and p.batch_shape == ()
    z = p.sample((500,))
    assert z.shape == (500, 3)
    log_p = p.log_prob(z)
    assert log_p.shape == (500,) and torch.isfinite(log_p).all()
    # What Pyro's data plate and particle plate do with it: expand, then score [particles, data, d].
    expanded = p.expand([6])
    assert expanded.batch_shape == (6,) and expanded.event_shape == (3,)
    assert expanded.log_prob(z[:12].reshape(2, 6, 3)).shape == (2, 6)
    torch.testing.assert_close(expanded.log_prob(z[:12].reshape(2, 6, 3)), log_p[:12].reshape(2, 6))


@pytest.mark.parametrize("latent_dim,points", [(1, 4001), (2, 401)])
@pytest.mark.parametrize("name", PRIORS.names())
def test_density_integrates_to_one(name, latent_dim, points, float64):
    vae = small_vae(name, latent_dim)
    perturb(vae)
    z, cell = grid(latent_dim, points=points)
    with torch.no_grad():
        density = vae.prior().log_prob(z).exp()
    assert trapezoid(density, latent_dim, cell).item() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("name", PRIORS.names())
def test_sample_moments_match_the_density(name, float64):
    """Monte-Carlo mean and variance of samples against the same moments of exp(log_prob) by quadrature."""
    vae = small_vae(name, 2)
    perturb(vae)
    z, cell = grid(2, points=401)
    with torch.no_grad():
        p = vae.prior()
        density = p.log_prob(z).exp()  # [G]
        draws = p.sample((20000,))
    mean = trapezoid(density[:, None] * z, 2, cell)
    var = trapezoid(density[:, None] * (z - mean) ** 2, 2, cell)
    standard_error = (var / len(draws)).sqrt()
    assert ((draws.mean(0) - mean).abs() < 5 * standard_error).all(), (draws.mean(0), mean)
    # The variance of a sample variance is about 2 var^2 / n for near-Gaussian shapes; 6 such errors leave room.
    assert ((draws.var(0) - var).abs() < 6 * var * math.sqrt(2 / len(draws))).all(), (draws.var(0), var)


@pytest.mark.parametrize("name", PRIORS.names())
def test_prior_trains_with_svi(name):
    vae = small_vae(name, 2)
    x = torch.bernoulli(torch.full((64, DATA_DIM), 0.3))
    before = {k: v.detach().clone() for k, v in vae.prior.named_parameters()}
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), make_loss("elbo"))
    losses = [svi.step(x) for _ in range(30)]
    assert all(math.isfinite(loss) for loss in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    for key, value in vae.prior.named_parameters():
        assert not torch.equal(value, before[key]), f"{name} prior parameter {key} did not move"


# ---------------------------------------------------------------------------- learned-normal, mixture


def test_learned_normal_starts_standard_and_matches_scipy():
    prior = PRIORS.get("learned-normal")(latent_dim=3)
    z = torch.randn(7, 3)
    torch.testing.assert_close(prior().log_prob(z), dist.Normal(0.0, 1.0).log_prob(z).sum(-1))
    perturb(prior, 0.5)
    loc = prior.loc.detach().double().numpy()
    scale = (torch.nn.functional.softplus(prior.raw_scale.detach()) + 1e-3).double().numpy()
    expected = scipy.stats.multivariate_normal(mean=loc, cov=np.diag(scale**2)).logpdf(z.double().numpy())
    torch.testing.assert_close(prior().log_prob(z).double(), torch.as_tensor(expected), rtol=1e-5, atol=1e-5)
    draws = prior().sample((20000,))
    torch.testing.assert_close(draws.mean(0).double(), torch.as_tensor(loc), atol=0.05, rtol=0)
    torch.testing.assert_close(draws.std(0).double(), torch.as_tensor(scale), atol=0.05, rtol=0.02)


def test_mixture_starts_spread_and_matches_scipy():
    prior = PRIORS.get("mixture")(latent_dim=3, num_components=5)
    assert prior.loc.shape == (5, 3) and torch.pdist(prior.loc.detach()).min() > 0.05
    perturb(prior, 0.5)
    z = 2 * torch.randn(9, 3)
    weights = torch.softmax(prior.logits.detach(), 0).double().numpy()  # [K]
    locs = prior.loc.detach().double().numpy()  # [K, d]
    scales = (torch.nn.functional.softplus(prior.raw_scale.detach()) + 1e-3).double().numpy()  # [K, d]
    per_component = scipy.stats.norm(locs, scales).logpdf(z.double().numpy()[:, None, :]).sum(-1)  # [N, K]
    expected = scipy.special.logsumexp(per_component + np.log(weights), axis=-1)
    torch.testing.assert_close(prior().log_prob(z).double(), torch.as_tensor(expected), rtol=1e-5, atol=1e-5)
    draws = prior().sample((40000,)).double()
    mean = weights @ locs
    var = weights @ (scales**2 + locs**2) - mean**2
    torch.testing.assert_close(draws.mean(0), torch.as_tensor(mean), atol=0.05, rtol=0)
    torch.testing.assert_close(draws.var(0), torch.as_tensor(var), atol=0.1, rtol=0.03)


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("mixture", {"num_components": 0}, "num_components must be a positive integer"),
        ("vamp", {"num_components": 0}, "num_components must be a positive integer"),
        ("flow", {"num_flows": 0}, "num_flows must be a positive integer"),
        ("flow", {"hidden_dim": 2}, r"hidden_dim \(2\) must be at least latent_dim \(3\)"),
    ],
)
def test_bad_options_are_rejected(name, options, message):
    with pytest.raises(ValueError, match=message):
        PRIORS.get(name)(latent_dim=3, **options)


# ------------------------------------------------------------------------------------------------ vamp


def test_vamp_is_the_guide_averaged_over_pseudo_inputs():
    vae = small_vae("vamp", 3, num_components=6)
    perturb(vae)
    z = torch.randn(11, 3)
    q = vae.guide_head(vae.encoder(vae.prior.pseudo_inputs))  # batch [K]
    expected = q.log_prob(z[:, None, :]).logsumexp(-1) - math.log(6)
    torch.testing.assert_close(vae.prior().log_prob(z), expected)
    assert vae.prior.pseudo_inputs.shape == (6, DATA_DIM)


def test_vamp_parameters_appear_once():
    vae = small_vae("vamp", 3)
    state = vae.state_dict()
    assert [k for k in state if k.startswith("prior.")] == ["prior.pseudo_inputs"]
    pointers = [v.data_ptr() for v in state.values()]
    assert len(pointers) == len(set(pointers)), "a tensor is saved under two names"
    assert sum(p.numel() for p in vae.parameters()) == sum(v.numel() for v in state.values())
    with poutine.trace(param_only=True) as traced:
        pyro.module("prior", vae.prior)
    assert set(traced.trace.nodes) == {"prior$$$pseudo_inputs"}
    # A rebuilt model with the saved state is the same prior.
    twin = small_vae("vamp", 3)
    twin.load_state_dict(state)
    z = torch.randn(5, 3)
    torch.testing.assert_close(twin.prior().log_prob(z), vae.prior().log_prob(z))


def test_vamp_gradients_reach_pseudo_inputs_and_encoder():
    vae = small_vae("vamp", 3)
    vae.prior().log_prob(torch.randn(20, 3)).sum().backward()
    assert vae.prior.pseudo_inputs.grad is not None and vae.prior.pseudo_inputs.grad.abs().sum() > 0
    for name, p in [*vae.encoder.named_parameters(), *vae.guide_head.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_vamp_needs_binding():
    prior = PRIORS.get("vamp")(latent_dim=3)
    assert list(prior.parameters()) == []
    with pytest.raises(RuntimeError, match=r"until it is bound.*prior\.bind"):
        prior()


class FullCovarianceHead(nn.Module):
    """A guide head outside the diagonal family: N(W h + b, L L^T) with a fixed full L."""

    def __init__(self, feature_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.loc = nn.Linear(feature_dim, latent_dim)
        self.register_buffer("scale_tril", torch.tensor([[0.8, 0.0], [0.5, 0.6]]))

    def forward(self, features: torch.Tensor) -> dist.Distribution:
        return dist.MultivariateNormal(self.loc(features), scale_tril=self.scale_tril)


def test_vamp_with_a_non_diagonal_guide_is_an_equal_weight_mixture():
    encoder, head = nn.Linear(DATA_DIM, 4), FullCovarianceHead(4, 2)
    prior = VampPrior(latent_dim=2, num_components=3, pseudo_input_std=1.0)
    prior.bind(encoder=encoder, guide_head=head, data_dim=DATA_DIM)
    p = prior()
    assert isinstance(p, EqualWeightMixture) and p.event_shape == (2,) and p.batch_shape == ()
    q = head(encoder(prior.pseudo_inputs))
    z = torch.randn(10, 2)
    torch.testing.assert_close(p.log_prob(z), q.log_prob(z[:, None]).logsumexp(-1) - math.log(3))
    assert p.expand([4]).log_prob(z[:8].reshape(2, 4, 2)).shape == (2, 4)
    with torch.no_grad():
        locs = q.mean  # [K, 2]
        draws = p.sample((40000,))
    covariance = head.scale_tril @ head.scale_tril.T
    expected_cov = covariance + (locs.T @ locs) / 3 - torch.outer(locs.mean(0), locs.mean(0))
    torch.testing.assert_close(draws.mean(0), locs.mean(0), atol=0.03, rtol=0)
    torch.testing.assert_close(draws.T.cov(), expected_cov, atol=0.05, rtol=0)


def test_equal_weight_mixture_matches_mixture_same_family():
    components = dist.Normal(torch.randn(5, 3), torch.rand(5, 3) + 0.5).to_event(1)
    z = torch.randn(2, 7, 3)
    reference = dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(5)), components)
    torch.testing.assert_close(EqualWeightMixture(components).log_prob(z), reference.log_prob(z))
    with pytest.raises(ValueError, match="one batch dimension"):
        EqualWeightMixture(dist.Normal(torch.zeros(2, 5, 3), 1.0).to_event(1))


# ------------------------------------------------------------------------------------------------ flow


def test_flow_starts_standard_normal():
    prior = PRIORS.get("flow")(latent_dim=3)
    z = torch.randn(7, 3)
    torch.testing.assert_close(prior().log_prob(z), dist.Normal(0.0, 1.0).log_prob(z).sum(-1))


def flow_to_base(prior, z: torch.Tensor) -> torch.Tensor:
    """u = f(z), written out from the MADE networks: u_i = z_i exp(s_i) + m_i per layer, first layer first."""
    for made in prior.networks:
        shift, log_scale = made(z)
        z = z * log_scale.clamp(-5, 3).exp() + shift
    return z


def test_flow_log_prob_is_the_change_of_variables(float64):
    prior = PRIORS.get("flow")(latent_dim=3, num_flows=3, hidden_dim=16)
    perturb(prior, 0.3)
    z = prior().sample((6,))
    standard = dist.Normal(torch.zeros(3), 1.0).to_event(1)
    expected = []
    for point in z:
        jacobian = torch.autograd.functional.jacobian(lambda v: flow_to_base(prior, v), point)  # [3, 3]
        expected.append(standard.log_prob(flow_to_base(prior, point)) + torch.linalg.slogdet(jacobian)[1])
    with torch.no_grad():
        torch.testing.assert_close(prior().log_prob(z.clone()), torch.stack(expected))
        # A sample maps back to the base: f(f^{-1}(u)) = u, so the forward pass is the inverse of sampling.
        u = standard.sample((50,))
        sample = u
        for transform in prior().transforms:
            sample = transform(sample)
        torch.testing.assert_close(flow_to_base(prior, sample), u)


def test_flow_scores_in_one_pass_per_layer():
    prior = PRIORS.get("flow")(latent_dim=5, num_flows=2, hidden_dim=16)
    calls = [0]
    for made in prior.networks:
        made.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    prior().log_prob(torch.randn(100, 5))
    assert calls[0] == 2


def test_flow_cache_never_outlives_parameter_updates():
    prior = PRIORS.get("flow")(latent_dim=3, hidden_dim=16)
    z = torch.randn(4, 3)
    before = prior().log_prob(z)
    perturb(prior, 0.3)
    after = prior().log_prob(z)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, prior().log_prob(z.clone()))
