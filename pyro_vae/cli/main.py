"""The ``pyro-vae`` command line: train, evaluate and list components.

    pyro-vae train [--dataset digits] [--likelihood bernoulli] ... [--out RUN_DIR]
    torchrun --nproc-per-node N -m pyro_vae train --distributed ...   (data-parallel over N processes)
    pyro-vae evaluate RUN_DIR --num-samples 5000 [--split test] [--json FILE]
    pyro-vae plot RUN_DIR [--out DIR]
    pyro-vae sample RUN_DIR --num 64 --out FILE.png
    pyro-vae export RUN_DIR --out FILE.nc
    pyro-vae list

Errors in what the user gave (unknown names, bad sizes, missing files) print
one line and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyro
import torch

from ..components.guides import GUIDES
from ..components.likelihoods import LIKELIHOODS
from ..components.nets import ACTIVATIONS, NETWORKS
from ..components.priors import PRIORS
from ..config import BINARIZE_MODES, DEVICES, INFERENCE, DataConfig, ModelConfig, TrainConfig
from ..errors import PyroVAEError
from ..inference.bounds import Bounds
from ..inference.importance import evaluate_bounds
from ..inference.layers import latent_layers
from ..io.binarization import prepare_split, resolve_binarize
from ..io.data import DATASETS, load_dataset
from ..io.run import is_run_dir, load_run, save_config, save_evaluation, save_run
from ..models.build import build_vae
from ..objectives import LOSSES
from ..training.distributed import DataParallel, Stream, process_group, run_on_main, torchrun_process_group
from ..training.loop import fit, resolve_device

__all__ = ["format_report", "main"]

_DEFAULTS_MODEL = ModelConfig(data_dim=1)
_DEFAULTS_TRAIN = TrainConfig()
_REGISTRIES = {
    "priors (--prior)": PRIORS,
    "likelihoods (--likelihood)": LIKELIHOODS,
    "guides (--guide)": GUIDES,
    "networks (--encoder)": NETWORKS,
    "losses (--loss)": LOSSES,
    "data sets (--dataset)": DATASETS,
}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 400,200, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return values


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value

    return parse


def _option(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as rank=4, got {text!r}")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the value of {key} must be a number, got {value!r}") from None
    return key, int(number) if number.is_integer() and "." not in value else number


def _index_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated data indices like 0,5,9, got {text!r}"
        ) from None


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def _choice(registry: Any) -> Any:
    # Checked here rather than with argparse `choices` so the message lists names the registry's way.
    def parse(text: str) -> str:
        try:
            registry.get(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-vae", description="Variational autoencoders as Pyro models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fit a VAE by SVI and save a run folder")
    data = train.add_argument_group("data")
    data.add_argument(
        "--dataset",
        default="digits",
        help="digits (embedded), mnist, fashion-mnist, binarized-mnist, or a .npy/.npz file",
    )
    data.add_argument(
        "--data-dir", default=None, help="folder holding the data files (torchvision's layout for MNIST)"
    )
    data.add_argument(
        "--binarize",
        choices=BINARIZE_MODES,
        default="auto",
        help="auto: dynamic for a binary likelihood on grey data",
    )
    model = train.add_argument_group("model")
    model.add_argument("--prior", type=_choice(PRIORS), default=_DEFAULTS_MODEL.prior)
    model.add_argument(
        "--prior-components", type=_positive(int), default=None, help="K for the mixture and vamp priors"
    )
    model.add_argument("--likelihood", type=_choice(LIKELIHOODS), default=_DEFAULTS_MODEL.likelihood)
    model.add_argument(
        "--likelihood-scale",
        type=_positive(float),
        default=None,
        help="fixed scale of the gaussian likelihood",
    )
    model.add_argument("--guide", type=_choice(GUIDES), default=_DEFAULTS_MODEL.guide)
    model.add_argument(
        "--guide-option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the guide head, e.g. rank=4 (low-rank) or num_flows=4 (iaf); repeatable",
    )
    model.add_argument("--encoder", type=_choice(NETWORKS), default=_DEFAULTS_MODEL.network)
    model.add_argument(
        "--latent-dims",
        type=_int_list,
        default=_DEFAULTS_MODEL.latent_dims,
        help="latent sizes, z1 first: 20, or 100,50 for two stochastic layers",
    )
    model.add_argument(
        "--inference",
        choices=INFERENCE,
        default=_DEFAULTS_MODEL.inference,
        help="with several --latent-dims: bottom-up (Burda et al.) or ladder (Sønderby et al.)",
    )
    model.add_argument(
        "--activation", choices=tuple(ACTIVATIONS), default=None, help="default: softplus (mlp), elu (conv)"
    )
    model.add_argument(
        "--hidden-dims",
        type=_int_list,
        default=_DEFAULTS_MODEL.hidden_dims,
        help="encoder widths, e.g. 400 or 500,500",
    )
    fitting = train.add_argument_group("training")
    fitting.add_argument("--loss", type=_choice(LOSSES), default=_DEFAULTS_TRAIN.loss)
    fitting.add_argument(
        "--beta", type=float, default=_DEFAULTS_TRAIN.beta, help="weight of the KL term (beta-VAE)"
    )
    fitting.add_argument(
        "--warmup-epochs",
        type=int,
        default=_DEFAULTS_TRAIN.warmup_epochs,
        help="epochs to ramp the KL weight 0 -> beta",
    )
    fitting.add_argument("--epochs", type=_positive(int), default=_DEFAULTS_TRAIN.epochs)
    fitting.add_argument("--batch-size", type=_positive(int), default=_DEFAULTS_TRAIN.batch_size)
    fitting.add_argument("--lr", type=_positive(float), default=_DEFAULTS_TRAIN.lr)
    fitting.add_argument(
        "--num-particles",
        type=_positive(int),
        default=_DEFAULTS_TRAIN.num_particles,
        help="samples of z per datum per step",
    )
    fitting.add_argument(
        "--clip-norm", type=_positive(float), default=None, help="clip the gradient's global norm to this"
    )
    fitting.add_argument("--seed", type=_non_negative_int, default=_DEFAULTS_TRAIN.seed)
    fitting.add_argument("--device", default="auto", help=f"{', '.join(DEVICES)} or cuda:N")
    fitting.add_argument(
        "--fused-adam",
        action=argparse.BooleanOptionalAction,
        default=_DEFAULTS_TRAIN.fused_adam,
        help="one fused Adam over all parameters (default), or Pyro's per-parameter Adam",
    )
    fitting.add_argument(
        "--jit",
        action=argparse.BooleanOptionalAction,
        default=_DEFAULTS_TRAIN.jit,
        help="compile the loss by tracing it once per minibatch shape (not with --warmup-epochs)",
    )
    fitting.add_argument(
        "--distributed",
        action="store_true",
        help="data-parallel over the processes torchrun starts (NCCL on GPUs, gloo on CPUs); "
        "--batch-size is then the global minibatch",
    )
    fitting.add_argument(
        "--shards",
        type=_positive(int),
        default=None,
        metavar="S",
        help="cut every minibatch into S shards with their own random streams and average their gradients: "
        "the result of S processes of --distributed (there the default is the number of processes)",
    )
    train.add_argument(
        "--eval-samples", type=int, default=1000, help="K for the final test log p(x); 0 skips it"
    )
    train.add_argument("--out", default=None, help="run folder (default: runs/DATASET-TIME)")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    train.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint (same flags)"
    )
    train.add_argument(
        "--checkpoint-every",
        type=_positive(int),
        default=None,
        metavar="STEPS",
        help="also checkpoint every STEPS steps (always at the end of each epoch)",
    )

    evaluate = commands.add_parser(
        "evaluate", help="importance-sampled log p(x), IWAE bounds and PSIS diagnostics"
    )
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    evaluate.add_argument(
        "--num-samples", type=_positive(int), default=1000, help="importance samples K per datum"
    )
    evaluate.add_argument("--split", default="test", choices=("train", "valid", "test"))
    evaluate.add_argument(
        "--chunk-size", type=_positive(int), default=1000, help="samples per vectorized pass"
    )
    evaluate.add_argument(
        "--limit", type=_positive(int), default=None, help="evaluate the first N data points only"
    )
    evaluate.add_argument("--json", default=None, metavar="FILE", help="also write the results to FILE")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", default="auto")

    export = commands.add_parser(
        "export", help="importance samples of the latents as an ArviZ InferenceData (netCDF)"
    )
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--out", required=True, metavar="FILE.nc")
    export.add_argument("--num-samples", type=_positive(int), default=1000, help="draws z ~ q(z|x) per datum")
    export.add_argument("--split", default="test", choices=("train", "valid", "test"))
    export.add_argument("--indices", type=_index_list, default=None, help="data points to export, e.g. 0,5,9")
    export.add_argument(
        "--limit", type=_positive(int), default=16, help="without --indices: the first N points"
    )
    export.add_argument("--chunk-size", type=_positive(int), default=1000)
    export.add_argument("--seed", type=_non_negative_int, default=0)
    export.add_argument("--device", default="auto")

    plot = commands.add_parser("plot", help="figures of a run: ELBO curves, reconstructions, latents, k-hat")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    plot.add_argument("--out", default=None, metavar="DIR", help="default: RUN_DIR/plots")
    plot.add_argument(
        "--khat-samples", type=_non_negative_int, default=500, help="K for the k-hat plot; 0 skips it"
    )
    plot.add_argument("--khat-limit", type=_positive(int), default=500, help="test points in the k-hat plot")
    plot.add_argument("--seed", type=_non_negative_int, default=0)
    plot.add_argument("--device", default="auto")

    sample = commands.add_parser("sample", help="a grid of new data decoded from z ~ p(z)")
    sample.add_argument("run_dir", metavar="RUN_DIR")
    sample.add_argument("--num", type=_positive(int), default=64)
    sample.add_argument("--out", required=True, metavar="FILE.png")
    sample.add_argument("--seed", type=_non_negative_int, default=0)
    sample.add_argument("--device", default="auto")

    commands.add_parser("list", help="every registered prior, likelihood, guide, network, loss and data set")
    return parser


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


def _evaluate(
    vae: Any, x: torch.Tensor, *, num_samples: int, chunk_size: int, seed: int, shards: int | None = None
) -> dict[str, Any]:
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


def _train(args: argparse.Namespace, *, device: torch.device | None = None) -> int:
    if args.distributed and device is None:
        with torchrun_process_group(device=args.device) as process_device:
            return _train(args, device=process_device)
    rank, world_size = process_group()
    # Only rank 0 speaks and writes files; the others compute their shards and join its collectives.
    say = print if rank == 0 else lambda *_, **__: None
    dataset = load_dataset(args.dataset, data_dir=args.data_dir)
    likelihood_cls = LIKELIHOODS.get(args.likelihood)
    mode = resolve_binarize(args.binarize, dataset=dataset, likelihood_binary=likelihood_cls.binary_data)
    train_x = prepare_split(dataset, "train", mode=mode)
    test_x = prepare_split(dataset, "test", mode=mode)
    model_config = ModelConfig(
        data_dim=dataset.input_dim,
        latent_dims=args.latent_dims,
        hidden_dims=args.hidden_dims,
        prior=args.prior,
        prior_options={} if args.prior_components is None else {"num_components": args.prior_components},
        likelihood=args.likelihood,
        likelihood_options={} if args.likelihood_scale is None else {"scale": args.likelihood_scale},
        guide=args.guide,
        guide_options=dict(args.guide_option),
        network=args.encoder,
        activation=args.activation,
        inference=args.inference,
        image_shape=dataset.image_shape,
    )
    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        num_particles=args.num_particles,
        loss=args.loss,
        beta=args.beta,
        warmup_epochs=args.warmup_epochs,
        clip_norm=args.clip_norm,
        seed=args.seed,
        device=args.device,
        fused_adam=args.fused_adam,
        jit=args.jit,
        shards=args.shards or (world_size if args.distributed else None),
    )
    data_config = DataConfig(dataset=args.dataset, data_dir=args.data_dir, binarize=mode)

    def run_folder() -> Path:
        # Rank 0's disk holds the run: it alone checks and clears the folder, and every process gets its answer.
        out = Path(args.out or f"runs/{Path(args.dataset).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        checkpoint = out / "checkpoint.pt"
        if args.resume and args.overwrite:
            raise PyroVAEError(
                "--resume continues the run in --out and --overwrite replaces it; pass one of them"
            )
        if args.resume and not checkpoint.is_file():
            raise PyroVAEError(f"{out} holds no checkpoint.pt to resume; train without --resume")
        if is_run_dir(out) and not (args.overwrite or args.resume):
            raise PyroVAEError(
                f"{out} already holds a run; choose another --out, or pass --resume or --overwrite"
            )
        if args.overwrite:
            for name in ("config.json", "model.pt", "metrics.csv", "evaluation.json", "checkpoint.pt"):
                (out / name).unlink(missing_ok=True)
        return out

    out = run_on_main(run_folder)
    checkpoint = out / "checkpoint.pt"
    if args.eval_samples < 0:
        raise PyroVAEError(f"--eval-samples must be 0 (skip) or a positive integer, got {args.eval_samples}")
    device = resolve_device(args.device) if device is None else device

    pyro.set_rng_seed(args.seed)
    vae = build_vae(model_config)
    # The configs go in first, so a run that dies still says what it was (and --resume finds it).
    run_on_main(
        lambda: save_config(
            out, model_config=model_config, train_config=train_config, data_config=data_config
        )
    )
    start = time.perf_counter()
    result = fit(
        vae,
        train_x,
        test=test_x,
        epochs=train_config.epochs,
        batch_size=train_config.batch_size,
        lr=train_config.lr,
        num_particles=train_config.num_particles,
        loss=train_config.loss,
        beta=train_config.beta,
        warmup_epochs=train_config.warmup_epochs,
        clip_norm=train_config.clip_norm,
        seed=train_config.seed,
        shards=train_config.shards,
        device=device,
        fused_adam=train_config.fused_adam,
        jit=train_config.jit,
        dynamic_binarization=mode == "dynamic",
        checkpoint=checkpoint,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        model_config=model_config,
    )
    seconds = time.perf_counter() - start
    if rank == 0:
        save_run(
            out,
            vae=vae,
            model_config=model_config,
            train_config=train_config,
            data_config=data_config,
            history=result.history,
        )
    final = result.final
    where = f"{device}" if world_size == 1 else f"{world_size} processes ({device.type})"
    say(
        f"trained a {args.likelihood} VAE (latent {','.join(map(str, model_config.latent_dims))}, hidden {','.join(map(str, args.hidden_dims))}) "
        f"on {dataset.name}: {train_x.shape[0]} train / {test_x.shape[0]} test points of dimension {dataset.input_dim}, "
        f"binarize={mode}"
    )
    say(
        f"{train_config.epochs} epochs in {seconds:.1f} s ({seconds / train_config.epochs:.2f} s/epoch) on {where}; "
        f"final ELBO per datum: train {final.train_elbo:.3f} nats, test {final.test_elbo:.3f} nats"
    )
    if args.eval_samples:
        summary = _evaluate(
            vae,
            test_x.to(device),
            num_samples=args.eval_samples,
            chunk_size=1000,
            seed=args.seed,
            shards=train_config.shards,
        )
        if rank == 0:
            save_evaluation(out / "evaluation.json", summary)
        say(
            f"test log p(x) = {summary['log_px']:.3f} ± {summary['log_px_stderr']:.3f} nats per datum "
            f"(importance sampling, K={args.eval_samples}); NLL {summary['nll']:.3f} nats, "
            f"{summary['bits_per_dim']:.4f} bits/dim"
        )
    say(f"run saved to {out}")
    return 0


def _evaluate_command(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    run = load_run(args.run_dir, device=device)
    x = run.data(args.split)
    if args.limit is not None:
        x = x[: args.limit]
    summary = _evaluate(
        run.vae, x.to(device), num_samples=args.num_samples, chunk_size=args.chunk_size, seed=args.seed
    )
    summary["split"] = args.split
    title = (
        f"{run.data_config.dataset} / {args.split}: {summary['num_data']} data points, "
        f"K = {args.num_samples} importance samples each"
    )
    print(format_report(summary, title=title))
    if args.json:
        save_evaluation(Path(args.json), summary)
    return 0


def _export_command(args: argparse.Namespace) -> int:
    from ..io.export import export_run

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


def _plot_command(args: argparse.Namespace) -> int:
    from ..plots import plot_run

    run = load_run(args.run_dir, device=resolve_device(args.device))
    out = Path(args.out) if args.out else Path(args.run_dir) / "plots"
    for path in plot_run(
        run, out, khat_samples=args.khat_samples, khat_limit=args.khat_limit, seed=args.seed
    ):
        print(f"wrote {path}")
    return 0


def _sample_command(args: argparse.Namespace) -> int:
    from ..plots import save_sample_grid

    run = load_run(args.run_dir, device=resolve_device(args.device))
    path = save_sample_grid(
        run.vae, args.out, num=args.num, image_shape=run.model_config.image_shape, seed=args.seed
    )
    print(f"wrote {path}")
    return 0


def _list_command(args: argparse.Namespace) -> int:
    for heading, registry in _REGISTRIES.items():
        print(heading)
        for name, description in registry.describe().items():
            print(f"  {name:24} {description}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = {
        "train": _train,
        "evaluate": _evaluate_command,
        "export": _export_command,
        "plot": _plot_command,
        "sample": _sample_command,
        "list": _list_command,
    }[args.command]
    # Under torchrun every process would say the same: the others name their rank, and stay silent where
    # all of them stop together (a NaN loss, Ctrl-C: decided with the gradients of the same step).
    rank = int(os.environ.get("RANK", "0")) if getattr(args, "distributed", False) else 0
    name = "pyro-vae" if rank == 0 else f"pyro-vae (rank {rank})"
    try:
        return command(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        if args.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"{name}: error: {message}", file=sys.stderr)
        return 2
    except FloatingPointError as error:
        if args.debug:
            raise
        if rank == 0:
            print(f"pyro-vae: training stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:
        if rank == 0:
            print(f"pyro-vae: interrupted{': ' + str(error) if str(error) else ''}", file=sys.stderr)
            if args.command == "train":
                print("pyro-vae: run the same command with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
