"""Training-step time of pyro_vae against the same VAE written by hand in PyTorch.

For the standard MLP VAE (784-400-50, Bernoulli likelihood, Adam), at batch 128
and 1024, times one training step of pyro_vae and of the hand-written
reference in ``reference_vae.py`` (same network, same single-sample ELBO),
interleaved in one process after warm-up, on the CPU or a CUDA device:

- ``hand-written PyTorch``: torch.optim.Adam with torch's default kernel
  choice (a per-tensor loop on the CPU, foreach on CUDA): the reference.
- ``hand-written, fused Adam``: the same with ``fused=True``, to show how much
  of any lead comes from the optimizer kernel alone.
- ``pyro_vae (default)``: ``fit``'s step: AsyncSVI, the device-resident
  Trace_ELBO and one fused Adam over all parameters (``JointAdam``).
- ``pyro_vae --jit``: the same with the loss compiled by tracing (``JitELBO``).
- ``pyro_vae --no-fused-adam``: Pyro's per-parameter ``pyro.optim.Adam``.

Prints the median ms/step of each and its ratio to the reference; the last
line is ``ratio=<float>`` for the default at batch 128 on the device used.

    python benchmarks/bench_train.py --device cpu
    python benchmarks/bench_train.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import pyro
import pyro.optim
import torch

from pyro_vae import ModelConfig, build_vae, make_loss
from pyro_vae.training.loop import AsyncSVI, resolve_device
from pyro_vae.training.optim import JointAdam

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_vae import ReferenceVAE


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device: torch.device, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return times


def compare(
    batch: int, data: torch.Tensor, device: torch.device, args: argparse.Namespace
) -> dict[str, float]:
    """Median ms/step of each implementation at one batch size."""
    num_data = data.shape[0]
    x = data[:batch]
    pyro.set_rng_seed(0)
    config = ModelConfig(data_dim=784, latent_dims=(50,), hidden_dims=(400,))
    base = build_vae(config)  # every implementation starts from these weights
    steps = {}
    for name, fused in [("hand-written PyTorch", None), ("hand-written, fused Adam", True)]:
        reference = ReferenceVAE().copy_from(base).to(device)
        optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3, fused=fused)
        steps[name] = partial(_reference_step, reference, optimizer, x, num_data)
    store = pyro.get_param_store()
    for name, optimizer, jit in [
        ("pyro_vae (default)", JointAdam(lr=1e-3), False),
        ("pyro_vae --jit", JointAdam(lr=1e-3), True),
        ("pyro_vae --no-fused-adam", pyro.optim.Adam({"lr": 1e-3}), False),
    ]:
        vae = build_vae(config)
        vae.load_state_dict(base.state_dict())
        vae.to(device)
        # Each model trains in a param store of its own (the names are the same), entered around its steps.
        with store.scope() as state:
            svi = AsyncSVI(vae.model, vae.guide, optimizer, loss=make_loss("elbo", jit=jit))
        steps[name] = partial(_pyro_step, store, state, svi, x, num_data)
    with pyro.validation_enabled(False):
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        timings: dict[str, list[float]] = {name: [] for name in steps}
        # Interleave short rounds so drift in the machine's speed hits every implementation alike.
        for _ in range(args.rounds):
            for name, step in steps.items():
                timings[name] += time_steps(step, device, args.steps_per_round)
    return {name: statistics.median(values) for name, values in timings.items()}


def _reference_step(model: ReferenceVAE, optimizer, x: torch.Tensor, num_data: int) -> None:  # type: ignore[no-untyped-def]
    optimizer.zero_grad(set_to_none=True)
    model.loss(x, num_data).backward()
    optimizer.step()


def _pyro_step(store, state, svi: AsyncSVI, x: torch.Tensor, num_data: int) -> None:  # type: ignore[no-untyped-def]
    with store.scope(state):
        svi.step_async(x, num_data=num_data)


def main(args: argparse.Namespace) -> float:
    device = resolve_device(args.device)
    data = torch.bernoulli(torch.full((60_000, 784), 0.13)).to(device)
    results = {batch: compare(batch, data, device, args) for batch in args.batch_sizes}
    print(
        f"device {device}, torch {torch.__version__}, pyro {pyro.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"{'batch':>6}  {'implementation':<26} {'median ms/step':>15} {'ratio':>7}")
    for batch, medians in results.items():
        base = medians["hand-written PyTorch"]
        for name, ms in medians.items():
            print(f"{batch:>6}  {name:<26} {ms:>15.3f} {ms / base:>7.3f}")
    first = results[args.batch_sizes[0]]
    ratio = first["pyro_vae (default)"] / first["hand-written PyTorch"]
    print(f"ratio={ratio:.4f}")
    return ratio


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps-per-round", type=int, default=20)
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    if args.smoke_test:
        args.batch_sizes, args.warmup, args.rounds, args.steps_per_round = [16], 2, 2, 2
    main(args)
