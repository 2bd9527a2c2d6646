"""The pyro-vae command line: train writes a run folder, evaluate reads it, errors are one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pyro_vae import DATASETS, GUIDES, LIKELIHOODS, LOSSES, NETWORKS, PRIORS, load_run
from pyro_vae.cli import main

from .conftest import SHARED_DATASETS, requires_shared

SMALL = ["--hidden-dims", "32", "--latent-dims", "4", "--batch-size", "64"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["train", "--epochs", "3", "--eval-samples", "200", "--out", str(out), *SMALL]) == 0
    return out


def test_train_writes_the_run_folder(digits_run, capsys):
    assert {p.name for p in digits_run.iterdir()} == {
        "config.json",
        "model.pt",
        "metrics.csv",
        "evaluation.json",
        "checkpoint.pt",
    }
    config = json.loads((digits_run / "config.json").read_text())
    assert config["format"] == "pyro_vae.run/1" and config["model"]["kind"] == "builtin"
    options = config["model"]["options"]
    assert options["latent_dims"] == [4] and options["hidden_dims"] == [32]
    assert config["data"] == {"dataset": "digits", "data_dir": None, "binarize": "dynamic"}
    rows = (digits_run / "metrics.csv").read_text().splitlines()
    assert rows[0] == "epoch,train_elbo,test_elbo,seconds" and len(rows) == 4
    run = load_run(digits_run)
    assert len(run.history) == 3 and run.history[-1].test_elbo < 0
    # The stored weights are the trained ones: the rebuilt model reproduces the stored test ELBO closely.
    x = run.data("test")
    assert x.shape == (359, 64) and set(x.unique().tolist()) == {0.0, 1.0}


def test_evaluate_reports_ordered_bounds(digits_run, tmp_path, capsys):
    report = tmp_path / "eval.json"
    assert main(["evaluate", str(digits_run), "--num-samples", "500", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    for label in ("ELBO", "IWAE-5", "IWAE-50", "log p(x) (IS)", "NLL", "PSIS k-hat", "bits/dim"):
        assert label in printed
    result = json.loads(report.read_text())
    expected_keys = {
        "elbo",
        "iwae",
        "log_px",
        "log_px_stderr",
        "nll",
        "bits_per_dim",
        "khat_max",
        "khat_frac_above_0_7",
        "num_samples",
        "num_data",
    }
    assert expected_keys <= set(result)
    assert result["num_samples"] == 500 and result["num_data"] == 359
    assert set(result["iwae"]) == {"1", "5", "50", "500"}
    assert result["log_px"] >= result["iwae"]["50"] >= result["elbo"]
    assert result["nll"] == pytest.approx(-result["log_px"])
    assert result["bits_per_dim"] == pytest.approx(result["nll"] / (64 * np.log(2)))


def test_refuses_to_overwrite_a_run(digits_run, capsys):
    assert main(["train", "--epochs", "1", "--out", str(digits_run), *SMALL]) == 2
    error = capsys.readouterr().err
    assert "already holds a run" in error and "--overwrite" in error and error.count("\n") == 1


@pytest.mark.parametrize(
    "argv,message",
    [
        (["evaluate", "NOWHERE"], "is not a pyro_vae run folder"),
        (["train", "--dataset", "cifar"], "unknown data set 'cifar'"),
        (["train", "--binarize", "none", "--epochs", "1"], "needs binary data"),
        (["train", "--likelihood-scale", "0.5", "--epochs", "1"], "takes no option(s) scale"),
        (["train", "--batch-size", "5000", "--epochs", "1"], "larger than the 1438 training points"),
    ],
)
def test_user_errors_are_one_line_with_status_2(argv, message, tmp_path, capsys):
    if argv[0] == "train":
        argv = [*argv, "--out", str(tmp_path / "run")]
    else:
        argv = [argv[0], str(tmp_path / argv[1]), *argv[2:]]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and "Traceback" not in error


@pytest.mark.parametrize("flag", ["--likelihood poisson", "--hidden-dims 4,x", "--epochs x", "--jit 3"])
def test_bad_flags_exit_2(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *flag.split()])
    assert exit_info.value.code == 2
    if "poisson" in flag:
        assert "choose one of: bernoulli" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--epochs 0", "--epochs must be a positive integer, got 0"),
        ("--lr -1", "--lr must be a positive number, got -1.0"),
        ("--clip-norm 0", "--clip-norm must be a positive number or None"),
        ("--batch-size 100 --shards 3", "cannot be cut into 3 equal shards"),
    ],
)
def test_training_values_are_checked_by_train_config_and_named_by_flag(flag, message, tmp_path, capsys):
    assert main(["train", *flag.split(), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and not (tmp_path / "run").exists()


def test_training_flags_are_the_train_config_fields():
    import argparse
    import dataclasses

    from pyro_vae.cli.main import parser
    from pyro_vae.cli.train import fill_several_layer_defaults
    from pyro_vae.config import TrainConfig

    train = next(
        action for action in parser()._actions if isinstance(action, argparse._SubParsersAction)
    ).choices["train"]
    group = next(g for g in train._action_groups if g.title == "training")
    flags = {a.option_strings[0]: a for a in group._group_actions}
    # --warmup-epochs alone is left to the model (None): 2 for several latent layers, TrainConfig's 0 otherwise.
    decided_by_the_model = {"warmup_epochs"}
    for field in dataclasses.fields(TrainConfig):
        action = flags["--" + field.name.replace("_", "-")]
        if field.name in decided_by_the_model:
            assert action.default is None and action.help.startswith(field.metadata.get("help"))
        else:
            assert action.default == field.default and action.help == field.metadata.get("help")
    assert {"--no-fused-adam", "--no-jit"} <= {s for a in group._group_actions for s in a.option_strings}
    # Parsing no training flag at all gives TrainConfig's defaults (for the default, one-layer model).
    args = parser().parse_args(["train"])
    fill_several_layer_defaults(args)
    assert (
        TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
        == TrainConfig()
    )


def test_a_run_folder_of_the_old_layout_still_loads(digits_run, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(digits_run, old)
    config = json.loads((old / "config.json").read_text())
    config["model"] = config["model"]["options"]  # before user models: the ModelConfig fields themselves
    (old / "config.json").write_text(json.dumps(config))
    run, again = load_run(old), load_run(digits_run)
    assert run.model_config == again.model_config
    for (name, mine), theirs in zip(
        run.vae.state_dict().items(), again.vae.state_dict().values(), strict=True
    ):
        assert torch.equal(mine, theirs), name


def test_list_prints_every_registered_component(capsys):
    assert main(["list"]) == 0
    printed = capsys.readouterr().out
    for registry in (PRIORS, LIKELIHOODS, GUIDES, NETWORKS, LOSSES, DATASETS):
        for name, description in registry.describe().items():
            assert name in printed and description in printed


def test_user_data_file_with_a_gaussian_likelihood(tmp_path, capsys):
    data = np.random.default_rng(0).normal(size=(120, 6)).astype(np.float32)
    np.save(tmp_path / "points.npy", data)
    argv = [
        "train",
        "--dataset",
        str(tmp_path / "points.npy"),
        "--likelihood",
        "gaussian",
        "--likelihood-scale",
        "0.5",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--eval-samples",
        "50",
        "--out",
        str(tmp_path / "run"),
        *SMALL[:4],
    ]
    assert main(argv) == 0
    assert "binarize=none" in capsys.readouterr().out
    run = load_run(tmp_path / "run")
    assert run.model_config.likelihood_options == {"scale": 0.5}
    torch.testing.assert_close(run.data("train")[:0], torch.empty(0, 6))


def test_module_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "pyro_vae", "list"], capture_output=True, text=True, check=True
    )
    assert "standard-normal" in done.stdout


@requires_shared
def test_one_mnist_epoch_from_the_shared_data(tmp_path, capsys):
    argv = [
        "train",
        "--dataset",
        "mnist",
        "--data-dir",
        str(SHARED_DATASETS),
        "--epochs",
        "1",
        "--eval-samples",
        "0",
        "--out",
        str(tmp_path / "mnist"),
    ]
    assert main(argv) == 0
    run = load_run(tmp_path / "mnist")
    assert run.model_config.data_dim == 784 and run.model_config.image_shape == (28, 28)
    assert -200.0 < run.history[0].test_elbo < -80.0


@pytest.mark.parametrize("inference", ["bottom-up", "ladder"])
def test_two_layer_model_trains_and_reports_each_layer(inference, tmp_path, capsys):
    out = tmp_path / inference
    argv = [
        "train",
        "--latent-dims",
        "6,3",
        "--hidden-dims",
        "24,24",
        "--inference",
        inference,
        "--activation",
        "tanh",
        "--epochs",
        "2",
        "--eval-samples",
        "50",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())["model"]["options"]
    assert config["latent_dims"] == [6, 3] and config["inference"] == inference
    report = tmp_path / "eval.json"
    assert main(["evaluate", str(out), "--num-samples", "100", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "latent z1 (dim 6)" in printed and "latent z2 (dim 3)" in printed
    layers = json.loads(report.read_text())["layers"]
    assert [layer["site"] for layer in layers] == ["z1", "z2"]
    assert [layer["dim"] for layer in layers] == [6, 3]
    for layer in layers:
        assert layer["kl"] >= -0.05 and 0 <= layer["active_units"] <= layer["dim"]


def test_plot_sample_and_export_commands(digits_run, tmp_path, capsys):
    assert main(["plot", str(digits_run), "--out", str(tmp_path / "plots"), "--khat-samples", "50"]) == 0
    written = {p.name for p in (tmp_path / "plots").iterdir()}
    assert {"elbo.png", "reconstructions.png", "samples.png", "latent_space.png", "khat.png"} <= written
    assert main(["sample", str(digits_run), "--num", "16", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    assert (
        main(
            [
                "export",
                str(digits_run),
                "--out",
                str(tmp_path / "x.nc"),
                "--num-samples",
                "30",
                "--indices",
                "0,3",
            ]
        )
        == 0
    )
    assert (tmp_path / "x.nc").stat().st_size > 0
    capsys.readouterr()
    assert main(["export", str(digits_run), "--out", str(tmp_path / "y.nc"), "--indices", "100000"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ---------------------------------------------------------------------------
# What train and evaluate print, and the points the final evaluation scores


def test_every_summary_line_fits_100_columns(digits_run, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--epochs",
                "1",
                "--eval-samples",
                "50",
                "--eval-points",
                "100",
                "--out",
                str(out),
                *SMALL,
            ]
        )
        == 0
    )
    assert main(["evaluate", str(out), "--num-samples", "30"]) == 0
    assert (
        main(
            [
                "evaluate",
                str(out),
                "--method",
                "gaps",
                "--limit",
                "3",
                "--num-samples",
                "30",
                "--optimize-steps",
                "3",
                "--num-steps",
                "5",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) > 15
    too_long = [line for line in printed if len(line) > 100]
    assert too_long == []


def test_the_final_evaluation_scores_a_random_subset_and_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--epochs",
                "1",
                "--eval-samples",
                "50",
                "--eval-points",
                "100",
                "--out",
                str(out),
                *SMALL,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "evaluated on 100 of 359 test points, drawn at random" in printed
    assert "from the K samples" in printed and "--eval-points all" in printed
    summary = json.loads((out / "evaluation.json").read_text())
    index = summary["per_datum"]["index"]
    assert summary["num_data"] == 100 and summary["num_split"] == 359 and summary["points"] == "random"
    assert index == sorted(set(index)) and len(index) == 100 and index != list(range(100))
    assert len(summary["per_datum"]["khat"]) == len(summary["per_datum"]["log_px"]) == 100
    # The headline's mean is the mean of the stored per-point values.
    assert summary["log_px"] == pytest.approx(np.mean(summary["per_datum"]["log_px"]))
    assert summary["log_px_points_stderr"] > 0


def test_evaluation_points_all_of_a_small_test_set_and_a_seeded_draw_of_a_large_one():
    from pyro_vae.cli.train import evaluation_points

    assert evaluation_points(359, 1000, seed=0) is None  # the digits: every point, no draw
    assert evaluation_points(10_000, None, seed=0) is None  # --eval-points all
    before = torch.random.get_rng_state()
    drawn = evaluation_points(10_000, 1000, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)  # training's stream is not moved
    assert torch.equal(drawn, evaluation_points(10_000, 1000, seed=3))
    assert not torch.equal(drawn, evaluation_points(10_000, 1000, seed=4))
    assert len(drawn.unique()) == 1000 and bool((drawn[1:] > drawn[:-1]).all())


def test_the_points_stderr_is_the_finite_population_formula():
    """sqrt((1 - n/N) s² / n) by hand for 4 of 10 points with log p̂ = 1, 2, 3, 6 (s² = 14/3)."""
    from pyro_vae.cli.train import points_summary

    summary = {"num_data": 4, "per_datum": {"log_px": [1.0, 2.0, 3.0, 6.0], "khat": [0.1] * 4}}
    out = points_summary(summary, torch.tensor([0, 2, 5, 9]), num_test=10)
    assert out["log_px_points_stderr"] == pytest.approx(np.sqrt(0.6 * (14 / 3) / 4))
    assert out["per_datum"]["index"] == [0, 2, 5, 9]
    every = points_summary(summary | {"num_data": 4}, None, num_test=4)
    assert every["log_px_points_stderr"] == 0.0 and every["points"] == "all"


@pytest.mark.parametrize("text", ["0", "-3", "some", "1.5"])
def test_eval_points_refuses_what_is_not_a_count(text, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--eval-points", text])
    assert stop.value.code == 2 and "positive whole number or all" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# --config FILE


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_a_toml_config_gives_the_defaults_and_flags_override_it(tmp_path, capsys):
    """One file for two commands: each reads its own table (and would read keys outside any table)."""
    config = _write(
        tmp_path / "c.toml",
        "[train]\nepochs = 5\nlatent-dims = [3]\nhidden_dims = [16]\nbatch-size = 64\njit = false\n"
        "eval-samples = 0\n[evaluate]\nnum-samples = 40\n",
    )
    out = tmp_path / "run"
    assert main(["train", "--config", config, "--epochs", "2", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["epochs"] == 2 and saved["train"]["batch_size"] == 64  # the flag won, the file gave
    assert saved["model"]["options"]["latent_dims"] == [3] and saved["model"]["options"]["hidden_dims"] == [
        16
    ]
    assert not (out / "evaluation.json").exists()  # eval-samples 0 from the [train] table
    capsys.readouterr()
    assert main(["evaluate", str(out), "--config", config]) == 0  # the [evaluate] table's K
    assert "K = 40 importance samples each" in capsys.readouterr().out


def test_a_json_config_with_a_repeatable_option_and_a_switch(tmp_path):
    from pyro_vae.cli.main import parser
    from pyro_vae.cli.options import config_file_defaults

    train = next(
        a for a in parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict)
    ).choices["train"]
    config = _write(
        tmp_path / "c.json",
        json.dumps(
            {
                "guide-option": {"rank": 2},
                "jit": True,
                "fused-adam": False,
                "layer-hidden-dims": [[8], [4]],
            }
        ),
    )
    defaults = config_file_defaults(config, train, command="train")
    assert defaults == {
        "guide_option": [("rank", 2)],
        "jit": True,
        "fused_adam": False,
        "layer_hidden_dims": ((8,), (4,)),
    }


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"epoch": 3}', "pyro-vae train has no option 'epoch'; its options are"),
        ('{"epochs": "many"}', "epochs: invalid literal"),
        ('{"prior": "nope"}', "prior: "),
        ('{"binarize": "sometimes"}', "binarize: must be one of auto"),
        ('{"jit": 1}', "jit: must be true or false"),
        ('{"epochs": 3', "is not valid JSON"),
        ("[1, 2]", "must hold one object"),
    ],
)
def test_a_bad_config_is_refused_in_one_line_and_writes_nothing(text, message, tmp_path, capsys):
    config = _write(tmp_path / "c.json", text)
    assert main(["train", "--config", config, "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and not (tmp_path / "run").exists(), error
    if "no option" in message:
        assert "epochs" in error and "batch-size" in error  # the known keys are named


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nowhere.toml")]) == 2
    assert "nowhere.toml" in capsys.readouterr().err
