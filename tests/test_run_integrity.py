"""Run folders are never lost: a refused command changes nothing, one trainer per folder, data by content.

Faults are real processes (``python -m pyro_vae``): two trainers racing for one
``--out``, SIGKILL in the middle of training; refusals are run in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae.cli import main
from pyro_vae.errors import PyroVAEError
from pyro_vae.io.lock import LOCK_FILE, RunLock
from pyro_vae.io.run import set_aside_run, settle_replacement

SMALL = ["--hidden-dims", "16", "--latent-dims", "2", "--eval-samples", "0"]
TRAIN = [sys.executable, "-m", "pyro_vae", "train", *SMALL]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) by its relative path, with the SHA-256 of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(argv: list[str], **kwargs: object) -> subprocess.Popen:
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), **kwargs
    )


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.002)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run: ``train SMALL --epochs 2``."""
    out = tmp_path_factory.mktemp("runs") / "R"
    assert main(["train", *SMALL, "--epochs", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_dir(finished, tmp_path) -> Path:
    out = tmp_path / "R"
    shutil.copytree(finished, out)
    return out


# ---------------------------------------------------------------------------
# A refused command changes nothing on disk


@pytest.mark.parametrize(
    "changed",
    [["--latent-dims", "3"], ["--likelihood", "continuous-bernoulli"], ["--binarize", "static"]],
    ids=["latent-dims", "likelihood", "binarize"],
)
def test_a_refused_resume_changes_no_byte_of_the_run(run_dir, changed, capsys):
    before = _snapshot(run_dir)
    argv = ["train", *SMALL, "--epochs", "3", "--out", str(run_dir), "--resume"]
    assert main([*argv[:1], *argv[1:], *changed]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err
    assert _snapshot(run_dir) == before
    assert main(["evaluate", str(run_dir), "--num-samples", "5"]) == 0


@pytest.mark.parametrize(
    "bad",
    [
        ["--eval-samples", "-1"],
        pytest.param(
            ["--device", "cuda"],
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA"),
        ),
        ["--seed", "4294967296"],
        ["--batch-size", "5000"],
    ],
    ids=["eval-samples", "device", "seed", "batch-size"],
)
def test_a_refused_overwrite_keeps_the_old_run(run_dir, bad, capsys):
    before = _snapshot(run_dir)
    assert main(["train", *SMALL, "--epochs", "2", "--out", str(run_dir), "--overwrite", *bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err
    assert _snapshot(run_dir) == before


def test_a_refused_fresh_run_leaves_no_folder(tmp_path):
    out = tmp_path / "new" / "R"
    assert main(["train", *SMALL, "--epochs", "2", "--out", str(out), "--batch-size", "5000"]) == 2
    assert not (tmp_path / "new").exists()


def test_overwrite_replaces_the_run_and_keeps_other_files(run_dir):
    (run_dir / "notes.txt").write_text("mine")
    old = json.loads((run_dir / "config.json").read_text())
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(run_dir), "--overwrite"]) == 0
    new = json.loads((run_dir / "config.json").read_text())
    assert (old["train"]["epochs"], new["train"]["epochs"]) == (2, 1)
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        ["checkpoint.pt", "config.json", "metrics.csv", "model.pt", "notes.txt"]
    )
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_an_overwrite_that_stops_before_its_first_checkpoint_keeps_the_old_run(run_dir, capsys):
    # A learning rate this large makes the loss NaN within the first epoch, before any checkpoint.
    before = _snapshot(run_dir)
    argv = ["train", *SMALL, "--epochs", "2", "--lr", "1e30", "--out", str(run_dir), "--overwrite"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "training stopped" in err and "is kept" in err
    assert _snapshot(run_dir) == before


def _plant(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


OLD = {
    "checkpoint.pt": "old ckpt",
    "config.json": "old config",
    "model.pt": "old model",
    "metrics.csv": "old",
}


@pytest.mark.parametrize(
    "state",
    [
        "setting-aside",  # killed while moving the old files out: some still in R
        "set-aside",  # killed after that, before the new run wrote anything
        "new-config",  # killed after the new run wrote its config, before its first checkpoint
        "restoring",  # killed while moving the old files back
    ],
)
def test_an_overwrite_killed_before_the_new_checkpoint_gets_the_old_run_back(tmp_path, state):
    run = tmp_path / "R"
    if state == "setting-aside":
        _plant(run, {k: v for k, v in OLD.items() if k != "checkpoint.pt"})
        _plant(run / ".replaced.tmp", {"checkpoint.pt": OLD["checkpoint.pt"]})
    elif state == "restoring":
        _plant(run, {"checkpoint.pt": OLD["checkpoint.pt"]})
        _plant(run / ".replaced.tmp", {k: v for k, v in OLD.items() if k != "checkpoint.pt"})
    else:
        _plant(run / ".replaced", OLD)
        if state == "new-config":
            _plant(run, {"config.json": "new config"})
    assert "is kept" in settle_replacement(run)
    assert {p.name: p.read_text() for p in run.iterdir()} == OLD


def test_an_overwrite_killed_after_the_new_checkpoint_keeps_the_new_run(tmp_path):
    run = tmp_path / "R"
    _plant(run / ".replaced", OLD)
    _plant(run, {"config.json": "new config", "checkpoint.pt": "new ckpt"})
    assert settle_replacement(run) is None
    assert {p.name: p.read_text() for p in run.iterdir()} == {
        "config.json": "new config",
        "checkpoint.pt": "new ckpt",
    }


def test_setting_aside_and_settling_without_a_new_checkpoint_restores_every_byte(tmp_path):
    run = tmp_path / "R"
    _plant(run, {**OLD, "plot.png": "kept where it is"})
    before = _snapshot(run)
    assert set_aside_run(run)
    assert sorted(p.name for p in run.iterdir()) == [".replaced", "plot.png"]
    (run / "config.json").write_text("new config")
    settle_replacement(run)
    assert _snapshot(run) == before


def test_a_sigkilled_overwrite_loses_neither_run(run_dir):
    before = _snapshot(run_dir)
    process = _start([*TRAIN, "--epochs", "50", "--out", str(run_dir), "--overwrite"])
    _wait_for(run_dir / ".replaced", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # The next command that takes the lock settles the folder, then refuses (it already holds a run).
    done = subprocess.run([*TRAIN, "--out", str(run_dir)], capture_output=True, text=True, env=_env())
    assert done.returncode == 2, done.stderr
    after = _snapshot(run_dir)
    assert not (run_dir / ".replaced").exists() and not (run_dir / ".replaced.tmp").exists()
    kept_old = after == before
    kept_new = (
        "checkpoint.pt" in after
        and json.loads((run_dir / "config.json").read_text())["train"]["epochs"] == 50
    )
    assert kept_old or kept_new, after


# ---------------------------------------------------------------------------
# One trainer per run folder


# A trainer that has imported everything and waits for a file to appear, so two of them reach the run
# folder within a millisecond of each other (imports take seconds, and vary).
_GATED = """
import sys, time
from pathlib import Path
from pyro_vae.cli import main
gate = Path(sys.argv[1])
while not gate.exists():
    time.sleep(0.0002)
sys.exit(main(sys.argv[2:]))
"""


def test_two_racing_trainers_one_wins_and_the_other_gets_one_line(tmp_path):
    out, gate = tmp_path / "R", tmp_path / "go"
    argv = ["train", *SMALL, "--epochs", "30", "--out", str(out)]
    racers = [_start([sys.executable, "-c", _GATED, str(gate), *argv]) for _ in range(2)]
    time.sleep(5.0)  # not a timed assertion: a racer still importing only joins the race later
    gate.touch()
    results = [(p, *p.communicate(timeout=600)) for p in racers]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [(p.returncode, err) for p, _, err in results]
    (winner, _, _), (_, _, loser_err) = sorted(results, key=lambda r: r[0].returncode)
    assert loser_err.count("\n") == 1 and "Traceback" not in loser_err
    # Either it came while the winner trained (the folder in use), or after (the folder holds a run). In the
    # instant between the winner's flock and its writing its pid into the lock file, the pid is not known
    # yet and the line names none; when it names one, that is the winner's.
    assert "is in use by another pyro-vae process" in loser_err or "already holds a run" in loser_err
    if "(pid " in loser_err:
        assert f"(pid {winner.pid})" in loser_err
    assert not (out / LOCK_FILE).exists()


def test_a_second_trainer_while_the_first_trains_gets_one_line_with_its_pid(tmp_path):
    out = tmp_path / "R"
    first = _start([*TRAIN, "--epochs", "1000", "--checkpoint-every", "3", "--out", str(out)])
    try:
        _wait_for(out / "checkpoint.pt", first)  # it is training: it holds the folder
        second = subprocess.run(
            [*TRAIN, "--epochs", "2", "--out", str(out)], capture_output=True, text=True, env=_env()
        )
        assert first.poll() is None  # still training while the second was refused
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2
    assert second.stderr == (
        f"pyro-vae: error: {out} is in use by another pyro-vae process (pid {first.pid}); wait for it or "
        "choose another --out\n"
    )


def test_a_folder_locked_by_another_process_is_refused_with_its_pid(run_dir):
    before = _snapshot(run_dir)
    with RunLock.acquire(run_dir, advice="wait"):
        done = subprocess.run(
            [*TRAIN, "--epochs", "3", "--out", str(run_dir), "--resume"],
            capture_output=True,
            text=True,
            env=_env(),
        )
    assert done.returncode == 2
    assert done.stderr == (
        f"pyro-vae: error: {run_dir} is in use by another pyro-vae process (pid {os.getpid()}); wait for it "
        "or choose another --out\n"
    )
    assert _snapshot(run_dir) == before


def test_after_a_sigkill_the_next_trainer_takes_the_lock_and_clears_stale_temporaries(tmp_path):
    out = tmp_path / "R"
    process = _start([*TRAIN, "--epochs", "50", "--checkpoint-every", "3", "--out", str(out)])
    _wait_for(out / "checkpoint.pt", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (out / LOCK_FILE).exists()  # the file stays, the kernel's lock does not
    stale = [out / ".checkpoint.pt.k1ll3d.tmp", out / ".model.pt.abc123.tmp"]
    for path in stale:
        path.write_bytes(b"half written")
    (out / "mine.tmp").write_text("not ours")
    done = subprocess.run(
        [*TRAIN, "--epochs", "1", "--out", str(out), "--resume", "--checkpoint-every", "3"],
        capture_output=True,
        text=True,
        env=_env(),
    )
    # The killed run stood somewhere in its 50 epochs: resuming with --epochs 1 may be refused as too few,
    # but only after the lock was taken and the folder tidied.
    assert done.returncode in (0, 2) and "in use" not in done.stderr, done.stderr
    assert not any(path.exists() for path in stale)
    assert not list(out.glob(".*.tmp"))
    assert (out / "mine.tmp").exists()


def test_the_lock_file_holds_no_lock_after_its_process_ends(tmp_path):
    out = tmp_path / "R"
    code = "from pyro_vae.io.lock import RunLock; import os, sys; RunLock.acquire(sys.argv[1], advice='x'); os._exit(0)"
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=_env())
    assert (out / LOCK_FILE).exists()  # never released by the process, only by its end
    with RunLock.acquire(out, advice="x") as lock:
        assert lock.held
    assert not (out / LOCK_FILE).exists()


def test_readers_share_the_lock_and_keep_a_trainer_out(tmp_path):
    out = tmp_path / "R"
    out.mkdir()
    with RunLock.acquire(out, shared=True, advice="x"), RunLock.acquire(out, shared=True, advice="x"):
        with pytest.raises(PyroVAEError, match="is in use by another pyro-vae process; wait"):
            RunLock.acquire(out, advice="wait")
    with RunLock.acquire(out, advice="x"):
        with pytest.raises(PyroVAEError, match=rf"in use by another pyro-vae process \(pid {os.getpid()}\)"):
            RunLock.acquire(out, shared=True, advice="x")


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_out_that_cannot_be_a_folder_is_one_line(tmp_path, where, capsys):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if where == "a file" else tmp_path / "f" / "R"
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "file, not a folder" in err
    assert (tmp_path / "f").read_text() == "x"


# ---------------------------------------------------------------------------
# Advice that works


def test_a_run_killed_before_its_first_checkpoint_is_told_what_works(run_dir, capsys):
    # What a run killed in its first epoch leaves: its config.json alone.
    for name in ("checkpoint.pt", "model.pt", "metrics.csv"):
        (run_dir / name).unlink()
    base = ["train", *SMALL, "--epochs", "2", "--out", str(run_dir)]
    assert main([*base, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "stopped before its first one); start it again with --overwrite" in err
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "start it again with --overwrite" in err and "--resume" not in err
    assert main([*base, "--overwrite"]) == 0


# ---------------------------------------------------------------------------
# Self-contained data


@pytest.fixture
def points(tmp_path) -> Path:
    x = np.random.default_rng(0).random((200, 6)).astype(np.float32)
    path = tmp_path / "data" / "points.npy"
    path.parent.mkdir()
    np.save(path, x)
    return path


def test_a_user_data_file_is_kept_by_absolute_path_and_hash(points, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(points.parent)
    out = tmp_path / "R"
    argv = ["train", *SMALL, "--epochs", "1", "--likelihood", "gaussian", "--dataset", "points.npy"]
    assert main([*argv, "--out", str(out)]) == 0
    data = json.loads((out / "config.json").read_text())["data"]
    assert data["dataset"] == str(points.resolve())
    assert data["sha256"] == hashlib.sha256(points.read_bytes()).hexdigest()
    monkeypatch.chdir(tmp_path)  # another working directory
    assert main(["evaluate", str(out), "--num-samples", "5"]) == 0
    capsys.readouterr()

    np.save(points, np.random.default_rng(1).random((200, 6)).astype(np.float32))
    assert main(["evaluate", str(out), "--num-samples", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(points.resolve()) in err and data["sha256"] in err

    before = _snapshot(out)
    assert main([*argv[:-1], str(points), "--epochs", "2", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "was trained on the data file with SHA-256" in err
    assert _snapshot(out) == before


def test_a_run_folder_from_before_data_hashes_still_loads(points, tmp_path):
    out = tmp_path / "R"
    argv = ["train", *SMALL, "--epochs", "1", "--likelihood", "gaussian", "--dataset", str(points)]
    assert main([*argv, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    del config["data"]["sha256"]
    (out / "config.json").write_text(json.dumps(config))
    np.save(points, np.random.default_rng(1).random((200, 6)).astype(np.float32))
    assert main(["evaluate", str(out), "--num-samples", "5"]) == 0  # no hash kept: nothing to compare


def test_a_registered_data_set_keeps_its_name_and_no_hash(finished):
    data = json.loads((finished / "config.json").read_text())["data"]
    assert data == {"dataset": "digits", "data_dir": None, "binarize": "dynamic"}
