"""Known-answer tests for annealed importance sampling (:func:`pyro_vae.inference.ais`).

* With the exact posterior as guide every weight increment is (β_t - β_{t-1}) log p(x), so AIS
  must return log p(x) to rounding at any schedule: this checks the weight bookkeeping, the
  traced log-densities (a guide whose second site depends on the first included) and the
  HMC moves (which must not break it).
* From a deliberately poor proposal, AIS converges to the closed-form log p(x) of a
  linear-Gaussian model as the steps grow (within 0.05 nats at the default schedule), from
  the guide or from the prior.
* Non-conjugate models are checked against quadrature: a Bernoulli decoder with a 1-D or 2-D
  latent, and a positive (Gamma) latent, which the chains move in log space with the
  Jacobian of exp.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vae.errors import PyroVAEError
from pyro_vae.inference import AnnealingSettings, ais, annealing_schedule
from tests.conftest import requires_cuda
from tests.test_evaluation_known_answer import BernoulliDecoder, GaussianChain, LinearGaussian

# Known answers are compared in double precision (conftest's fixture; pyro_state clears the store and seeds).
pytestmark = pytest.mark.usefixtures("float64")


def poor_guide(x: torch.Tensor) -> None:
    """N(1, 2² I) for every datum: nowhere near the posterior (its IS estimate is off by nats)."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.ones(x.shape[0], 2), 2.0).to_event(1))


@pytest.mark.parametrize("kind", ["sigmoid", "geometric", "linear"])
@pytest.mark.parametrize("num_steps", [1, 2, 7, 100])
def test_schedules_rise_from_zero_to_one(kind, num_steps):
    betas = annealing_schedule(num_steps, kind=kind)
    assert betas.shape == (num_steps + 1,) and betas.dtype == torch.float64
    assert betas[0] == 0 and betas[-1] == 1
    assert (betas.diff() > 0).all()


def test_sigmoid_schedule_is_denser_at_the_ends_than_in_the_middle():
    steps = annealing_schedule(100, kind="sigmoid").diff()
    assert steps[0] < steps[50] and steps[-1] < steps[50]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_steps": 0}, "num_steps must be a positive integer"),
        ({"num_chains": 0}, "num_chains must be a positive integer"),
        ({"leapfrog_steps": 0}, "leapfrog_steps must be a positive integer"),
        ({"num_steps": 2.5}, "num_steps must be a positive integer"),
        ({"pilot_chains": -1}, "pilot_chains must be a non-negative integer"),
        ({"schedule": "cubic"}, "schedule must be one of"),
        ({"start": "posterior"}, "start must be one of"),
        ({"step_size": 0.0}, "step_size must be a positive number"),
        ({"target_accept": 1.0}, "target_accept must lie strictly between 0 and 1"),
    ],
)
def test_bad_settings_are_refused_with_a_sentence(options, message):
    with pytest.raises(PyroVAEError, match=message):
        AnnealingSettings(**options)


def test_bad_data_and_chunk_size_are_refused():
    lg = LinearGaussian.random(2, 5)
    with pytest.raises(PyroVAEError, match="non-empty tensor"):
        ais(lg.model, lg.exact_guide, torch.zeros(0, 5))
    with pytest.raises(PyroVAEError, match="data_chunk_size"):
        ais(lg.model, lg.exact_guide, lg.sample_data(3), data_chunk_size=0)


def test_discrete_latent_is_refused_with_a_sentence():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(0.3 * torch.ones(x.shape[0])))

    with pytest.raises(PyroVAEError, match=r"needs continuous latents.*'c'.*--method is"):
        ais(model, guide, torch.randn(4))


def test_mismatched_guide_is_refused_before_any_number():
    lg = LinearGaussian.random(2, 5)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("w", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))

    with pytest.raises(PyroVAEError, match="does not match the model"):
        ais(lg.model, guide, lg.sample_data(3))


@pytest.mark.parametrize("num_steps", [1, 3, 50])
def test_exact_posterior_guide_gives_exact_log_px_at_any_schedule(num_steps):
    lg = LinearGaussian.random(2, 5, s=0.5)
    x = lg.sample_data(6)
    result = ais(lg.model, lg.exact_guide, x, settings=AnnealingSettings(num_steps=num_steps, num_chains=4))
    torch.testing.assert_close(result.log_px, lg.exact_log_px(x), rtol=0, atol=1e-9)
    assert torch.allclose(result.ess, torch.tensor(4.0))
    assert result.log_px.shape == result.log_px_stderr.shape == result.accept_rate.shape == (6,)
    assert result.log_weights.shape == (4, 6)


def test_guide_with_dependent_sites_is_scored_given_the_chains_values():
    # q(z2 | z1, x) is the exact conditional: the guide must be conditioned on the chains' z1, z2.
    chain = GaussianChain.random()
    x = chain.sample_data(5)
    result = ais(chain.model, chain.exact_guide, x, settings=AnnealingSettings(num_steps=20, num_chains=4))
    torch.testing.assert_close(result.log_px, chain.exact_log_px(x), rtol=0, atol=1e-9)
    assert (result.accept_rate > 0.3).all()


def test_ais_from_a_poor_guide_converges_to_the_closed_form():
    lg = LinearGaussian.random(2, 5, s=0.5)
    x = lg.sample_data(20)
    truth = lg.exact_log_px(x)
    errors = {}
    for num_steps in (1, 20, AnnealingSettings().num_steps):
        pyro.set_rng_seed(0)
        result = ais(lg.model, poor_guide, x, settings=AnnealingSettings(num_steps=num_steps))
        errors[num_steps] = float((result.log_px - truth).mean())
    assert errors[1] < -1.0  # plain importance sampling with this guide is off by nats
    assert abs(errors[AnnealingSettings().num_steps]) < 0.05
    assert abs(errors[20]) > abs(errors[AnnealingSettings().num_steps])


def test_ais_from_the_prior_converges_to_the_closed_form():
    lg = LinearGaussian.random(2, 5, s=0.5)
    x = lg.sample_data(20)
    result = ais(lg.model, poor_guide, x, settings=AnnealingSettings(start="prior", num_steps=1000))
    assert abs(float((result.log_px - lg.exact_log_px(x)).mean())) < 0.05


def test_step_sizes_adapt_towards_the_target_acceptance():
    lg = LinearGaussian.random(2, 5, s=0.5)
    x = lg.sample_data(5)
    for step_size in (1e-3, 3.0):  # far too small, far too large
        settings = AnnealingSettings(num_steps=100, step_size=step_size)
        result = ais(lg.model, poor_guide, x, settings=settings)
        assert 0.45 < float(result.accept_rate.mean()) < 0.85
    fixed = ais(
        lg.model, poor_guide, x, settings=AnnealingSettings(num_steps=100, step_size=3.0, pilot_chains=0)
    )
    assert float(fixed.accept_rate.mean()) < 0.2


@pytest.mark.parametrize("d", [1, 2])
def test_bernoulli_decoder_log_px_matches_quadrature(d):
    bd = BernoulliDecoder.random(d)
    x = bd.sample_data(12)
    result = ais(bd.model, bd.guide, x, settings=AnnealingSettings(num_steps=300))
    truth = bd.grid_log_px(x)
    assert abs(float((result.log_px - truth).mean())) < 0.02
    # Each datum within its Monte-Carlo error (16 chains: a few hundredths of a nat).
    assert ((result.log_px - truth).abs() < 4 * result.log_px_stderr + 0.02).all()


def test_positive_latent_moves_in_log_space_and_matches_quadrature():
    """z ~ Gamma(2, 1), x_j | z ~ N(z, 0.5²) (4 coordinates); the guide is a poor LogNormal."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Gamma(2.0, 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1), 0.5).expand((*z.shape, 4)).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.LogNormal(torch.zeros(x.shape[0]), 1.0))

    g = torch.Generator().manual_seed(4)
    z = torch.distributions.Gamma(2.0, 1.0).sample((10,))
    x = z.unsqueeze(-1) + 0.5 * torch.randn(10, 4, generator=g)
    grid = torch.linspace(1e-6, 30.0, 60001)
    log_joint = torch.distributions.Gamma(2.0, 1.0).log_prob(grid) + torch.distributions.Normal(
        grid.unsqueeze(-1), 0.5
    ).log_prob(x.unsqueeze(-2)).sum(-1)  # (N, G)
    truth = torch.logsumexp(log_joint, -1) + torch.log(grid[1] - grid[0])
    result = ais(model, guide, x, settings=AnnealingSettings(num_steps=300))
    assert abs(float((result.log_px - truth).mean())) < 0.03
    assert torch.isfinite(result.log_px).all()


def test_guide_outside_the_priors_support_is_refused():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Gamma(2.0, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0]), 1.0))

    # With Pyro's validation on, validate_pair refuses the pair; without it, AIS checks the draws.
    with pytest.raises(PyroVAEError, match="within the support"):
        ais(model, guide, torch.ones(5), settings=AnnealingSettings(num_steps=2))
    with (
        pyro.validation_enabled(False),
        pytest.raises(PyroVAEError, match="outside the support of the model's prior"),
    ):
        ais(model, guide, torch.ones(5), settings=AnnealingSettings(num_steps=2))


def test_same_seed_gives_identical_results_and_chunks_cover_the_data():
    lg = LinearGaussian.random(2, 5, s=0.5)
    x = lg.sample_data(7)
    settings = AnnealingSettings(num_steps=10, num_chains=3)

    def run(chunk):
        pyro.set_rng_seed(3)
        return ais(lg.model, poor_guide, x, settings=settings, data_chunk_size=chunk)

    first, again, chunked = run(None), run(None), run(3)
    assert torch.equal(first.log_px, again.log_px)
    assert chunked.log_px.shape == (7,) and torch.isfinite(chunked.log_px).all()
    summary = first.summary()
    assert set(summary) == {
        "num_data",
        "log_px",
        "log_px_stderr",
        "nll",
        "num_chains",
        "num_steps",
        "accept_rate",
    }
    assert summary["nll"] == -summary["log_px"] and summary["num_data"] == 7


def test_float32_model_accumulates_float64_weights():
    torch.set_default_dtype(torch.float32)
    lg = LinearGaussian.random(2, 5, s=0.5)
    lg = LinearGaussian(lg.W.float(), lg.b.float(), lg.s)
    x = lg.sample_data(4).float()
    result = ais(lg.model, poor_guide, x, settings=AnnealingSettings(num_steps=20))
    assert result.log_px.dtype == torch.float64 and torch.isfinite(result.log_px).all()


def _dependent_poor_guide(x: torch.Tensor) -> None:
    """q(z2 | z1) with a mean that follows z1: the guide's second site depends on the first's value."""
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(torch.zeros(x.shape[0], 2), 1.5).to_event(1))
        pyro.sample("z2", dist.Normal(0.5 * z1, 1.5).to_event(1))


def _fast_and_plain_case(name: str) -> tuple:
    lg = LinearGaussian.random(2, 5, s=0.5)
    chain = GaussianChain.random()
    bd = BernoulliDecoder.random(2)
    return {
        "linear-gaussian": (lg.model, poor_guide, lg.sample_data(7), "guide"),
        "linear-gaussian-from-the-prior": (lg.model, poor_guide, lg.sample_data(7), "prior"),
        "dependent-guide": (chain.model, _dependent_poor_guide, chain.sample_data(5), "guide"),
        "bernoulli-decoder": (bd.model, bd.guide, bd.sample_data(6), "guide"),
    }[name]


@pytest.mark.parametrize(
    "name", ["linear-gaussian", "linear-gaussian-from-the-prior", "dependent-guide", "bernoulli-decoder"]
)
def test_fast_path_gives_the_plain_paths_numbers_for_the_same_seed(name):
    # The fast path (q's distributions kept for the chunk, the model scored without a trace) sums the same
    # .log_prob terms as the plain path (model and guide traced at every leapfrog position): with the same
    # seed every weight and every accept decision must agree, to rounding.
    model, guide, x, start = _fast_and_plain_case(name)
    settings = AnnealingSettings(num_steps=30, num_chains=4, start=start, leapfrog_steps=3)
    results = {}
    for fast in (False, True):
        pyro.set_rng_seed(5)
        results[fast] = ais(model, guide, x, settings=settings, fast=fast)
    plain, fast = results[False], results[True]
    torch.testing.assert_close(fast.log_weights, plain.log_weights, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(fast.log_px, plain.log_px, rtol=1e-12, atol=1e-10)
    assert torch.equal(fast.accept_rate, plain.accept_rate)
    assert (plain.accept_rate > 0.2).all()  # the chains moved: the comparison covers the HMC moves


def test_fast_path_keeps_q_only_when_it_does_not_depend_on_the_chains_values():
    from pyro_vae.inference.ais import AnnealingPath
    from pyro_vae.inference.conditioning import per_datum_pair

    lg, chain = LinearGaussian.random(2, 5, s=0.5), GaussianChain.random()
    cases = [
        (lg.model, poor_guide, lg.sample_data(4), True),
        (chain.model, chain.exact_guide, chain.sample_data(4), False),  # q(z2 | z1, x)
        (chain.model, _dependent_poor_guide, chain.sample_data(4), False),
    ]
    for model, guide, x, kept in cases:
        path = AnnealingPath(per_datum_pair(model, guide, x), x, num_chains=3, start="guide")
        assert (path.guide_sites is not None) == kept
        plain = AnnealingPath(per_datum_pair(model, guide, x), x, num_chains=3, start="guide", fast=False)
        assert plain.guide_sites is None


@requires_cuda
def test_ais_runs_on_cuda():
    lg = LinearGaussian.random(2, 5, s=0.5)
    lg = LinearGaussian(lg.W.cuda(), lg.b.cuda(), lg.s)
    x = lg.sample_data(6).cuda()
    result = ais(lg.model, lg.exact_guide, x, settings=AnnealingSettings(num_steps=5, num_chains=4))
    torch.testing.assert_close(result.log_px, lg.exact_log_px(x).cpu(), rtol=0, atol=1e-9)
    # The fast and the plain path agree on the GPU as on the CPU.
    settings = AnnealingSettings(num_steps=10, num_chains=4)
    runs = []
    for fast in (True, False):
        pyro.set_rng_seed(5)
        runs.append(ais(lg.model, lg.wrong_guide, x, settings=settings, fast=fast))
    torch.testing.assert_close(runs[0].log_weights, runs[1].log_weights, rtol=1e-12, atol=1e-10)


# --------------------------------------------------------------------------------------------------------
# The evaluator registry and ``pyro-vae evaluate --method``
# --------------------------------------------------------------------------------------------------------

JSON_KEYS = {
    "ais": {"method", "num_data", "log_px", "log_px_stderr", "nll", "num_chains", "num_steps", "accept_rate"},
    "bdmc": {"method", "num_data", "lower", "upper", "gap", "num_chains", "num_steps"},
    "gaps": {
        "method",
        "num_data",
        "log_px",
        "elbo",
        "elbo_optimized",
        "approximation_gap",
        "amortization_gap",
    },
}


def test_registry_holds_every_method_with_a_description():
    from pyro_vae.inference import EVALUATORS

    assert EVALUATORS.names() == ["is", "ais", "bdmc", "gaps"]
    assert all(EVALUATORS.describe().values())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from pyro_vae.cli import main

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    out = tmp_path_factory.mktemp("runs") / "digits"
    small = ["--hidden-dims", "16", "--latent-dims", "2", "--batch-size", "64", "--eval-samples", "0"]
    try:
        assert main(["train", "--epochs", "1", "--out", str(out), *small]) == 0
    finally:
        torch.set_default_dtype(old)
    return out


@pytest.mark.parametrize("method", ["is", "ais", "bdmc", "gaps"])
def test_evaluate_method_writes_exactly_the_keys_of_its_method(tiny_run, tmp_path, capsys, method):
    import json

    from pyro_vae.cli import main

    torch.set_default_dtype(torch.float32)
    report = tmp_path / "eval.json"
    fast = ["--num-steps", "5", "--num-chains", "2", "--leapfrog-steps", "2", "--optimize-steps", "3"]
    fast += ["--elbo-samples", "10", "--num-samples", "20", "--num-simulated", "5"]
    assert (
        main(["evaluate", str(tiny_run), "--method", method, "--limit", "6", "--json", str(report), *fast])
        == 0
    )
    printed = capsys.readouterr().out
    result = json.loads(report.read_text())
    assert result["method"] == method
    if method == "is":
        assert {"elbo", "iwae", "log_px", "khat_max", "split"} <= set(result) and "log p(x) (IS)" in printed
    else:
        # Exactly the method's keys, besides "weights" (model.pt or best.pt), which every method's JSON may name.
        assert set(result) - {"weights"} == JSON_KEYS[method]
        assert f"--method {method}" in printed
    assert result["num_data"] == (5 if method == "bdmc" else 6)


def test_evaluate_refuses_bad_options_in_one_line(tiny_run, capsys):
    from pyro_vae.cli import main

    assert main(["evaluate", str(tiny_run), "--method", "ais", "--target-accept", "1.5"]) == 2
    error = capsys.readouterr().err
    assert "target_accept must lie strictly between 0 and 1" in error and error.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["evaluate", str(tiny_run), "--method", "exact"])
    assert "unknown evaluator 'exact'" in capsys.readouterr().err


class MixturePriorLinearGaussian:
    """z ~ sum_k pi_k N(mu_k, sigma_k² I) (a MixtureSameFamily, as the mixture and vamp priors build it);
    x | z ~ N(W z + b, s² I). Marginal: log p(x) = logsumexp_k [log pi_k + log N(x; W mu_k + b, sigma_k² W Wᵀ + s² I)].
    """

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(4)
        self.W = torch.randn(5, 2, generator=g, dtype=torch.float64)
        self.b = torch.randn(5, generator=g, dtype=torch.float64)
        self.s = 0.5
        self.logits = torch.tensor([0.0, 0.5, -0.5], dtype=torch.float64)
        self.mu = 2 * torch.randn(3, 2, generator=g, dtype=torch.float64)
        self.sigma = torch.tensor([0.5, 1.0, 0.7], dtype=torch.float64)

    def prior(self) -> dist.MixtureSameFamily:
        components = dist.Normal(self.mu, self.sigma[:, None].expand(3, 2)).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)

    def model(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior())  # (..., N, 2)
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.s).to_event(1), obs=x)

    def exact_log_px(self, x: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(5, dtype=torch.float64)
        per_component = torch.stack(
            [
                dist.MultivariateNormal(
                    self.mu[k] @ self.W.T + self.b,
                    covariance_matrix=self.sigma[k] ** 2 * self.W @ self.W.T + self.s**2 * eye,
                ).log_prob(x)
                for k in range(3)
            ]
        )  # [3, N]
        return torch.logsumexp(per_component + torch.log_softmax(self.logits, 0)[:, None], 0)

    def sample_data(self, n: int) -> torch.Tensor:
        z = self.prior().sample((n,))
        return z @ self.W.T + self.b + self.s * torch.randn(n, 5, dtype=torch.float64)


def test_a_mixture_prior_latent_moves_and_matches_the_closed_form():
    # MixtureSameFamily's support wraps its components' (biject_to does not know the wrapper).
    mixture = MixturePriorLinearGaussian()
    x = mixture.sample_data(12)
    truth = mixture.exact_log_px(x)
    result = ais(mixture.model, poor_guide, x)
    assert (result.accept_rate > 0.3).all()
    assert abs(float((result.log_px - truth).mean())) < 0.05


def test_bdmc_sandwiches_the_truth_with_a_mixture_prior():
    from pyro_vae.inference import bdmc

    mixture = MixturePriorLinearGaussian()
    result = bdmc(
        mixture.model, poor_guide, mixture.sample_data(12), settings=AnnealingSettings(num_steps=200)
    )
    truth = mixture.exact_log_px(result.x)
    assert float(result.lower.mean()) <= float(truth.mean()) + 0.02
    assert float(result.upper.mean()) >= float(truth.mean()) - 0.02
    assert float(result.gap.mean()) < 0.3


def test_the_chains_leave_the_models_parameters_as_they_were_and_without_gradients():
    import warnings

    from pyro_vae import ModelConfig, build_vae
    from pyro_vae.inference.ais import parameters_frozen

    vae = build_vae(ModelConfig(data_dim=20, latent_dims=(2,), hidden_dims=(8,)))
    x = torch.bernoulli(torch.full((4, 20), 0.3))
    params = list(vae.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning from pyro.module about the frozen parameters
        ais(vae.model, vae.guide, x, settings=AnnealingSettings(num_chains=2, num_steps=3, pilot_chains=0))
    assert all(p.requires_grad and p.grad is None for p in params)
    with pytest.raises(RuntimeError, match="inside"), parameters_frozen(vae.model):
        assert not any(p.requires_grad for p in params)
        raise RuntimeError("inside")
    assert all(p.requires_grad for p in params)  # restored after an error too
