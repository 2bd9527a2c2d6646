"""Shared fixtures: Pyro's validation on, a clean param store and a fixed seed for every test."""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import pytest
import torch

# One thread per process, for this process and the subprocesses tests start: with two OpenMP threads on
# two cores, any other busy process makes every parallel region wait for a descheduled thread (steps
# 30x slower), while one thread costs these small networks almost nothing.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# ../shared/datasets beside the repository: exact copies of the benchmark data sets, absent on some machines.
SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_shared = pytest.mark.skipif(not SHARED_DATASETS.exists(), reason=f"needs {SHARED_DATASETS}")


@pytest.fixture(autouse=True)
def pyro_state():
    pyro.enable_validation(True)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture
def float64():
    """Run a test in double precision (known-answer comparisons to 1e-6 and below)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
