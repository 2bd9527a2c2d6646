"""Guide heads q(z|x): the contract every registered head keeps, and known answers for each one."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions.transforms import AffineAutoregressive

from pyro_vae import ModelConfig, build_vae, log_weights
from pyro_vae.components.guides import GUIDES, InverseAutoregressiveFlow, LowRankNormal

FEATURE_DIM, LATENT_DIM = 5, 3


def make_head(name: str, **options) -> torch.nn.Module:
    return GUIDES.get(name)(feature_dim=FEATURE_DIM, latent_dim=LATENT_DIM, **options)


def forbid_inversion(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make inverting an IAF step fail, so a test shows that log_prob of a sample took the cached path."""

    def fail(self, y):
        raise AssertionError("the flow was inverted to score its own sample")

    monkeypatch.setattr(AffineAutoregressive, "_inverse", fail)
    monkeypatch.setattr(AffineAutoregressive, "_inverse_stable", fail)


@pytest.mark.parametrize("name", GUIDES.names())
@pytest.mark.parametrize("leading", [(4,), (2, 4)], ids=["features[N,H]", "features[M,N,H]"])
def test_head_shapes_and_log_prob(name, leading):
    head = make_head(name)
    q = head(torch.randn(*leading, FEATURE_DIM))
    assert isinstance(q, dist.Distribution) and q.has_rsample
    assert q.batch_shape == leading and q.event_shape == (LATENT_DIM,)
    z = q.rsample((7,))  # [S, *leading, d]
    assert z.shape == (7, *leading, LATENT_DIM)
    log_q = q.log_prob(z)
    assert log_q.shape == (7, *leading) and torch.isfinite(log_q).all()
    assert q.mean.shape == (*leading, LATENT_DIM)


@pytest.mark.parametrize("name", GUIDES.names())
def test_gradients_flow_from_samples_to_every_parameter(name):
    head = make_head(name)
    q = head(torch.randn(4, FEATURE_DIM))
    z = q.rsample((3,))
    (z.pow(2).sum() + q.log_prob(z).sum()).backward()
    for param_name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), param_name
        assert p.grad.abs().sum() > 0, f"{param_name} gets no gradient"


@pytest.mark.parametrize("name", GUIDES.names())
def test_expanded_to_particles_by_data(name):
    """Pyro's plates expand q from [N] to [S, N]; its samples [S, N, d] are scored with shape [S, N]."""
    head = make_head(name)
    h = torch.randn(4, FEATURE_DIM)

    def guide():
        with pyro.plate("particles", 6, dim=-2), pyro.plate("data", 4, dim=-1):
            return pyro.sample("z", head(h))

    site = poutine.trace(guide).get_trace().nodes["z"]
    assert site["fn"].batch_shape == (6, 4) and site["value"].shape == (6, 4, LATENT_DIM)
    log_q = site["fn"].log_prob(site["value"])
    assert log_q.shape == (6, 4) and torch.isfinite(log_q).all()
    # The same density as the unexpanded q, which broadcasts over the particles.
    assert torch.allclose(log_q, head(h).log_prob(site["value"].detach().clone()), atol=1e-4)


@pytest.mark.parametrize("name", GUIDES.names())
def test_heads_are_registered_with_the_guide(name):
    vae = build_vae(
        ModelConfig(data_dim=6, latent_dims=(LATENT_DIM,), hidden_dims=(FEATURE_DIM,), guide=name)
    )
    with poutine.trace(param_only=True) as params:
        vae.guide(torch.bernoulli(torch.full((3, 6), 0.5)))
    traced = {n for n in params.trace.nodes if n.startswith("guide_head$$$")}
    assert traced == {f"guide_head$$${n}" for n, _ in vae.guide_head.named_parameters()}


def test_low_rank_matches_full_covariance_normal(float64):
    head = LowRankNormal(feature_dim=FEATURE_DIM, latent_dim=4, rank=2)
    h = torch.randn(6, FEATURE_DIM)
    q = head(h)
    assert q.cov_factor.shape == (6, 4, 2)
    covariance = q.cov_factor @ q.cov_factor.mT + torch.diag_embed(q.cov_diag)
    reference = torch.distributions.MultivariateNormal(q.loc, covariance_matrix=covariance)
    z = q.sample((5,))
    assert torch.allclose(q.log_prob(z), reference.log_prob(z), atol=1e-10)
    # Off-diagonal covariance is what the rank buys over the diagonal head.
    assert covariance[0].triu(1).abs().max() > 1e-3


@pytest.mark.parametrize("rank", [0, LATENT_DIM + 1, 1.5])
def test_low_rank_rejects_a_rank_outside_one_to_latent_dim(rank):
    with pytest.raises(ValueError, match="rank must be an integer between 1 and latent_dim=3"):
        make_head("low-rank", rank=rank)


def test_iaf_log_prob_of_its_sample_is_base_minus_log_det_jacobian(float64, monkeypatch):
    head = InverseAutoregressiveFlow(feature_dim=FEATURE_DIM, latent_dim=LATENT_DIM, num_flows=3)
    h = torch.randn(1, FEATURE_DIM)
    q = head(h)
    torch.manual_seed(1)
    z = q.rsample()  # [1, d]
    torch.manual_seed(1)
    z0 = head(h).base_dist.rsample().detach()  # the same eps, so the same base point

    def flow(x: torch.Tensor) -> torch.Tensor:
        for transform in head(h).transforms:  # fresh transforms: nothing cached
            x = transform(x)
        return x

    assert torch.allclose(flow(z0), z, atol=1e-10)
    jacobian = torch.autograd.functional.jacobian(lambda x: flow(x[None])[0], z0[0])  # [d, d]
    expected = head(h).base_dist.log_prob(z0) - torch.linalg.slogdet(jacobian).logabsdet
    forbid_inversion(monkeypatch)
    assert torch.allclose(q.log_prob(z), expected, atol=1e-10)


def test_iaf_log_prob_by_explicit_inversion_agrees_with_the_cached_one(float64):
    head = InverseAutoregressiveFlow(feature_dim=FEATURE_DIM, latent_dim=LATENT_DIM)
    q = head(torch.randn(4, FEATURE_DIM))
    z = q.rsample((5,))
    cached = q.log_prob(z)
    inverted = q.log_prob(z.detach().clone())  # a new tensor misses the cache: the flow is inverted
    assert torch.allclose(cached, inverted, atol=1e-9)


def test_iaf_density_integrates_to_one(float64):
    head = InverseAutoregressiveFlow(feature_dim=FEATURE_DIM, latent_dim=2, num_flows=2)
    q = head(torch.randn(FEATURE_DIM))
    axis = torch.linspace(-9.0, 9.0, 361)
    grid = torch.cartesian_prod(axis, axis)  # [361^2, 2]
    with torch.no_grad():
        density = q.log_prob(grid).exp()
    step = float(axis[1] - axis[0])
    assert float(density.sum()) * step**2 == pytest.approx(1.0, abs=2e-3)


def test_iaf_scores_samples_under_the_evaluator_without_inverting(monkeypatch):
    """log_weights traces the guide inside a particle plate: the expanded flow must keep its cache."""
    vae = build_vae(ModelConfig(data_dim=6, latent_dims=(LATENT_DIM,), hidden_dims=(8,), guide="iaf"))
    forbid_inversion(monkeypatch)
    with torch.no_grad():
        log_w = log_weights(vae.model, vae.guide, torch.bernoulli(torch.full((4, 6), 0.5)), num_samples=5)
    assert log_w.shape == (5, 4) and torch.isfinite(log_w).all()


def test_iaf_state_dict_rebuilds_the_same_flow():
    h = torch.randn(3, FEATURE_DIM)
    head = InverseAutoregressiveFlow(feature_dim=FEATURE_DIM, latent_dim=4)
    torch.manual_seed(5)
    rebuilt = InverseAutoregressiveFlow(feature_dim=FEATURE_DIM, latent_dim=4)
    rebuilt.load_state_dict(head.state_dict())
    z = torch.randn(2, 3, 4)
    assert torch.allclose(head(h).log_prob(z), rebuilt(h).log_prob(z), atol=1e-5)


@pytest.mark.parametrize(
    "options,message",
    [({"num_flows": 0}, "num_flows must be a positive integer"), ({"hidden_dim": 2}, "hidden_dim must be")],
)
def test_iaf_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        make_head("iaf", **options)


def test_iaf_mean_is_the_flow_of_the_base_mean():
    head = InverseAutoregressiveFlow(feature_dim=FEATURE_DIM, latent_dim=LATENT_DIM)
    h = torch.randn(4, FEATURE_DIM)
    q = head(h)
    expected = q.base_dist.mean
    for transform in head(h).transforms:
        expected = transform(expected)
    assert torch.allclose(q.mean, expected)
    assert not torch.allclose(q.mean, q.base_dist.mean, atol=1e-3)
