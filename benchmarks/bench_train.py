"""Training-step time of pyro_vae against the same VAE written by hand in PyTorch.

For the standard MLP VAE (784-400-50, Bernoulli likelihood, Adam), at batch 128
and 1024, times one SVI step of pyro_vae (``fit``'s step: AsyncSVI with the
device-resident Trace_ELBO) and one step of the hand-written reference in
``reference_vae.py`` (same network, same single-sample ELBO, torch.optim.Adam),
interleaved in one process after warm-up, on the CPU or a CUDA device. Prints
the median ms/step of each and their ratio; the last line is ``ratio=<float>``
for batch 128 on the device used.

    python benchmarks/bench_train.py --device cpu
    python benchmarks/bench_train.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyro
import pyro.optim
import torch

from pyro_vae import ModelConfig, build_vae, make_loss
from pyro_vae.train import AsyncSVI, resolve_device

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
    pyro.set_rng_seed(0)
    vae = build_vae(ModelConfig(data_dim=784, latent_dims=(50,), hidden_dims=(400,))).to(device)
    reference = ReferenceVAE().to(device).copy_from(vae)
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3)
    x = data[:batch]

    def reference_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        reference.loss(x, num_data).backward()
        optimizer.step()

    with pyro.get_param_store().scope(), pyro.validation_enabled(False):
        svi = AsyncSVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), loss=make_loss("elbo"))
        steps = {
            "hand-written PyTorch": reference_step,
            "pyro_vae (default)": lambda: svi.step_async(x, num_data=num_data),
        }
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        timings: dict[str, list[float]] = {name: [] for name in steps}
        # Interleave short rounds so drift in the machine's speed hits every implementation alike.
        for _ in range(args.rounds):
            for name, step in steps.items():
                timings[name] += time_steps(step, device, args.steps_per_round)
    return {name: statistics.median(values) for name, values in timings.items()}


def main(args: argparse.Namespace) -> float:
    device = resolve_device(args.device)
    data = torch.bernoulli(torch.full((60_000, 784), 0.13)).to(device)
    results = {batch: compare(batch, data, device, args) for batch in args.batch_sizes}
    print(
        f"device {device}, torch {torch.__version__}, pyro {pyro.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"{'batch':>6}  {'implementation':<24} {'median ms/step':>15} {'ratio':>7}")
    for batch, medians in results.items():
        base = medians["hand-written PyTorch"]
        for name, ms in medians.items():
            print(f"{batch:>6}  {name:<24} {ms:>15.3f} {ms / base:>7.3f}")
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
