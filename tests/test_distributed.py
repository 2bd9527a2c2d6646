"""Data-parallel training: two gloo processes under torchrun equal one process with two shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed

from pyro_vae import TrainConfig, data_plate, make_loss
from pyro_vae.cli import main
from pyro_vae.training.distributed import DataParallel, Shard, ShardedELBO, derive_seed, shard_indices
from pyro_vae.training.state import load_checkpoint, load_weights

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
# 1438 training points in minibatches of 64: 23 steps an epoch, the last one of 30 points (15 per shard).
SMALL = [
    "--hidden-dims",
    "32",
    "--latent-dims",
    "2",
    "--batch-size",
    "64",
    "--epochs",
    "2",
    "--eval-samples",
    "20",
]
TRAIN = ["train", *SMALL, "--checkpoint-every", "5", "--out", "run"]


def _torchrun(folder: Path, *argv: str) -> subprocess.CompletedProcess:
    """Two CPU processes (gloo) of tests/distributed_worker.py, each working in ``folder/rank<R>``."""
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    command = [*launcher, "--standalone", "--nproc-per-node", "2", str(WORKER), str(folder), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_weights(run_dir / "model.pt")


def _metrics(run_dir: Path) -> list[tuple[str, ...]]:
    # Every column but the wall time.
    return [tuple(line.split(",")[:3]) for line in (run_dir / "metrics.csv").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torchrun")
    done = _torchrun(folder, *TRAIN, "--distributed")
    assert done.returncode == 0, done.stderr
    return folder, done


def test_two_processes_equal_one_process_with_two_shards(two_processes, tmp_path, capsys):
    folder, _ = two_processes
    assert main(["train", *SMALL, "--shards", "2", "--out", str(tmp_path / "one")]) == 0
    two, one = folder / "rank0" / "run", tmp_path / "one"
    expected, got = _weights(one), _weights(two)
    assert expected.keys() == got.keys()
    largest = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    print(f"largest parameter difference, 2 processes vs 1 process with 2 shards: {largest:.3g}")
    assert largest <= 1e-6
    assert _metrics(one) == _metrics(two)
    # The final log p(x), evaluated slice by slice on both processes and gathered on rank 0.
    evaluation = [json.loads((run / "evaluation.json").read_text()) for run in (one, two)]
    assert evaluation[0]["num_data"] == evaluation[1]["num_data"] == 359
    assert evaluation[0]["log_px"] == pytest.approx(evaluation[1]["log_px"], abs=1e-9)
    assert json.loads((two / "config.json").read_text())["train"]["shards"] == 2


def test_only_rank_zero_writes_and_speaks(two_processes):
    folder, done = two_processes
    assert {p.name for p in (folder / "rank0" / "run").iterdir()} == {
        "checkpoint.pt",
        "config.json",
        "evaluation.json",
        "metrics.csv",
        "model.pt",
    }
    assert not any((folder / "rank1").iterdir())  # rank 1 wrote nothing, not even a temporary file
    assert done.stdout.count("run saved to") == 1 and "on 2 processes (cpu)" in done.stdout


def test_an_interrupted_distributed_run_resumes_to_identical_parameters(two_processes, tmp_path):
    uninterrupted = two_processes[0] / "rank0" / "run"
    # Rank 0 gets Ctrl-C during step 7; the flag rides with step 8's gradients, so both stop after step 8.
    stopped = _torchrun(tmp_path, "--interrupt-at", "7", *TRAIN, "--distributed")
    assert stopped.returncode != 0
    assert "interrupted: stopped at step 8" in stopped.stderr, stopped.stderr
    run = tmp_path / "rank0" / "run"
    state = load_checkpoint(run / "checkpoint.pt")
    assert (state["step"], state["epoch"], state["rng"]) == (8, 1, None) and not (run / "model.pt").exists()
    one_process = tmp_path / "copy"
    shutil.copytree(run, one_process)

    resumed = _torchrun(tmp_path, *TRAIN, "--distributed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    expected, got = _weights(uninterrupted), _weights(run)
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert _metrics(run) == _metrics(uninterrupted)
    assert not any((tmp_path / "rank1").iterdir())

    # The shard count, not the number of processes, fixes the numbers: one process resumes the run too.
    assert main(["train", *SMALL, "--shards", "2", "--resume", "--out", str(one_process)]) == 0
    got = _weights(one_process)
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_resume_refuses_another_number_of_shards(two_processes, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_processes[0] / "rank0" / "run", run)
    base = ["train", *SMALL[:-4], "--epochs", "3", "--eval-samples", "0", "--out", str(run), "--resume"]
    assert main([*base, "--shards", "1"]) == 2
    error = capsys.readouterr().err
    assert "trained with --shards 2 and this run has --shards 1; resume with --shards 2" in error
    assert error.count("\n") == 1
    assert main(base) == 2
    assert "this run has no shards" in capsys.readouterr().err


def test_distributed_needs_the_torchrun_environment(monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["train", "--distributed", "--epochs", "1"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "torchrun --nproc-per-node N -m pyro_vae train --distributed" in error


@pytest.mark.parametrize("num_data", [1438, 1437])
@pytest.mark.parametrize("shards", [2, 4])
def test_the_shards_of_a_minibatch_are_the_one_process_minibatch(num_data, shards):
    batch_size, per_shard = 64, 64 // shards
    for epoch in (0, 3):
        whole = shard_indices(num_data, shards=1, shard=0, seed=5, epoch=epoch)
        # DistributedSampler's permutation: a generator seeded with seed + epoch.
        assert torch.equal(
            whole, torch.randperm(num_data, generator=torch.Generator().manual_seed(5 + epoch))
        )
        parts = [shard_indices(num_data, shards=shards, shard=s, seed=5, epoch=epoch) for s in range(shards)]
        visited = num_data - num_data % shards  # the tail of the permutation sits this epoch out
        assert all(len(part) == visited // shards for part in parts)
        for start in range(0, visited, batch_size):
            k = start // batch_size
            union = torch.cat([part[k * per_shard : (k + 1) * per_shard] for part in parts])
            expected = whole[start : min(start + batch_size, visited)]
            assert torch.equal(union.sort().values, expected.sort().values)
    epochs = [shard_indices(num_data, shards=shards, shard=0, seed=5, epoch=e) for e in (0, 1)]
    assert not torch.equal(*epochs)  # reshuffled every epoch


def test_the_mean_over_shards_is_the_full_minibatch_gradient():
    """With S shards of m points, (1/S) sum_s (N/m) sum_{i in s} = (N/M) sum_i: the one-process estimate."""
    x = torch.randn(12, 3)

    def model(x, *, num_data=None):
        loc = pyro.param("loc", torch.zeros(3))
        with data_plate(x, num_data):
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(x, *, num_data=None):
        pass

    loc = pyro.param("loc", torch.tensor([0.3, -0.2, 0.1])).unconstrained()
    expected = make_loss("elbo").differentiable_loss(model, guide, x, num_data=100)
    expected.backward()
    expected_grad, loc.grad = loc.grad.clone(), None

    parallel = DataParallel(shards=3, seed=0, device=torch.device("cpu"))
    sharded = ShardedELBO(make_loss("elbo"), parallel=parallel)
    shards = [Shard(s, derive_seed(0, s), x[s::3]) for s in range(3)]
    sharded.loss_and_grads(model, guide, shards, num_data=100)
    sharded.reduce_grads([loc])
    torch.testing.assert_close(sharded.global_loss, expected.detach())
    torch.testing.assert_close(loc.grad, expected_grad)


def test_derived_seeds_and_config_checks():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert len({derive_seed(0, 0, step, shard) for step in range(50) for shard in range(4)}) == 200
    with pytest.raises(ValueError, match="use a --batch-size that is a multiple of 3"):
        TrainConfig(batch_size=64, shards=3)
    with pytest.raises(ValueError, match="shards must be a positive integer"):
        TrainConfig(shards=0)


def test_two_processes_with_four_shards_equal_one_process_with_four(tmp_path):
    """Each of the 2 processes computes 2 of the 4 shards: still the one-process --shards 4 run."""
    argv = ["train", *SMALL[:-4], "--epochs", "1", "--eval-samples", "0", "--shards", "4", "--out", "run"]
    done = _torchrun(tmp_path / "two", *argv, "--distributed")
    assert done.returncode == 0, done.stderr
    assert main([*argv[:-1], str(tmp_path / "one")]) == 0
    expected, got = _weights(tmp_path / "one"), _weights(tmp_path / "two" / "rank0" / "run")
    largest = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    assert largest <= 1e-6, largest
    # Each process sums its two shards before the all-reduce: the same numbers up to the order of additions.
    one, two = (_metrics(run)[1:] for run in (tmp_path / "one", tmp_path / "two" / "rank0" / "run"))
    assert [float(v) for row in one for v in row] == pytest.approx([float(v) for row in two for v in row])
