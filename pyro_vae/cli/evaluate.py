"""``pyro-vae evaluate RUN_DIR [--method is|ais|bdmc|gaps]``: one of the registered evaluators on a run.

``is`` (the default) reports importance-sampled log p(x), IWAE bounds, per-layer KL and PSIS
k-hat; ``ais``, ``bdmc`` and ``gaps`` are annealed importance sampling, bidirectional Monte
Carlo and the inference gaps (:mod:`pyro_vae.inference.evaluators`). A progress bar is drawn
on a terminal; piped, a line per data chunk goes to stderr instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pyro
import torch

from .._typing import VAEModel
from ..errors import PyroVAEError
from ..inference.ais import AnnealingSettings
from ..inference.bounds import Bounds
from ..inference.evaluators import EVALUATORS, EvaluationOptions, importance_report, run_evaluator
from ..inference.gaps import GapSettings
from ..inference.importance import evaluate_bounds, latent_layers_within
from ..inference.traces import MAX_MEMORY
from ..io.run import Run, load_run, save_evaluation
from ..resources import format_bytes, memory_size
from ..training.distributed import DataParallel, Stream
from ..training.loop import resolve_device
from ..training.state import load_weights
from ..training.validation import BEST_FILE
from .options import (
    add_dataclass_arguments,
    dataclass_from_args,
    device_option,
    positive,
    registry_choice,
    seed_option,
)
from .printing import fit_columns

__all__ = [
    "add_max_memory_argument",
    "add_parser",
    "evaluate_summary",
    "format_report",
    "khat_caveat",
    "memory_option",
    "run",
]


def memory_option(text: str) -> int:
    """``--max-memory``: bytes, or a size with a unit (2GiB, 512MiB, 1.5GB)."""
    try:
        return memory_size(text)
    except PyroVAEError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_max_memory_argument(parser: Any, flag: str = "--max-memory", *, what: str = "an evaluation") -> None:
    """The memory budget of ``what``'s importance-sampling passes, the flag of every command that evaluates."""
    parser.add_argument(
        flag,
        type=memory_option,
        default=format_bytes(MAX_MEMORY).replace(" ", ""),  # text: argparse parses it, and shows it in --help
        metavar="SIZE",
        help=f"memory the vectorized passes of {what} may add, e.g. 8GiB or 512MiB: the particles and data "
        "points per pass are sized to it from the model's measured bytes per (datum, particle) row; a run "
        "that cannot fit one row is refused",
    )


def add_parser(commands: Any) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="log p(x) of a run: importance sampling, AIS, the BDMC sandwich or the inference gaps",
    )
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    evaluate.add_argument(
        "--method",
        type=registry_choice(EVALUATORS),
        default="is",
        help=f"the evaluator: {', '.join(EVALUATORS.names())}",
    )
    evaluate.add_argument(
        "--num-samples", type=positive(int), default=1000, help="importance samples K per datum"
    )
    evaluate.add_argument("--split", default="test", choices=("train", "valid", "test"))
    evaluate.add_argument(
        "--chunk-size",
        type=positive(int),
        default=1000,
        help="samples per vectorized pass (at most: --max-memory may take fewer)",
    )
    add_max_memory_argument(evaluate, what="every --method (the passes of gaps' evaluations too)")
    evaluate.add_argument(
        "--limit", type=positive(int), default=None, help="evaluate the first N data points only"
    )
    evaluate.add_argument("--json", default=None, metavar="FILE", help="also write the results to FILE")
    evaluate.add_argument("--seed", type=seed_option, default=0)
    evaluate.add_argument("--device", type=device_option, default="auto")
    evaluate.add_argument(
        "--weights",
        choices=("final", "best"),
        default="final",
        help="final: model.pt; best: best.pt, the best epoch on the validation split (train --eval-every)",
    )
    annealing = evaluate.add_argument_group("ais, bdmc and gaps (annealed importance sampling)")
    add_dataclass_arguments(annealing, AnnealingSettings)
    annealing.add_argument(
        "--data-chunk-size", type=positive(int), default=None, help="data points per vectorized pass"
    )
    annealing.add_argument(
        "--num-simulated",
        type=positive(int),
        default=None,
        help="bdmc: data points simulated (default --limit or 100)",
    )
    optimized = evaluate.add_argument_group("gaps (the per-datum optimized guide)")
    gap_defaults = GapSettings()
    optimized.add_argument("--optimize-steps", type=positive(int), default=gap_defaults.optimize_steps)
    optimized.add_argument("--optimize-lr", type=positive(float), default=gap_defaults.learning_rate)
    optimized.add_argument(
        "--optimize-samples",
        type=positive(int),
        default=gap_defaults.optimize_samples,
        help="ELBO draws per step",
    )
    optimized.add_argument(
        "--elbo-samples", type=positive(int), default=gap_defaults.elbo_samples, help="draws behind each ELBO"
    )
    optimized.add_argument(
        "--log-px-method",
        choices=("ais", "is"),
        default=gap_defaults.log_px_method,
        help="how log p(x) is estimated",
    )
    evaluate.set_defaults(run=run)


def format_report(summary: dict[str, Any], *, title: str) -> str:
    """The importance-sampling summary as a table: nats per datum and bits per dimension."""
    return "\n".join([title, *importance_report(summary)])


def evaluate_summary(
    vae: VAEModel,
    x: torch.Tensor,
    *,
    num_samples: int,
    chunk_size: int,
    seed: int,
    shards: int | None = None,
    max_memory: int | None = MAX_MEMORY,
) -> dict[str, Any]:
    """The bounds of :func:`~pyro_vae.inference.evaluate_bounds` and the per-layer report, as one JSON-able dict.

    ``max_memory`` (bytes) bounds what each pass adds (:func:`~pyro_vae.resources.plan_passes`).
    """
    layers_samples = min(num_samples, 100)

    def layers_of(xs: torch.Tensor) -> list[dict[str, Any]]:
        return latent_layers_within(
            vae.model, vae.guide, xs, num_samples=layers_samples, max_memory=max_memory
        )

    if shards is None:
        pyro.set_rng_seed(seed)
        bounds = evaluate_bounds(
            vae.model, vae.guide, x, num_samples=num_samples, chunk_size=chunk_size, max_memory=max_memory
        )
        layers = layers_of(x)
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
                max_memory=max_memory,
                progress=None if parallel.is_main else False,
            ),
            keys=(Stream.EVALUATION,),
        )
        bounds = Bounds.concatenate([part for part in parts if part is not None])
        layers = []
        if parallel.is_main:  # needs all of x at once (the variance over x of E[z | x]); small K
            with parallel.seeded(Stream.LAYERS):
                layers = layers_of(x)
    summary = bounds.summary(data_dim=x.shape[-1])
    summary["data_dim"] = x.shape[-1]
    summary["layers"] = layers
    # Every point's own numbers, so a picture of them (khat.png) shows this evaluation's k̂, not another's.
    summary["per_datum"] = {
        "log_px": bounds.log_px.tolist(),
        "khat": None if bounds.khat is None else bounds.khat.tolist(),
    }
    return summary


# Simulated data points of bdmc when neither --num-simulated nor --limit says.
DEFAULT_SIMULATED = 100


def _options(args: argparse.Namespace) -> EvaluationOptions:
    return EvaluationOptions(
        seed=args.seed,
        num_samples=args.num_samples,
        chunk_size=args.chunk_size,
        max_memory=args.max_memory,
        annealing=dataclass_from_args(AnnealingSettings, args),
        gaps=GapSettings(
            optimize_steps=args.optimize_steps,
            learning_rate=args.optimize_lr,
            optimize_samples=args.optimize_samples,
            elbo_samples=args.elbo_samples,
            log_px_method=args.log_px_method,
            is_samples=args.num_samples,
        ),
        num_simulated=args.num_simulated or args.limit or DEFAULT_SIMULATED,
        data_chunk_size=args.data_chunk_size,
    )


def khat_caveat(summary: dict[str, Any]) -> str:
    """The line that goes with every headline log p(x): how far its ± can be trusted, by PSIS k̂ per datum."""
    n, frac = summary["num_data"], summary.get("khat_frac_above_0_7")
    if frac is None:
        return (
            f"PSIS k-hat not estimated (K = {summary['num_samples']} is too few to fit a tail; use K >= 21)"
        )
    if frac == 0:
        return (
            f"PSIS k-hat <= 0.7 for all {n} test points (max {summary['khat_max']:.2f}): the ± can be trusted"
        )
    return (
        f"k-hat > 0.7 for {100 * frac:.1f}% of {n} test points: the ± understates the error; "
        "see evaluate --method ais"
    )


def _load_best(loaded: Run) -> None:
    """Put the weights of the run's ``best.pt`` (checksum verified) into its model, and say which epoch."""
    path = loaded.path / BEST_FILE
    if not path.is_file():
        raise PyroVAEError(
            f"{loaded.path} has no {BEST_FILE}: it was trained without --eval-every (a validation score); "
            "evaluate its final weights (drop --weights best)"
        )
    weights = load_weights(path)
    try:
        loaded.vae.load_state_dict(weights)  # type: ignore[attr-defined]
    except Exception as error:  # names or shapes of another model
        raise PyroVAEError(f"{path} cannot be loaded into the run's model ({error})") from None
    scored = [r for r in loaded.history if r.valid_elbo is not None]
    if scored:
        best = max(scored, key=lambda r: r.valid_elbo)  # type: ignore[arg-type, return-value]
        print(f"weights of {path}: epoch {best.epoch}, validation score {best.valid_elbo:.3f} nats per datum")


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    loaded = load_run(args.run_dir, device=device)
    if args.weights == "best":
        _load_best(loaded)
    x = loaded.data(args.split)
    if args.limit is not None:
        x = x[: args.limit]
    x = x.to(device)
    evaluation = run_evaluator(args.method, loaded.vae, x, options=_options(args))
    summary = evaluation.summary
    summary["weights"] = "best.pt" if args.weights == "best" else "model.pt"
    if args.method == "is":
        summary["split"] = args.split
        title = (
            f"{loaded.data_config.dataset} / {args.split}: {summary['num_data']} data points, "
            f"K = {args.num_samples} importance samples each"
        )
    else:
        source = "simulated from the model" if args.method == "bdmc" else f"of {args.split}"
        title = f"{loaded.data_config.dataset}: {summary['num_data']} data points {source}, --method {args.method}"
    print(fit_columns("\n".join([title, *evaluation.report])))
    if args.json:
        save_evaluation(Path(args.json), summary)
    return 0
