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

The gaps reuse the AIS row's log p̂(x) (their seconds exclude it). ``--plot`` draws the
per-datum AIS estimate against the IS estimate, and AIS - IS against IS coloured by the PSIS
k̂ of the IS weights; ``--per-datum FILE.csv`` writes those numbers. ``--rows`` picks the rows
(``ais`` alone for a throughput measurement), ``--plain`` runs AIS on its plain path (a trace
of the model and the guide at every leapfrog position) to compare.

    python benchmarks/bench_ais.py --data-dir ../shared/datasets --epochs 3 --limit 1000 --plot ais.png
"""

from __future__ import annotations

import argparse
import csv
import json
import math
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
    wanted = set(args.rows.split(","))
    unknown = wanted - {"is", "ais", "bdmc", "gaps"}
    if unknown or "ais" not in wanted:
        raise SystemExit(
            f"--rows takes a comma-separated subset of is,ais,bdmc,gaps with ais, got {args.rows!r}"
        )

    bounds = None
    if "is" in wanted:
        pyro.set_rng_seed(1)
        bounds, is_seconds = _timed(
            lambda: evaluate_bounds(vae.model, vae.guide, x, num_samples=args.is_samples)
        )
        khat = bounds.khat
        khat_high = float((khat > 0.7).double().mean()) if khat is not None else float("nan")
        rows.append(
            (
                f"IS, K={args.is_samples}",
                f"log p(x) {float(bounds.log_px.mean()):.3f} (PSIS k-hat > 0.7 for {100 * khat_high:.1f}%)",
                is_seconds,
            )
        )
    # The matmul reference is timed just before and just after the AIS row (the machine may be shared).
    reference_rows = min(n * settings.num_chains, 1 << 14)
    before, _ = matmul_rate(reference_rows, latent, hidden, data_dim, device, repeats=20)
    pyro.set_rng_seed(2)
    result, ais_seconds = _timed(
        lambda: ais(vae.model, vae.guide, x, settings=settings, progress=False, fast=not args.plain)
    )
    after, _ = matmul_rate(reference_rows, latent, hidden, data_dim, device, repeats=20)
    ais_line = (
        f"log p(x) {float(result.log_px.mean()):.3f} ± {result.summary()['log_px_stderr']:.3f}, "
        f"accept {float(result.accept_rate.mean()):.2f}, per-datum stderr {float(result.log_px_stderr.mean()):.3f}"
    )
    path = "plain path" if args.plain else "fast path"
    rows.append((f"AIS, {args.num_chains} chains x {args.num_steps} steps, {path}", ais_line, ais_seconds))
    difference = None
    if bounds is not None:
        difference = result.log_px - bounds.log_px
        rows.append(
            (
                "AIS - IS per datum",
                f"mean {float(difference.mean()):.3f}, sd {float(difference.std()):.3f}, "
                f"< 0 for {int((difference < 0).sum())} of {n}",
                math.nan,
            )
        )

    summary = None
    if "bdmc" in wanted:
        pyro.set_rng_seed(3)
        sandwich, bdmc_seconds = _timed(
            lambda: bdmc(vae.model, vae.guide, x, num_data=args.bdmc_data, settings=settings, progress=False)
        )
        summary = sandwich.summary()
        rows.append(
            (
                f"BDMC on {args.bdmc_data} simulated",
                f"lower {summary['lower']:.3f}, upper {summary['upper']:.3f}, gap {summary['gap']:.3f} "
                f"(max {float(sandwich.gap.max()):.3f})",
                bdmc_seconds,
            )
        )
    if "gaps" in wanted:
        pyro.set_rng_seed(4)
        gap_settings = GapSettings(optimize_steps=args.optimize_steps)
        found, gaps_seconds = _timed(
            lambda: gaps(vae.model, vae.guide, x, settings=gap_settings, log_px=result.log_px, progress=False)
        )
        s = found.summary()
        rows.append(
            (
                "gaps (log p(x) from the AIS row)",
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
    fraction = throughput * flops / ((before + after) / 2)

    print(
        f"\n{loaded.data_config.dataset}, {n} test images, {data_dim}-{hidden}-{latent} MLP, device {device}"
    )
    print(f"| {'evaluator':42} | {'result (nats per datum)':96} | seconds |")
    for name, text, seconds in rows:
        print(f"| {name:42} | {text:96} | {'' if math.isnan(seconds) else f'{seconds:7.1f}':>7} |")
    print(f"AIS throughput: {throughput:.3g} (datum x chain x step)/s, pilot included")
    print(
        f"torch.matmul of the decoder's shapes ({reference_rows} rows): {before / 1e9:.1f} GFLOP/s before AIS, "
        f"{after / 1e9:.1f} after"
    )
    print(f"decoder FLOP/s in AIS over torch.matmul of the same shapes: matmul_fraction={fraction:.3f}")
    if args.per_datum and bounds is not None:
        with open(args.per_datum, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["is_log_px", "ais_log_px", "ais_stderr", "ais_accept", "khat"])
            khats = bounds.khat if bounds.khat is not None else torch.full_like(bounds.log_px, math.nan)
            columns = (bounds.log_px, result.log_px, result.log_px_stderr, result.accept_rate, khats)
            for row in zip(*columns, strict=True):
                writer.writerow([f"{float(v):.6f}" for v in row])
        print(f"per-datum estimates: {args.per_datum}")
    if args.plot and bounds is not None and difference is not None:
        plot_ais_against_is(
            bounds.log_px, result.log_px, bounds.khat, Path(args.plot), title=f"{n} test images", args=args
        )
        print(f"plot: {args.plot}")
    return {
        "ais_minus_is": float(difference.mean()) if difference is not None else math.nan,
        "bdmc_gap": summary["gap"] if summary is not None else math.nan,
        "throughput": throughput,
        "matmul_fraction": fraction,
    }


def plot_ais_against_is(
    is_log_px: torch.Tensor,
    ais_log_px: torch.Tensor,
    khat: torch.Tensor | None,
    out: Path,
    *,
    title: str,
    args: argparse.Namespace,
) -> None:
    """Left: AIS against IS per datum, with the diagonal; right: AIS - IS against IS, coloured by k-hat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    is_values, ais_values = is_log_px.numpy(), ais_log_px.numpy()
    difference = ais_values - is_values
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8))
    left.scatter(is_values, ais_values, s=6, alpha=0.6)
    low, high = min(is_values.min(), ais_values.min()), max(is_values.max(), ais_values.max())
    left.plot([low, high], [low, high], color="k", linewidth=0.8, label="AIS = IS")
    left.set_xlabel(f"log p(x) by IS, K = {args.is_samples} (nats)")
    left.set_ylabel(f"log p(x) by AIS, {args.num_chains} chains x {args.num_steps} steps (nats)")
    left.set_title(f"{title}: per-datum estimates")
    left.legend()
    colour = khat.numpy() if khat is not None else None
    points = right.scatter(is_values, difference, s=8, c=colour, cmap="viridis", alpha=0.8)
    right.axhline(0.0, color="k", linewidth=0.8)
    right.set_xlabel(f"log p(x) by IS, K = {args.is_samples} (nats)")
    right.set_ylabel("AIS - IS (nats)")
    right.set_title(f"AIS - IS: mean {difference.mean():.3f}, sd {difference.std(ddof=1):.3f} nats")
    if colour is not None:
        fig.colorbar(points, ax=right, label="PSIS k-hat of the IS weights")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


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
    parser.add_argument(
        "--per-datum", default=None, metavar="FILE.csv", help="per-datum IS and AIS estimates"
    )
    parser.add_argument("--rows", default="is,ais,bdmc,gaps", help="which evaluators to run (ais always)")
    parser.add_argument(
        "--plain", action="store_true", help="AIS on its plain path (traces at every position)"
    )
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes on the embedded digits")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.dataset, args.epochs, args.hidden, args.latent, args.limit = "digits", 1, 16, 2, 8
        args.is_samples, args.num_chains, args.num_steps, args.bdmc_data, args.optimize_steps = 50, 2, 5, 4, 5
    return args


if __name__ == "__main__":
    main(parse_args())
