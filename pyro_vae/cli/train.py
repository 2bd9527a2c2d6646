"""``pyro-vae train``: fit a model by SVI and save a run folder.

The model is the package's own, described by the model flags (``--prior``,
``--likelihood``, ``--latent-dims`` ...), or a user's class, ``--model
FILE.py:Class`` or ``--model package.module:Class`` with its constructor's
options as ``--model-option KEY=VALUE``; both go through one
:class:`~pyro_vae.models.spec.ModelSpec`, which the run folder keeps. The
training flags are generated from the fields of
:class:`~pyro_vae.config.TrainConfig`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import torch

from ..components.guides import GUIDES
from ..components.likelihoods import LIKELIHOODS
from ..components.nets import ACTIVATIONS, NETWORKS
from ..components.priors import PRIORS
from ..config import BINARIZE_MODES, INFERENCE, LAYER_INITS, TOP_DOWN, DataConfig, ModelConfig, TrainConfig
from ..errors import PyroVAEError
from ..io.binarization import prepare_split, resolve_binarize
from ..io.data import Dataset, load_dataset
from ..io.lock import RunLock, remove_stale_temporaries
from ..io.run import (
    is_run_dir,
    read_data_config,
    save_config,
    save_evaluation,
    save_run,
    set_aside_run,
    settle_replacement,
)
from ..models.abilities import needs_binary_data
from ..models.hierarchical import HierarchicalVAE
from ..models.initialization import init_output_bias
from ..models.spec import ModelSpec
from ..objectives import LOSSES
from ..resources import check_evaluation_fits, check_model_fits
from ..training.distributed import process_group, run_on_main, torchrun_process_group
from ..training.hooks import Hook, Loop
from ..training.loop import fit, resolve_device
from ..training.state import EpochRecord
from .evaluate import evaluate_summary, khat_caveat
from .options import (
    add_dataclass_arguments,
    dataclass_from_args,
    int_list,
    json_option,
    layer_int_lists,
    number_option,
    positive,
    registry_choice,
)

__all__ = ["add_parser", "run"]

_DEFAULTS = ModelConfig(data_dim=1)
# The flags that describe the built-in model (filled in by add_parser): a user's --model takes none of them.
_BUILTIN_MODEL_FLAGS: dict[str, str] = {}


def add_parser(commands: Any) -> None:
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
    model = train.add_argument_group("model (the package's own)")
    model.add_argument("--prior", type=registry_choice(PRIORS), default=_DEFAULTS.prior)
    model.add_argument(
        "--prior-components", type=positive(int), default=None, help="K for the mixture and vamp priors"
    )
    model.add_argument("--likelihood", type=registry_choice(LIKELIHOODS), default=_DEFAULTS.likelihood)
    model.add_argument(
        "--likelihood-scale",
        type=positive(float),
        default=None,
        help="fixed scale of the gaussian likelihood",
    )
    model.add_argument("--guide", type=registry_choice(GUIDES), default=_DEFAULTS.guide)
    model.add_argument(
        "--guide-option",
        type=number_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the guide head, e.g. rank=4 (low-rank) or num_flows=4 (iaf); repeatable",
    )
    model.add_argument("--encoder", type=registry_choice(NETWORKS), default=_DEFAULTS.network)
    model.add_argument(
        "--latent-dims",
        type=int_list,
        default=_DEFAULTS.latent_dims,
        help="latent sizes, z1 first: 20, or 100,50 for two stochastic layers",
    )
    model.add_argument(
        "--inference",
        choices=INFERENCE,
        default=_DEFAULTS.inference,
        help="with several --latent-dims: bottom-up (Burda et al.) or ladder (Sønderby et al.)",
    )
    model.add_argument(
        "--activation", choices=tuple(ACTIVATIONS), default=None, help="default: softplus (mlp), elu (conv)"
    )
    model.add_argument(
        "--hidden-dims",
        type=int_list,
        default=_DEFAULTS.hidden_dims,
        help="encoder widths, e.g. 400 or 500,500",
    )
    model.add_argument(
        "--layer-hidden-dims",
        type=layer_int_lists,
        default=_DEFAULTS.layer_hidden_dims,
        metavar="W,W/W,W",
        help="with several --latent-dims: the hidden widths between each pair of latent layers, z1-z2 first, "
        "e.g. 100,100 (default: as wide as the lower layer, Burda et al.)",
    )
    model.add_argument(
        "--top-down",
        choices=TOP_DOWN,
        default=_DEFAULTS.top_down,
        help="mean of p(z_l | z_l+1): residual (a linear path that starts as the identity, plus an MLP) or plain",
    )
    model.add_argument(
        "--layer-init",
        choices=LAYER_INITS,
        default=_DEFAULTS.layer_init,
        help="initialization of the layers between latent layers: glorot or torch's default",
    )
    _BUILTIN_MODEL_FLAGS.update({action.dest: action.option_strings[0] for action in model._group_actions})
    own = train.add_argument_group("model (your own)")
    own.add_argument(
        "--model",
        default=None,
        metavar="FILE.py:Class",
        help="your own model: an nn.Module class with model(x, *, num_data=None) and guide(x, *, num_data=None), "
        "from a file (FILE.py:Class) or an installed module (package.module:Class), built as "
        "Class(data_dim=D, [image_shape=...,] **options)",
    )
    own.add_argument(
        "--model-option",
        type=json_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a keyword of your model's constructor, e.g. hidden=16 (JSON values, else text); repeatable",
    )
    fitting = train.add_argument_group("training")
    add_dataclass_arguments(fitting, TrainConfig, types_by_name={"loss": registry_choice(LOSSES)})
    fitting.add_argument(
        "--distributed",
        action="store_true",
        help="data-parallel over the processes torchrun starts (NCCL on GPUs, gloo on CPUs); "
        "--batch-size is then the global minibatch",
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
        type=positive(int),
        default=None,
        metavar="STEPS",
        help="also checkpoint every STEPS steps (always at the end of each epoch)",
    )
    train.set_defaults(run=run, parser=train)


def _model_spec(args: argparse.Namespace, dataset: Dataset) -> ModelSpec:
    """The model the flags describe: a user's ``--model`` class, or the built-in one."""
    if args.model is None:
        if args.model_option:
            raise PyroVAEError(
                "--model-option sets an option of your own --model; pass --model FILE.py:Class with it"
            )
        return ModelSpec.builtin(
            ModelConfig(
                data_dim=dataset.input_dim,
                latent_dims=args.latent_dims,
                hidden_dims=args.hidden_dims,
                prior=args.prior,
                prior_options={}
                if args.prior_components is None
                else {"num_components": args.prior_components},
                likelihood=args.likelihood,
                likelihood_options={} if args.likelihood_scale is None else {"scale": args.likelihood_scale},
                guide=args.guide,
                guide_options=dict(args.guide_option),
                network=args.encoder,
                activation=args.activation,
                inference=args.inference,
                layer_hidden_dims=args.layer_hidden_dims,
                top_down=args.top_down,
                layer_init=args.layer_init,
                image_shape=dataset.image_shape,
            )
        )
    given = [
        option
        for dest, option in _BUILTIN_MODEL_FLAGS.items()
        if getattr(args, dest) != args.parser.get_default(dest)
    ]
    if given:
        raise PyroVAEError(
            f"{', '.join(given)} describe the package's own model, and --model brings yours; pass your model's "
            "options as --model-option KEY=VALUE"
        )
    return ModelSpec.from_target(
        args.model,
        data_dim=dataset.input_dim,
        image_shape=dataset.image_shape,
        options=dict(args.model_option),
    )


def _starts_from_the_mean_pixel(vae: Any, spec: ModelSpec) -> bool:
    # Only the built-in hierarchical model with a Bernoulli likelihood and mlp networks: the one-layer model's
    # numbers (the README's) stay as they were, and a user's own model is initialized by its own code.
    config = spec.config
    return (
        isinstance(vae, HierarchicalVAE)
        and config is not None
        and config.likelihood == "bernoulli"
        and config.network == "mlp"
    )


def _describe(spec: ModelSpec, args: argparse.Namespace) -> str:
    """The model, for the first line train prints (the built-in's wording as it always was)."""
    if spec.config is not None:
        latent, hidden = (
            ",".join(map(str, spec.config.latent_dims)),
            ",".join(map(str, spec.config.hidden_dims)),
        )
        return f"a {args.likelihood} VAE (latent {latent}, hidden {hidden})"
    options = ", ".join(f"{key}={value!r}" for key, value in spec.options.items())
    return f"{spec.name}" + (f" ({options})" if options else "")


def _out_path(args: argparse.Namespace) -> Path:
    return Path(args.out or f"runs/{Path(args.dataset).stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def _claim_folder(out: Path, args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    """Lock ``out`` for this command (held until ``stack`` closes), tidy it, and check it can take the run.

    Nothing in a run that is there is changed: what the command writes waits until every check has passed
    (:class:`_RunFolderWriter`).
    """
    if args.resume and args.overwrite:
        raise PyroVAEError(
            "--resume continues the run in --out and --overwrite replaces it; pass one of them"
        )
    if args.resume and not out.is_dir():
        raise PyroVAEError(f"{out} holds no checkpoint.pt to resume; train without --resume")
    lock = stack.enter_context(RunLock.acquire(out, advice="wait for it or choose another --out"))
    # The exclusive lock proves that no other process writes here: what a killed one left is settled.
    kept = settle_replacement(lock.folder)
    if kept is not None:
        print(f"pyro-vae: {kept}", file=sys.stderr)
    remove_stale_temporaries(lock.folder)
    has_checkpoint = (out / "checkpoint.pt").is_file()
    # A run killed before its first checkpoint has its config.json only: nothing to resume, nothing to keep.
    unfinished = is_run_dir(out) and not has_checkpoint and not (out / "model.pt").is_file()
    if args.resume and not has_checkpoint:
        if not is_run_dir(out):
            raise PyroVAEError(f"{out} holds no checkpoint.pt to resume; train without --resume")
        why = " (the run stopped before its first one)" if unfinished else ""
        raise PyroVAEError(f"{out} holds no checkpoint.pt to resume{why}; start it again with --overwrite")
    if is_run_dir(out) and not (args.overwrite or args.resume):
        if unfinished:
            raise PyroVAEError(
                f"{out} holds a run that stopped before its first checkpoint; start it again with "
                "--overwrite, or choose another --out"
            )
        resume = "--resume or " if has_checkpoint else ""
        raise PyroVAEError(f"{out} already holds a run; choose another --out, or pass {resume}--overwrite")


def _check_same_data(out: Path, data: DataConfig) -> None:
    """Refuse to resume the run in ``out`` on other data than it was trained on."""
    then = read_data_config(out)
    if then.sha256 is not None and data.sha256 is not None:
        same = then.sha256 == data.sha256  # a user's file: the same bytes, wherever the file now lies
        what = f"the data file with SHA-256 {then.sha256}"
    else:
        same = Path(then.dataset).name == Path(data.dataset).name
        what = f"--dataset {then.dataset}"
    if not same:
        now = f"--dataset {data.dataset}" + (f" (SHA-256 {data.sha256})" if data.sha256 else "")
        raise PyroVAEError(
            f"the run in {out} was trained on {what}, not on {now}; resume it with the original data, or "
            "train afresh with --overwrite"
        )
    if then.binarize != data.binarize:
        raise PyroVAEError(
            f"the run in {out} was trained with --binarize {then.binarize}, this one resolves to "
            f"{data.binarize}; resume with --binarize {then.binarize}"
        )


class _RunFolderWriter(Hook):
    """Writes into the run folder only once every check of ``fit`` has passed (the loop starts).

    There it runs the last ``check`` (after fit's own: a checkpoint made with other settings is named
    first), sets an old run aside (``--overwrite``) and writes the configs, so a run that dies still says
    what it was (and ``--resume`` finds it). The old run is dropped once the new one has its first
    checkpoint, and brought back if the new one stops before that (see :func:`set_aside_run`).
    """

    def __init__(
        self,
        out: Path,
        *,
        replace: bool,
        check: Callable[[], None] | None,
        write_config: Callable[[], None],
    ) -> None:
        self.out = out
        self.replace = replace
        self.check = check
        self.write_config = write_config
        self.replacing = False  # an old run is set aside, waiting for the new one's first checkpoint

    def on_fit_start(self, loop: Loop) -> None:
        if self.check is not None:
            run_on_main(self.check)  # every process gets rank 0's answer, so none waits for the others
        if not loop.feeder.is_main:
            return
        if self.replace:
            self.replacing = set_aside_run(self.out)
        self.write_config()

    # Called after the built-in hooks, Checkpoints among them: a checkpoint of this step is written by now.
    def on_step_end(self, loop: Loop, loss: torch.Tensor) -> None:
        self.settle_at_first_checkpoint()

    def on_epoch_end(self, loop: Loop, record: EpochRecord) -> None:
        self.settle_at_first_checkpoint()

    def on_fit_end(self, loop: Loop) -> None:
        if self.replacing:
            self.settle()

    def settle_at_first_checkpoint(self) -> None:
        if self.replacing and (self.out / "checkpoint.pt").exists():
            self.settle()

    def settle(self) -> None:
        self.replacing = False
        kept = settle_replacement(self.out)
        if kept is not None:
            print(f"pyro-vae: {kept}", file=sys.stderr)


def run(args: argparse.Namespace, *, device: torch.device | None = None) -> int:
    if args.distributed and device is None:
        with torchrun_process_group(device=args.device) as process_device:
            return run(args, device=process_device)
    out = _out_path(args)
    with contextlib.ExitStack() as stack:
        # Rank 0's disk holds the run: it alone locks and checks the folder, and every process gets its answer.
        run_on_main(lambda: _claim_folder(out, args, stack))
        return _train(args, out, device=device)


def _train(args: argparse.Namespace, out: Path, *, device: torch.device | None) -> int:
    rank, world_size = process_group()
    # Only rank 0 speaks and writes files; the others compute their shards and join its collectives.
    say = print if rank == 0 else lambda *_, **__: None
    dataset = load_dataset(args.dataset, data_dir=args.data_dir)
    spec = _model_spec(args, dataset)
    train_config = dataclass_from_args(
        TrainConfig, args, shards=args.shards or (world_size if args.distributed else None)
    )
    if args.eval_samples < 0:
        raise PyroVAEError(f"--eval-samples must be 0 (skip) or a positive integer, got {args.eval_samples}")
    device = resolve_device(args.device) if device is None else device
    # Sizes against the device's memory before anything is allocated (a user's class is not built twice).
    if spec.config is not None:
        check_model_fits(spec.build, device=device)
    if args.eval_samples:
        check_evaluation_fits(
            num_samples=args.eval_samples, num_data=len(dataset.split("test")), device=device
        )
    # The weights are drawn first from the seeded generator, as they always were; what follows draws nothing
    # from it (the binarization check traces the model on a fork, static binarization has its own seeds).
    pyro.set_rng_seed(args.seed)
    vae = spec.build()
    binary = needs_binary_data(vae, dataset.split("train")[:2])
    mode = resolve_binarize(args.binarize, dataset=dataset, likelihood_binary=binary)
    train_x = prepare_split(dataset, "train", mode=mode)
    test_x = prepare_split(dataset, "test", mode=mode)
    if _starts_from_the_mean_pixel(vae, spec):
        # The decoder's output bias at logit(mean pixel): without it a stack of latent layers spends its first
        # epoch on the mean image while the KL term closes the upper layers (benchmarks/README.md, issue 15).
        init_output_bias(vae, train_x)
    # A user's file by its absolute path and the hash of its bytes, so the run can be scored from anywhere
    # and a changed file is refused.
    data_config = DataConfig(
        dataset=args.dataset if dataset.source is None else str(dataset.source),
        data_dir=args.data_dir,
        binarize=mode,
        sha256=dataset.sha256,
    )
    writer = _RunFolderWriter(
        out,
        replace=args.overwrite,
        check=(lambda: _check_same_data(out, data_config)) if args.resume else None,
        write_config=lambda: save_config(
            out, model_spec=spec, train_config=train_config, data_config=data_config
        ),
    )
    # What a checkpoint must match on resume: the built-in's config as it always was, a user's spec without
    # the absolute path its file was read from (the same source read from elsewhere is the same model).
    description = (
        spec.config if spec.config is not None else {k: v for k, v in spec.to_dict().items() if k != "origin"}
    )
    start = time.perf_counter()
    result = fit(
        vae,
        train_x,
        test=test_x,
        config=train_config,
        device=device,
        dynamic_binarization=mode == "dynamic",
        checkpoint=out / "checkpoint.pt",
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        model_config=description,
        hooks=[writer],
    )
    seconds = time.perf_counter() - start
    if rank == 0:
        save_run(
            out,
            vae=vae,
            model_spec=spec,
            train_config=train_config,
            data_config=data_config,
            history=result.history,
        )
    final = result.final
    where = f"{device}" if world_size == 1 else f"{world_size} processes ({device.type})"
    say(
        f"trained {_describe(spec, args)} "
        f"on {dataset.name}: {train_x.shape[0]} train / {test_x.shape[0]} test points of dimension {dataset.input_dim}, "
        f"binarize={mode}"
    )
    say(
        f"{train_config.epochs} epochs in {seconds:.1f} s ({seconds / train_config.epochs:.2f} s/epoch) on {where}; "
        f"final ELBO per datum: train {final.train_elbo:.3f} nats, test {final.test_elbo:.3f} nats"
    )
    if args.eval_samples:
        summary = evaluate_summary(
            vae,
            test_x.to(device),
            num_samples=args.eval_samples,
            chunk_size=1000,
            seed=args.seed,
            shards=train_config.shards,
        )
        if rank == 0:
            save_evaluation(out / "evaluation.json", summary)
        conditional = summary.get("conditional_on") or []
        given = f" | {', '.join(conditional)} at the guide's mean" if conditional else ""
        say(
            f"test log p(x{given}) = {summary['log_px']:.3f} ± {summary['log_px_stderr']:.3f} nats per datum "
            f"(importance sampling, K={args.eval_samples}); NLL {summary['nll']:.3f} nats, "
            f"{summary['bits_per_dim']:.4f} bits/dim"
        )
        say(khat_caveat(summary))
    say(f"run saved to {out}")
    return 0
