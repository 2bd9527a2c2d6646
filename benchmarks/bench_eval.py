"""Throughput of the importance-sampled log p(x) evaluator against a plain matmul.

Evaluates log p̂(x) with K importance samples per data point for the
MNIST-sized MLP VAE (784-400-50, Bernoulli likelihood) and reports wall time,
(data points x samples) per second, and the achieved FLOP/s of the decoder as
a fraction of plain ``torch.matmul`` calls of the decoder's shapes on the same
device: how close the evaluator is to being bound by arithmetic rather than by
Python and Pyro bookkeeping.

The data are MNIST test images from ``--data-dir`` (statically binarized) when
the files are there, random binary images otherwise; they are evaluated in
``--rounds`` slices, with the matmul reference timed between slices so that
drift in the machine's speed touches both rates alike; the numbers depend only on
shapes, not on trained weights. ``--compile`` chooses the likelihood's
log-density kernel: ``auto`` (the evaluator's default: fused by torch.compile
from 2^22 (datum, sample) rows on, as in the full 10,000 x 5,000 run), ``on`` or
``off``; the warm-up call, which compiles, is timed apart.

    python benchmarks/bench_eval.py --data-dir ../shared/datasets --limit 200 --num-samples 5000
"""

from __future__ import annotations

import argparse
import time

import pyro
import torch

from pyro_vae import DataError, ModelConfig, build_vae, evaluate_bounds, load_dataset, prepare_split
from pyro_vae.components.kernels import AUTO_ROWS
from pyro_vae.training.loop import resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decoder_flops_per_row(latent: int, hidden: int, data_dim: int) -> int:
    """Multiply-adds x 2 of one decoder pass z -> hidden -> logits for one (datum, sample) row."""
    return 2 * (latent * hidden + hidden * data_dim)


def matmul_rate(
    rows: int, latent: int, hidden: int, data_dim: int, device: torch.device, repeats: int
) -> tuple[float, float]:
    """FLOP/s of the decoder's two matmuls on ``rows`` rows, with nothing else around them, and the seconds timed."""
    z = torch.randn(rows, latent, device=device)
    w1 = torch.randn(latent, hidden, device=device)
    w2 = torch.randn(hidden, data_dim, device=device)
    for _ in range(2):
        torch.matmul(torch.matmul(z, w1), w2)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(torch.matmul(z, w1), w2)
    _sync(device)
    elapsed = time.perf_counter() - start
    return repeats * rows * decoder_flops_per_row(latent, hidden, data_dim) / elapsed, elapsed


def main(args: argparse.Namespace) -> float:
    device = resolve_device(args.device)
    latent, hidden = 50, 400
    try:
        x = prepare_split(
            load_dataset("mnist", data_dir=args.data_dir, download=False), "test", mode="static"
        )
        source = "MNIST test"
    except DataError:
        x = torch.bernoulli(torch.full((10_000, 784), 0.13))
        source = "random binary 784-pixel images (MNIST files not found)"
    x = x[: args.limit].to(device)
    pyro.set_rng_seed(0)
    vae = build_vae(ModelConfig(data_dim=784, latent_dims=(latent,), hidden_dims=(hidden,))).to(device)

    rows = x.shape[0] * args.num_samples
    fuse = {"auto": rows >= AUTO_ROWS, "on": True, "off": False}[args.compile]
    start = time.perf_counter()
    evaluate_bounds(
        vae.model, vae.guide, x[:2], num_samples=args.chunk_size, chunk_size=args.chunk_size, compile=fuse
    )  # warm-up, and the compilation of the fused log-density when there is one
    warmup = time.perf_counter() - start
    # The machine's speed drifts over a long run (the matmul rate alone moved from 124 to 167 GFLOP/s
    # between runs here), so the data are evaluated in rounds with the matmul reference timed between
    # them: both rates are taken over the same stretch of time.
    rows_per_pass = args.chunk_size * max(1, 65536 // args.chunk_size)
    seconds, matmul_seconds, matmul_flops = 0.0, 0.0, 0.0
    for part in x.tensor_split(min(args.rounds, x.shape[0])):
        _sync(device)
        start = time.perf_counter()
        evaluate_bounds(
            vae.model,
            vae.guide,
            part,
            num_samples=args.num_samples,
            chunk_size=args.chunk_size,
            diagnostics=not args.no_khat,
            compile=fuse,
        )
        _sync(device)
        seconds += time.perf_counter() - start
        rate, elapsed = matmul_rate(rows_per_pass, latent, hidden, 784, device, repeats=2)
        matmul_seconds += elapsed
        matmul_flops += rate * elapsed
    achieved = rows * decoder_flops_per_row(latent, hidden, 784) / seconds
    reference = matmul_flops / matmul_seconds
    fraction = achieved / reference
    print(f"device {device}, torch {torch.__version__}, pyro {pyro.__version__}; data: {source}")
    print(
        f"fused log-density: {'compiled' if fuse else 'eager'} (--compile {args.compile}); "
        f"warm-up {warmup:.1f} s, not counted below"
    )
    print(
        f"{'data points':>12} {'K':>6} {'seconds':>9} {'rows/s':>12} {'GFLOP/s':>9} {'matmul GFLOP/s':>15} {'fraction':>9}"
    )
    print(
        f"{x.shape[0]:>12} {args.num_samples:>6} {seconds:>9.2f} {rows / seconds:>12.3g} {achieved / 1e9:>9.1f} "
        f"{reference / 1e9:>15.1f} {fraction:>9.3f}"
    )
    print(f"matmul_fraction={fraction:.4f}")
    return fraction


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--limit", type=int, default=10_000, help="number of test images")
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--chunk-size", type=int, default=1000, help="samples per vectorized pass")
    parser.add_argument(
        "--rounds",
        type=int,
        default=10,
        help="slices of the data, with the matmul reference timed between them",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-khat", action="store_true", help="skip the PSIS diagnostics (CPU numpy work)")
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="fuse the likelihood's log-density with torch.compile (auto: as evaluate_bounds decides)",
    )
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    if args.smoke_test:
        args.limit, args.num_samples, args.chunk_size, args.rounds = 4, 100, 50, 2
    main(args)
