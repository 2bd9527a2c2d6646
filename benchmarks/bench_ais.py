"""Importance sampling against annealed importance sampling, BDMC and the inference gaps on a trained VAE.

Trains a small VAE on MNIST with the package (``pyro-vae train``, ``--epochs``; the embedded
8x8 digits with ``--dataset digits`` or when ``--data-dir`` has no MNIST), or reads ``--run``,
then on the same ``--limit`` test images reports, each with its wall time:

- log p̂(x) by importance sampling with K = ``--is-samples`` and by AIS (``--num-chains`` x
  ``--num-steps``), per-datum agreement and the PSIS k̂ of the IS weights;
- the BDMC sandwich (lower, upper, gap) on ``--bdmc-data`` points simulated from the model;
- the inference gaps (log p̂(x) by AIS, the encoder's and the optimized guide's ELBO);
- AIS throughput as (datum x chain x step) per second, and the decoder's FLOP/s in it as a
  fraction of plain ``torch.matmul`` of the decoder's shapes (``bench_eval.matmul_rate``):
  each AIS step costs ``leapfrog_steps + 1`` forward passes and as many input-gradient passes.

It plots the per-datum AIS estimate against the IS estimate (``--plot``).

    python benchmarks/bench_ais.py --data-dir ../shared/datasets --epochs 3 --limit 200
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyro
import torch

from pyro_vae import evaluate_bounds, load_run
from pyro_vae.cli import main as cli
from pyro_vae.inference import AnnealingSettings, GapSettings, ais, bdmc, gaps
from pyro_vae.training.loop import resolve_device

try:  # run as a script from any directory: bench_eval sits beside this file
    from bench_eval import decoder_flops_per_row, matmul_rate
except ImportError:  # imported as benchmarks.bench_ais
    from benchmarks.bench_eval import decoder_flops_per_row, matmul_rate


def _timed(fn):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _train(args: argparse.Namespace, out: Path) -> Path:
    dataset = args.dataset
    if dataset == "mnist" and not (Path(args.data_dir) / "MNIST").exists():
        print(f"no MNIST under {args.data_dir}: training on the embedded digits instead")
        dataset = "digits"
    command = [
        "train",
        "--dataset",
        dataset,
        "--epochs",
        str(args.epochs),
        "--eval-samples",
        "0",
        "--out",
        str(out),
    ]
    if dataset != "digits":
        command += ["--data-dir", args.data_dir]
    command += ["--hidden-dims", str(args.hidden), "--latent-dims", str(args.latent), "--seed", "0"]
    assert cli(command) == 0
    return out


def main(args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(args.run) if args.run else _train(args, Path(scratch) / "run")
        loaded = load_run(run_dir, device=device)
    vae = loaded.vae
    options = json.loads((run_dir / "config.json").read_text())["model"]["options"] if args.run else None
    hidden = options["hidden_dims"][0] if options else args.hidden
    latent = options["latent_dims"][0] if options else args.latent
    pyro.set_rng_seed(0)
    x = loaded.data("test")[: args.limit].to(device)  # binarized once: every evaluator sees the same images
    n, data_dim = x.shape
    settings = AnnealingSettings(
        num_chains=args.num_chains, num_steps=args.num_steps, leapfrog_steps=args.leapfrog_steps
    )
    rows: list[tuple[str, str, float]] = []

    pyro.set_rng_seed(1)
    bounds, is_seconds = _timed(lambda: evaluate_bounds(vae.model, vae.guide, x, num_samples=args.is_samples))
    khat_high = float((bounds.khat > 0.7).double().mean()) if bounds.khat is not None else float("nan")
    rows.append((f"IS, K={args.is_samples}", f"log p(x) {float(bounds.log_px.mean()):.3f}", is_seconds))
    pyro.set_rng_seed(2)
    result, ais_seconds = _timed(lambda: ais(vae.model, vae.guide, x, settings=settings, progress=False))
    ais_line = (
        f"log p(x) {float(result.log_px.mean()):.3f} ± {result.summary()['log_px_stderr']:.3f}, "
        f"accept {float(result.accept_rate.mean()):.2f}"
    )
    rows.append((f"AIS, {args.num_chains} chains x {args.num_steps} steps", ais_line, ais_seconds))
    difference = result.log_px - bounds.log_px
    rows.append(
        ("AIS - IS per datum", f"mean {float(difference.mean()):.3f}, sd {float(difference.std()):.3f}", 0.0)
    )

    pyro.set_rng_seed(3)
    sandwich, bdmc_seconds = _timed(
        lambda: bdmc(vae.model, vae.guide, x, num_data=args.bdmc_data, settings=settings, progress=False)
    )
    summary = sandwich.summary()
    rows.append(
        (
            f"BDMC on {args.bdmc_data} simulated",
            f"lower {summary['lower']:.3f}, upper {summary['upper']:.3f}, gap {summary['gap']:.3f}",
            bdmc_seconds,
        )
    )
    pyro.set_rng_seed(4)
    gap_settings = GapSettings(optimize_steps=args.optimize_steps)
    found, gaps_seconds = _timed(
        lambda: gaps(vae.model, vae.guide, x, settings=gap_settings, annealing=settings, progress=False)
    )
    s = found.summary()
    rows.append(
        (
            "gaps",
            f"log p(x) {s['log_px']:.3f}, ELBO {s['elbo']:.3f}, ELBO* {s['elbo_optimized']:.3f}, "
            f"approximation {s['approximation_gap']:.3f}, amortization {s['amortization_gap']:.3f}",
            gaps_seconds,
        )
    )

    # One chain's step costs leapfrog + 1 decoder passes forward and as many backward to the inputs.
    pilot = settings.pilot_chains / settings.num_chains
    units = n * settings.num_chains * (settings.num_steps - 1)
    throughput = units * (1 + pilot) / ais_seconds
    flops = 2 * (settings.leapfrog_steps + 1) * decoder_flops_per_row(latent, hidden, data_dim)
    reference, _ = matmul_rate(
        min(n * settings.num_chains, 1 << 14), latent, hidden, data_dim, device, repeats=20
    )
    fraction = throughput * flops / reference

    print(
        f"\n{loaded.data_config.dataset}, {n} test images, {data_dim}-{hidden}-{latent} MLP, device {device}"
    )
    print(f"PSIS k-hat > 0.7 for {100 * khat_high:.1f}% of the IS estimates")
    print(f"| {'evaluator':34} | {'result (nats per datum)':80} | seconds |")
    for name, text, seconds in rows:
        print(f"| {name:34} | {text:80} | {seconds:7.1f} |")
    print(f"AIS throughput: {throughput:.3g} (datum x chain x step)/s, pilot included")
    print(f"decoder FLOP/s in AIS over torch.matmul of the same shapes: matmul_fraction={fraction:.3f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 5))
        ais_values, is_values = result.log_px.numpy(), bounds.log_px.numpy()
        ax.scatter(is_values, ais_values, s=6, alpha=0.6)
        low, high = min(is_values.min(), ais_values.min()), max(is_values.max(), ais_values.max())
        ax.plot([low, high], [low, high], color="k", linewidth=0.8, label="AIS = IS")
        ax.set_xlabel(f"log p(x) by IS, K = {args.is_samples}")
        ax.set_ylabel(f"log p(x) by AIS, {args.num_chains} x {args.num_steps}")
        ax.set_title(f"{n} test images: mean AIS - IS = {float(difference.mean()):.3f} nats")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")
    return {"ais_minus_is": float(difference.mean()), "bdmc_gap": summary["gap"], "matmul_fraction": fraction}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a run folder to evaluate instead of training one")
    parser.add_argument("--dataset", default="mnist", choices=("mnist", "digits"))
    parser.add_argument("--data-dir", default="../shared/datasets")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--latent", type=int, default=20)
    parser.add_argument("--limit", type=int, default=200, help="test images")
    parser.add_argument("--is-samples", type=int, default=5000)
    parser.add_argument("--num-chains", type=int, default=8)
    parser.add_argument("--num-steps", type=int, default=100)
    parser.add_argument("--leapfrog-steps", type=int, default=10)
    parser.add_argument("--bdmc-data", type=int, default=50)
    parser.add_argument("--optimize-steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--plot", default=None, metavar="FILE.png")
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes on the embedded digits")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.dataset, args.epochs, args.hidden, args.latent, args.limit = "digits", 1, 16, 2, 8
        args.is_samples, args.num_chains, args.num_steps, args.bdmc_data, args.optimize_steps = 50, 2, 5, 4, 5
    return args


if __name__ == "__main__":
    main(parse_args())
