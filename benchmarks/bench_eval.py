"""Throughput of the importance-sampled log p(x) evaluator against a plain matmul.

Evaluates log p̂(x) with K importance samples per data point for the
MNIST-sized MLP VAE (784-400-50, Bernoulli likelihood) and reports wall time,
(data points x samples) per second, and the achieved FLOP/s of the decoder as
a fraction of the fastest plain matmul of the decoder's shapes on the same
device: how close the evaluator is to being bound by arithmetic rather than by
Python and Pyro bookkeeping. On a CPU the fastest is the faster of
``torch.matmul`` (the BLAS torch is built with, MKL in the official wheels) and
oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, which the package's
``Linear`` uses without gradients): on an AMD CPU MKL runs well below oneDNN.
``matmul_fraction=`` is against that faster one; ``matmul_fraction_blas=``
against ``torch.matmul`` alone, the reference of the figures before 2026-12.

The data are MNIST test images from ``--data-dir`` (statically binarized) when
the files are there, random binary images otherwise; they are evaluated in
``--rounds`` slices, with the matmul reference timed between slices so that
drift in the machine's speed touches both rates alike; the numbers depend only on
shapes, not on trained weights. ``--compile`` chooses the likelihood's
log-density kernel: ``auto`` (the evaluator's default: fused by torch.compile
from 2^22 (datum, sample) rows on, as in the full 10,000 x 5,000 run), ``on`` or
``off``; the warm-up call, which compiles, is timed apart.

Memory: the passes are sized to ``--max-memory`` (default 2 GiB) from the model's
measured bytes per (datum, sample) row (:func:`pyro_vae.resources.plan_passes`);
the planned pass, the process's peak resident memory (``peak_rss_mib``) and what
the evaluation added to the resident memory it started from (``added_rss_mib``)
are printed. ``--prior vamp`` (or ``mixture``) with ``--prior-components 500``
is the case whose log p(z) holds a [rows, 500, latent] tensor: 65k rows a pass
would need about 5 GB.

    python benchmarks/bench_eval.py --data-dir ../shared/datasets --limit 200 --num-samples 5000
    python benchmarks/bench_eval.py --data-dir ../shared/datasets --limit 100 --num-samples 1000 --prior vamp
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import pyro
import torch

from pyro_vae import DataError, ModelConfig, build_vae, evaluate_bounds, load_dataset, prepare_split
from pyro_vae.components.kernels import AUTO_ROWS
from pyro_vae.inference.conditioning import per_datum_pair
from pyro_vae.inference.traces import MAX_MEMORY, traced_weights
from pyro_vae.resources import memory_size, plan_passes
from pyro_vae.training.loop import resolve_device


def resident_bytes() -> int:
    """The process's resident memory now (Linux: /proc/self/statm), or its peak so far elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_resident_bytes()


def peak_resident_bytes() -> int:
    """The peak resident memory of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decoder_flops_per_row(latent: int, hidden: int, data_dim: int) -> int:
    """Multiply-adds x 2 of one decoder pass z -> hidden -> logits for one (datum, sample) row."""
    return 2 * (latent * hidden + hidden * data_dim)


def _onednn_matmul(device: torch.device):
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    return lambda a, weight: op(a, weight, None, "none", [], "")


def matmul_rate(
    rows: int,
    latent: int,
    hidden: int,
    data_dim: int,
    device: torch.device,
    repeats: int,
    *,
    onednn: bool = False,
) -> tuple[float, float]:
    """FLOP/s of the decoder's two matmuls on ``rows`` rows, with nothing else around them, and the seconds timed.

    ``onednn``: by oneDNN's matmul (weights [out, in], as nn.Linear keeps them) instead of ``torch.matmul``.
    """
    z = torch.randn(rows, latent, device=device)
    if onednn:
        mm = _onednn_matmul(device)
        w1 = torch.randn(hidden, latent, device=device)
        w2 = torch.randn(data_dim, hidden, device=device)
    else:
        mm = torch.matmul
        w1 = torch.randn(latent, hidden, device=device)
        w2 = torch.randn(hidden, data_dim, device=device)
    with torch.no_grad():
        for _ in range(2):
            mm(mm(z, w1), w2)
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            mm(mm(z, w1), w2)
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
    options = {} if args.prior == "standard-normal" else {"num_components": args.prior_components}
    vae = build_vae(
        ModelConfig(
            data_dim=784,
            latent_dims=(latent,),
            hidden_dims=(hidden,),
            prior=args.prior,
            prior_options=options,
        )
    ).to(device)
    pair = per_datum_pair(vae.model, vae.guide, x)
    sizes = plan_passes(
        lambda xs, k: traced_weights(
            pair.model, pair.guide, xs, num_samples=k, max_plate_nesting=pair.max_plate_nesting
        ),
        x,
        num_samples=args.num_samples,
        chunk_size=args.chunk_size,
        max_memory=args.max_memory,
    )  # the sizes evaluate_bounds plans for all of x (each round's slice is planned alike)

    rows = x.shape[0] * args.num_samples
    fuse = {"auto": rows >= AUTO_ROWS, "on": True, "off": False}[args.compile]
    start = time.perf_counter()
    evaluate_bounds(
        vae.model,
        vae.guide,
        x[:2],
        num_samples=sizes.particles,
        chunk_size=sizes.particles,
        max_memory=args.max_memory,
        compile=fuse,
    )  # warm-up, and the compilation of the fused log-density when there is one
    warmup = time.perf_counter() - start
    rss_before = resident_bytes()
    # The machine's speed drifts over a long run (the matmul rate alone moved from 124 to 167 GFLOP/s
    # between runs here), so the data are evaluated in rounds with the matmul reference timed between
    # them: both rates are taken over the same stretch of time.
    rows_per_pass = sizes.rows  # the reference multiplies the evaluator's pass shapes
    seconds = 0.0
    references = ["blas"] + (["onednn"] if _onednn_matmul(device) is not None else [])
    matmul_seconds = dict.fromkeys(references, 0.0)
    matmul_flops = dict.fromkeys(references, 0.0)
    for part in x.tensor_split(min(args.rounds, x.shape[0])):
        _sync(device)
        start = time.perf_counter()
        evaluate_bounds(
            vae.model,
            vae.guide,
            part,
            num_samples=args.num_samples,
            chunk_size=args.chunk_size,
            max_memory=args.max_memory,
            diagnostics=not args.no_khat,
            compile=fuse,
        )
        _sync(device)
        seconds += time.perf_counter() - start
        for name in references:
            rate, elapsed = matmul_rate(
                rows_per_pass, latent, hidden, 784, device, repeats=2, onednn=name == "onednn"
            )
            matmul_seconds[name] += elapsed
            matmul_flops[name] += rate * elapsed
    peak_rss = peak_resident_bytes()
    added = max(0, peak_rss - rss_before)
    achieved = rows * decoder_flops_per_row(latent, hidden, 784) / seconds
    rates = {name: matmul_flops[name] / matmul_seconds[name] for name in references}
    reference = max(rates.values())
    fraction = achieved / reference
    mib = 1024**2
    print(f"device {device}, torch {torch.__version__}, pyro {pyro.__version__}; data: {source}")
    print(
        f"fused log-density: {'compiled' if fuse else 'eager'} (--compile {args.compile}); "
        f"warm-up {warmup:.1f} s, not counted below"
    )
    prior = (
        args.prior
        if args.prior == "standard-normal"
        else f"{args.prior} ({args.prior_components} components)"
    )
    print(
        f"prior {prior}; budget {args.max_memory / mib:.0f} MiB: passes of {sizes.particles} samples x "
        f"{sizes.data} data points, {sizes.row_bytes / 1024:.1f} KiB a row measured, "
        f"{sizes.bytes / mib:.0f} MiB planned"
    )
    print(
        f"{'data points':>12} {'K':>6} {'seconds':>9} {'rows/s':>12} {'GFLOP/s':>9} {'matmul GFLOP/s':>15} "
        f"{'fraction':>9} {'peak_rss_MiB':>13} {'added_MiB':>10}"
    )
    print(
        f"{x.shape[0]:>12} {args.num_samples:>6} {seconds:>9.2f} {rows / seconds:>12.3g} {achieved / 1e9:>9.1f} "
        f"{reference / 1e9:>15.1f} {fraction:>9.3f} {peak_rss / mib:>13.1f} {added / mib:>10.1f}"
    )
    print(
        "matmul references, GFLOP/s: "
        + ", ".join(f"{'torch.matmul' if n == 'blas' else 'oneDNN'} {r / 1e9:.1f}" for n, r in rates.items())
    )
    print(f"matmul_fraction={fraction:.4f}")
    print(f"matmul_fraction_blas={achieved / rates['blas']:.4f}")
    print(f"peak_rss_mib={peak_rss / mib:.1f}")
    # What the timed evaluations (and the matmul reference between them) added to the memory they started
    # from, against the budget: the peak of the whole process also holds the data, weights and libraries.
    print(f"added_rss_mib={added / mib:.1f}")
    print(f"within_budget={added <= args.max_memory}")
    return fraction


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--limit", type=int, default=10_000, help="number of test images")
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--chunk-size", type=int, default=1000, help="samples per vectorized pass (at most)")
    parser.add_argument(
        "--max-memory",
        type=memory_size,
        default=MAX_MEMORY,
        help="bytes (or 2GiB, 512MiB) an evaluation pass may add; the passes are sized to it",
    )
    parser.add_argument(
        "--prior",
        choices=("standard-normal", "mixture", "vamp"),
        default="standard-normal",
        help="vamp or mixture: a K-component prior, the dear case for memory",
    )
    parser.add_argument("--prior-components", type=int, default=500, help="K of --prior vamp or mixture")
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
