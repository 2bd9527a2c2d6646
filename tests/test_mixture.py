"""Discrete latents summed out by enumeration: the Gaussian-mixture VAE, TraceEnum_ELBO, and exact evaluation.

Known answers:

* a linear-Gaussian mixture, c ~ Categorical(pi), z | c ~ N(mu_c, diag sigma_c^2), x | z ~ N(W z + b,
  diag s^2), whose marginal is sum_c pi_c N(x; W mu_c + b, W Sigma_c W^T + diag s^2): with the exact
  posterior q(c | x) q(z | x, c) as guide every enumerated weight is p(x), so log p(x), the ELBO and
  TraceEnum_ELBO's loss are exact to 1e-6 at any K; the same model with c summed in the model alone
  and the exact mixture posterior q(z | x) as guide, likewise; an inexact guide lands within standard errors;
* a Bernoulli mixture whose only latent is c: exact without sampling, whatever the guide.

Refusals: a guide whose discrete site does not match the model's, a discrete site the guide leaves out
without the enumerate flag, enumeration of a continuous site, sequential enumeration, an enumerated site
in a plate besides the data plate, code that does not broadcast over the enumerated values, and the
objectives that cannot sum a site out (mean-field; iwae for a site the guide enumerates).

The contract: every registered likelihood (and guide head, and network) under the mixture VAE trains by
SVI, the loss chosen being TraceEnum_ELBO with Pyro's validation on, and gets a finite log p(x).
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Iterator

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI
from torch import nn

from pyro_vae import (
    GUIDES,
    LIKELIHOODS,
    NETWORKS,
    ModelConfig,
    PyroVAEError,
    data_plate,
    evaluate_bounds,
    make_loss,
)
from pyro_vae.inference import validate_pair
from pyro_vae.inference.traces import traced_weights
from pyro_vae.models import abilities
from pyro_vae.models.mixture import MixtureVAE, build_mixture_vae
from pyro_vae.objectives.enum import Enum_ELBO
from tests.test_contract import DATA_DIM, NUM_DATA, check_trains_and_scores, config, data_for

ENUM = {"enumerate": "parallel"}


@pytest.fixture
def float64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# --------------------------------------------------------------------------------------------------------
# A linear-Gaussian mixture and its exact posterior
# --------------------------------------------------------------------------------------------------------


class LinearGaussianMixture(nn.Module):
    """c ~ Cat(pi); z | c ~ N(mu_c, diag sigma_c^2); x | z ~ N(W z + b, diag s^2); guide per ``guide=``.

    ``guide="exact"``: q(c | x) q(z | x, c), both the exact posterior, c enumerated in both.
    ``guide="model-only"``: c enumerated in the model alone, q(z | x) the exact mixture posterior.
    ``guide="wide"``: the exact q(c | x) and q(z | x, c) with twice the posterior scale.
    ``guide="model-only-normal"``: c enumerated in the model alone, q(z | x) a wide Normal.
    """

    def __init__(self, *, C: int = 3, d: int = 2, p: int = 4, seed: int = 0, guide: str = "exact") -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.log_pi = torch.log_softmax(torch.randn(C, generator=g), 0)  # [C]
        self.mu = 2 * torch.randn(C, d, generator=g)  # [C, d]
        self.sigma = 0.5 + torch.rand(C, d, generator=g)  # [C, d]
        self.W = torch.randn(p, d, generator=g)  # [p, d]
        self.b = torch.randn(p, generator=g)  # [p]
        self.s = 0.3 + torch.rand(p, generator=g)  # [p]
        self.C, self.kind = C, guide

    def sample_x(self, n: int, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        c = torch.multinomial(self.log_pi.exp(), n, replacement=True, generator=g)
        z = self.mu[c] + self.sigma[c] * torch.randn(n, self.mu.shape[1], generator=g)
        return z @ self.W.T + self.b + self.s * torch.randn(n, self.W.shape[0], generator=g)

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        """The closed form: logsumexp_c log pi_c + log N(x; W mu_c + b, W Sigma_c W^T + diag s^2): [N]."""
        cov = self.W @ torch.diag_embed(self.sigma**2) @ self.W.T + torch.diag(self.s**2)  # [C, p, p]
        marginal = dist.MultivariateNormal(self.mu @ self.W.T + self.b, covariance_matrix=cov)  # batch [C]
        return torch.logsumexp(self.log_pi + marginal.log_prob(x.unsqueeze(-2)), -1)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """p(c | x) logits [M, C], E[z | x, c] [M, C, d], and the Cholesky factor of Cov[z | x, c] [C, d, d]."""
        precision = torch.diag_embed(self.sigma**-2) + self.W.T @ torch.diag(self.s**-2) @ self.W  # [C, d, d]
        cov = torch.linalg.inv(precision)
        rhs = self.mu / self.sigma**2 + (((x - self.b) / self.s**2) @ self.W).unsqueeze(-2)  # [M, C, d]
        means = (cov @ rhs.unsqueeze(-1)).squeeze(-1)  # [M, C, d]
        cov_x = self.W @ torch.diag_embed(self.sigma**2) @ self.W.T + torch.diag(self.s**2)
        marginal = dist.MultivariateNormal(self.mu @ self.W.T + self.b, covariance_matrix=cov_x)
        logits = self.log_pi + marginal.log_prob(x.unsqueeze(-2))  # [M, C]
        return logits, means, torch.linalg.cholesky(cov)

    def model(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        with data_plate(x, num_data):
            c = pyro.sample("c", dist.Categorical(logits=self.log_pi), infer=ENUM)
            z = pyro.sample("z", dist.Normal(self.mu[c], self.sigma[c]).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.s).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        logits, means, tril = self.posterior(x)
        with data_plate(x, num_data):
            if self.kind == "model-only":
                # p(z | x) = sum_c p(c | x) N(z; m_c(x), V_c): the exact posterior with c summed out.
                mix = dist.MixtureSameFamily(
                    dist.Categorical(logits=logits), dist.MultivariateNormal(means, scale_tril=tril)
                )
                pyro.sample("z", mix)
                return
            if self.kind == "model-only-normal":
                # A reparameterized stand-in: the posterior's mean and twice its largest standard deviation.
                probs = torch.softmax(logits, -1).unsqueeze(-1)  # [M, C, 1]
                mean = (probs * means).sum(-2)  # [M, d]
                spread = (probs * (means - mean.unsqueeze(-2)) ** 2).sum(-2) + tril.pow(2).sum(-1).max(
                    0
                ).values
                pyro.sample("z", dist.Normal(mean, 2 * spread.sqrt()).to_event(1))
                return
            c = pyro.sample("c", dist.Categorical(logits=logits), infer=ENUM)  # [M] or [C, 1, 1]
            onehot = nn.functional.one_hot(c, self.C).to(means.dtype).unsqueeze(-1)  # [..., M?, C, 1]
            loc = (onehot * means).sum(-2)  # E[z | x, c]: [..., M, d]
            scale_tril = tril[c] * (2.0 if self.kind == "wide" else 1.0)  # [..., d, d]
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale_tril))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("guide", ["exact", "model-only"])
def test_exact_guide_gives_the_closed_form_log_px_of_a_linear_gaussian_mixture(float64, guide, seed):
    lgm = LinearGaussianMixture(seed=seed, guide=guide)
    x = lgm.sample_x(7)
    truth = lgm.log_px(x)
    # The closed form is itself right: against a sum over c of scipy-free Gaussian marginals by Monte Carlo
    # would be weak, so against the same formula term by term.
    terms = torch.stack(
        [
            lgm.log_pi[c]
            + dist.MultivariateNormal(
                lgm.W @ lgm.mu[c] + lgm.b,
                lgm.W @ torch.diag(lgm.sigma[c] ** 2) @ lgm.W.T + torch.diag(lgm.s**2),
            ).log_prob(x)
            for c in range(lgm.C)
        ]
    )
    torch.testing.assert_close(truth, torch.logsumexp(terms, 0))
    for num_samples, chunk_size in ((1, 1), (10, 3)):
        bounds = evaluate_bounds(lgm.model, lgm.guide, x, num_samples=num_samples, chunk_size=chunk_size)
        torch.testing.assert_close(bounds.log_px, truth, atol=1e-6, rtol=0)
        # The exact posterior leaves no KL: the ELBO (q(c | x)-weighted, as TraceEnum_ELBO's) is log p(x) too.
        torch.testing.assert_close(bounds.elbo, truth, atol=1e-6, rtol=0)
        for k, iwae in bounds.iwae.items():
            torch.testing.assert_close(iwae, truth, atol=1e-6, rtol=0, msg=f"IWAE-{k}")
    # TraceEnum_ELBO, chosen by make_loss("elbo"), gives the same exact number summed over the data.
    loss = make_loss("elbo", num_particles=3)
    assert math.isclose(loss.loss(lgm.model, lgm.guide, x), -float(truth.sum()), rel_tol=0, abs_tol=1e-6)


def test_wide_guide_estimate_is_within_standard_errors_and_its_elbo_is_the_enumerated_elbo(float64):
    lgm = LinearGaussianMixture(seed=2, guide="wide")
    x = lgm.sample_x(5)
    truth = lgm.log_px(x)
    bounds = evaluate_bounds(lgm.model, lgm.guide, x, num_samples=4000, chunk_size=1000)
    z_scores = (bounds.log_px - truth) / bounds.log_px_stderr
    assert (z_scores.abs() < 5).all(), z_scores
    assert (bounds.log_px_stderr > 0).all() and (bounds.elbo < truth).all()
    # The ELBO in closed form: log p(x) - KL(q(c|x) q(z|x,c) || p(c|x) p(z|x,c)), q(c|x) exact, so
    # log p(x) - sum_c p(c|x) KL(N(m_c, 4 V_c) || N(m_c, V_c)) = log p(x) - (d/2)(4 - 1 - log 4).
    d = lgm.mu.shape[1]
    expected = truth - d / 2 * (4 - 1 - math.log(4))
    # Per draw, log w - E log w = -1.5 (|eps|^2 - d) with eps ~ N(0, I_d): sd 1.5 sqrt(2 d) = 3; five sd of the mean.
    torch.testing.assert_close(bounds.elbo, expected, atol=5 * 3 / math.sqrt(4000), rtol=0)
    # IWAE-k rises with k towards log p(x).
    ks = sorted(bounds.iwae)
    assert all((bounds.iwae[a] <= bounds.iwae[b] + 1e-3).all() for a, b in itertools.pairwise(ks))
    assert bounds.khat is not None and torch.isfinite(bounds.khat).all()


def test_components_are_enumerated_in_one_vectorized_pass(float64):
    """Every particle holds one z per component: the guide's z site has the shape [C, K, M, d]."""
    lgm = LinearGaussianMixture(seed=0, guide="wide")
    x = lgm.sample_x(6)
    guide = pyro.poutine.trace(lgm.guide)
    weights = traced_weights(lgm.model, guide, x, num_samples=5, max_plate_nesting=1)
    assert weights.log_w.shape == weights.elbo.shape == (5, 6)
    assert tuple(guide.trace.nodes["c"]["value"].shape) == (lgm.C, 1, 1)
    assert tuple(guide.trace.nodes["z"]["value"].shape) == (lgm.C, 5, 6, 2)


# --------------------------------------------------------------------------------------------------------
# A model whose only latent is discrete: a Bernoulli mixture
# --------------------------------------------------------------------------------------------------------


class BernoulliMixture(nn.Module):
    """c ~ Cat(pi); x | c ~ Bernoulli(theta_c) per pixel. The guide: q(c | x) uniform, or nothing (model-only)."""

    def __init__(self, *, model_only: bool = False, C: int = 4, D: int = 6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.log_pi = torch.log_softmax(torch.randn(C, generator=g), 0)
        self.theta = torch.rand(C, D, generator=g) * 0.9 + 0.05
        self.model_only, self.C = model_only, C

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        per_c = dist.Bernoulli(self.theta).to_event(1).log_prob(x.unsqueeze(-2))  # [N, C]
        return torch.logsumexp(self.log_pi + per_c, -1)

    def model(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        with data_plate(x, num_data):
            c = pyro.sample("c", dist.Categorical(logits=self.log_pi), infer=ENUM)
            pyro.sample("x", dist.Bernoulli(self.theta[c]).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        if self.model_only:
            return
        with data_plate(x, num_data):
            pyro.sample("c", dist.Categorical(logits=x.new_zeros(self.C)), infer=ENUM)


@pytest.mark.parametrize("model_only", [False, True], ids=["guide enumerates c", "model alone enumerates c"])
def test_a_model_with_only_a_discrete_latent_is_scored_exactly_without_sampling(float64, model_only):
    mixture = BernoulliMixture(model_only=model_only)
    x = torch.bernoulli(torch.full((9, 6), 0.5), generator=torch.Generator().manual_seed(0))
    truth = mixture.log_px(x)
    bounds = evaluate_bounds(mixture.model, mixture.guide, x, num_samples=3)
    torch.testing.assert_close(bounds.log_px, truth, atol=1e-12, rtol=0)
    torch.testing.assert_close(bounds.log_px_stderr, torch.zeros(9), atol=1e-12, rtol=0)
    # The ELBO of a uniform q(c | x): sum_c q(c) [log p(x, c) - log q(c)]; with c in the model alone, log p(x).
    joint = mixture.log_pi + dist.Bernoulli(mixture.theta).to_event(1).log_prob(x.unsqueeze(-2))  # [N, C]
    elbo = truth if model_only else (joint + math.log(mixture.C)).mean(-1)
    torch.testing.assert_close(bounds.elbo, elbo, atol=1e-12, rtol=0)
    assert math.isclose(
        make_loss("elbo").loss(mixture.model, mixture.guide, x), -float(elbo.sum()), abs_tol=1e-9
    )


# --------------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------------


class _Pair(nn.Module):
    """A two-site mixture (c, z) whose guide is varied by keyword to make one mistake at a time."""

    def __init__(self, **mistake: object) -> None:
        super().__init__()
        self.mistake = mistake
        self.net = nn.Linear(3, 2)

    def model(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        how = self.mistake.get("model_infer", ENUM)
        with data_plate(x, num_data):
            if self.mistake.get("inner_plate"):
                with pyro.plate("pixels", 3, dim=-2):
                    pyro.sample("c", dist.Categorical(logits=torch.zeros(3, 1, 4)), infer=ENUM)
                c = torch.zeros((), dtype=torch.long)
            elif self.mistake.get("model_normal"):
                c = pyro.sample("c", dist.Normal(0.0, 1.0), infer={})
                c = torch.zeros((), dtype=torch.long)
            else:
                c = pyro.sample("c", dist.Categorical(logits=torch.zeros(4)), infer=how)
            z = pyro.sample(
                "z", dist.Normal(torch.arange(4.0)[c].unsqueeze(-1).expand(*c.shape, 2), 1.0).to_event(1)
            )
            pyro.sample(
                "x", dist.Normal(z.sum(-1, keepdim=True).expand(*z.shape[:-1], 3), 1.0).to_event(1), obs=x
            )

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        pyro.module("net", self.net)
        categories = self.mistake.get("categories", 4)
        with data_plate(x, num_data):
            if self.mistake.get("inner_plate"):
                with pyro.plate("pixels", 3, dim=-2):
                    pyro.sample("c", dist.Categorical(logits=torch.zeros(3, 1, 4)), infer=ENUM)
            elif self.mistake.get("guide_normal"):
                pyro.sample("c", dist.Normal(torch.zeros(x.shape[0]), 1.0), infer=ENUM)
            elif not self.mistake.get("no_c"):
                infer = self.mistake.get("guide_infer", ENUM)
                c = pyro.sample("c", dist.Categorical(logits=torch.zeros(categories)), infer=infer)
                if self.mistake.get("no_broadcast"):
                    # Uses c as if it had the data's shape [M]: breaks when it is [C, 1, 1].
                    loc = torch.cat([self.net(x), c.float().reshape(-1, 1)], -1)[:, :2]
                    pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
                    return
            pyro.sample("z", dist.Normal(self.net(x), 1.0).to_event(1))


REFUSALS = {
    "the guide's c has 3 categories, the model's 4": ({"categories": 3}, "same values"),
    "a discrete site missing from the guide, no enumerate flag": (
        {"no_c": True, "model_infer": {}},
        "infer={'enumerate': 'parallel'}",
    ),
    "the guide enumerates a Normal": (
        {"guide_normal": True, "model_normal": True},
        "no finite set of values",
    ),
    "the guide enumerates c, the model draws it from a Normal": ({"model_normal": True}, "no finite set"),
    "sequential enumeration": ({"guide_infer": {"enumerate": "sequential"}}, "'parallel'"),
    "an enumerated site in a plate besides the data plate": ({"inner_plate": True}, "besides the data plate"),
    "a guide that does not broadcast over the enumerated values": ({"no_broadcast": True}, "broadcast"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_validate_pair_refuses_enumeration_it_cannot_sum_out_exactly(case):
    mistake, words = REFUSALS[case]
    pair = _Pair(**mistake)
    x = torch.randn(5, 3)
    with pytest.raises(PyroVAEError, match=words.replace("(", r"\(").replace("[", r"\[").replace("{", r"\{")):
        validate_pair(pair.model, pair.guide, x)
    # Neither the evaluator nor the training loss gets a number out of it.
    with pytest.raises(PyroVAEError):
        evaluate_bounds(pair.model, pair.guide, x, num_samples=2)
    with pytest.raises(PyroVAEError):
        make_loss("elbo").differentiable_loss(pair.model, pair.guide, x)


def test_a_matching_pair_passes_and_is_named_enumerated():
    pair = _Pair()
    structure = validate_pair(pair.model, pair.guide, torch.randn(5, 3))
    assert structure.enumerated == structure.enumerated_in_guide == ("c",)
    # The same model with c left to the model alone (the guide draws z only) is a valid pair too.
    structure = validate_pair(pair.model, _Pair(no_c=True).guide, torch.randn(5, 3))
    assert structure.enumerated == ("c",) and structure.enumerated_in_guide == ()


@pytest.mark.parametrize(
    ("loss", "words"),
    [("mean-field", "cannot sum the enumerated"), ("iwae", "only inside each weight")],
)
def test_objectives_that_cannot_sum_a_guide_site_out_refuse_it(loss, words):
    vae = build_mixture_vae(config(), num_components=3)
    x = data_for(ModelConfig(data_dim=DATA_DIM).likelihood)
    with pytest.raises(PyroVAEError, match=words):
        make_loss(loss).differentiable_loss(vae.model, vae.guide, x)


def test_iwae_with_a_site_the_model_alone_enumerates_tends_to_the_closed_form_log_px(float64):
    """IWAE-K = log (1/K) sum_k sum_c p(x, z_k, c) / q(z_k | x): far above the ELBO, and log p(x) at large K."""
    lgm = LinearGaussianMixture(seed=0, guide="model-only-normal")
    x = lgm.sample_x(4)
    truth = float(lgm.log_px(x).sum())
    iwae = -make_loss("iwae", num_particles=20000).loss(lgm.model, lgm.guide, x)
    elbo = -make_loss("iwae", num_particles=1).loss(lgm.model, lgm.guide, x)
    # One draw of IWAE-K may lie above log p(x) (it is below on average): within five of its standard errors,
    # the delta-method error of the same estimator in the evaluator (whose weights are the bound's).
    stderr = evaluate_bounds(lgm.model, lgm.guide, x, num_samples=20000).log_px_stderr
    tolerance = 5 * float(stderr.pow(2).sum().sqrt())
    assert elbo < iwae and abs(iwae - truth) < tolerance < 0.1, (elbo, iwae, truth, tolerance)


def test_the_enumerated_elbo_and_its_gradient_are_exact_for_a_bernoulli_mixture(float64):
    """TraceEnum_ELBO = sum_c q(c) [log p(x, c) - log q(c)] with no sampling: value and gradient in closed form."""
    mixture = BernoulliMixture()
    x = torch.bernoulli(torch.full((5, 6), 0.5), generator=torch.Generator().manual_seed(1))
    weight = torch.randn(6, mixture.C, generator=torch.Generator().manual_seed(2), requires_grad=True)

    def guide(x: torch.Tensor, *, num_data: int | None = None) -> None:
        with data_plate(x, num_data):
            pyro.sample("c", dist.Categorical(logits=x @ weight), infer=ENUM)

    loss = make_loss("elbo", num_particles=2).differentiable_loss(mixture.model, guide, x)
    (grad,) = torch.autograd.grad(loss, weight)
    joint = mixture.log_pi + dist.Bernoulli(mixture.theta).to_event(1).log_prob(x.unsqueeze(-2))  # [N, C]
    log_q = torch.log_softmax(x @ weight, -1)
    expected = -(log_q.exp() * (joint - log_q)).sum()
    (expected_grad,) = torch.autograd.grad(expected, weight)
    torch.testing.assert_close(loss, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=1e-10, rtol=0)


def test_iwae_sums_a_site_the_model_alone_enumerates_inside_each_weight(float64):
    """For c in the model alone, IWAE-K = log (1/K) sum_k sum_c p(x, z_k, c) / q(z_k | x): trains, and is exact
    for the exact posterior (a mixture, which has no rsample, so here scored by the evaluator's same weights)."""
    pair = _Pair()
    guide = _Pair(no_c=True).guide
    x = torch.randn(5, 3)
    svi = SVI(pair.model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=make_loss("iwae", num_particles=4))
    assert all(math.isfinite(svi.step(x)) for _ in range(2))


# --------------------------------------------------------------------------------------------------------
# The mixture VAE and the contract
# --------------------------------------------------------------------------------------------------------


def _mixture_cases() -> dict[str, dict[str, object]]:
    cases: dict[str, dict[str, object]] = {f"likelihood={n}": {"likelihood": n} for n in LIKELIHOODS.names()}
    cases.update({f"guide={n}": {"guide": n} for n in GUIDES.names()})
    cases.update({f"network={n}": {"network": n} for n in NETWORKS.names()})
    return cases


MIXTURE_CASES = _mixture_cases()


@pytest.mark.parametrize("case", MIXTURE_CASES)
def test_every_registered_component_under_the_mixture_vae_trains_by_enumeration_and_is_scored(case):
    fields = MIXTURE_CASES[case]
    vae = build_mixture_vae(config(**fields), num_components=3)
    x = data_for(str(fields.get("likelihood", ModelConfig(data_dim=DATA_DIM).likelihood)))
    chosen = make_loss("elbo").choose(vae.model, vae.guide, (x,), {})
    assert isinstance(chosen, Enum_ELBO)
    # Pyro's validation is on (conftest): TraceEnum_ELBO checks the enumerated shapes at every step, and a
    # warning (say, that a site was not enumerated) fails the test.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        check_trains_and_scores(vae, x)


def test_the_mixture_vae_has_the_abilities_every_consumer_asks_for():
    vae = build_mixture_vae(config(), num_components=3)
    x = data_for(ModelConfig(data_dim=DATA_DIM).likelihood)
    assert isinstance(vae, MixtureVAE)
    assert abilities.latent_sites(vae, x) == ("z",)
    probs = vae.component_probs(x)
    assert probs.shape == (NUM_DATA, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(NUM_DATA))
    # The posterior mean is sum_c q(c | x) E[z | x, c]: against the derivation from vectorized guide draws.
    derived = abilities.guide_means(vae.guide, x, sites=("z",), num_samples=4000)["z"]
    torch.testing.assert_close(vae.posterior_means(x)["z"], derived, atol=0.1, rtol=0)
    assert abilities.decode(vae, vae.posterior_means(x)).shape == x.shape
    assert abilities.sample_latents(vae, 5)["z"].shape == (5, 3)
    with pytest.raises(PyroVAEError):
        abilities.check_data(vae, x[:, :5])


def test_the_compiled_loss_equals_the_eager_one_on_the_mixture_vae():
    vae = build_mixture_vae(config(), num_components=3)
    x = data_for(ModelConfig(data_dim=DATA_DIM).likelihood)
    values = {}
    for jit in (False, True):
        loss = make_loss("elbo", num_particles=2, jit=jit)
        torch.manual_seed(1)
        with warnings.catch_warnings():
            # JitELBO checks its graph against the eager loss on the first call, and warns if they differ.
            warnings.filterwarnings("error", message="the jit-compiled loss")
            values[jit] = [
                float(loss.differentiable_loss(vae.model, vae.guide, x).detach()) for _ in range(3)
            ]
    for eager, compiled in zip(values[False], values[True], strict=True):
        assert math.isclose(eager, compiled, rel_tol=1e-5)


def test_the_mixture_vae_trains_through_fit_and_its_test_elbo_sums_c_out():
    from pyro_vae import fit

    vae = build_mixture_vae(config(), num_components=3)
    x = data_for(ModelConfig(data_dim=DATA_DIM).likelihood)
    result = fit(vae, x, test=x, epochs=2, batch_size=6, progress=False)
    assert all(math.isfinite(r.train_elbo) and math.isfinite(r.test_elbo) for r in result.history)


# --------------------------------------------------------------------------------------------------------
# The export: c as a categorical variable with its posterior probabilities
# --------------------------------------------------------------------------------------------------------


def test_the_export_of_the_exact_mixture_posterior_holds_c_and_the_exact_probabilities(float64):
    from pyro_vae.io.export import to_inference_data

    lgm = LinearGaussianMixture(seed=0, guide="exact")
    x = lgm.sample_x(6)
    data = to_inference_data(lgm.model, lgm.guide, x, num_samples=30, seed=2)
    stats = data["sample_stats"]
    truth = lgm.log_px(x).numpy()
    exact_probs = torch.softmax(lgm.posterior(x)[0], -1).numpy()  # p(c | x): [N, C]
    assert abs(stats["log_px"].values - truth).max() < 1e-6
    # Every weight is p(x): W_k = sum_c p(x, c), and the identity log w = log p(x|z) + log p(z, c) - log q holds.
    assert abs(stats["log_weight"].values[0] - truth).max() < 1e-6
    recomposed = data["log_likelihood"]["x"].values + stats["log_prior"].values - stats["log_q"].values
    assert abs(recomposed - stats["log_weight"].values).max() < 1e-9
    assert abs(stats["c_probs"].values - exact_probs).max() < 1e-9
    assert abs(stats["c_guide_probs"].values - exact_probs).max() < 1e-9
    c = data["posterior"]["c"].values
    assert c.shape == (1, 30, 6) and c.min() >= 0 and c.max() < lgm.C
    assert data["posterior"]["z"].values.shape == (1, 30, 6, 2)


def test_the_export_draws_the_evaluators_samples_and_leaves_its_stream_alone(float64):
    from pyro_vae.io.export import to_inference_data

    lgm = LinearGaussianMixture(seed=1, guide="wide")
    x = lgm.sample_x(5)
    data = to_inference_data(lgm.model, lgm.guide, x, num_samples=40, seed=7, chunk_size=15)
    torch.manual_seed(7)
    bounds = evaluate_bounds(lgm.model, lgm.guide, x, num_samples=40, chunk_size=15)
    assert abs(data["sample_stats"]["log_px"].values - bounds.log_px.numpy()).max() < 1e-9
    # c_k is drawn in proportion to w_k^c: a properly weighted draw of p(c | x), whose weighted frequency
    # resamples the estimate c_probs (so it lies near it; c drawn from q(c | x) or uniformly would not).
    weights = torch.softmax(torch.as_tensor(data["sample_stats"]["log_weight"].values[0]), 0)  # [K, n]
    c = torch.as_tensor(data["posterior"]["c"].values[0])  # [K, n]
    frequency = torch.stack([(weights * (c == k)).sum(0) for k in range(lgm.C)], -1)  # [n, C]
    probs = torch.as_tensor(data["sample_stats"]["c_probs"].values)
    assert (frequency - probs).abs().max() < 0.35  # a 40-draw resample of those probabilities
    assert torch.allclose(probs.sum(-1), torch.ones(5))


def test_the_export_of_a_site_the_model_alone_enumerates(float64):
    from pyro_vae.io.export import to_inference_data

    mixture = BernoulliMixture(model_only=True)
    x = torch.bernoulli(torch.full((4, 6), 0.5), generator=torch.Generator().manual_seed(0))
    data = to_inference_data(mixture.model, mixture.guide, x, num_samples=3, seed=0)
    joint = mixture.log_pi + dist.Bernoulli(mixture.theta).to_event(1).log_prob(x.unsqueeze(-2))  # [N, C]
    assert abs(data["sample_stats"]["c_probs"].values - torch.softmax(joint, -1).numpy()).max() < 1e-12
    assert abs(data["sample_stats"]["log_px"].values - mixture.log_px(x).numpy()).max() < 1e-12
    assert "c_guide_probs" not in data["sample_stats"] and data["posterior"]["c"].values.shape == (1, 3, 4)


# --------------------------------------------------------------------------------------------------------
# The command line, the picture and the export of a run
# --------------------------------------------------------------------------------------------------------


def test_the_command_line_trains_plots_and_exports_a_mixture_vae(tmp_path, capsys):
    from pyro_vae import load_run
    from pyro_vae.cli import main
    from pyro_vae.io.arviz_compat import read_netcdf
    from pyro_vae.models.mixture import GMVAE
    from pyro_vae.plots import plot_components

    out = tmp_path / "gmvae"
    options = ["num_components=3", "latent_dim=2", "hidden_dims=16"]
    # The package's model by name: the run folder keeps it as the module and class it names.
    argv = ["train", "--model", "gmvae", "--epochs", "1", "--eval-samples", "20"]
    for option in options:
        argv += ["--model-option", option]
    assert main([*argv, "--batch-size", "256", "--out", str(out)]) == 0
    assert "log p(x)" in capsys.readouterr().out
    entry = json.loads((out / "config.json").read_text())["model"]
    assert (entry["kind"], entry["module"], entry["class"]) == ("module", "pyro_vae.models.mixture", "GMVAE")
    run = load_run(out)
    assert isinstance(run.vae, GMVAE) and run.vae.num_components == 3 and run.vae.latent_dim == 2
    assert plot_components(run, tmp_path / "components.png").stat().st_size > 0
    # pyro-vae plot draws the components figure for a model with a component (and only for one).
    assert main(["plot", str(out), "--out", str(tmp_path / "plots"), "--khat-samples", "0"]) == 0
    assert (tmp_path / "plots" / "components.png").stat().st_size > 0
    assert (
        main(["export", str(out), "--out", str(tmp_path / "g.nc"), "--num-samples", "30", "--limit", "5"])
        == 0
    )
    data = read_netcdf(tmp_path / "g.nc")
    assert data["posterior"]["c"].shape == (1, 30, 5)
    assert data["sample_stats"]["c_probs"].shape == data["sample_stats"]["c_guide_probs"].shape == (5, 3)


def test_the_component_picture_refuses_a_model_without_a_discrete_component():
    import types

    from pyro_vae import build_vae
    from pyro_vae.plots import plot_components

    with pytest.raises(abilities.AbilityMissing, match="component_probs"):
        plot_components(types.SimpleNamespace(vae=build_vae(config())), "unused.png")  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["is", "ais", "bdmc", "gaps"])
def test_importance_sampling_scores_the_mixture_vae_and_the_hmc_evaluators_refuse_its_discrete_site(method):
    from pyro_vae.inference.evaluators import EVALUATORS, EvaluationOptions, run_evaluator

    assert set(EVALUATORS.names()) == {"is", "ais", "bdmc", "gaps"}  # a new evaluator must be added here
    vae = build_mixture_vae(config(), num_components=3)
    x = data_for(ModelConfig(data_dim=DATA_DIM).likelihood)
    options = EvaluationOptions(num_samples=20, chunk_size=20, progress=False)
    if method == "is":
        assert math.isfinite(run_evaluator(method, vae, x, options=options).summary["log_px"])
        return
    with pytest.raises(PyroVAEError, match="discrete"):
        run_evaluator(method, vae, x, options=options)


# --------------------------------------------------------------------------------------------------------
# The semi-supervised M2 model: y observed where labelled, enumerated elsewhere
# --------------------------------------------------------------------------------------------------------


def _m2(num_classes: int = 2, data_dim: int = 16) -> nn.Module:
    from pyro_vae.components.guides import DiagonalNormal
    from pyro_vae.components.likelihoods import LIKELIHOODS as likelihoods
    from pyro_vae.components.nets import MLP
    from pyro_vae.models.semisupervised import SemiSupervisedVAE

    encoder = MLP(data_dim, [16])
    return SemiSupervisedVAE(
        num_classes=num_classes,
        latent_dim=2,
        likelihood=likelihoods.get("bernoulli")(data_dim=data_dim),
        encoder=encoder,
        guide_head=DiagonalNormal(feature_dim=encoder.out_dim + num_classes, latent_dim=2),
        decoder=MLP(2 + num_classes, [16], data_dim),
        alpha=5.0,
    )


def _two_prototypes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary images near all-zeros (class 0) or all-ones (class 1), 10% of pixels flipped."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    flips = torch.bernoulli(torch.full((n, 16), 0.1), generator=g)
    return (y.unsqueeze(-1).float() - flips).abs(), y


def test_m2_learns_from_labelled_and_unlabelled_batches_and_scores_unlabelled_data_exactly_over_y():
    m2 = _m2()
    x_lab, y_lab = _two_prototypes(8, seed=0)
    x_unl, y_unl = _two_prototypes(64, seed=1)
    elbo = make_loss("elbo")
    optim = pyro.optim.Adam({"lr": 3e-2})
    svi = SVI(m2.model, m2.guide, optim, loss=elbo)
    aux = SVI(m2.classifier_model, m2.no_guide, optim, loss=make_loss("elbo"))
    # The first call is labelled, (x, y), which the loss cannot inspect: the unlabelled call after it must
    # still find the enumerated y and sum it out (TraceEnum_ELBO), not sample it.
    losses = [svi.step(x_lab, y_lab), svi.step(x_unl)]
    assert isinstance(elbo.choose(m2.model, m2.guide, (x_unl,), {}), Enum_ELBO)
    for _ in range(150):
        losses += [svi.step(x_lab, y_lab, num_data=72), svi.step(x_unl, num_data=72), aux.step(x_lab, y_lab)]
    assert all(math.isfinite(v) for v in losses)
    accuracy = float((m2.predict(x_unl) == y_unl).double().mean())
    assert accuracy > 0.9, accuracy  # two prototypes 80% of pixels apart: eight labels suffice
    # Unlabelled, the pair is a model of the contract: log p(x) = log sum_y p(y) ∫ p(z) p(x | y, z) dz.
    bounds = evaluate_bounds(m2.model, m2.guide, x_unl, num_samples=50)
    assert torch.isfinite(bounds.log_px).all() and (bounds.elbo <= bounds.log_px + 1e-9).all()
    assert validate_pair(m2.model, m2.guide, x_unl).enumerated_in_guide == ("y",)


def test_m2_posterior_mean_sums_the_classes_like_the_guides_own_draws():
    # sum_y q(y | x) E[z | x, y], computed once for both models (mixed_guide_means), against the mean of
    # vectorized draws of the M2 guide with y left to q(y | x).
    from pyro_vae.models import abilities

    pyro.set_rng_seed(0)
    vae = _m2(data_dim=16, num_classes=3)
    x, _ = _two_prototypes(7, seed=5)
    derived = abilities.guide_means(vae.guide, x, sites=("z",), num_samples=4000)["z"]
    torch.testing.assert_close(vae.posterior_means(x)["z"], derived, atol=0.1, rtol=0)
