"""The ArviZ export: groups, dims and coords; the same samples as the evaluator; a known answer; netCDF.

Run under ArviZ 0.2x (Python 3.11) and 1.x (Python >= 3.12; `.ci/run` does both).
"""

from __future__ import annotations

import math

import arviz
import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from matplotlib import pyplot as plt

from pyro_vae import __version__, load_run
from pyro_vae.cli import main
from pyro_vae.inference import evaluate_bounds, log_marginal
from pyro_vae.io.arviz_compat import arviz_major_version, group_names, read_netcdf
from pyro_vae.io.export import export_run, to_inference_data

matplotlib.use("Agg")

SAMPLE_DIMS = ("chain", "draw", "datum")
LAYERS = {"one": ("3", {"z": 3}), "two": ("4,2", {"z1": 4, "z2": 2})}


@pytest.fixture(scope="module", params=sorted(LAYERS))
def run(request, tmp_path_factory):
    latent_dims, _ = LAYERS[request.param]
    out = tmp_path_factory.mktemp("runs") / request.param
    flags = ["--latent-dims", latent_dims, "--hidden-dims", "32", "--batch-size", "256"]
    assert main(["train", "--epochs", "2", "--eval-samples", "0", "--out", str(out), *flags]) == 0
    return out, LAYERS[request.param][1]


def test_groups_dims_and_coords(run, tmp_path):
    run_dir, sites = run
    path = export_run(run_dir, tmp_path / "draws.nc", num_samples=30, indices=[7, 0, 300], seed=1)
    idata = read_netcdf(path)
    assert set(group_names(idata)) == {"posterior", "log_likelihood", "sample_stats", "observed_data"}
    assert set(idata.posterior.data_vars) == set(sites)
    for name, dim in sites.items():
        assert idata.posterior[name].dims == (*SAMPLE_DIMS, f"{name}_dim")
        assert idata.posterior[name].shape == (1, 30, 3, dim)
        assert idata.posterior[f"{name}_dim"].values.tolist() == list(range(dim))
    assert list(idata.log_likelihood.data_vars) == ["x"]
    assert idata.log_likelihood["x"].dims == SAMPLE_DIMS and idata.log_likelihood["x"].shape == (1, 30, 3)
    stats = idata.sample_stats
    for name in ("log_weight", "log_prior", "log_q"):
        assert stats[name].dims == SAMPLE_DIMS and stats[name].shape == (1, 30, 3)
    for name in ("khat", "log_px"):
        assert stats[name].dims == ("datum",)
    assert idata.observed_data["x"].dims == ("datum", "x_dim") and idata.observed_data["x"].shape == (3, 64)
    for group in group_names(idata):
        assert idata[group]["datum"].values.tolist() == [7, 0, 300]
    x = load_run(run_dir).data("test")
    np.testing.assert_array_equal(idata.observed_data["x"].values, x[[7, 0, 300]].numpy())
    assert idata.attrs["num_samples"] == 30 and idata.attrs["created_by"] == "pyro_vae"
    assert idata.posterior.attrs["pyro_vae_version"] == __version__

    default = read_netcdf(export_run(run_dir, tmp_path / "first.nc", num_samples=5, limit=4))
    assert default.posterior["datum"].values.tolist() == [0, 1, 2, 3]


def test_the_evaluator_samples_and_weights(run):
    """log_weight splits exactly into its terms, and log_px / khat are the evaluator's for the same seed."""
    run_dir, _ = run
    vae = load_run(run_dir).vae
    x = load_run(run_dir).data("test")[:5]
    state = torch.get_rng_state()
    # chunk sizes that split both the particles (30 + 20) and the data (2 + 2 + 1)
    chunks = {"chunk_size": 30, "data_chunk_size": 2}
    idata = to_inference_data(vae.model, vae.guide, x, num_samples=50, seed=3, **chunks)
    assert torch.equal(torch.get_rng_state(), state), "a seeded export must leave the global stream alone"
    stats = idata.sample_stats
    log_w = stats["log_weight"].values
    np.testing.assert_array_equal(
        log_w, idata.log_likelihood["x"].values + stats["log_prior"].values - stats["log_q"].values
    )
    pyro.set_rng_seed(3)
    expected = log_marginal(vae.model, vae.guide, x, num_samples=50, **chunks).numpy()
    lse = np.logaddexp.reduce(log_w[0], axis=0) - math.log(50)
    np.testing.assert_allclose(stats["log_px"].values, expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(lse, expected, rtol=0, atol=1e-10)
    pyro.set_rng_seed(3)
    bounds = evaluate_bounds(vae.model, vae.guide, x, num_samples=50, iwae_ks=[1], progress=False, **chunks)
    # log_w is summed here term by term and in the evaluator in one pass: equal up to round-off
    np.testing.assert_allclose(stats["khat"].values, bounds.khat.numpy(), rtol=0, atol=1e-12)
    assert np.isfinite(bounds.khat.numpy()).all()


def _linear_gaussian(s: float = 0.3):
    """z ~ N(0, I_2), x | z ~ N(W z + b, s² I_4); p(z | x) = N(Σ Wᵀ (x - b) / s², Σ), Σ = (I + WᵀW / s²)⁻¹."""
    g = torch.Generator().manual_seed(1)
    W, b = torch.randn(4, 2, generator=g), torch.randn(4, generator=g)
    cov = torch.linalg.inv(torch.eye(2) + W.T @ W / s**2)

    def posterior_mean(x):
        return (x - b) @ W / s**2 @ cov  # [N, 2]

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))  # [..., N, 2]
            pyro.sample("x", dist.Normal(z @ W.T + b, s).to_event(1), obs=x)

    def guide(x, shift=0.0, widen=1.0):
        with pyro.plate("data", x.shape[0]):
            tril = widen * torch.linalg.cholesky(cov)
            pyro.sample("z", dist.MultivariateNormal(posterior_mean(x) + shift, scale_tril=tril))

    x = torch.randn(6, 2, generator=g) @ W.T + b + s * torch.randn(6, 4, generator=g)
    return model, guide, x, posterior_mean(x)


def _weighted_mean(idata):
    """Self-normalized importance estimate of E[z | x]: sum_k softmax(log w)_k z_k, [N, 2]."""
    log_w = idata.sample_stats["log_weight"].values[0]  # [K, N]
    weights = np.exp(log_w - log_w.max(0))
    weights /= weights.sum(0)
    return np.einsum("kn,knd->nd", weights, idata.posterior["z"].values[0])


def test_known_answer_exact_posterior(float64):
    # s = 0.1 makes the posterior sd about 0.05, so 4000 draws pin its mean to about 1e-3
    model, guide, x, exact_mean = _linear_gaussian(s=0.1)
    idata = to_inference_data(model, guide, x, num_samples=4000, data_indices=range(10, 16), seed=0)
    np.testing.assert_allclose(_weighted_mean(idata), exact_mean.numpy(), rtol=0, atol=1e-2)
    log_w = idata.sample_stats["log_weight"].values[0]
    assert np.ptp(log_w, axis=0).max() < 1e-6, "with the exact posterior every weight is p(x)"
    np.testing.assert_array_equal(idata.sample_stats["khat"].values, 0.0)


def test_the_weights_correct_a_wrong_guide(float64):
    """A guide shifted by 0.3 and 1.5x too wide: the plain mean of the draws is off, the weighted one is not."""
    model, guide, x, exact_mean = _linear_gaussian()

    def wrong_guide(x):
        guide(x, shift=0.3, widen=1.5)

    idata = to_inference_data(model, wrong_guide, x, num_samples=4000, seed=0)
    plain = idata.posterior["z"].values[0].mean(0)
    assert np.abs(plain - exact_mean.numpy()).max() > 0.25
    np.testing.assert_allclose(_weighted_mean(idata), exact_mean.numpy(), rtol=0, atol=5e-2)
    assert (idata.sample_stats["khat"].values < 0.7).all()


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_netcdf_round_trip_and_arviz(run, tmp_path):
    """The file holds exactly the object's numbers, and the installed ArviZ summarizes and plots it."""
    run_dir, sites = run
    first = next(iter(sites))
    path = export_run(run_dir, tmp_path / "draws.nc", num_samples=40, indices=[4, 2], seed=0)
    again = to_inference_data(
        load_run(run_dir).vae.model,
        load_run(run_dir).vae.guide,
        load_run(run_dir).data("test")[[4, 2]],
        num_samples=40,
        data_indices=[4, 2],
        seed=0,
    )
    idata = read_netcdf(path)
    assert group_names(idata) == group_names(again)
    for group in group_names(again):
        for name, values in again[group].data_vars.items():
            np.testing.assert_array_equal(idata[group][name].values, values.values)
    summary = arviz.summary(idata, group="posterior")
    assert len(summary) == 2 * sum(sites.values())
    one = {"datum": [4], f"{first}_dim": [0]}
    if arviz_major_version() == 0:
        arviz.plot_posterior(idata, var_names=[first], coords=one)
    else:
        arviz.plot_dist(idata, var_names=[first], coords=one)
    plt.close("all")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"indices": [0, 359]}, r"out of range: the test split has 359 data points, numbered 0\.\.358"),
        ({"indices": [-1]}, "out of range"),
        ({"indices": [1, 1]}, "must not repeat"),
        ({"indices": []}, "is empty"),
        ({"num_samples": 0}, "num_samples must be a positive integer"),
        ({"num_samples": -5}, "num_samples must be a positive integer"),
        ({"limit": 0}, "limit must be a positive integer"),
    ],
)
def test_bad_arguments_say_what_is_wrong(run, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        export_run(run[0], tmp_path / "draws.nc", **options)
    assert not any(tmp_path.iterdir()), "a refused export writes nothing"


def test_bad_data_indices_say_what_is_wrong():
    model, guide, x, _ = _linear_gaussian()
    with pytest.raises(ValueError, match="data_indices must be 6 integers"):
        to_inference_data(model, guide, x, data_indices=[0, 1])
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        to_inference_data(model, guide, x, num_samples=0)


def test_a_budget_that_cuts_the_passes_cuts_the_exports_alike():
    """Under a budget that shrinks the passes (a 50-component VampPrior), the export plans them as the
    evaluator does: the same draws for the same seed, and a budget no pass fits is refused alike."""
    from pyro_vae import ModelConfig, build_vae
    from pyro_vae.errors import PyroVAEError
    from pyro_vae.inference import plan_importance_passes

    vae = build_vae(
        ModelConfig(
            data_dim=30,
            latent_dims=(4,),
            hidden_dims=(16,),
            prior="vamp",
            prior_options={"num_components": 50},
        )
    )
    x = torch.bernoulli(torch.full((12, 30), 0.3))
    budget = 82 * 1024**2  # 0.8 x 82 MiB - 64 MiB of slack: about 1.6 MiB for the passes
    sizes = plan_importance_passes(vae.model, vae.guide, x, num_samples=400, max_memory=budget)
    unbounded = plan_importance_passes(vae.model, vae.guide, x, num_samples=400, max_memory=None)
    assert sizes.rows < unbounded.rows  # the budget is what decides here
    idata = to_inference_data(vae.model, vae.guide, x, num_samples=400, seed=2, max_memory=budget)
    pyro.set_rng_seed(2)
    expected = log_marginal(vae.model, vae.guide, x, num_samples=400, max_memory=budget).numpy()
    np.testing.assert_allclose(idata.sample_stats["log_px"].values, expected, rtol=0, atol=1e-10)
    with pytest.raises(PyroVAEError, match="memory budget"):
        to_inference_data(vae.model, vae.guide, x, num_samples=400, max_memory=80 * 1024**2)
