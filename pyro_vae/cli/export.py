"""``pyro-vae export RUN_DIR --out FILE.nc``: importance samples of the latents as an ArviZ InferenceData."""

from __future__ import annotations

import argparse
from typing import Any

from ..training.loop import resolve_device
from .options import device_option, index_list, positive, seed_option

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    export = commands.add_parser(
        "export", help="importance samples of the latents as an ArviZ InferenceData (netCDF)"
    )
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--out", required=True, metavar="FILE.nc")
    export.add_argument("--num-samples", type=positive(int), default=1000, help="draws z ~ q(z|x) per datum")
    export.add_argument("--split", default="test", choices=("train", "valid", "test"))
    export.add_argument("--indices", type=index_list, default=None, help="data points to export, e.g. 0,5,9")
    export.add_argument(
        "--limit", type=positive(int), default=16, help="without --indices: the first N points"
    )
    export.add_argument("--chunk-size", type=positive(int), default=1000)
    export.add_argument("--seed", type=seed_option, default=0)
    export.add_argument("--device", type=device_option, default="auto")
    export.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..io.export import export_run  # arviz and xarray only for this command

    path = export_run(
        args.run_dir,
        args.out,
        num_samples=args.num_samples,
        split=args.split,
        indices=args.indices,
        limit=args.limit,
        seed=args.seed,
        chunk_size=args.chunk_size,
        device=resolve_device(args.device),
    )
    print(f"wrote {path} (open it with arviz.from_netcdf)")
    return 0
