"""Reliability: checkpoints that resume exactly, clean stops, clear errors, and no hang on garbage input."""

from __future__ import annotations

import gzip
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.optim
import pytest
import torch

from pyro_vae import DataError, ModelConfig, build_vae, fit, load_dataset, make_loss, prepare_split
from pyro_vae.cli import main
from pyro_vae.io.data import read_amat, read_idx
from pyro_vae.training.loop import AsyncSVI
from pyro_vae.training.state import load_checkpoint, load_weights

SMALL = ["--hidden-dims", "32", "--latent-dims", "4", "--batch-size", "64", "--eval-samples", "0"]
RUN = [sys.executable, "-m", "pyro_vae", "train", *SMALL, "--checkpoint-every", "3"]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_weights(run_dir / "model.pt")


def _start(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "whole"
    done = subprocess.run([*RUN, "--epochs", "12", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


def test_a_run_killed_mid_epoch_resumes_to_identical_parameters(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    process = _start([*RUN, "--epochs", "12", "--out", str(out)])
    _wait_for(out / "checkpoint.pt", process)
    time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] <= 12 and not (out / "model.pt").exists()  # it died before finishing
    done = subprocess.run(
        [*RUN, "--epochs", "12", "--out", str(out), "--resume"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    expected, resumed = _weights(uninterrupted), _weights(out)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    assert (out / "metrics.csv").read_text().count("\n") == 13


def test_sigint_stops_cleanly_after_saving(uninterrupted, tmp_path):
    out = tmp_path / "interrupted"
    process = _start([*RUN, "--epochs", "12", "--out", str(out)])
    _wait_for(out / "checkpoint.pt", process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted: stopped at step" in stderr and "--resume" in stderr and "Traceback" not in stderr
    done = subprocess.run(
        [*RUN, "--epochs", "12", "--out", str(out), "--resume"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    expected, resumed = _weights(uninterrupted), _weights(out)
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)


def test_resume_can_train_longer_but_refuses_other_settings(uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", *SMALL, "--epochs", "2", "--out", str(out)]
    assert main(base) == 0
    assert main(["train", *SMALL, "--epochs", "3", "--out", str(out), "--resume"]) == 0
    assert (out / "metrics.csv").read_text().count("\n") == 4
    capsys.readouterr()
    assert main(["train", *SMALL, "--epochs", "4", "--lr", "0.01", "--out", str(out), "--resume"]) == 2
    assert "another configuration (differs in: lr)" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                *SMALL[:2],
                "--latent-dims",
                "5",
                *SMALL[4:],
                "--epochs",
                "4",
                "--out",
                str(out),
                "--resume",
            ]
        )
        == 2
    )
    assert "model.latent_dims" in capsys.readouterr().err
    assert main(base) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*base, "--resume", "--overwrite"]) == 2
    assert main([*base, "--overwrite"]) == 0
    assert main(["train", *SMALL, "--out", str(tmp_path / "fresh"), "--resume"]) == 2
    assert "no checkpoint.pt to resume" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign"])
def test_damaged_checkpoints_are_refused_with_one_line(damage, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(out)]) == 0
    checkpoint = out / "checkpoint.pt"
    data = checkpoint.read_bytes()
    if damage == "truncate":
        checkpoint.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        checkpoint.write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(4096)))
    else:
        torch.save({"weights": torch.zeros(3)}, checkpoint)
    capsys.readouterr()
    assert main(["train", *SMALL, "--epochs", "2", "--out", str(out), "--resume"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and (
        "truncated or corrupted" in error or "not a pyro_vae checkpoint" in error
    )


def test_a_corrupted_model_file_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(out)]) == 0
    (out / "model.pt").write_bytes(b"\x00" * 100)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--num-samples", "10"]) == 2
    assert "cannot be loaded" in capsys.readouterr().err


class _NaNAfter(torch.nn.Module):
    """A decoder that turns NaN after a number of training calls: a fault in the middle of training.

    Only calls that build a gradient count (one per step): the dry runs that
    validate the model against its guide before training run without one.
    """

    def __init__(self, inner: torch.nn.Module, calls: int) -> None:
        super().__init__()
        self.inner, self.left = inner, calls

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.left -= 1
        out = self.inner(z)
        return out if self.left >= 0 else out * float("nan")


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    train = prepare_split(load_dataset("digits"), "train", mode="none")  # 1438 points: 23 steps an epoch
    vae = build_vae(ModelConfig(data_dim=64, latent_dims=(4,), hidden_dims=(32,), likelihood="gaussian"))
    vae.decoder = _NaNAfter(vae.decoder, calls=23 + 10)
    checkpoint = tmp_path / "checkpoint.pt"
    with pytest.raises(
        FloatingPointError, match=rf"at step 34 \(epoch 2\); the last good checkpoint is {checkpoint}"
    ):
        fit(vae, train, epochs=3, batch_size=64, checkpoint=checkpoint, checkpoint_every=5, progress=False)
    kept = load_checkpoint(checkpoint)
    assert kept["step"] == 30  # the last multiple of 5 before the fault
    assert all(torch.isfinite(t).all() for t in kept["model"].values())


def test_clip_norm_bounds_the_global_gradient_norm():
    vae = build_vae(ModelConfig(data_dim=64, latent_dims=(4,), hidden_dims=(32,)))
    x = torch.bernoulli(torch.full((16, 64), 0.4))
    seen = []

    class Recorder(pyro.optim.PyroOptim):
        def __call__(self, params, *args, **kwargs):
            seen.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
            super().__call__(params, *args, **kwargs)

    with pyro.get_param_store().scope():
        svi = AsyncSVI(vae.model, vae.guide, Recorder(torch.optim.SGD, {"lr": 0.0}), loss=make_loss("elbo"))
        svi.step_async(x, num_data=60_000)
        svi.clip_norm = 0.5
        svi.step_async(x, num_data=60_000)
    assert seen[0] > 10 and float(seen[1]) == pytest.approx(0.5, rel=1e-4)


def test_fuzzed_command_lines_never_crash(capsys):
    rng = random.Random(0)
    words = [
        "train",
        "evaluate",
        "list",
        "--epochs",
        "--lr",
        "--batch-size",
        "--latent-dims",
        "--prior",
        "--likelihood",
        "--binarize",
        "--beta",
        "-1",
        "0",
        "nan",
        "1e9",
        "x",
        "3,",
        ",",
        "--",
        "--seed",
    ]
    for _ in range(150):
        argv = [rng.choice(words) for _ in range(rng.randint(0, 5))]
        if argv[:1] == ["train"] or argv[:1] == ["evaluate"]:
            argv += ["--out", "/nonexistent/dir/run"] if argv[0] == "train" else []
            if "--epochs" not in argv:
                argv += ["--epochs", "0"]  # a valid command line would train: keep the fuzz to errors
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
        assert code in (0, 2), argv
    capsys.readouterr()


def test_fuzzed_data_files_raise_data_errors(tmp_path):
    rng = np.random.default_rng(0)
    for case in range(60):
        blob = rng.integers(0, 256, size=rng.integers(0, 400), dtype=np.uint8).tobytes()
        if case % 3 == 1:
            blob = b"\x00\x00\x08\x03" + blob  # an IDX magic in front of garbage
        for name, reader in (("f-idx3-ubyte", read_idx), ("f.amat", read_amat)):
            path = tmp_path / name
            path.write_bytes(blob)
            try:
                reader(path)
            except DataError:
                pass
            gz = tmp_path / (name + ".gz")
            gz.write_bytes(gzip.compress(blob) if case % 2 else blob)
            try:
                reader(gz)
            except DataError:
                pass
        for suffix in (".npy", ".npz"):
            path = tmp_path / f"user{suffix}"
            path.write_bytes(blob)
            with pytest.raises(DataError):
                load_dataset(str(path))
