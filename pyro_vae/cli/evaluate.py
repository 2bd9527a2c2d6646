"""``pyro-vae evaluate RUN_DIR``: importance-sampled log p(x), IWAE bounds, per-layer KL and PSIS k-hat."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import pyro
import torch

from .._typing import VAEModel
from ..inference.bounds import Bounds
from ..inference.importance import evaluate_bounds
from ..inference.layers import latent_layers
from ..io.run import load_run, save_evaluation
from ..training.distributed import DataParallel, Stream
from ..training.loop import resolve_device
from .options import positive

__all__ = ["add_parser", "evaluate_summary", "format_report", "run"]


def add_parser(commands: Any) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="importance-sampled log p(x), IWAE bounds and PSIS diagnostics"
    )
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    evaluate.add_argument(
        "--num-samples", type=positive(int), default=1000, help="importance samples K per datum"
    )
    evaluate.add_argument("--split", default="test", choices=("train", "valid", "test"))
    evaluate.add_argument(
        "--chunk-size", type=positive(int), default=1000, help="samples per vectorized pass"
    )
    evaluate.add_argument(
        "--limit", type=positive(int), default=None, help="evaluate the first N data points only"
    )
    evaluate.add_argument("--json", default=None, metavar="FILE", help="also write the results to FILE")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", default="auto")
    evaluate.set_defaults(run=run)


def format_report(summary: dict[str, Any], *, title: str) -> str:
    """The evaluation summary as a table: nats per datum and bits per dimension."""
    data_dim = summary.get("data_dim")

    def bits(nats: float) -> str:
        return f"{-nats / (data_dim * math.log(2)):10.4f}" if data_dim else ""

    lines = [title, f"{'':18}{'nats/datum':>14}{'bits/dim':>11}"]
    lines.append(f"{'ELBO':18}{summary['elbo']:14.3f}{bits(summary['elbo'])}")
    for k, value in summary["iwae"].items():
        lines.append(f"{'IWAE-' + k:18}{value:14.3f}{bits(value)}")
    stderr = summary["log_px_stderr"]
    lines.append(
        f"{'log p(x) (IS)':18}{summary['log_px']:14.3f}{bits(summary['log_px'])}   ± {stderr:.3f} (MC stderr)"
    )
    lines.append(f"{'NLL':18}{summary['nll']:14.3f}{bits(summary['log_px'])}")
    if summary.get("conditional_on"):
        sites = ", ".join(summary["conditional_on"])
        lines.append(
            f"conditional on the global latent(s) {sites} at the guide's mean (its median where it has none): "
            f"each figure is log p(x_i | {sites}), "
            "not the marginal log p(x_i)"
        )
    for layer in summary.get("layers", []):
        lines.append(
            f"latent {layer['site']} (dim {layer['dim']}): KL {layer['kl']:.3f} nats, "
            f"{layer['active_units']} of {layer['dim']} units active (Var_x E[z|x] > 0.01)"
        )
    if summary.get("khat_max") is not None:
        frac = summary["khat_frac_above_0_7"]
        lines.append(f"PSIS k-hat: max {summary['khat_max']:.2f}, {100 * frac:.1f}% of data points above 0.7")
        if frac > 0:
            lines.append(
                f"warning: k-hat > 0.7 for {round(frac * summary['num_data'])} of {summary['num_data']} data points: "
                "their log p(x) estimates are unreliable (the guide's tails are too light); raise --num-samples "
                "or improve the guide"
            )
    return "\n".join(lines)


def evaluate_summary(
    vae: VAEModel, x: torch.Tensor, *, num_samples: int, chunk_size: int, seed: int, shards: int | None = None
) -> dict[str, Any]:
    """The bounds of :func:`~pyro_vae.inference.evaluate_bounds` and the per-layer report, as one JSON-able dict."""
    layers_samples = min(num_samples, 100)
    if shards is None:
        pyro.set_rng_seed(seed)
        bounds = evaluate_bounds(vae.model, vae.guide, x, num_samples=num_samples, chunk_size=chunk_size)
        layers = latent_layers(vae.model, vae.guide, x, num_samples=layers_samples)
    else:
        # Slice s of x drawn from the stream (seed, EVALUATION, s) by the process that owns shard s, the
        # per-datum results gathered in slice order: the same numbers on any number of processes.
        parallel = DataParallel(shards=shards, seed=seed, device=x.device)
        parts = parallel.map_shards(
            x,
            lambda xs: evaluate_bounds(
                vae.model,
                vae.guide,
                xs,
                num_samples=num_samples,
                chunk_size=chunk_size,
                progress=None if parallel.is_main else False,
            ),
            keys=(Stream.EVALUATION,),
        )
        bounds = Bounds.concatenate([part for part in parts if part is not None])
        layers = []
        if parallel.is_main:  # needs all of x at once (the variance over x of E[z | x]); small K
            with parallel.seeded(Stream.LAYERS):
                layers = latent_layers(vae.model, vae.guide, x, num_samples=layers_samples)
    summary = bounds.summary(data_dim=x.shape[-1])
    summary["data_dim"] = x.shape[-1]
    summary["layers"] = layers
    return summary


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    loaded = load_run(args.run_dir, device=device)
    x = loaded.data(args.split)
    if args.limit is not None:
        x = x[: args.limit]
    summary = evaluate_summary(
        loaded.vae, x.to(device), num_samples=args.num_samples, chunk_size=args.chunk_size, seed=args.seed
    )
    summary["split"] = args.split
    title = (
        f"{loaded.data_config.dataset} / {args.split}: {summary['num_data']} data points, "
        f"K = {args.num_samples} importance samples each"
    )
    print(format_report(summary, title=title))
    if args.json:
        save_evaluation(Path(args.json), summary)
    return 0
