"""Conventions of the command line: a line per epoch when piped (no bar frames), --quiet, --version, umask."""

from __future__ import annotations

import os
import subprocess
import sys

from pyro_vae import __version__
from pyro_vae.files import write_text_atomic

SMALL = ["--hidden-dims", "16", "--latent-dims", "2", "--epochs", "3"]


def _train(tmp_path, *flags: str, eval_samples: str = "0") -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pyro_vae",
            *flags,
            "train",
            *SMALL,
            "--eval-samples",
            eval_samples,
            "--out",
            str(tmp_path / "R"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )


def test_piped_training_prints_one_line_per_epoch_and_no_bar_frames(tmp_path):
    done = _train(tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("train ELBO" in line and "test ELBO" in line and "s left" in line for line in lines)
    assert "\r" not in done.stderr
    # The results stay on stdout, as before.
    assert "final ELBO per datum" in done.stdout


def test_quiet_hides_the_progress_lines(tmp_path):
    done = _train(tmp_path, "--quiet")
    assert done.returncode == 0 and done.stderr == ""


def test_piped_evaluation_logs_its_chunks_and_the_headline_has_its_khat_caveat(tmp_path):
    done = _train(tmp_path, eval_samples="50")
    assert done.returncode == 0, done.stderr
    assert "k-hat" in done.stdout.splitlines()[-2]  # the line after the headline log p(x)
    evaluated = subprocess.run(
        [sys.executable, "-m", "pyro_vae", "evaluate", str(tmp_path / "R"), "--num-samples", "30"],
        capture_output=True,
        text=True,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert "data points done" in evaluated.stderr and "\r" not in evaluated.stderr


def test_version():
    done = subprocess.run([sys.executable, "-m", "pyro_vae", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"pyro-vae {__version__}"


def test_run_files_get_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640


def test_sample_draws_real_samples_and_names_the_run_and_seed(tmp_path):
    assert _train(tmp_path).returncode == 0
    for flags, name in (([], "means.png"), (["--draws"], "draws.png")):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pyro_vae",
                "sample",
                str(tmp_path / "R"),
                "--num",
                "9",
                "--seed",
                "3",
                "--out",
                str(tmp_path / name),
                *flags,
            ],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"wrote {tmp_path / name}"
    # Draws of a Bernoulli likelihood are binary images; means are grey: the two pictures differ.
    assert (tmp_path / "means.png").read_bytes() != (tmp_path / "draws.png").read_bytes()


def test_long_lines_are_wrapped_to_100_columns_and_words_kept_whole():
    from pyro_vae.cli.printing import fit_columns

    line = "warning: k-hat > 0.7 for 23 of 359 data points: " + "their estimates are unreliable; " * 6
    wrapped = fit_columns(line + "\nshort").splitlines()
    assert all(len(part) <= 100 for part in wrapped) and len(wrapped) >= 3
    assert wrapped[-1] == "short" and all(part.startswith("    ") for part in wrapped[1:-1])
    assert " ".join(part.strip() for part in wrapped[:-1]) == " ".join(line.split())
    path = "run saved to /" + "x" * 120  # a path longer than a line stays whole
    assert fit_columns(path).splitlines()[-1].strip() == "/" + "x" * 120


def test_piped_evaluation_chunks_say_the_time_left(tmp_path):
    assert _train(tmp_path).returncode == 0
    evaluated = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyro_vae",
            "evaluate",
            str(tmp_path / "R"),
            "--num-samples",
            "1000",
            "--limit",
            "150",
        ],
        capture_output=True,
        text=True,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    chunks = [line for line in evaluated.stderr.splitlines() if "data points done" in line]
    assert len(chunks) >= 2, evaluated.stderr  # 65 points of K = 1000 a pass
    assert all(" s left)" in line for line in chunks[:-1])
    assert chunks[-1].startswith("log p(x), K = 1000: 150 of 150") and "left" not in chunks[-1]
