"""ArviZ 0.2x and 1.x through pyro_vae.io.arviz_compat; one k̂ whichever is installed.

`.ci/run` runs this file under both (Python 3.11 gives 0.2x, Python 3.12 gives 1.x).
``tests/data/export_arviz0.nc`` and ``export_arviz1.nc`` were written by each
version (``python -m tests.test_arviz_compat`` in a venv of each rewrites its
own), so each run also opens the other's file.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vae.inference.psis import psis_khat
from pyro_vae.io.arviz_compat import (
    arviz_major_version,
    group_names,
    make_inference_data,
    read_netcdf,
    write_netcdf,
)
from pyro_vae.io.export import to_inference_data

DATA = Path(__file__).parent / "data"
GROUPS = ["posterior", "log_likelihood", "sample_stats", "observed_data"]
SAMPLE_DIMS = ("chain", "draw", "datum")
XIS = (0.2, 0.5, 0.7, 1.0, 1.5)


def _pareto_log_w(num_samples: int) -> np.ndarray:
    """log w_k = -xi log(1 - u_k) at u_k = (k - 1/2) / K, one column per xi: w - 1 ~ GPD(xi, xi), [K, 5].

    Quantiles rather than draws, so the weights are the same on every machine;
    a GPD's tail above any threshold is a GPD of the same shape xi.
    """
    u = (np.arange(1, num_samples + 1) - 0.5) / num_samples
    return np.stack([-xi * np.log1p(-u) for xi in XIS], 1)


def _arviz_khat(log_w: np.ndarray) -> np.ndarray:
    """k̂ [n] of the columns of ``log_w`` [K, n] by the installed ArviZ's own PSIS."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ warns when some k̂ > 0.7
        if arviz_major_version() == 0:
            import arviz

            return np.asarray(arviz.psislw(log_w.T.copy())[1])
        from arviz_stats.base import array_stats

        # arviz-stats smooths exp(-values) (its input is a log-likelihood, as in PSIS-LOO): pass -log w.
        return np.asarray(array_stats.psislw(-log_w.T, axis=-1)[1])


def test_khat_stored_values():
    """The numbers ArviZ 0.23.4's psislw gives these weights; ours give them under either ArviZ."""
    log_w = _pareto_log_w(1000)[::-1].copy()  # order does not matter to PSIS
    expected = [0.236787735857503, 0.497085961262522, 0.670657768314356, 0.931073024226456, 1.365035898702984]
    np.testing.assert_allclose(psis_khat(torch.from_numpy(log_w)).numpy(), expected, rtol=0, atol=1e-12)


def test_khat_recovers_the_pareto_shape():
    """Weights whose tail is a GPD of shape xi: k̂ is xi shrunk toward 0.5 by 10 pseudo-observations."""
    num_samples = 4000
    tail_length = math.ceil(3 * math.sqrt(num_samples))  # 190
    khat = psis_khat(torch.from_numpy(_pareto_log_w(num_samples))).numpy()
    shrunk = (tail_length * np.array(XIS) + 10 * 0.5) / (tail_length + 10)
    np.testing.assert_allclose(khat, shrunk, rtol=0, atol=0.03)
    assert (khat[XIS.index(0.5)] < 0.7) and (khat[XIS.index(1.0)] > 0.7)


def _tail_lengths(num_samples: int) -> tuple[int, int]:
    """PSIS's tail length ceil(min(K / 5, 3 sqrt K)) (ours, ArviZ 0.2x's, R loo's) and arviz-stats 1.x's."""
    ours = math.ceil(min(num_samples / 5, 3 * math.sqrt(num_samples)))
    theirs = math.floor(3 * math.sqrt(num_samples)) if num_samples > 225 else num_samples // 5
    return ours, theirs


# Equal tails in both for K / 5 an integer up to K = 225 and K a perfect square above; the rest differ by one.
@pytest.mark.parametrize("num_samples", [50, 100, 225, 400, 900, 26, 101, 226, 1000, 1001])
def test_khat_is_arvizs(num_samples):
    ours, theirs = _tail_lengths(num_samples)
    if arviz_major_version() >= 1 and ours != theirs:
        pytest.skip(f"at K = {num_samples} arviz-stats 1.x fits {theirs} tail draws, PSIS {ours}")
    u = (np.arange(1, num_samples + 1) - 0.5) / num_samples
    from scipy.special import ndtri

    normal = np.stack([s * ndtri(u) for s in (0.3, 1.0, 3.0)], 1)  # log-normal weights, light to heavy
    log_w = np.concatenate([_pareto_log_w(num_samples), normal], 1)[
        np.argsort(np.cos(np.arange(num_samples)))
    ]
    np.testing.assert_allclose(
        psis_khat(torch.from_numpy(log_w)).numpy(), _arviz_khat(log_w), rtol=0, atol=1e-12
    )


def test_khat_of_equal_weights_and_of_too_few():
    """Equal weights (an exact posterior) are perfect, k̂ = 0; K = 20 leaves 4 tail draws, too few: inf."""
    log_w = torch.cat(
        [torch.full((21, 1), -3.0, dtype=torch.float64), torch.randn(21, 1, dtype=torch.float64)], 1
    )
    assert psis_khat(log_w[:20]).tolist() == [0.0, math.inf]
    assert math.isfinite(psis_khat(log_w)[1]), "K = 21 fits ceil(21 / 5) = 5 tail draws"


def _groups() -> dict:
    import xarray

    coords = {"chain": [0], "draw": np.arange(3), "datum": np.array([9, 4])}
    return {
        "posterior": xarray.Dataset(
            {"z": ((*SAMPLE_DIMS, "z_dim"), np.arange(12.0).reshape(1, 3, 2, 2))},
            coords={**coords, "z_dim": [0, 1]},
        ),
        "sample_stats": xarray.Dataset(
            {"khat": (("datum",), np.array([0.25, 0.75])), "log_weight": (SAMPLE_DIMS, -np.ones((1, 3, 2)))},
            coords=coords,
        ),
    }


def test_round_trip(tmp_path):
    data = make_inference_data(_groups(), attrs={"created_by": "pyro_vae", "num_samples": 3})
    assert group_names(data) == ["posterior", "sample_stats"]
    data.attrs.update(split="test")
    write_netcdf(data, tmp_path / "data.nc")
    back = read_netcdf(tmp_path / "data.nc")
    assert type(back) is type(data)
    assert group_names(back) == ["posterior", "sample_stats"]
    assert back.attrs == {"created_by": "pyro_vae", "num_samples": 3, "split": "test"}
    assert back["posterior"]["z"].dims == (*SAMPLE_DIMS, "z_dim")
    np.testing.assert_array_equal(back["posterior"]["z"].values, np.arange(12.0).reshape(1, 3, 2, 2))
    assert back["sample_stats"]["datum"].values.tolist() == [9, 4]
    np.testing.assert_array_equal(back["sample_stats"]["khat"].values, [0.25, 0.75])


def test_the_installed_arviz_is_the_one_we_think():
    import arviz

    assert arviz_major_version() == int(arviz.__version__.split(".")[0])
    expected = "InferenceData" if arviz_major_version() == 0 else "DataTree"
    assert type(make_inference_data(_groups(), attrs={})).__name__ == expected


def _toy_export():
    """to_inference_data of z ~ N(0, I_2), x | z ~ N(W z, 0.5² I_3) with a guide N(0.5 x W, 0.8²)."""
    weight = torch.tensor([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]])

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z @ weight.T, 0.5).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.5 * x @ weight, 0.8).to_event(1))

    x = torch.tensor([[0.5, -1.0, 2.0], [1.0, 1.0, 0.0], [-2.0, 0.5, 1.5]])
    return to_inference_data(model, guide, x, num_samples=40, data_indices=[10, 11, 12], seed=0)


@pytest.mark.parametrize("major", [0, 1])
def test_files_written_by_either_arviz_open_here(major):
    data = read_netcdf(DATA / f"export_arviz{major}.nc")
    assert group_names(data) == GROUPS
    assert data.attrs["created_by"] == "pyro_vae" and data.attrs["num_samples"] == 40
    assert data["posterior"]["z"].dims == (*SAMPLE_DIMS, "z_dim") and data["posterior"]["z"].shape == (
        1,
        40,
        3,
        2,
    )
    for group in GROUPS:
        assert data[group]["datum"].values.tolist() == [10, 11, 12]
    stats = data["sample_stats"]
    log_w = stats["log_weight"].values[0]  # [K, n]
    np.testing.assert_allclose(
        log_w, data["log_likelihood"]["x"].values[0] + stats["log_prior"].values[0] - stats["log_q"].values[0]
    )
    np.testing.assert_allclose(
        stats["log_px"].values, np.logaddexp.reduce(log_w, 0) - math.log(40), atol=1e-12
    )
    # the k̂ stored by the other version is the k̂ computed here
    np.testing.assert_allclose(
        stats["khat"].values, psis_khat(torch.from_numpy(log_w)).numpy(), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("major", [0, 1])
def test_the_stored_files_are_todays_export(major):
    """The stored files have the variables and dims the export writes now (else: rewrite them, see the top)."""
    made = _toy_export()
    stored = read_netcdf(DATA / f"export_arviz{major}.nc")
    for group in GROUPS:
        assert list(stored[group].data_vars) == list(made[group].data_vars)
        for name, values in made[group].data_vars.items():
            assert (stored[group][name].dims, stored[group][name].shape) == (values.dims, values.shape)


if __name__ == "__main__":
    path = DATA / f"export_arviz{arviz_major_version()}.nc"
    path.parent.mkdir(exist_ok=True)
    write_netcdf(_toy_export(), path)
    print(f"wrote {path} with Python {sys.version.split()[0]}")
