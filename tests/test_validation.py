"""A model and guide are checked against each other before any number or gradient is computed from them.

Each flaw a pair can have is refused with its sentence, by the evaluators and by every objective (compiled
or not), and every model the package builds is accepted. The pairs of the issue that reported the silent
numbers are written here as plain functions; the flawed ``nn.Module`` pairs come from ``tests/zoo.py``
(whose tests in ``test_user_models.py`` take them through every evaluator and ``fit``).
"""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

from pyro_vae import LOSSES, ModelConfig, build_vae, data_plate, make_loss
from pyro_vae.errors import PyroVAEError
from pyro_vae.inference import evaluate_bounds, validate_pair
from pyro_vae.objectives import base

from . import zoo

# ---- the issue's pairs: a number, no error, no warning, before validation -------------------------------


def one_latent_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def two_latent_model(x):
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
        z2 = pyro.sample("z2", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z1 + z2, 1.0), obs=x)


def guide_without_the_latent(x):
    with pyro.plate("data", x.shape[0]):
        pass


def guide_naming_it_w(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("w", dist.Normal(x / 2, 0.7))


def guide_missing_z2(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z1", dist.Normal(x / 3, 0.8))


def guide_with_an_extra_site(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x / 2, 0.7))
        pyro.sample("u", dist.Normal(0.0, 1.0))


ISSUE_PAIRS = {
    "guide missing the latent": (
        one_latent_model,
        guide_without_the_latent,
        r"'z' are not drawn by the guide",
    ),
    "site named w": (one_latent_model, guide_naming_it_w, r"'z' are not drawn.*the guide draws 'w', which"),
    "two latents, one missing": (two_latent_model, guide_missing_z2, r"'z2' are not drawn by the guide"),
    "extra latent site": (
        one_latent_model,
        guide_with_an_extra_site,
        r"the guide draws 'u', which the model",
    ),
}


def _evaluate(model, guide, x):
    return evaluate_bounds(model, guide, x, num_samples=20)


def _loss(name: str, *, jit: bool = False):
    def run(model, guide, x):
        return make_loss(name, num_particles=3, jit=jit).differentiable_loss(model, guide, x)

    return run


CONSUMERS = {
    "evaluate_bounds": _evaluate,
    **{f"loss {name}": _loss(name) for name in LOSSES.names()},
    **{f"jit loss {name}": _loss(name, jit=True) for name in LOSSES.names()},
}


@pytest.mark.parametrize("consumer", CONSUMERS)
@pytest.mark.parametrize("case", ISSUE_PAIRS)
def test_the_issues_silently_wrong_pairs_are_refused(case, consumer):
    model, guide, sentence = ISSUE_PAIRS[case]
    with pytest.raises(PyroVAEError, match=sentence) as refusal:
        CONSUMERS[consumer](model, guide, torch.randn(200))
    assert "\n" not in str(refusal.value)


@pytest.mark.parametrize("method", ["loss", "differentiable_loss", "loss_and_grads"])
@pytest.mark.parametrize("loss", LOSSES.names())
def test_every_entry_point_of_a_loss_checks_the_pair(loss, method):
    objective = make_loss(loss, num_particles=2)
    with pytest.raises(PyroVAEError, match="not drawn by the guide"):
        getattr(objective, method)(two_latent_model, guide_missing_z2, torch.randn(10))


def test_validation_is_not_a_matter_of_pyros_validation_flag():
    with pyro.validation_enabled(False), pytest.raises(PyroVAEError, match="not drawn by the guide"):
        evaluate_bounds(two_latent_model, guide_missing_z2, torch.randn(10), num_samples=5)


# ---- the zoo's flawed pairs through every objective -----------------------------------------------------

FLAWED = {
    "missing latent": (zoo.MissingLatent, r"the model's latent site\(s\) 'z2' are not drawn by the guide"),
    "renamed site": (
        zoo.RenamedSite,
        r"'z2' are not drawn by the guide; the guide draws 'w', which the model",
    ),
    "extra site": (zoo.ExtraSite, r"the guide draws 'u', which the model does not have"),
    # Pyro's plate check or check_model_guide_match finds it, depending on the sizes.
    "shape mismatch": (
        zoo.ShapeMismatch,
        r"event_dims disagree at site 'z2'|inside plate\('data'\) at site z2",
    ),
    "observed site drawn": (zoo.GuideObservesData, r"the guide draws 'x', which the model observes"),
    "guide outside the data plate": (zoo.GuideWithoutDataPlate, r"shapes disagree at site 'z[12]'"),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("loss", LOSSES.names())
@pytest.mark.parametrize("flaw", FLAWED)
def test_every_loss_refuses_a_flawed_pair_before_any_gradient(flaw, loss, jit):
    cls, sentence = FLAWED[flaw]
    pair = cls(data_dim=5)
    objective = make_loss(loss, num_particles=3, jit=jit)
    with pytest.raises(PyroVAEError, match=sentence) as refusal:
        objective.loss_and_grads(pair.model, pair.guide, torch.randn(8, 5))
    assert "\n" not in str(refusal.value)
    assert all(p.grad is None for p in pair.parameters())  # refused before any backward pass


@pytest.mark.parametrize("flaw", FLAWED)
def test_the_evaluator_refuses_a_flawed_pair(flaw):
    cls, sentence = FLAWED[flaw]
    pair = cls(data_dim=5)
    with pytest.raises(PyroVAEError, match=sentence):
        _evaluate(pair.model, pair.guide, torch.randn(8, 5))


# ---- what an objective cannot handle --------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("loss", ["iwae", "mean-field"])
def test_reparameterized_objectives_refuse_a_discrete_guide_site(loss, jit):
    pair = zoo.DiscreteLatent(data_dim=5)
    sentence = r"the guide's site 'c' \(Bernoulli\) has none.*use loss='elbo' \(--loss elbo\)"
    with pytest.raises(PyroVAEError, match=sentence):
        _loss(loss, jit=jit)(pair.model, pair.guide, torch.randn(8, 5))


def test_the_elbo_and_the_evaluator_take_a_discrete_guide_site():
    pair = zoo.DiscreteLatent(data_dim=5)
    x = torch.randn(8, 5)
    assert torch.isfinite(_loss("elbo")(pair.model, pair.guide, x))
    assert torch.isfinite(_evaluate(pair.model, pair.guide, x).log_px).all()


def test_pyros_mean_field_elbo_drops_the_score_term_of_a_discrete_site():
    """Why mean-field refuses such a site: Pyro's gradient is silently wrong with validation off.

    q(c_i) = Bernoulli(sigmoid(theta)), p(c_i) = Bernoulli(1/2), x_i | c_i ~ N(2 c_i, 1): the exact
    gradient of the negative ELBO at theta = 0 is -1.5 here; TraceMeanField_ELBO's is 0 (the KL is
    minimal at theta = 0 and the likelihood's dependence on theta, through the draws of c, is lost).
    """
    x = torch.tensor([2.0, 1.5, 2.5])
    theta = torch.tensor(0.0, requires_grad=True)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(torch.tensor(0.5)))
            pyro.sample("x", dist.Normal(2.0 * c, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(logits=theta.expand(x.shape[0])))

    q1 = torch.sigmoid(theta)
    log_lik = q1 * dist.Normal(2.0, 1.0).log_prob(x) + (1 - q1) * dist.Normal(0.0, 1.0).log_prob(x)
    kl = q1 * torch.log(2 * q1) + (1 - q1) * torch.log(2 * (1 - q1))
    (exact,) = torch.autograd.grad(-(log_lik - kl).sum(), theta)
    assert float(exact) == pytest.approx(-1.5)
    with pyro.validation_enabled(False):
        pyro_loss = TraceMeanField_ELBO(num_particles=1000, vectorize_particles=True, max_plate_nesting=1)
        (pyros,) = torch.autograd.grad(pyro_loss.differentiable_loss(model, guide, x), theta)
        assert float(pyros) == 0.0
        with pytest.raises(PyroVAEError, match="the guide's site 'c' \\(Bernoulli\\) has none"):
            make_loss("mean-field").differentiable_loss(model, guide, x)


def test_mean_field_refuses_a_bottom_up_guide_naming_both_ways_to_fix_it():
    vae = build_vae(ModelConfig(data_dim=16, latent_dims=(4, 3), hidden_dims=(8,), inference="bottom-up"))
    x = torch.bernoulli(torch.full((6, 16), 0.3))
    sentence = (
        r"in the model's order \(z2, z1\), but it draws z1, z2; use loss='elbo' \(--loss elbo\), or a guide "
        r"that draws top-down \(for a built-in hierarchical VAE: inference='ladder', --inference ladder\)"
    )
    with pytest.raises(PyroVAEError, match=sentence):
        make_loss("mean-field").differentiable_loss(vae.model, vae.guide, x)
    assert torch.isfinite(evaluate_bounds(vae.model, vae.guide, x, num_samples=4).log_px).all()


def test_pyros_own_errors_running_the_pair_become_one_line():
    pair = zoo.SkipVAE(
        data_dim=5
    )  # its likelihood is pyro's Bernoulli, which checks its data when validating
    grey = torch.rand(6, 5)
    with pyro.validation_enabled(True), pytest.raises(PyroVAEError, match="within the support") as refusal:
        validate_pair(pair.model, pair.guide, grey)
    assert "\n" not in str(refusal.value) and "Trace Shapes" not in str(refusal.value)


# ---- every model the package builds is accepted ---------------------------------------------------------

BUILT_IN = {
    "one layer": ModelConfig(data_dim=16, latent_dims=(3,), hidden_dims=(8,)),
    "two layers, bottom-up": ModelConfig(data_dim=16, latent_dims=(4, 3), hidden_dims=(8,)),
    "two layers, ladder": ModelConfig(data_dim=16, latent_dims=(4, 3), hidden_dims=(8,), inference="ladder"),
}


# Every built-in model with every objective, but mean-field with a bottom-up guide, which is refused on
# purpose (test_mean_field_refuses_a_bottom_up_guide_naming_both_ways_to_fix_it).
ACCEPTED = [
    (config, loss)
    for config in BUILT_IN
    for loss in (None, *LOSSES.names())
    if (config, loss) != ("two layers, bottom-up", "mean-field")
]


@pytest.mark.parametrize("config, loss", ACCEPTED)
def test_validate_pair_accepts_every_built_in_model(config, loss):
    vae = build_vae(BUILT_IN[config])
    x = torch.bernoulli(torch.full((5, 16), 0.3))
    structure = validate_pair(vae.model, vae.guide, x, loss=loss, num_data=50)
    layers = len(BUILT_IN[config].latent_dims)
    assert sorted(structure.local) == (["z"] if layers == 1 else [f"z{i}" for i in range(1, layers + 1)])
    assert structure.global_ == () and structure.observed == ("x",) and structure.max_plate_nesting == 1


# ---- the check itself: once per pair, outside any trace, no random number drawn ------------------------


@pytest.mark.parametrize("loss", LOSSES.names())
def test_checking_draws_no_random_number(loss):
    vae = build_vae(BUILT_IN["one layer"])
    x = torch.bernoulli(torch.full((7, 16), 0.3))
    objective = make_loss(loss, num_particles=4)
    values = []
    for _ in range(2):  # the first call checks the pair, the second does not
        pyro.set_rng_seed(5)
        values.append((objective.differentiable_loss(vae.model, vae.guide, x).detach(), torch.rand(3)))
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("loss", LOSSES.names())
def test_a_loss_checks_each_pair_once_and_never_inside_a_trace(loss, jit, monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(torch._C._get_tracing_state() is None)
        return validate_pair(*args, **kwargs)

    monkeypatch.setattr(base, "validate_pair", counting)
    vae = build_vae(BUILT_IN["one layer"])
    x = torch.bernoulli(torch.full((7, 16), 0.3))
    objective = make_loss(loss, num_particles=2, jit=jit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the compiled loss agrees with the eager one: no fallback warning
        for _ in range(3):  # vae.model is a new bound-method object at every access: still the same pair
            objective.loss_and_grads(vae.model, vae.guide, x)
    assert calls == [True]
    pyro.clear_param_store()  # the other model's parameters have the same names
    other = build_vae(BUILT_IN["one layer"])
    objective.loss_and_grads(other.model, other.guide, x)
    assert calls == [True, True]


def test_two_data_plates_in_one_guide_are_refused_with_a_sentence():
    # Pyro's trace raises a RuntimeError with its trace table for the second "data" plate; a user's
    # mistake, so it is one sentence (other RuntimeErrors from a model stay bugs with their traceback).
    def model(x, num_data=None):
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], 2]).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)

    def guide(x, num_data=None):
        with data_plate(x, num_data):
            pass
        with data_plate(x, num_data):
            pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], 2]).to_event(1))

    with pytest.raises(PyroVAEError, match="two sample sites named 'data'"):
        validate_pair(model, guide, torch.randn(4, 1))

    def buggy_guide(x, num_data=None):
        raise RuntimeError("a bug in the guide")

    with pytest.raises(RuntimeError, match="a bug in the guide"):
        validate_pair(model, buggy_guide, torch.randn(4, 1))
