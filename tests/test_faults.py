"""Faults and bad input (issue 14): every one a single line and a clear exit status, never a traceback or a lost run.

Faults run as real subprocesses (``python -m pyro_vae``): SIGTERM, a bit flipped
on disk, a read-only run folder and a full disk (tmpfs mounts, where the tests
run as root and may mount; skipped with the reason otherwise).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from pyro_vae import ModelConfig, build_vae, fit, load_dataset, prepare_split
from pyro_vae.errors import PyroVAEError, PyroVAETypeError
from pyro_vae.inference import evaluate_bounds
from pyro_vae.training.state import _write_sealed, load_checkpoint, load_weights, save_weights

S = ["--hidden-dims", "16", "--latent-dims", "2", "--eval-samples", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyro_vae", *argv], capture_output=True, text=True, env=ENV, timeout=timeout
    )


# What the command line logs on stderr when piped, before any error: a line per epoch, a line per chunk.
PROGRESS = re.compile(r"^(epoch \d+/\d+: |log p\(x\), K = \d+: )")


def assert_one_line(done: subprocess.CompletedProcess, code: int, *words: str) -> None:
    """Exit status ``code``, the error one line holding every word, no traceback (progress lines aside)."""
    assert done.returncode == code, done.stderr
    lines = [line for line in done.stderr.splitlines() if not PROGRESS.match(line)]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in lines[0], done.stderr


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """R: ``pyro-vae train $S --epochs 2 --out R``."""
    out = tmp_path_factory.mktemp("finished") / "R"
    done = cli("train", *S, "--epochs", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A copy of R to damage."""
    return Path(shutil.copytree(finished, tmp_path / "R"))


def _flip_a_bit_of(path: Path, tensor: torch.Tensor) -> None:
    """Flip one bit in the middle of ``tensor``'s record in ``path`` (found by its raw bytes)."""
    data = bytearray(path.read_bytes())
    raw = tensor.contiguous().numpy().tobytes()
    at = data.find(raw)
    assert at >= 0, "the tensor's bytes are not stored as they are"
    data[at + len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------------------
# Checksums (item 4) and non-finite weights (item 5)


def test_a_bit_flipped_in_a_tensor_record_of_the_checkpoint_is_refused(run):
    checkpoint = run / "checkpoint.pt"
    weights = load_checkpoint(checkpoint)["model"]
    _flip_a_bit_of(checkpoint, max(weights.values(), key=torch.Tensor.numel))
    done = cli("train", *S, "--epochs", "3", "--out", str(run), "--resume")
    assert_one_line(done, 2, str(checkpoint), "SHA-256")


def test_a_bit_flipped_in_model_pt_is_refused(run):
    weights = load_weights(run / "model.pt")
    _flip_a_bit_of(run / "model.pt", max(weights.values(), key=torch.Tensor.numel))
    assert_one_line(cli("evaluate", str(run), "--num-samples", "10"), 2, "model.pt", "SHA-256")


def test_a_checkpoint_written_before_checksums_still_loads(run):
    # Unsealed files (plain torch.save, as before) are read unchecked rather than stranded.
    state = load_checkpoint(run / "checkpoint.pt")
    torch.save(state, run / "checkpoint.pt")
    torch.save(load_weights(run / "model.pt"), run / "model.pt")
    assert load_checkpoint(run / "checkpoint.pt")["step"] == state["step"]
    assert cli("evaluate", str(run), "--num-samples", "10").returncode == 0


@pytest.mark.parametrize(
    "command",
    [
        ["evaluate", "--num-samples", "10"],
        ["export", "--out", "{tmp}/x.nc", "--num-samples", "10"],
        ["plot", "--out", "{tmp}/plots", "--khat-samples", "0"],
        ["sample", "--out", "{tmp}/s.png"],
    ],
)
def test_a_model_pt_with_nan_weights_is_refused(run, tmp_path, command):
    weights = load_weights(run / "model.pt")
    name = next(iter(weights))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_weights(run / "model.pt", weights)  # a valid checksum: the NaN was there when it was written
    argv = [command[0], str(run), *(word.format(tmp=tmp_path) for word in command[1:])]
    assert_one_line(cli(*argv), 2, "NaN or infinite", name)


def test_a_checkpoint_with_nan_weights_is_refused_on_resume(run):
    state = load_checkpoint(run / "checkpoint.pt")
    name = next(iter(state["model"]))
    state["model"][name] = torch.full_like(state["model"][name], float("inf"))
    _write_sealed(run / "checkpoint.pt", state)
    done = cli("train", *S, "--epochs", "3", "--out", str(run), "--resume")
    assert_one_line(done, 2, "NaN or infinite", name)
    assert "last good" not in done.stderr


# ---------------------------------------------------------------------------------------------------------
# SIGTERM (item 6)


def test_sigterm_in_epoch_2_saves_and_resumes_bit_identical(tmp_path):
    argv = [*S, "--batch-size", "16", "--epochs", "3"]  # 90 steps an epoch: SIGTERM lands inside epoch 2
    whole = cli("train", *argv, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "stopped"
    process = subprocess.Popen(
        [sys.executable, "-m", "pyro_vae", "train", *argv, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    deadline = time.monotonic() + 240
    while not (out / "checkpoint.pt").exists():  # the end of epoch 1
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "stopped at step" in stderr and "--resume" in stderr and "Traceback" not in stderr
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 2 and state["done"] > 0, "the signal was to stop in the middle of epoch 2"
    resumed = cli("train", *argv, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    expected, got = load_weights(tmp_path / "whole" / "model.pt"), load_weights(out / "model.pt")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


# ---------------------------------------------------------------------------------------------------------
# OS errors (item 8)


def test_out_paths_the_system_refuses_are_one_line(finished, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    assert_one_line(cli("train", *S, "--epochs", "1", "--out", str(a_file)), 2, str(a_file))
    assert_one_line(cli("train", *S, "--epochs", "1", "--out", str(a_file / "run")), 2, str(a_file))
    folder = tmp_path / "folder"
    folder.mkdir()
    done = cli("evaluate", str(finished), "--num-samples", "10", "--json", str(folder))
    assert_one_line(done, 2, str(folder), "folder")
    assert_one_line(cli("export", str(finished), "--out", str(folder), "--num-samples", "10"), 2, str(folder))
    done = cli("plot", str(finished), "--out", str(a_file), "--khat-samples", "0")
    assert_one_line(done, 2, str(a_file), "is a file, not a folder")


@contextlib.contextmanager
def _tmpfs(size: str):
    """A tmpfs of ``size`` mounted on a fresh folder (root only; skips the test where it cannot mount)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    where = Path(tempfile.mkdtemp(prefix="pyro-vae-tmpfs-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)
        where.rmdir()


def test_a_read_only_run_is_one_line_for_plot_and_resume(finished):
    with _tmpfs("8m") as where:
        run = Path(shutil.copytree(finished, where / "R"))
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        assert_one_line(cli("plot", str(run), "--khat-samples", "0"), 2, "Read-only file system")
        done = cli("train", *S, "--epochs", "3", "--out", str(run), "--resume")
        assert_one_line(done, 2, "Read-only file system")


def test_a_full_disk_stops_with_one_line_naming_the_last_checkpoint():
    # 800 hidden units: a checkpoint of about 1.3 MB, so the first fits in 2 MiB and the second cannot.
    with _tmpfs("2m") as where:
        out = where / "R"
        done = cli(
            "train",
            "--hidden-dims",
            "800",
            "--latent-dims",
            "2",
            "--eval-samples",
            "0",
            "--epochs",
            "3",
            "--out",
            str(out),
        )
        assert_one_line(done, 1, "No space left on device", f"the last checkpoint, {out / 'checkpoint.pt'}")
        assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2  # epoch 1's, whole


# ---------------------------------------------------------------------------------------------------------
# Huge sizes (item 9)


@pytest.mark.parametrize(
    "flags",
    [
        ["--hidden-dims", "100000000000"],
        ["--latent-dims", "100000000000"],
        ["--num-particles", "1000000000000"],
        ["--prior", "vamp", "--prior-components", "100000000"],
        ["--eval-samples", "1000000000000"],
    ],
)
def test_sizes_that_cannot_fit_are_refused_with_the_estimate(flags, tmp_path):
    done = cli("train", *S, "--epochs", "1", *flags, "--out", str(tmp_path / "R"))
    assert_one_line(done, 2, "of memory, more than the")
    assert not (tmp_path / "R" / "checkpoint.pt").exists()


def test_epochs_that_cannot_finish_are_refused_after_the_first(tmp_path):
    done = cli("train", *S, "--epochs", "1000000000", "--out", str(tmp_path / "R"))
    assert_one_line(done, 2, "--epochs 1000000000 cannot finish", "years")
    assert load_checkpoint(tmp_path / "R" / "checkpoint.pt")["epoch"] == 2  # the epoch done is kept


def test_a_sample_grid_that_cannot_fit_is_refused(finished, tmp_path):
    done = cli("sample", str(finished), "--num", "100000000000", "--out", str(tmp_path / "s.png"))
    assert_one_line(done, 2, "drawing 100000000000 samples", "of memory")


# ---------------------------------------------------------------------------------------------------------
# --device (item 10)


@pytest.mark.parametrize("command", ["evaluate", "plot", "sample", "export"])
@pytest.mark.parametrize("device", ["tpu", ""])
def test_every_command_refuses_a_device_with_one_line(finished, tmp_path, command, device):
    extra = {"sample": ["--out", str(tmp_path / "s.png")], "export": ["--out", str(tmp_path / "x.nc")]}
    done = cli(command, str(finished), "--device", device, *extra.get(command, []))
    assert_one_line(done, 2, "device")


# ---------------------------------------------------------------------------------------------------------
# Damaged run files (item 11)


@pytest.mark.parametrize(
    "damage,words",
    [
        (lambda s: s.pop("optim"), "lacks optim"),
        (lambda s: s.pop("rng"), "lacks rng"),
        (lambda s: s.update(done=3, order=None), "inconsistent"),
        (lambda s: s.update(done=5000, order=torch.randperm(1438)), "inconsistent"),
        (lambda s: s.update(order=torch.zeros(1438, dtype=torch.long), done=1), "not a permutation"),
    ],
)
def test_a_damaged_checkpoint_is_refused_with_one_line(run, damage, words):
    state = load_checkpoint(run / "checkpoint.pt")
    damage(state)
    _write_sealed(run / "checkpoint.pt", state)
    assert_one_line(cli("train", *S, "--epochs", "3", "--out", str(run), "--resume"), 2, words)


@pytest.mark.parametrize("command", [["evaluate", "--num-samples", "10"], ["plot", "--khat-samples", "0"]])
def test_a_foreign_metrics_csv_is_refused(run, command):
    (run / "metrics.csv").write_text("foo,bar\n1,2\n")
    assert_one_line(cli(command[0], str(run), *command[1:]), 2, "metrics.csv")


def test_a_config_nested_too_deep_is_refused(run):
    (run / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_one_line(cli("evaluate", str(run), "--num-samples", "10"), 2, "config.json")


# ---------------------------------------------------------------------------------------------------------
# The Python API (item 12)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return prepare_split(load_dataset("digits"), "train", mode="none")[:64].round()


def small_vae():
    return build_vae(ModelConfig(data_dim=64, latent_dims=(2,), hidden_dims=(16,)))


@pytest.mark.parametrize(
    "call,error,words",
    [
        (lambda x: fit(small_vae(), x.double(), epochs=1), PyroVAETypeError, "float64"),
        (lambda x: fit(small_vae(), x.half(), epochs=1), PyroVAETypeError, "float16"),
        (
            lambda x: fit(small_vae(), x, test=x.double(), epochs=1),
            PyroVAETypeError,
            "test data are torch.float64",
        ),
        (lambda x: fit(small_vae(), x.to("meta"), epochs=1), PyroVAEError, "meta device"),
        (lambda x: fit(None, x, epochs=1), PyroVAETypeError, "NoneType"),
        (lambda x: fit(small_vae(), None, epochs=1), PyroVAETypeError, "torch.Tensor"),
        (
            lambda x: fit(small_vae(), x, epochs=1, checkpoint=Path(tempfile.gettempdir())),
            PyroVAEError,
            "a folder",
        ),
        (
            lambda x: fit(small_vae(), x, epochs=1, batch_size=8, num_particles=10**12),
            PyroVAEError,
            "of memory",
        ),
    ],
)
def test_fit_refuses_bad_input_before_any_work(digits, call, error, words):
    with pytest.raises(error, match=words):
        call(digits)


@pytest.mark.parametrize(
    "transform,error,words",
    [
        (lambda x: x.double(), PyroVAETypeError, "float64"),
        (lambda x: x[:, :10], PyroVAEError, "64 values per data point"),
        (lambda x: x * float("nan"), PyroVAEError, "NaN"),
        (lambda x: x * 0.5, PyroVAEError, "binary data"),  # grey values on a Bernoulli model
    ],
)
def test_evaluate_bounds_refuses_data_the_model_cannot_score(digits, transform, error, words):
    vae = small_vae()
    with pytest.raises(error, match=words):
        evaluate_bounds(vae.model, vae.guide, transform(digits), num_samples=3)


# ---------------------------------------------------------------------------------------------------------
# Argparse errors (item 13) and the small ones (item 16)


def test_a_bad_flag_is_one_line_with_a_pointer_to_the_help():
    done = cli("train", "--epochs", "x")
    assert_one_line(done, 2, "pyro-vae train: error:", "--epochs", "pyro-vae train --help")
    assert "usage:" not in done.stderr


def test_sample_names_the_file_it_wrote(finished, tmp_path):
    done = cli("sample", str(finished), "--out", str(tmp_path / "noext"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "noext.png").is_file() and f"wrote {tmp_path / 'noext.png'}" in done.stdout


@pytest.mark.parametrize("command", ["sample", "plot", "export"])
def test_a_seed_too_large_is_a_sentence(finished, tmp_path, command):
    out = {"sample": ["--out", str(tmp_path / "s.png")], "export": ["--out", str(tmp_path / "x.nc")]}
    done = cli(command, str(finished), "--seed", "18446744073709551616", *out.get(command, []))
    assert_one_line(done, 2, "--seed", "2**32 - 1")
