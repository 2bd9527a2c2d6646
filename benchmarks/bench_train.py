"""Training-step time of pyro_vae against the same VAE written by hand in PyTorch.

For the standard MLP VAE (784-400-50, Bernoulli likelihood, Adam lr 1e-3),
at each batch size of ``--batch-sizes`` (default 32, 128, 512 and 2048),
times one training step of pyro_vae and of the hand-written reference in
``reference_vae.py`` (same network, same single-sample ELBO, same starting
weights), interleaved in one process after warm-up, on the CPU or a CUDA
device:

- ``hand-written PyTorch``: torch.optim.Adam with torch's default kernel
  choice (a per-tensor loop on the CPU, foreach on CUDA): the reference.
- ``hand-written, fused Adam``: the same with ``fused=True``, to show how much
  of any lead comes from the optimizer kernel alone.
- ``hand-written, fused, log1p-free``: the fused one whose softplus
  activations and Bernoulli log-density are pyro_vae's log1p-free kernels
  (:mod:`pyro_vae.components.softplus`, ``ReferenceVAE(log1p_free=True)``),
  which pyro_vae's default MLP and likelihood use.
- ``hand-written, pyro_vae's kernels``: that one with pyro_vae's ``Linear``
  too (:mod:`pyro_vae.components.linear`: every product of the forward and
  backward passes by oneDNN), so it does exactly pyro_vae's arithmetic.
- ``pyro_vae (default)``: ``fit``'s step: AsyncSVI, the device-resident
  Trace_ELBO and one fused Adam over all parameters (``JointAdam``).
- ``pyro_vae --jit``: the same with the loss compiled by tracing (``JitELBO``;
  the tracer cannot record oneDNN's op, so its products are the BLAS's).
- ``pyro_vae --no-fused-adam``: Pyro's per-parameter ``pyro.optim.Adam``.

How to read the rows. pyro_vae's default differs from the plain hand-written
step in four ways: the optimizer kernel, the elementwise math (log1p-free
softplus and Bernoulli log-density), the matrix products (oneDNN's, where
torch's ``F.linear`` calls the BLAS it is built with) and Pyro's bookkeeping
(tracing the guide, replaying the model, per-site log-prob sums). Each
hand-written row takes one more away, so

- fused / hand-written            = what the optimizer kernel alone buys;
- log1p-free / fused              = what the faster elementwise math alone buys;
- kernels / log1p-free            = what oneDNN's products alone buy (on an
  AMD CPU, where MKL takes a slower path, most of it; on an Intel CPU little);
- pyro_vae (default) / kernels    = the cost of Pyro's bookkeeping, the
  only difference left between the two (the ``/kernels`` column).

Prints the median ms/step of each, its ratio to the hand-written reference
(``ratio``), to the hand-written fused one (``/fused``), to the log1p-free
one (``/log1p-free``) and to the one with all of pyro_vae's kernels
(``/kernels``). The last lines are, for the default at batch 128 (or the
first batch size when 128 is not measured): ``ratio=<float>`` (over the
hand-written reference), ``ratio_fused=<float>`` (over the hand-written fused
step), ``ratio_log1p_free=<float>`` and ``ratio_kernels=<float>``.

    python benchmarks/bench_train.py --device cpu
    python benchmarks/bench_train.py --device cuda --batch-sizes 128,1024
    python benchmarks/bench_train.py --smoke-test    # seconds; what the test suite runs
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

# The hand-written rows: (name, torch.optim.Adam's ``fused``, ReferenceVAE's ``log1p_free`` and ``onednn``).
REFERENCE, FUSED, LOG1P_FREE, KERNELS = (
    "hand-written PyTorch",
    "hand-written, fused Adam",
    "hand-written, fused, log1p-free",
    "hand-written, pyro_vae's kernels",
)
REFERENCES = [
    (REFERENCE, None, False, False),
    (FUSED, True, False, False),
    (LOG1P_FREE, True, True, False),
    (KERNELS, True, True, True),
]
DEFAULT = "pyro_vae (default)"


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
    for name, fused, log1p_free, onednn in REFERENCES:
        reference = ReferenceVAE(log1p_free=log1p_free, onednn=onednn).copy_from(base).to(device)
        optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3, fused=fused)
        steps[name] = partial(_reference_step, reference, optimizer, x, num_data)
    store = pyro.get_param_store()
    for name, optimizer, jit in [
        (DEFAULT, JointAdam(lr=1e-3), False),
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
    data = torch.bernoulli(torch.full((max(60_000, max(args.batch_sizes)), 784), 0.13)).to(device)
    results = {batch: compare(batch, data, device, args) for batch in args.batch_sizes}
    print(
        f"device {device}, torch {torch.__version__}, pyro {pyro.__version__}, threads {torch.get_num_threads()}"
    )
    width = max(len(name) for name in next(iter(results.values())))
    print(
        f"{'batch':>6}  {'implementation':<{width}} {'ms/step':>9} {'ratio':>7} {'/fused':>7} {'/log1p-free':>11} "
        f"{'/kernels':>8}"
    )
    for batch, medians in results.items():
        for name, ms in medians.items():
            print(
                f"{batch:>6}  {name:<{width}} {ms:>9.3f} {ms / medians[REFERENCE]:>7.3f} "
                f"{ms / medians[FUSED]:>7.3f} {ms / medians[LOG1P_FREE]:>11.3f} {ms / medians[KERNELS]:>8.3f}"
            )
    at = results[128 if 128 in results else args.batch_sizes[0]]
    ratio = at[DEFAULT] / at[REFERENCE]
    # ratio= first: benchmarks/gpu_check.py reports these lines in order, and its test reads ratio= first.
    print(f"ratio={ratio:.4f}")
    print(f"ratio_fused={at[DEFAULT] / at[FUSED]:.4f}")
    print(f"ratio_log1p_free={at[DEFAULT] / at[LOG1P_FREE]:.4f}")
    # Against the same arithmetic written by hand: what Pyro's bookkeeping (traces, sites, plates) costs.
    print(f"ratio_kernels={at[DEFAULT] / at[KERNELS]:.4f}")
    return ratio


def batch_sizes(text: str) -> list[int]:
    """``"32,128"`` -> [32, 128]: the sizes of one ``--batch-sizes`` word, each a positive integer."""
    try:
        sizes = [int(word) for word in text.split(",") if word.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive batch sizes")
    return sizes


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--batch-sizes",
        type=batch_sizes,
        nargs="+",
        default=[[32, 128, 512, 2048]],
        help="batch sizes, comma- or space-separated (default 32,128,512,2048)",
    )
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps-per-round", type=int, default=20)
    parser.add_argument("--smoke-test", action="store_true", help="batch 16, 2 rounds of 2 steps: seconds")
    args = parser.parse_args()
    args.batch_sizes = list(dict.fromkeys(size for word in args.batch_sizes for size in word))
    if args.smoke_test:
        args.batch_sizes, args.warmup, args.rounds, args.steps_per_round = [16], 2, 2, 2
    main(args)
