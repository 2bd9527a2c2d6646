"""Models written as a user would write them (``tests/zoo.py``) go everywhere the package's own go.

Each zoo model trains with ``fit``, is scored by ``evaluate_bounds`` (a model
with a global latent at a plug-in value of it, which the result names), gets a
per-layer report, is saved to a run folder and loaded back, and goes through
``pyro-vae train --model FILE.py:Class`` and the ``evaluate``, ``plot`` and
``export`` commands on that run. Every kind of mismatched model/guide pair is
refused, with its sentence, by every consumer, before any number is computed.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vae import (
    DataConfig,
    ModelSpec,
    PyroVAEError,
    TrainConfig,
    data_plate,
    evaluate_bounds,
    fit,
    latent_layers,
    load_dataset,
    load_run,
    log_marginal,
    prepare_split,
    save_run,
)
from pyro_vae.cli import main
from pyro_vae.io.export import to_inference_data

from . import zoo

ZOO_FILE = Path(zoo.__file__)
DATA_DIM = 64
SMALL = {"hidden_dim": 16}


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    """The digits' test split twice: binarized once with a fixed seed, and as grey values in [0, 1]."""
    dataset = load_dataset("digits")
    return {
        "binary": prepare_split(dataset, "test", mode="static"),
        "grey": prepare_split(dataset, "test", mode="none"),
    }


def data_for(name: str, digits: dict[str, torch.Tensor]) -> torch.Tensor:
    # The Gaussian model scores grey values; the Bernoulli ones need binary data.
    return digits["grey" if name == "GlobalNoiseVAE" else "binary"]


# ---- the zoo in Python -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", zoo.MODELS)
def test_fit_trains_a_user_model(name, digits):
    model = zoo.MODELS[name](data_dim=DATA_DIM, **SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(epochs=2, batch_size=32, device="cpu")  # the whole config (elsewhere: its keywords)
    result = fit(model, data_for(name, digits)[:96], config=config, progress=False)
    assert len(result.history) == 2
    assert all(math.isfinite(record.train_elbo) for record in result.history)
    unchanged = [k for k, v in model.state_dict().items() if torch.equal(v, before[k])]
    assert not unchanged, f"parameters the training did not move: {unchanged}"


@pytest.mark.parametrize("name", zoo.MODELS)
def test_evaluate_bounds_on_a_user_model(name, digits):
    model = zoo.MODELS[name](data_dim=DATA_DIM, **SMALL)
    x = data_for(name, digits)[:32]
    bounds = evaluate_bounds(model.model, model.guide, x, num_samples=20)
    assert bounds.log_px.shape == (32,) and torch.isfinite(bounds.log_px).all()
    # Jensen on the same K samples: log mean_k w_k >= mean_k log w_k, for every datum.
    assert (bounds.elbo <= bounds.log_px + 1e-9).all()
    summary = bounds.summary(data_dim=DATA_DIM)
    expected = ["log_noise"] if name == "GlobalNoiseVAE" else []
    assert summary["conditional_on"] == expected and list(bounds.conditional_on) == expected
    json.dumps(summary)  # what the CLI writes


def test_a_global_latent_is_plugged_in_at_the_guide_mean(digits):
    """log p(x_i | g*) at g* = E_q[g]: the numbers of the same model written with its global fixed at g*."""
    model = zoo.GlobalNoiseVAE(data_dim=DATA_DIM, **SMALL)
    x = digits["grey"][:16]
    noise = model.q_noise["m"].detach().exp()  # the guide's q(log_noise) is N(m, s^2): its mean is m

    def fixed_noise_model(x, *, num_data=None):
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(x.new_zeros(model.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(model.decoder(z), noise).to_event(1), obs=x)

    def local_guide(x, *, num_data=None):
        with data_plate(x, num_data):
            pyro.sample("z", zoo.normal(model.encoder(x)))

    bounds = evaluate_bounds(model.model, model.guide, x, num_samples=400)
    reference = evaluate_bounds(fixed_noise_model, local_guide, x, num_samples=400)
    tolerance = 4 * (bounds.log_px_stderr.pow(2) + reference.log_px_stderr.pow(2)).sqrt() + 1e-6
    assert ((bounds.log_px - reference.log_px).abs() <= tolerance).all()
    assert bounds.summary()["conditional_on"] == ["log_noise"]


def test_iwae_refuses_a_global_latent(digits):
    model = zoo.GlobalNoiseVAE(data_dim=DATA_DIM, **SMALL)
    with pytest.raises(PyroVAEError, match=r"global latent site\(s\) 'log_noise'.*loss='elbo'"):
        fit(model, digits["grey"], epochs=1, batch_size=32, loss="iwae", device="cpu", progress=False)


@pytest.mark.parametrize(
    "name,layers",
    [("SkipVAE", [("z1", 4), ("z2", 2)]), ("GlobalNoiseVAE", [("z", 2)]), ("LaplaceVAE", [("z", 3)])],
)
def test_latent_layers_of_a_user_model(name, layers, digits):
    model = zoo.MODELS[name](data_dim=DATA_DIM, **SMALL)
    report = latent_layers(model.model, model.guide, data_for(name, digits)[:32], num_samples=10)
    assert [(layer["site"], layer["dim"]) for layer in report] == layers
    for layer in report:
        assert math.isfinite(layer["kl"]) and 0 <= layer["active_units"] <= layer["dim"]


# ---- every consumer refuses a mismatched pair with its sentence ----------------------------------------

MISMATCHED = {
    "missing latent": (zoo.MissingLatent, r"the model's latent site\(s\) 'z2' are not drawn by the guide"),
    "renamed site": (
        zoo.RenamedSite,
        r"'z2' are not drawn by the guide; the guide draws 'w', which the model",
    ),
    "extra site": (zoo.ExtraSite, r"the guide draws 'u', which the model does not have"),
    # Found by Pyro's plate check or by check_model_guide_match, depending on the minibatch size.
    "shape mismatch": (
        zoo.ShapeMismatch,
        r"event_dims disagree at site 'z2'|inside plate\('data'\) at site z2",
    ),
    "observed site drawn": (zoo.GuideObservesData, r"the guide draws 'x', which the model observes"),
    "guide outside the data plate": (zoo.GuideWithoutDataPlate, r"shapes disagree at site 'z[12]'"),
}


def _grey(digits: dict[str, torch.Tensor]) -> torch.Tensor:
    return digits["grey"][:64]


CONSUMERS = {
    "evaluate_bounds": lambda m, x: evaluate_bounds(m.model, m.guide, x, num_samples=10),
    "log_marginal": lambda m, x: log_marginal(m.model, m.guide, x, num_samples=10),
    "latent_layers": lambda m, x: latent_layers(m.model, m.guide, x, num_samples=10),
    "to_inference_data": lambda m, x: to_inference_data(m.model, m.guide, x, num_samples=10),
    "fit": lambda m, x: fit(m, x, epochs=1, batch_size=32, device="cpu", progress=False),
}


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_the_correct_pair_goes_through_every_consumer(consumer, digits):
    CONSUMERS[consumer](zoo.TwoLatents(data_dim=DATA_DIM), _grey(digits))


@pytest.mark.parametrize("consumer", CONSUMERS)
@pytest.mark.parametrize("flaw", MISMATCHED)
def test_a_mismatched_pair_is_refused_with_its_sentence(flaw, consumer, digits):
    cls, sentence = MISMATCHED[flaw]
    model = cls(data_dim=DATA_DIM)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PyroVAEError, match=sentence) as refusal:
        CONSUMERS[consumer](model, _grey(digits))
    assert "\n" not in str(refusal.value)  # one sentence, one line
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused before training


@pytest.mark.parametrize("loss", ["iwae", "mean-field"])
def test_an_objective_refuses_a_discrete_guide_site(loss, digits):
    model = zoo.DiscreteLatent(data_dim=DATA_DIM)
    with pytest.raises(PyroVAEError, match=r"the guide's site 'c' \(Bernoulli\) has none.*use loss='elbo'"):
        fit(model, _grey(digits), epochs=1, batch_size=32, loss=loss, device="cpu", progress=False)


def test_a_discrete_guide_site_trains_by_the_elbo_and_is_evaluated(digits):
    """The score-function ELBO and importance sampling are right with a discrete guide site."""
    model = zoo.DiscreteLatent(data_dim=DATA_DIM)
    x = _grey(digits)
    result = fit(model, x, epochs=1, batch_size=32, loss="elbo", device="cpu", progress=False)
    assert math.isfinite(result.history[-1].train_elbo)
    bounds = evaluate_bounds(model.model, model.guide, x, num_samples=10)
    assert torch.isfinite(bounds.log_px).all() and (bounds.elbo <= bounds.log_px + 1e-9).all()


# ---- run folders and the command line ------------------------------------------------------------------


@pytest.mark.parametrize("name", zoo.MODELS)
def test_save_and_load_a_run_of_a_user_model(name, digits, tmp_path, monkeypatch):
    """The run folder keeps a copy of the model's source: it loads after the original file is gone."""
    source = tmp_path / "my_models.py"
    shutil.copy(ZOO_FILE, source)
    spec = ModelSpec.from_target(f"{source}:{name}", data_dim=DATA_DIM, options=SMALL)
    model = spec.build()
    x = data_for(name, digits)[:64]
    result = fit(model, x, epochs=1, batch_size=32, device="cpu", progress=False)
    binarize = "none" if name == "GlobalNoiseVAE" else "static"
    save_run(
        tmp_path / "run",
        vae=model,
        model_spec=spec,
        train_config=TrainConfig(epochs=1, batch_size=32),
        data_config=DataConfig(dataset="digits", binarize=binarize),
        history=result.history,
    )
    source.unlink()
    monkeypatch.chdir(tmp_path.parent)
    run = load_run(tmp_path / "run")
    assert type(run.vae).__name__ == name and run.model_spec.options == SMALL
    assert [(r.epoch, r.train_elbo) for r in run.history] == [(r.epoch, r.train_elbo) for r in result.history]
    loaded = run.vae.state_dict()
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    # The loaded model scores as the trained one: the same numbers from the same seed.
    torch.manual_seed(1)
    expected = evaluate_bounds(model.model, model.guide, x[:8], num_samples=10).log_px
    torch.manual_seed(1)
    assert torch.equal(evaluate_bounds(run.vae.model, run.vae.guide, x[:8], num_samples=10).log_px, expected)


# A run made by `pyro-vae train --model FILE.py:Class`, per zoo model: (flags for the data, model options).
CLI_RUNS = {
    "SkipVAE": (["--binarize", "dynamic"], ["hidden_dim=16", "z1_dim=3"]),
    "GlobalNoiseVAE": (["--binarize", "none"], ["hidden_dim=16"]),
    "LaplaceVAE": (["--binarize", "dynamic"], ["hidden_dim=16", "latent_dim=2"]),
}


@pytest.fixture(scope="module", params=list(CLI_RUNS))
def cli_run(request, tmp_path_factory):
    """A run trained from a copy of the zoo file, which is then deleted: the run folder must suffice."""
    name = request.param
    data_flags, options = CLI_RUNS[name]
    source = tmp_path_factory.mktemp("source") / "my_models.py"
    shutil.copy(ZOO_FILE, source)
    out = tmp_path_factory.mktemp("runs") / name
    argv = ["train", "--model", f"{source}:{name}", *data_flags, "--epochs", "2", "--batch-size", "128"]
    for option in options:
        argv += ["--model-option", option]
    assert main([*argv, "--eval-samples", "20", "--out", str(out)]) == 0
    source.unlink()
    return name, out


def test_train_writes_a_self_contained_run(cli_run):
    name, out = cli_run
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert math.isfinite(evaluation["log_px"]) and evaluation["elbo"] <= evaluation["log_px"] + 1e-9
    assert evaluation["conditional_on"] == (["log_noise"] if name == "GlobalNoiseVAE" else [])
    run = load_run(out)
    assert type(run.vae).__name__ == name
    if name == "SkipVAE":
        assert run.vae.q_z1[-1].out_features == 2 * 3  # the --model-option z1_dim=3 was kept


def test_evaluate_plot_and_export_a_user_model_run(cli_run, tmp_path, monkeypatch, capsys):
    name, out = cli_run
    monkeypatch.chdir(tmp_path)  # from any working directory
    report = tmp_path / "eval.json"
    assert main(["evaluate", str(out), "--num-samples", "20", "--limit", "40", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(report.read_text())
    assert math.isfinite(result["log_px"]) and result["num_data"] == 40
    if name == "GlobalNoiseVAE":
        assert result["conditional_on"] == ["log_noise"] and "log_noise" in printed
    assert main(["plot", str(out), "--out", str(tmp_path / "plots"), "--khat-samples", "20"]) == 0
    written = {p.name for p in (tmp_path / "plots").iterdir()}
    # Every figure's ability (decode, posterior means, prior samples) is derived from the model and guide.
    figures = {"reconstructions", "samples", "latent_space", "traversals", "interpolation"}
    assert {"elbo.png", "khat.png"} | {f"{figure}.png" for figure in figures} <= written
    nc = tmp_path / "draws.nc"
    assert main(["export", str(out), "--out", str(nc), "--num-samples", "10", "--limit", "4"]) == 0
    import arviz as az

    idata = az.from_netcdf(nc)
    local = {"SkipVAE": {"z1", "z2"}, "GlobalNoiseVAE": {"z"}, "LaplaceVAE": {"z"}}[name]
    assert local <= set(idata.posterior.data_vars)
    assert idata.posterior.sizes["draw"] == 10 and idata.posterior.sizes["datum"] == 4


def test_a_mismatched_model_file_is_one_line_and_exit_2(tmp_path, capsys):
    source = tmp_path / "my_models.py"
    shutil.copy(ZOO_FILE, source)
    argv = ["train", "--model", f"{source}:RenamedSite", "--binarize", "none", "--epochs", "1"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert "the guide draws 'w', which the model does not have" in error and error.count("\n") == 1
