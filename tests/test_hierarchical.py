"""Tests of :mod:`pyro_vae.models.hierarchical`: a VAE with stochastic layers z1 (next to x) ... zL.

* contracts of the model and both guides (sites, order, plate, shapes, replay, gradients, N/M scale,
  the ladder guide sharing the generative ``down`` layers);
* the ladder guide's precision weighting, recomputed from the module's pieces;
* known answers on a two-layer linear-Gaussian chain ``z2 -> z1 -> x`` (exact log p(x) in closed form),
  with the exact posterior and with a learned bottom-up guide;
* training on the digits data, the ordering ELBO <= IWAE-5 <= log p̂(x), and the mean-field loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch.distributions import MultivariateNormal, kl_divergence
from torch.nn import functional as F

from pyro_vae import ModelConfig, build_vae, fit, load_dataset, mean_elbo
from pyro_vae.inference import evaluate_bounds, log_marginal, traced_log_weights
from pyro_vae.io.binarization import prepare_split
from pyro_vae.models.hierarchical import HierarchicalVAE
from pyro_vae.models.initialization import init_output_bias
from pyro_vae.objectives import make_loss

DATA_DIM = 16
MODES = ["bottom-up", "ladder"]
LATENT_DIMS = [pytest.param((6, 4), id="L2"), pytest.param((6, 4, 2), id="L3")]


def _vae(latent_dims: tuple[int, ...], inference: str, **overrides) -> HierarchicalVAE:
    config = ModelConfig(
        data_dim=DATA_DIM, latent_dims=latent_dims, hidden_dims=(12, 12), inference=inference, **overrides
    )
    vae = build_vae(config)
    assert isinstance(vae, HierarchicalVAE)
    return vae


def _binary_data(n: int, seed: int = 1) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, DATA_DIM), 0.4), generator=torch.Generator().manual_seed(seed))


def _traces(vae: HierarchicalVAE, x: torch.Tensor, **kwargs) -> tuple[poutine.Trace, poutine.Trace]:
    guide_trace = poutine.trace(vae.guide).get_trace(x, **kwargs)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x, **kwargs)
    return guide_trace, model_trace


def _sample_sites(trace: poutine.Trace) -> list[str]:
    # The plate's own subsample site ("data") is not a random variable of the model.
    return [
        name for name, site in trace.nodes.items() if site["type"] == "sample" and not name.startswith("data")
    ]


# --------------------------------------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("latent_dims", LATENT_DIMS)
@pytest.mark.parametrize("mode", MODES)
def test_sites_order_plate_shapes_and_replay(mode, latent_dims):
    vae = _vae(latent_dims, mode)
    n, num_layers = 5, len(latent_dims)
    x = _binary_data(n)
    guide_trace, model_trace = _traces(vae, x)

    top_down = [f"z{layer}" for layer in range(num_layers, 0, -1)]
    assert _sample_sites(model_trace) == [*top_down, "x"]
    expected_guide = top_down if mode == "ladder" else top_down[::-1]
    assert _sample_sites(guide_trace) == expected_guide
    assert vae.site_names() == [f"z{layer}" for layer in range(1, num_layers + 1)]

    for trace in (model_trace, guide_trace):
        for layer, d in enumerate(latent_dims, start=1):
            site = trace.nodes[f"z{layer}"]
            assert [frame.name for frame in site["cond_indep_stack"]] == ["data"]
            assert site["fn"].event_shape == (d,)
            assert site["fn"].batch_shape == (n,)
            assert site["value"].shape == (n, d)
    assert model_trace.nodes["x"]["fn"].batch_shape == (n,)
    assert model_trace.nodes["x"]["fn"].event_shape == (DATA_DIM,)

    # Replay: the model scores the guide's samples, and p(z_l | z_{l+1}) is conditioned on the guide's z_{l+1}.
    for layer in range(1, num_layers + 1):
        assert torch.equal(model_trace.nodes[f"z{layer}"]["value"], guide_trace.nodes[f"z{layer}"]["value"])
    for layer in range(1, num_layers):
        loc, scale = vae.down[layer - 1].params(guide_trace.nodes[f"z{layer + 1}"]["value"])
        fn = model_trace.nodes[f"z{layer}"]["fn"].base_dist
        torch.testing.assert_close(fn.loc, loc)
        torch.testing.assert_close(fn.scale, scale)


@pytest.mark.parametrize("latent_dims", LATENT_DIMS)
@pytest.mark.parametrize("mode", MODES)
def test_one_elbo_step_reaches_every_parameter(mode, latent_dims):
    vae = _vae(latent_dims, mode, prior="learned-normal", likelihood="gaussian")
    x = torch.randn(6, DATA_DIM, generator=torch.Generator().manual_seed(2))
    make_loss("elbo", num_particles=2).differentiable_loss(vae.model, vae.guide, x).backward()
    params = dict(vae.named_parameters())
    assert any(name.startswith("prior.") for name in params)
    missing = [name for name, p in params.items() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("mode", MODES)
def test_num_data_scales_every_site_by_n_over_m(mode):
    vae = _vae((6, 4), mode)
    x = _binary_data(4)
    guide_trace, model_trace = _traces(vae, x, num_data=20)
    for trace in (guide_trace, model_trace):
        for name in _sample_sites(trace):
            assert trace.nodes[name]["scale"] == pytest.approx(5.0), name

    loss = make_loss("elbo", num_particles=3)
    pyro.set_rng_seed(4)
    full = loss.differentiable_loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(4)
    scaled = loss.differentiable_loss(vae.model, vae.guide, x, num_data=20)
    torch.testing.assert_close(scaled, 5.0 * full)


def _param_tensors(fn, x: torch.Tensor) -> dict[str, torch.Tensor]:
    trace = poutine.trace(fn).get_trace(x)
    return {name: site["value"] for name, site in trace.nodes.items() if site["type"] == "param"}


@pytest.mark.parametrize("latent_dims", LATENT_DIMS)
def test_ladder_guide_reuses_the_generative_down_layers(latent_dims):
    vae = _vae(latent_dims, "ladder")
    x = _binary_data(3)
    guide_params = _param_tensors(vae.guide, x)
    model_params = _param_tensors(vae.model, x)
    down = {f"down$$${name}": p for name, p in vae.down.named_parameters()}
    assert down
    for name, p in down.items():
        assert guide_params[name] is p and model_params[name] is p, name

    # The guide's own density depends on them: a gradient of log q alone, at fixed values of z (at its own
    # reparameterized samples log q does not depend on the location), reaches every down layer.
    with torch.no_grad():
        sampled = poutine.trace(vae.guide).get_trace(x)
    conditioned = poutine.condition(vae.guide, data={n: sampled.nodes[n]["value"] for n in vae.site_names()})
    poutine.trace(conditioned).get_trace(x).log_prob_sum().backward()
    assert all(p.grad is not None and torch.any(p.grad != 0) for p in down.values())

    # The bottom-up guide does not use them.
    bottom_up = _vae(latent_dims, "bottom-up")
    assert not any(name.startswith("down$$$") for name in _param_tensors(bottom_up.guide, x))


# --------------------------------------------------------------------------------------------------------
# Ladder precision weighting
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("latent_dims", LATENT_DIMS)
def test_ladder_posterior_is_the_precision_weighted_combination(latent_dims):
    vae = _vae(latent_dims, "ladder")
    num_layers = len(latent_dims)
    x = _binary_data(7)
    with torch.no_grad():
        # The upward pass recomputed from the pieces, then checked against the module's own.
        d = vae.encoder(x)
        estimates = []
        for layer in range(num_layers):
            if layer > 0:
                d = vae.ladder_nets[layer - 1](d)
            out = vae.ladder_heads[layer](d)
            half = out.shape[-1] // 2
            estimates.append((out[..., :half], F.softplus(out[..., half:]) + 1e-5))
        for (loc, scale), (loc_m, scale_m) in zip(estimates, vae._ladder_estimates(x), strict=True):
            torch.testing.assert_close(loc_m, loc)
            torch.testing.assert_close(scale_m, scale)

        guide_trace = poutine.trace(vae.guide).get_trace(x)
        top = guide_trace.nodes[f"z{num_layers}"]["fn"].base_dist
        torch.testing.assert_close(top.loc, estimates[-1][0])
        torch.testing.assert_close(top.scale, estimates[-1][1])
        for layer in range(1, num_layers):
            loc_hat, scale_hat = estimates[layer - 1]
            loc_p, scale_p = vae.down[layer - 1].params(guide_trace.nodes[f"z{layer + 1}"]["value"])
            # The product of N(mu_hat, sh²) and N(mu_p, sp²), written as a weighted average of variances.
            var_hat, var_p = scale_hat**2, scale_p**2
            expected_scale = (var_hat * var_p / (var_hat + var_p)).sqrt()
            expected_loc = (loc_hat * var_p + loc_p * var_hat) / (var_hat + var_p)
            q = guide_trace.nodes[f"z{layer}"]["fn"].base_dist
            torch.testing.assert_close(q.loc, expected_loc)
            torch.testing.assert_close(q.scale, expected_scale)
            assert torch.all(q.scale <= torch.minimum(scale_hat, scale_p) * (1 + 1e-6))
            # Both sources count: q is neither the estimate nor the generative conditional.
            assert not torch.allclose(q.loc, loc_hat) and not torch.allclose(q.loc, loc_p)


# --------------------------------------------------------------------------------------------------------
# Known answer: z2 ~ N(0, I_2),  z1 | z2 ~ N(A z2 + a, t² I_3),  x | z1 ~ N(B z1 + b, s² I_p)
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearGaussianChain:
    """A two-layer linear-Gaussian hierarchy; marginal x ~ N(B a + b, B (A Aᵀ + t² I) Bᵀ + s² I)."""

    A: torch.Tensor  # (3, 2)
    a: torch.Tensor  # (3,)
    B: torch.Tensor  # (p, 3)
    b: torch.Tensor  # (p,)
    t: float = 0.8
    s: float = 1.0

    @classmethod
    def random(cls, p: int = 4, seed: int = 3) -> LinearGaussianChain:
        # A scaled by 0.6 keeps the posterior's correlations moderate, so a diagonal guide's importance
        # weights have a light tail (Pareto k̂ about 0.5 at K = 10⁴).
        g = torch.Generator().manual_seed(seed)
        A = 0.6 * torch.randn(3, 2, generator=g, dtype=torch.float64)
        a = 0.5 * torch.randn(3, generator=g, dtype=torch.float64)
        B = torch.randn(p, 3, generator=g, dtype=torch.float64)
        b = torch.randn(p, generator=g, dtype=torch.float64)
        return cls(A, a, B, b)

    @property
    def data_dim(self) -> int:
        return self.B.shape[0]

    def sample_data(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        z2 = torch.randn(n, 2, generator=g, dtype=torch.float64)
        z1 = z2 @ self.A.T + self.a + self.t * torch.randn(n, 3, generator=g, dtype=torch.float64)
        return (
            z1 @ self.B.T + self.b + self.s * torch.randn(n, self.data_dim, generator=g, dtype=torch.float64)
        )

    def model(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(0.0, 1.0).expand([2]).to_event(1))  # (..., N, 2)
            z1 = pyro.sample("z1", dist.Normal(z2 @ self.A.T + self.a, self.t).to_event(1))  # (..., N, 3)
            pyro.sample("x", dist.Normal(z1 @ self.B.T + self.b, self.s).to_event(1), obs=x)

    def exact_log_px(self, x: torch.Tensor) -> torch.Tensor:
        eye3, eye_p = torch.eye(3, dtype=x.dtype), torch.eye(self.data_dim, dtype=x.dtype)
        cov = self.B @ (self.A @ self.A.T + self.t**2 * eye3) @ self.B.T + self.s**2 * eye_p
        return MultivariateNormal(self.B @ self.a + self.b, covariance_matrix=cov).log_prob(x)  # (N,)

    def posterior_z1(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z1 | x) with prior z1 ~ N(a, A Aᵀ + t² I): loc (N, 3), cov (3, 3)."""
        prior_prec = torch.linalg.inv(self.A @ self.A.T + self.t**2 * torch.eye(3, dtype=x.dtype))
        cov = torch.linalg.inv(prior_prec + self.B.T @ self.B / self.s**2)
        loc = (self.a @ prior_prec + (x - self.b) @ self.B / self.s**2) @ cov
        return loc, cov

    def posterior_z2(self, z1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z2 | z1, x) = p(z2 | z1) (x depends on z2 only through z1): loc (..., N, 2), cov (2, 2)."""
        cov = torch.linalg.inv(torch.eye(2, dtype=z1.dtype) + self.A.T @ self.A / self.t**2)
        loc = (z1 - self.a) @ self.A / self.t**2 @ cov
        return loc, cov

    def exact_guide(self, x: torch.Tensor) -> None:
        loc1, cov1 = self.posterior_z1(x)
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.MultivariateNormal(loc1, scale_tril=torch.linalg.cholesky(cov1)))
            loc2, cov2 = self.posterior_z2(z1)
            pyro.sample("z2", dist.MultivariateNormal(loc2, scale_tril=torch.linalg.cholesky(cov2)))


def bottom_up_guide(x: torch.Tensor) -> None:
    """q(z1 | x) = N(C x + c, diag) and q(z2 | z1) = N(E z1 + e, diag), learnable."""
    C = pyro.param("C", torch.zeros(3, x.shape[1], dtype=x.dtype))
    c = pyro.param("c", torch.zeros(3, dtype=x.dtype))
    log_scale1 = pyro.param("log_scale1", torch.zeros(3, dtype=x.dtype))
    E = pyro.param("E", torch.zeros(2, 3, dtype=x.dtype))
    e = pyro.param("e", torch.zeros(2, dtype=x.dtype))
    log_scale2 = pyro.param("log_scale2", torch.zeros(2, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(x @ C.T + c, log_scale1.exp()).to_event(1))
        pyro.sample("z2", dist.Normal(z1 @ E.T + e, log_scale2.exp()).to_event(1))


def test_reference_chain_posterior_satisfies_bayes_rule(float64):
    chain = LinearGaussianChain.random()
    x = chain.sample_data(8, seed=1)
    loc1, cov1 = chain.posterior_z1(x)
    for value in (0.4, -1.1):
        z1 = torch.full((8, 3), value)
        z2 = torch.full((8, 2), -value / 2)
        loc2, cov2 = chain.posterior_z2(z1)
        log_joint = (
            torch.distributions.Normal(0.0, 1.0).log_prob(z2).sum(-1)
            + torch.distributions.Normal(z2 @ chain.A.T + chain.a, chain.t).log_prob(z1).sum(-1)
            + torch.distributions.Normal(z1 @ chain.B.T + chain.b, chain.s).log_prob(x).sum(-1)
        )
        log_post = MultivariateNormal(loc1, cov1).log_prob(z1) + MultivariateNormal(loc2, cov2).log_prob(z2)
        torch.testing.assert_close(log_joint - log_post, chain.exact_log_px(x), rtol=0, atol=1e-10)


def test_chain_exact_guide_gives_exact_log_marginal(float64):
    chain = LinearGaussianChain.random()
    x = chain.sample_data(10, seed=1)
    log_px = log_marginal(chain.model, chain.exact_guide, x, num_samples=12, chunk_size=5, data_chunk_size=4)
    torch.testing.assert_close(log_px, chain.exact_log_px(x), rtol=0, atol=1e-6)


def test_chain_learned_bottom_up_guide_gives_log_marginal_within_standard_errors(float64):
    chain = LinearGaussianChain.random()
    train, held_out = chain.sample_data(200, seed=10), chain.sample_data(15, seed=1000)
    svi = pyro.infer.SVI(
        chain.model, bottom_up_guide, pyro.optim.Adam({"lr": 0.05}), make_loss("elbo", num_particles=8)
    )
    for _ in range(300):
        svi.step(train)

    # Mean-field optimum of a Gaussian target: the exact posterior means (both maps are linear).
    loc1, _ = chain.posterior_z1(held_out)
    with torch.no_grad():
        learned_loc1 = held_out @ pyro.param("C").T + pyro.param("c")
    torch.testing.assert_close(learned_loc1, loc1, rtol=0, atol=0.15)

    exact = chain.exact_log_px(held_out)
    bounds = evaluate_bounds(chain.model, bottom_up_guide, held_out, num_samples=10_000, progress=False)
    error = bounds.log_px - exact
    assert torch.all(bounds.log_px_stderr > 0)
    assert (error.abs() >= 4 * bounds.log_px_stderr).sum() <= 1, (error, bounds.log_px_stderr)
    assert torch.all(error.abs() < 0.1), error
    # A diagonal guide cannot be exact here, so the ELBO stays clearly below log p(x).
    assert torch.all(bounds.elbo < exact - 0.01), (bounds.elbo, exact)


# --------------------------------------------------------------------------------------------------------
# Training on binary data
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    dataset = load_dataset("digits")
    return prepare_split(dataset, "train", mode="static"), prepare_split(dataset, "test", mode="static")


@pytest.mark.parametrize(("loss", "num_particles"), [("elbo", 1), ("iwae", 5)])
@pytest.mark.parametrize("mode", MODES)
def test_hierarchical_vae_trains_on_digits(digits, mode, loss, num_particles):
    train, test = digits
    vae = build_vae(ModelConfig(data_dim=64, latent_dims=(8, 4), hidden_dims=(32, 32), inference=mode))
    before = mean_elbo(vae, test, num_particles=4)
    result = fit(
        vae, train, test=test, epochs=4, batch_size=100, lr=3e-3, loss=loss,
        num_particles=num_particles, device="cpu", progress=False,
    )  # fmt: skip
    assert len(result.history) == 4
    # Untrained about -44 nats, after 4 epochs about -28.
    assert result.final.test_elbo > before + 5, (before, [r.test_elbo for r in result.history])
    assert result.final.test_elbo > result.history[0].test_elbo

    bounds = evaluate_bounds(vae.model, vae.guide, test[:150], num_samples=250, progress=False)
    elbo, iwae5, log_px = bounds.elbo.mean(), bounds.iwae[5].mean(), bounds.log_px.mean()
    assert log_px >= iwae5 >= elbo, (log_px, iwae5, elbo)
    assert log_px > elbo + 0.01


# --------------------------------------------------------------------------------------------------------
# Mean-field loss
# --------------------------------------------------------------------------------------------------------


def _mean_field_terms(vae: HierarchicalVAE, x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Per-particle, per-datum E_q log p(x|z1) - sum_l KL(q(z_l | ...) || p(z_l | z_{l+1})): [K, N].

    Every KL comes from torch's closed form for two diagonal Gaussians, conditioned on the guide's
    samples of the other layers; only the layers above (for the ladder) or below are sampled.
    """
    with pyro.plate("particles", num_samples, dim=-2):
        guide_trace, model_trace = _traces(vae, x)
    terms = model_trace.nodes["x"]["fn"].log_prob(x)  # [K, N]
    for name in vae.site_names():
        q, p = guide_trace.nodes[name]["fn"], model_trace.nodes[name]["fn"]
        assert type(q.base_dist) is type(p.base_dist) is dist.Normal
        terms = terms - kl_divergence(q, p)
    return terms.expand(num_samples, x.shape[0])


def test_mean_field_loss_matches_monte_carlo_elbo_for_ladder_inference():
    vae = _vae((6, 4, 2), "ladder")
    x = _binary_data(8)
    num_samples = 20_000
    with torch.no_grad():
        log_w, _ = traced_log_weights(vae.model, vae.guide, x, num_samples=num_samples)  # [K, N]
        mean_field = _mean_field_terms(vae, x, num_samples).double()
    # Per datum: both estimate the same ELBO; the difference's standard error comes from both samples.
    stderr = ((log_w.var(0) + mean_field.var(0)) / num_samples).sqrt()
    difference = mean_field.mean(0) - log_w.mean(0)
    assert torch.all(difference.abs() < 4 * stderr), (difference, stderr)

    # The package's loss is that estimator, summed over the data, with no Monte-Carlo fallback warning.
    pyro.set_rng_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            loss = make_loss("mean-field", num_particles=num_samples).differentiable_loss(
                vae.model, vae.guide, x
            )
    total_stderr = mean_field.var(0).sum().div(num_samples).sqrt()
    assert abs(-float(loss) - float(mean_field.mean(0).sum())) < 4 * float(total_stderr) + 1e-3


def test_mean_field_loss_refuses_a_guide_in_another_order_than_the_model(float64):
    # With a bottom-up guide, KL(q(z1|x) || p(z1 | z2)) would be taken at z2 ~ q(z2 | z1), as if z2 were
    # independent of z1: on this chain that shifts the loss by tr(A E S1) / t^2 per datum (S1 = q's
    # covariance of z1; 4.5 nats on 10 points when measured). The loss must refuse, not return that.
    chain = LinearGaussianChain.random()
    x = chain.sample_data(10, seed=1)
    pyro.param("C", torch.zeros(3, chain.data_dim))
    pyro.param("c", torch.zeros(3))
    pyro.param("log_scale1", torch.zeros(3))
    pyro.param("E", torch.zeros(2, 3))
    pyro.param("e", torch.zeros(2))
    pyro.param("log_scale2", torch.zeros(2))
    with pytest.raises(
        ValueError, match=r"draw the latents in the model's order \(z2, z1\), but it draws z1, z2"
    ):
        make_loss("mean-field", num_particles=4).differentiable_loss(chain.model, bottom_up_guide, x)
    vae = _vae((6, 4), "bottom-up")
    with pytest.raises(ValueError, match="--inference ladder"):
        make_loss("mean-field").differentiable_loss(vae.model, vae.guide, _binary_data(5))


# --------------------------------------------------------------------------------------------------------
# Sampling, reconstruction and what build_vae rejects
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("latent_dims", LATENT_DIMS)
@pytest.mark.parametrize("mode", MODES)
def test_sample_and_reconstruct_shapes(mode, latent_dims):
    vae = _vae(latent_dims, mode)
    x = _binary_data(5)
    means = vae.sample(7)
    draws = vae.sample(7, mean=False)
    assert means.shape == draws.shape == (7, DATA_DIM)
    assert torch.all((means > 0) & (means < 1))
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    recon = vae.reconstruct(x)
    assert recon.shape == (5, DATA_DIM)
    assert torch.all((recon > 0) & (recon < 1))
    assert vae.num_layers == len(latent_dims) and vae.latent_dim == latent_dims[0]


def test_build_vae_rejects_vamp_prior_with_several_layers():
    with pytest.raises(ValueError, match="vamp"):
        build_vae(ModelConfig(data_dim=DATA_DIM, latent_dims=(6, 4), prior="vamp"))
    build_vae(ModelConfig(data_dim=DATA_DIM, latent_dims=(6,), prior="vamp"))  # one layer is fine


@pytest.mark.parametrize("guide", ["low-rank", "iaf"])
def test_build_vae_rejects_ladder_inference_with_a_non_diagonal_guide(guide):
    with pytest.raises(ValueError, match="diagonal"):
        build_vae(ModelConfig(data_dim=DATA_DIM, latent_dims=(6, 4), inference="ladder", guide=guide))
    # The same guide is accepted for bottom-up inference.
    assert isinstance(
        build_vae(ModelConfig(data_dim=DATA_DIM, latent_dims=(6, 4), inference="bottom-up", guide=guide)),
        HierarchicalVAE,
    )


# --------------------------------------------------------------------------------------------------------
# The layers between latent layers (issue 15): widths, the residual top-down mean, initialization,
# old configurations, the output bias
# --------------------------------------------------------------------------------------------------------


def _linear_shapes(module: torch.nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, torch.nn.Linear)]


def _loc_spread(vae: HierarchicalVAE, num: int = 2000) -> float:
    # How far the mean of p(z1 | z2) moves with z2 ~ N(0, I), relative to the scale of p(z1 | z2).
    z2 = torch.randn(num, vae.latent_dims[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loc, scale = vae.down[0].params(z2)
    return float(loc.std(0).mean() / scale.mean())


def test_burda_network_between_layers_by_default():
    # Burda et al. (2016), section 5: x -> 200 -> 200 -> z1 (100) -> 100 -> 100 -> z2 (50).
    vae = build_vae(
        ModelConfig(data_dim=784, latent_dims=(100, 50), hidden_dims=(200, 200), activation="tanh")
    )
    assert _linear_shapes(vae.encoder) == [(784, 200), (200, 200)]
    assert _linear_shapes(vae.down[0].body) == [(50, 100), (100, 100)]
    assert _linear_shapes(vae.up[0]) == [(100, 100), (100, 100), (100, 50), (100, 50)]
    assert isinstance(vae.down[0].body[1], torch.nn.Tanh)


@pytest.mark.parametrize("mode", MODES)
def test_layer_hidden_dims_build_the_stated_shapes(mode):
    widths = ((7,), (5, 3))
    vae = _vae((6, 4, 2), mode, layer_hidden_dims=widths)
    assert vae.layer_hidden_dims == [[7], [5, 3]]
    # p(z1 | z2): 4 -> 7 -> (loc, scale) of 6; p(z2 | z3): 2 -> 5 -> 3 -> 4, with the 4 x 2 residual path.
    assert _linear_shapes(vae.down[0]) == [(4, 7), (7, 6), (7, 6), (4, 6)]
    assert _linear_shapes(vae.down[1]) == [(2, 5), (5, 3), (3, 4), (3, 4), (2, 4)]
    if mode == "bottom-up":
        assert _linear_shapes(vae.up[0]) == [(6, 7), (7, 4), (7, 4)]
        assert _linear_shapes(vae.up[1]) == [(4, 5), (5, 3), (3, 2), (3, 2)]
    else:
        assert _linear_shapes(vae.ladder_nets[0]) == [(12, 7)]
        assert _linear_shapes(vae.ladder_nets[1]) == [(7, 5), (5, 3)]
        assert _linear_shapes(vae.ladder_heads) == [(12, 12), (7, 8), (3, 4)]
    x = _binary_data(3)
    make_loss("elbo").differentiable_loss(vae.model, vae.guide, x).backward()


@pytest.mark.parametrize(
    "widths, match",
    [
        (((7,),), "one list of widths per pair"),
        (((7,), ()), "at least one width"),
        (((7,), (0,)), "positive"),
    ],
)
def test_config_refuses_wrong_layer_hidden_dims(widths, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(data_dim=DATA_DIM, latent_dims=(6, 4, 2), layer_hidden_dims=widths)


@pytest.mark.parametrize("field, value", [("top_down", "skip"), ("layer_init", "he")])
def test_config_refuses_unknown_top_down_and_init(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(data_dim=DATA_DIM, latent_dims=(6, 4), **{field: value})


def test_residual_mean_starts_as_the_identity_on_the_shared_coordinates():
    vae = _vae((6, 4), "bottom-up")
    layer = vae.down[0]
    torch.testing.assert_close(layer.skip.weight, torch.eye(6, 4), rtol=0, atol=0)
    # Without the MLP head, the mean of p(z1 | z2) is z2 padded with zeros.
    with torch.no_grad():
        layer.loc.weight.zero_()
        layer.loc.bias.zero_()
    z2 = torch.randn(5, 4)
    loc, _ = layer.params(z2)
    torch.testing.assert_close(loc, torch.cat([z2, torch.zeros(5, 2)], dim=-1))


def test_mean_of_p_z1_given_z2_depends_on_z2_at_initialization():
    # Issue 15: with a plain MLP and torch's init the mean moved with z2 by about 0.2 of the scale of
    # p(z1 | z2) (tanh; less with softplus), so z2 started disconnected; the default starts connected.
    config = {"data_dim": 784, "latent_dims": (100, 50), "hidden_dims": (200, 200), "activation": "tanh"}
    old = build_vae(ModelConfig(**config, top_down="plain", layer_init="torch"))
    new = build_vae(ModelConfig(**config))
    assert _loc_spread(old) < 0.3
    assert _loc_spread(new) > 1.0
    # The Jacobian d mu / d z2 [100, 50] at initialization: about 50 singular values near 1 or above.
    jacobian = torch.autograd.functional.jacobian(lambda z: new.down[0].params(z)[0], torch.zeros(50))
    assert int((torch.linalg.svdvals(jacobian) > 0.5).sum()) >= 45


def test_glorot_init_of_the_layers_between_latents():
    vae = _vae((6, 4), "bottom-up", layer_init="glorot", top_down="plain")
    for module in (*vae.down, *vae.up):
        for linear in module.modules():
            if isinstance(linear, torch.nn.Linear):
                bound = (6 / (linear.in_features + linear.out_features)) ** 0.5
                assert linear.weight.abs().max() <= bound
                assert linear.weight.abs().max() > 0.5 * bound
                assert torch.all(linear.bias == 0)


# sha256 of the state dict (names and float32 bytes) that the code before issue 15 built from these
# configs under torch.manual_seed(0): data_dim 16, hidden_dims (12, 12), tanh.
_OLD_DIGESTS = {
    ("bottom-up", (6, 4)): "c48a701d2ef981fbb1cfcdbfad4a644a9f13fb89326d05e8f733ca5d5361d98f",
    ("bottom-up", (6, 4, 2)): "17003d18e8e8f9af57de4e2d543ee414955fe2b95bf3d71f9a8959ca57430515",
    ("ladder", (6, 4)): "92af42fbe3c4fadfbd95a94a25d6b8d79c172ce54a4b9580d9b5c1c26744a02b",
    ("ladder", (6, 4, 2)): "40912b1be22d2e7813e83aec38dfa23c3a36c5a5c13fdb650d92df86e04fe249",
}


@pytest.mark.parametrize("inference, latent_dims", list(_OLD_DIGESTS))
def test_an_old_config_rebuilds_the_same_weights(inference, latent_dims):
    # What ModelConfig.to_dict wrote before the fields of the layers between latents existed.
    saved = {
        "data_dim": 16,
        "latent_dims": list(latent_dims),
        "hidden_dims": [12, 12],
        "prior": "standard-normal",
        "prior_options": {},
        "likelihood": "bernoulli",
        "likelihood_options": {},
        "guide": "diagonal",
        "guide_options": {},
        "network": "mlp",
        "activation": "tanh",
        "inference": inference,
        "image_shape": None,
    }
    config = ModelConfig.from_dict(saved)
    assert config.layer_hidden_dims == ((latent_dims[1],) * 2, *[(d,) * 2 for d in latent_dims[2:]])
    assert (config.top_down, config.layer_init) == ("plain", "torch")
    torch.manual_seed(0)
    vae = build_vae(config)
    digest = hashlib.sha256()
    for name, p in vae.state_dict().items():
        digest.update(name.encode())
        digest.update(p.detach().contiguous().numpy().tobytes())
    assert digest.hexdigest() == _OLD_DIGESTS[(inference, latent_dims)]
    # A config written now keeps its own fields through the round trip.
    assert ModelConfig.from_dict(_vae_config_dict(latent_dims)).top_down == "residual"


def _vae_config_dict(latent_dims: tuple[int, ...]) -> dict:
    return ModelConfig(data_dim=DATA_DIM, latent_dims=latent_dims).to_dict()


def test_config_round_trips_the_layer_fields():
    config = ModelConfig(data_dim=DATA_DIM, latent_dims=(6, 4, 2), layer_hidden_dims=((7,), (5, 3)))
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_init_output_bias_sets_the_logit_of_the_mean_pixel():
    x = torch.rand(50, DATA_DIM, generator=torch.Generator().manual_seed(5))
    x[:, 0] = 0.0  # an always-black pixel gets the clamped, finite logit
    for vae in (_vae((6, 4), "bottom-up"), build_vae(ModelConfig(data_dim=DATA_DIM, latent_dims=(3,)))):
        bias = init_output_bias(vae, x)
        last = vae.decoder[-1]
        expected = torch.logit(x.double().mean(0).clamp(1e-3, 1 - 1e-3)).float()
        torch.testing.assert_close(last.bias, expected)
        torch.testing.assert_close(bias, expected)
        # With the decoder's weights at zero the model is the independent-pixel model of the mean image.
        with torch.no_grad():
            last.weight.zero_()
        torch.testing.assert_close(
            vae.likelihood(vae.decoder(torch.zeros(1, vae.latent_dim))).mean[0, 1:], x.mean(0)[1:]
        )


def test_init_output_bias_refuses_what_it_cannot_set():
    x = torch.rand(10, DATA_DIM)
    with pytest.raises(ValueError, match="bernoulli"):
        init_output_bias(_vae((6, 4), "bottom-up", likelihood="gaussian"), x)
    conv = build_vae(ModelConfig(data_dim=DATA_DIM, latent_dims=(3,), network="conv", image_shape=(4, 4)))
    with pytest.raises(ValueError, match="linear layer"):
        init_output_bias(conv, x)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        init_output_bias(_vae((6, 4), "bottom-up"), 2 * x + 1)
    with pytest.raises(ValueError, match="shape"):
        init_output_bias(_vae((6, 4), "bottom-up"), x[:, :5])


@pytest.mark.parametrize("mode", MODES)
def test_free_bits_clamp_each_layer_of_the_hierarchy_at_its_traced_kl(mode):
    # On the same samples (one particle), free bits = ELBO loss + N * sum_l max(0, lambda - KL_l), with
    # KL_l = mean_i [log q(z_l | ...) - log p(z_l | ...)] read here from a guide trace and the model replayed
    # on it: z1 and z2 below lambda = 40 nats are clamped, and with lambda = 0 the loss is the ELBO's.
    vae = _vae((6, 4), mode)
    x, num_data = _binary_data(10), 50
    pyro.set_rng_seed(3)
    guide_trace, model_trace = _traces(vae, x, num_data=num_data)
    kl = {
        site: float(
            (
                guide_trace.nodes[site]["fn"].log_prob(guide_trace.nodes[site]["value"])
                - model_trace.nodes[site]["fn"].log_prob(guide_trace.nodes[site]["value"])
            )
            .mean()
            .detach()
        )
        for site in ("z1", "z2")
    }
    losses = {}
    for lam in (None, 0.0, 40.0):
        pyro.set_rng_seed(3)
        loss = make_loss("elbo", free_bits=lam)
        losses[lam] = float(loss.differentiable_loss(vae.model, vae.guide, x, num_data=num_data).detach())
    assert all(0 < value < 40 for value in kl.values())
    assert losses[0.0] == pytest.approx(losses[None], rel=1e-6)
    clamp = num_data * sum(40.0 - value for value in kl.values())
    assert losses[40.0] - losses[None] == pytest.approx(clamp, rel=1e-5)


def test_hierarchy_benchmark_smoke_test_runs_its_arms_and_modifiers():
    # benchmarks/hierarchy.py on the digits: a warm-up + free-bits arm and a ladder arm, one epoch each.
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "hierarchy.py"
    done = subprocess.run(
        [sys.executable, str(script), "--smoke-test", "--arms", "default+warmup+fb0.5,ladder-2-warmup"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["arm"] for r in results] == ["default+warmup+fb0.5", "ladder-2-warmup"]
    assert results[0]["fit"] == {"lr": 1e-3, "warmup_epochs": 1, "free_bits": 0.5}
    assert all(len(r["layers"]) == 2 for r in results)
