"""``pyro-vae plot RUN_DIR``: every figure that applies to the run, each one skipped says why in a line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..io.run import load_run
from ..training.loop import resolve_device
from .options import device_option, non_negative_int, positive, seed_option

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    plot = commands.add_parser("plot", help="figures of a run: ELBO curves, reconstructions, latents, k-hat")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    plot.add_argument("--out", default=None, metavar="DIR", help="default: RUN_DIR/plots")
    plot.add_argument(
        "--khat-samples",
        type=non_negative_int,
        default=None,
        metavar="K",
        help="khat.png shows the k-hat of the run's own evaluation (evaluation.json: its K, its points); "
        "K computes them afresh with K samples (500 for a run without an evaluation); 0 skips it",
    )
    plot.add_argument(
        "--khat-limit",
        type=positive(int),
        default=500,
        help="test points of a k-hat computed afresh (the first N)",
    )
    plot.add_argument("--seed", type=seed_option, default=0)
    plot.add_argument("--device", type=device_option, default="auto")
    plot.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..plots import plot_run  # matplotlib only for the commands that draw

    loaded = load_run(args.run_dir, device=resolve_device(args.device))
    out = Path(args.out) if args.out else Path(args.run_dir) / "plots"
    for path in plot_run(
        loaded, out, khat_samples=args.khat_samples, khat_limit=args.khat_limit, seed=args.seed, log=print
    ):
        print(f"wrote {path}")
    return 0
