"""A user's own model through the command line: train from a file or a module, then evaluate, plot, sample, export.

The model is written here as a user would: a two-layer VAE with a skip
connection from z2 to the decoder, an ``nn.Module`` with ``model`` / ``guide``
methods, its sites in ``pyro_vae.data_plate``, and none of the package's
attributes (no ``likelihood``, no ``prior``, no ability methods), so every
consumer has to go through the contract and the derived abilities.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from pyro_vae import load_run
from pyro_vae.cli import main
from pyro_vae.config import DataConfig
from pyro_vae.models import abilities
from pyro_vae.plots import PLOT_FILES, plot_run

SKIP_VAE = textwrap.dedent(
    '''
    """A two-layer VAE whose decoder reads both layers: z2 ~ N(0, I), z1 ~ p(z1 | z2), x ~ p(x | z1, z2)."""

    import pyro
    import pyro.distributions as dist
    import torch
    from torch import nn
    from torch.nn import functional as F

    from pyro_vae import data_plate


    def mlp(n_in, hidden, n_out):
        return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out))


    def normal(params):
        loc, raw = params.chunk(2, dim=-1)
        return dist.Normal(loc, F.softplus(raw) + 1e-4).to_event(1)


    class SkipVAE(nn.Module):
        def __init__(self, *, data_dim, hidden=32, z1_dim=4, z2_dim=2):
            super().__init__()
            self.z2_dim = z2_dim
            self.p_z1 = mlp(z2_dim, hidden, 2 * z1_dim)
            self.decoder = mlp(z1_dim + z2_dim, hidden, data_dim)
            self.q_z1 = mlp(data_dim, hidden, 2 * z1_dim)
            self.q_z2 = mlp(z1_dim, hidden, 2 * z2_dim)

        def model(self, x, *, num_data=None):
            pyro.module("skip", self)
            with data_plate(x, num_data):
                z2 = pyro.sample("z2", dist.Normal(x.new_zeros(len(x), self.z2_dim), 1.0).to_event(1))
                z1 = pyro.sample("z1", normal(self.p_z1(z2)))
                logits = self.decoder(torch.cat([z1, z2], dim=-1))
                pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

        def guide(self, x, *, num_data=None):
            pyro.module("skip", self)
            with data_plate(x, num_data):
                z1 = pyro.sample("z1", normal(self.q_z1(x)))
                pyro.sample("z2", normal(self.q_z2(z1)))


    class BrokenVAE(SkipVAE):
        def model(self, x, *, num_data=None):
            raise RuntimeError("a bug in the user's model")


    class NoGuide(nn.Module):
        def __init__(self, *, data_dim):
            super().__init__()

        def model(self, x, *, num_data=None):
            pass


    class NotAModule:
        def __init__(self, *, data_dim):
            pass

        def model(self, x, *, num_data=None):
            pass

        def guide(self, x, *, num_data=None):
            pass


    def not_a_class(data_dim):
        return None
    '''
)

TRAIN = ["--epochs", "2", "--eval-samples", "50", "--batch-size", "256"]


@pytest.fixture(scope="module")
def skip_run(tmp_path_factory):
    """A run of SkipVAE trained from a file that is deleted afterwards: the run folder must suffice."""
    source = tmp_path_factory.mktemp("source") / "skip.py"
    source.write_text(SKIP_VAE)
    out = tmp_path_factory.mktemp("runs") / "skip"
    argv = ["train", "--model", f"{source}:SkipVAE", "--model-option", "hidden=16", *TRAIN, "--out", str(out)]
    assert main(argv) == 0
    source.unlink()
    return out


def test_train_keeps_the_source_and_options_in_the_run_folder(skip_run):
    assert {p.name for p in skip_run.iterdir()} >= {
        "config.json",
        "model.pt",
        "model_source.py",
        "evaluation.json",
    }
    entry = json.loads((skip_run / "config.json").read_text())["model"]
    assert entry["kind"] == "file" and entry["class"] == "SkipVAE" and entry["source"] == "model_source.py"
    assert entry["options"] == {"hidden": 16} and entry["data_dim"] == 64 and entry["image_shape"] == [8, 8]
    assert (skip_run / "model_source.py").read_text() == SKIP_VAE
    run = load_run(skip_run)
    assert type(run.vae).__name__ == "SkipVAE" and run.vae.q_z1[0].out_features == 16
    assert run.binarize == "dynamic"  # found from the model's Bernoulli site, as for the built-in bernoulli
    with pytest.raises(ValueError, match="user's class"):
        assert run.model_config is None


def test_evaluate_plot_sample_and_export_from_another_directory(skip_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["evaluate", str(skip_run), "--num-samples", "50", "--json", "eval.json"]) == 0
    printed = capsys.readouterr().out
    assert "latent z1 (dim 4)" in printed and "latent z2 (dim 2)" in printed
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["log_px"] >= result["elbo"] and result["num_data"] == 359

    assert main(["plot", str(skip_run), "--out", "plots", "--khat-samples", "20", "--khat-limit", "30"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for file in PLOT_FILES.values():
        assert [line for line in lines if file in line], f"{file} neither written nor skipped"
        said = next(line for line in lines if file in line)
        assert said.startswith(("wrote", "skipped")) and (
            said.startswith("skipped") or (tmp_path / "plots" / file).is_file()
        )
    # Every figure applies to this model (two layers, the top one 2-D, images) but the mixture models' one.
    assert {p.name for p in (tmp_path / "plots").iterdir()} == set(PLOT_FILES.values()) - {"components.png"}

    assert main(["sample", str(skip_run), "--num", "16", "--out", "f.png"]) == 0
    assert (tmp_path / "f.png").stat().st_size > 0
    assert main(["export", str(skip_run), "--out", "f.nc", "--num-samples", "10", "--limit", "3"]) == 0
    import arviz

    idata = arviz.from_netcdf(tmp_path / "f.nc")
    assert {"z1", "z2"} <= set(idata.posterior.data_vars) and idata.posterior.sizes["draw"] == 10


def test_derived_abilities_of_the_user_model(skip_run):
    run = load_run(skip_run)
    x = run.data("test")[:5]
    assert abilities.latent_sites(run.vae, x) == ("z1", "z2")  # drawn z2 then z1: the layer next to x first
    means = abilities.posterior_means(run.vae, x)
    assert {k: tuple(v.shape) for k, v in means.items()} == {"z1": (5, 4), "z2": (5, 2)}
    # z1's q depends on x alone, so its mean is exact: the guide network's output itself.
    torch.testing.assert_close(means["z1"], run.vae.q_z1(x).chunk(2, dim=-1)[0])
    decoded = abilities.decode(run.vae, means, like=x)
    expected = torch.sigmoid(run.vae.decoder(torch.cat([means["z1"], means["z2"]], dim=-1)))
    torch.testing.assert_close(decoded, expected)
    # A top layer alone decodes through the mean of p(z1 | z2).
    z2 = torch.zeros(3, 2)
    z1 = run.vae.p_z1(z2).chunk(2, dim=-1)[0]
    torch.testing.assert_close(
        abilities.decode(run.vae, {"z2": z2}, like=x), torch.sigmoid(run.vae.decoder(torch.cat([z1, z2], -1)))
    )
    draws = abilities.prior_samples(run.vae, 7, like=x, mean=False)
    assert draws.shape == (7, 64) and set(draws.unique().tolist()) <= {0.0, 1.0}
    abilities.check_data(run.vae, x)
    with pytest.raises(ValueError, match="support"):
        abilities.check_data(run.vae, torch.full((2, 64), 0.5))


def test_plot_run_resolves_the_default_auto_binarization(skip_run, tmp_path):
    run = dataclasses.replace(load_run(skip_run), data_config=DataConfig())
    assert run.data_config.binarize == "auto" and run.binarize == "dynamic"
    notes: list[str] = []
    paths = plot_run(run, tmp_path, khat_samples=0, log=notes.append)
    assert len(paths) == len(PLOT_FILES) - 2 and notes[0] == "skipped khat.png: khat_samples is 0"
    assert len(notes) == 2 and notes[1].startswith("skipped components.png")


def test_a_model_from_an_importable_module(tmp_path, monkeypatch, capsys):
    package = tmp_path / "lib" / "mymodels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "skip.py").write_text(SKIP_VAE)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        "mymodels.skip:SkipVAE",
        "--model-option",
        "z2_dim=3",
        *TRAIN,
        "--eval-samples",
        "0",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("trained mymodels.skip:SkipVAE (z2_dim=3) on digits")
    entry = json.loads((out / "config.json").read_text())["model"]
    assert entry["kind"] == "module" and entry["module"] == "mymodels.skip" and entry["class"] == "SkipVAE"
    assert entry["version"] is None  # importable, but not installed by any distribution
    assert not (out / "model_source.py").exists()
    monkeypatch.chdir(tmp_path)
    assert load_run(out).vae.q_z2[-1].out_features == 2 * 3


@pytest.mark.parametrize(
    "target,extra,message",
    [
        ("{dir}/missing.py:SkipVAE", [], "there is no file"),
        ("{dir}/skip.py", [], "takes FILE.py:Class or package.module:Class"),
        (
            "{dir}/skip.py:Nope",
            [],
            "has no class Nope; its nn.Module classes are: BrokenVAE, NoGuide, SkipVAE",
        ),
        ("{dir}/skip.py:not_a_class", [], "is not a class"),
        ("{dir}/skip.py:NotAModule", [], "is not a torch.nn.Module"),
        ("{dir}/skip.py:NoGuide", [], "has no guide method"),
        (
            "{dir}/skip.py:SkipVAE",
            ["--model-option", "width=3"],
            "its options are: hidden=32, z1_dim=4, z2_dim=2",
        ),
        ("{dir}/skip.py:SkipVAE", ["--model-option", "data_dim=3"], "is set by the data"),
        ("{dir}/skip.py:SkipVAE", ["--prior", "vamp"], "--prior describe the package's own model"),
        ("no_such_package.models:SkipVAE", [], "there is no module no_such_package.models"),
    ],
)
def test_bad_model_values_are_one_line_and_exit_2(target, extra, message, tmp_path, capsys):
    (tmp_path / "skip.py").write_text(SKIP_VAE)
    argv = [
        "train",
        "--model",
        target.format(dir=tmp_path),
        *extra,
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and "Traceback" not in error
    assert not (tmp_path / "r").exists()


def test_model_option_without_model_is_refused(tmp_path, capsys):
    assert main(["train", "--model-option", "hidden=3", "--out", str(tmp_path / "r")]) == 2
    assert "pass --model FILE.py:Class with it" in capsys.readouterr().err


def test_a_bug_inside_a_user_model_keeps_its_traceback_and_exits_1(tmp_path):
    (tmp_path / "skip.py").write_text(SKIP_VAE)
    argv = [
        "train",
        "--model",
        f"{tmp_path / 'skip.py'}:BrokenVAE",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "r"),
    ]
    with pytest.raises(RuntimeError, match="a bug in the user's model"):
        main(argv)
    done = subprocess.run([sys.executable, "-m", "pyro_vae", *argv], capture_output=True, text=True)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "RuntimeError: a bug in the user's model" in done.stderr
