"""``pyro-vae sample RUN_DIR --out FILE.png``: a grid of new data decoded from draws of the prior."""

from __future__ import annotations

import argparse
from typing import Any

from ..io.run import Run, load_run
from ..training.loop import resolve_device
from .options import device_option, positive, seed_option

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    sample = commands.add_parser("sample", help="a grid of new data decoded from z ~ p(z)")
    sample.add_argument("run_dir", metavar="RUN_DIR")
    sample.add_argument("--num", type=positive(int), default=64)
    sample.add_argument("--out", required=True, metavar="FILE.png")
    sample.add_argument("--seed", type=seed_option, default=0)
    sample.add_argument("--device", type=device_option, default="auto")
    sample.add_argument(
        "--draws",
        action="store_true",
        help="show draws x ~ p(x | z), what the model generates, instead of the means of p(x | z)",
    )
    sample.set_defaults(run=run)


def _title(loaded: Run, args: argparse.Namespace) -> str:
    # What was drawn, from which run and with which seed, so a grid can be traced back to its command.
    what = "draws x ~ p(x | z)" if args.draws else "means of p(x | z)"
    return f"{args.num} {what} for z ~ p(z)\nrun {loaded.path.name}, seed {args.seed}"


def run(args: argparse.Namespace) -> int:
    from ..plots import save_sample_grid  # matplotlib only for the commands that draw

    device = resolve_device(args.device)
    loaded = load_run(args.run_dir, device=device)
    path = save_sample_grid(
        loaded.vae,
        args.out,
        num=args.num,
        image_shape=loaded.image_shape,
        seed=args.seed,
        like=loaded.data("test")[:2].to(device),
        draws=args.draws,
        title=_title(loaded, args),
    )
    print(f"wrote {path}")
    return 0
