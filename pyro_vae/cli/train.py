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
import logging
import math
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
from ..io.data import Dataset, hold_out, load_dataset
from ..io.lock import RunLock, remove_stale_temporaries
from ..io.run import (
    is_run_dir,
    read_data_config,
    read_layer_choices,
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
from ..training.tensorboard import TensorBoardLog, require_tensorboard
from .evaluate import add_max_memory_argument, evaluate_summary, khat_caveat
from .options import (
    add_dataclass_arguments,
    count_or_all,
    dataclass_from_args,
    int_list,
    json_option,
    layer_int_lists,
    number_option,
    positive,
    registry_choice,
)
from .printing import fit_columns

__all__ = [
    "add_parser",
    "evaluation_points",
    "fill_several_layer_defaults",
    "headline",
    "points_summary",
    "run",
]

LOGGER = logging.getLogger("pyro_vae.cli")
_DEFAULTS = ModelConfig(data_dim=1)
# The final evaluation scores at most this many test points by default (K = 1000 over MNIST's 10,000 took
# several times as long as a few epochs of training): the digits' 359 all, MNIST's 1000 of 10,000.
DEFAULT_EVAL_POINTS = 1000
# Where the decoder's output bias starts (--output-bias).
OUTPUT_BIASES = ("auto", "mean", "zero")
# Epochs of KL warm-up that --warmup-epochs defaults to for several latent layers (fill_several_layer_defaults).
SEVERAL_LAYER_WARMUP = 2
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
    data.add_argument(
        "--validation",
        type=_validation_size,
        default=None,
        metavar="N",
        help="hold out N training points (or a fraction, e.g. 0.1) as the validation split; binarized-mnist "
        "has its own",
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
        default=None,
        help="with several --latent-dims: bottom-up (Burda et al.) or ladder (Sønderby et al.); default: ladder "
        "when the KL is warmed up (--warmup-epochs), which the ladder needs, else bottom-up",
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
    model.add_argument(
        "--output-bias",
        choices=OUTPUT_BIASES,
        default="auto",
        help="the decoder's output bias at the start (bernoulli, mlp): mean sets it to logit(mean training "
        "pixel), zero leaves torch's 0, auto is mean for several latent layers and zero for one",
    )
    _BUILTIN_MODEL_FLAGS.update({action.dest: action.option_strings[0] for action in model._group_actions})
    own = train.add_argument_group("model (your own)")
    own.add_argument(
        "--model",
        default=None,
        metavar="FILE.py:Class",
        help="your own model: an nn.Module class with model(x, *, num_data=None) and guide(x, *, num_data=None), "
        "from a file (FILE.py:Class) or an installed module (package.module:Class), built as "
        "Class(data_dim=D, [image_shape=...,] **options); or one of the package's by name: gmvae "
        "(the Gaussian-mixture VAE, options num_components, latent_dim, hidden_dims, likelihood, ...)",
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
    # With several latent layers the defaults are what made them work (benchmarks/README.md, issue 15): KL
    # warm-up and the ladder; None here is "decide from the model" (fill_several_layer_defaults).
    warmup_help = (
        f"epochs to ramp the KL weight 0 -> beta (default: {SEVERAL_LAYER_WARMUP} with several --latent-dims "
        f"and an ELBO loss over at least {2 * SEVERAL_LAYER_WARMUP} epochs, else 0)"
    )
    add_dataclass_arguments(
        fitting,
        TrainConfig,
        types_by_name={"loss": registry_choice(LOSSES)},
        options_by_name={"warmup_epochs": {"default": None, "help": warmup_help}},
    )
    fitting.add_argument(
        "--distributed",
        action="store_true",
        help="data-parallel over the processes torchrun starts (NCCL on GPUs, gloo on CPUs); "
        "--batch-size is then the global minibatch",
    )
    train.add_argument(
        "--eval-samples", type=int, default=1000, help="K for the final test log p(x); 0 skips it"
    )
    train.add_argument(
        "--eval-points",
        type=count_or_all,
        default=DEFAULT_EVAL_POINTS,
        metavar="N|all",
        help="test points the final log p(x) is estimated on: all of a test set of up to N points, else N "
        "drawn at random with --seed (the ± then includes that draw); all: every test point",
    )
    add_max_memory_argument(train, "--eval-max-memory", what="the final log p(x)")
    train.add_argument(
        "--tensorboard",
        default=None,
        metavar="DIR",
        help="also write per-epoch ELBOs, KL per layer and seconds, and the final reconstruction and sample "
        "grids, to TensorBoard in DIR (pip install 'pyro_vae[tensorboard]')",
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


def fill_several_layer_defaults(args: argparse.Namespace, *, resumed: dict[str, Any] | None = None) -> None:
    """Fill in --warmup-epochs and --inference where they were left to the model (None).

    With ``resumed`` (the choices of the run --resume continues, ``read_layer_choices``), what that run
    was trained with: a run from before these defaults continues as it started.

    At 20 epochs on MNIST the two-layer model beats the one-layer model by a nat only as a ladder with
    two epochs of KL warm-up (93.51 against 94.51); bottom-up without warm-up, the old default, was
    worse than one layer (95.21 against 95.07), and the ladder without warm-up worse still (107.57).
    Warm-up is left out where it cannot apply: IWAE has no KL term to weight, --jit traces one KL
    weight, and a run shorter than twice the warm-up would spend half of it on a different objective.
    """
    resumed = resumed or {}
    if args.warmup_epochs is None and "warmup_epochs" in resumed:
        args.warmup_epochs = resumed["warmup_epochs"]
    if args.inference is None and args.model is None and "inference" in resumed:
        args.inference = resumed["inference"]
    several = args.model is None and len(args.latent_dims) > 1
    if args.warmup_epochs is None:
        warm = several and args.loss != "iwae" and not args.jit and args.epochs >= 2 * SEVERAL_LAYER_WARMUP
        args.warmup_epochs = SEVERAL_LAYER_WARMUP if warm else 0
    if args.inference is None and args.model is None:
        args.inference = "ladder" if several and args.warmup_epochs > 0 else _DEFAULTS.inference


def _validation_size(text: str) -> int | float:
    """--validation: a whole number of points (10000) or a fraction in (0, 1) (0.1)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        fraction = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of points or a fraction, got {text!r}") from None
    if not 0 < fraction < 1:
        raise argparse.ArgumentTypeError(f"a fraction must lie in (0, 1), got {text!r}")
    return fraction


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


def _starts_from_the_mean_pixel(vae: Any, spec: ModelSpec, choice: str) -> bool:
    # By default only the built-in hierarchical model (Bernoulli likelihood, mlp networks) starts from the mean
    # pixel: the one-layer model's numbers (the README's) stay as they were unless --output-bias mean asks, and
    # a user's own model is initialized by its own code.
    config = spec.config
    if config is None or choice == "zero":
        return False
    if choice == "mean":
        if config.likelihood != "bernoulli" or config.network != "mlp":
            raise PyroVAEError(
                f"--output-bias mean sets the logits of a bernoulli likelihood on mlp networks; this model has "
                f"--likelihood {config.likelihood} and --encoder {config.network}. Leave --output-bias at auto"
            )
        return True
    return isinstance(vae, HierarchicalVAE) and config.likelihood == "bernoulli" and config.network == "mlp"


def _describe(spec: ModelSpec, args: argparse.Namespace) -> str:
    """The model, for the first line train prints (the built-in's wording as it always was)."""
    if spec.config is not None:
        latent, hidden = (
            ",".join(map(str, spec.config.latent_dims)),
            ",".join(map(str, spec.config.hidden_dims)),
        )
        if len(spec.config.latent_dims) == 1:
            return f"a {args.likelihood} VAE (latent {latent}, hidden {hidden})"
        warm = f", KL warm-up {args.warmup_epochs} epochs" if args.warmup_epochs else ""
        return f"a {args.likelihood} VAE (latent {latent}, hidden {hidden}, {spec.config.inference} inference{warm})"
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


def evaluation_points(num_test: int, eval_points: int | None, *, seed: int) -> torch.Tensor | None:
    """The test indices the final evaluation scores, in order: None for all of them.

    ``eval_points`` of them drawn uniformly without replacement when the test set is larger (its own
    generator seeded with ``seed``, so training's random stream is left as it was), else all. A random
    draw rather than the first N: test sets are often ordered (MNIST's first 5000 are the cleaner half).
    """
    if eval_points is None or eval_points >= num_test:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_test, generator=generator)[:eval_points].sort().values


def points_summary(summary: dict[str, Any], points: torch.Tensor | None, *, num_test: int) -> dict[str, Any]:
    """What ``summary`` (of ``points`` of a test set of ``num_test``) says of the points it scored.

    ``log_px_points_stderr``: the standard error of the mean log p̂(x) over the drawn points as an estimate
    of the whole test set's, sqrt((1 - n/N) s² / n) with s² the variance of the per-point log p̂(x)
    (sampling without replacement; 0 when every point was scored).
    """
    n = summary["num_data"]
    log_px = torch.tensor(summary["per_datum"]["log_px"], dtype=torch.float64)
    drawn = 0.0 if points is None else math.sqrt((1 - n / num_test) * float(log_px.var()) / n)
    index = list(range(num_test)) if points is None else points.tolist()
    return {
        "split": "test",
        "num_split": num_test,
        "points": "all" if points is None else "random",
        "log_px_points_stderr": drawn,
        "per_datum": {"index": index, **summary["per_datum"]},
    }


def headline(summary: dict[str, Any], *, given: list[str]) -> list[str]:
    """The lines of the final log p(x): its value and ± (from the K samples and the draw of points), what was scored."""
    n, total = summary["num_data"], summary["num_split"]
    sampling, drawn = summary["log_px_stderr"], summary["log_px_points_stderr"]
    condition = f" | {', '.join(given)} at the guide's mean" if given else ""
    lines = [
        f"test log p(x{condition}) = {summary['log_px']:.3f} ± {math.hypot(sampling, drawn):.3f} nats per datum "
        f"(importance sampling, K={summary['num_samples']})"
    ]
    what = f"all {n} test points" if n == total else f"{n} of {total} test points, drawn at random"
    lines.append(
        f"evaluated on {what}; NLL {summary['nll']:.3f} nats, {summary['bits_per_dim']:.4f} bits/dim"
    )
    if n < total:
        lines.append(
            f"the ± is {sampling:.3f} from the K samples and {drawn:.3f} from the draw of the points; "
            "--eval-points all for all"
        )
    return lines


def run(args: argparse.Namespace, *, device: torch.device | None = None) -> int:
    if args.tensorboard is not None:
        require_tensorboard()  # before the run folder is touched: a refused command changes nothing
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

    def say(text: str) -> None:
        if rank == 0:
            print(fit_columns(text))

    fill_several_layer_defaults(args, resumed=read_layer_choices(out) if args.resume else None)
    dataset = load_dataset(args.dataset, data_dir=args.data_dir)
    if args.validation is not None:
        dataset = hold_out(dataset, args.validation)
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
    num_test = len(dataset.split("test"))
    points = evaluation_points(num_test, args.eval_points, seed=args.seed)
    if args.eval_samples:
        check_evaluation_fits(
            num_samples=args.eval_samples,
            num_data=num_test if points is None else len(points),
            device=device,
            max_memory=args.eval_max_memory,
        )
    # The weights are drawn first from the seeded generator, as they always were; what follows draws nothing
    # from it (the binarization check traces the model on a fork, static binarization has its own seeds).
    pyro.set_rng_seed(args.seed)
    vae = spec.build()
    binary = needs_binary_data(vae, dataset.split("train")[:2])
    mode = resolve_binarize(args.binarize, dataset=dataset, likelihood_binary=binary)
    train_x = prepare_split(dataset, "train", mode=mode)
    test_x = prepare_split(dataset, "test", mode=mode)
    # Scored every --eval-every epochs: the held-out points, or the data set's own valid split.
    scored = train_config.eval_every is not None and dataset.valid is not None
    valid_x = prepare_split(dataset, "valid", mode=mode) if scored else None  # none: fit says what to pass
    if _starts_from_the_mean_pixel(vae, spec, args.output_bias):
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
        validation=args.validation,
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
    tracking = (
        []
        if args.tensorboard is None
        else [
            TensorBoardLog(
                args.tensorboard, vae=vae, test=test_x, image_shape=dataset.image_shape, seed=args.seed
            )
        ]
    )
    start = time.perf_counter()
    result = fit(
        vae,
        train_x,
        test=test_x,
        valid=valid_x,
        config=train_config,
        device=device,
        dynamic_binarization=mode == "dynamic",
        checkpoint=out / "checkpoint.pt",
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        model_config=description,
        hooks=[writer, *tracking],
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
    test_elbo = "-" if final.test_elbo is None else f"{final.test_elbo:.3f} nats"
    say(f"trained {_describe(spec, args)} on {dataset.name}, binarize={mode}")
    say(
        f"{train_x.shape[0]} train / {test_x.shape[0]} test points of dimension {dataset.input_dim}; "
        f"{train_config.epochs} epochs in {seconds:.1f} s ({seconds / train_config.epochs:.2f} s/epoch) on {where}"
    )
    say(f"final ELBO per datum: train {final.train_elbo:.3f} nats, test {test_elbo}")
    if args.eval_samples:
        chosen = test_x if points is None else test_x[points]
        scope = (
            f"all {len(chosen)} test points"
            if points is None
            else f"{len(chosen)} of {test_x.shape[0]} test points drawn at random (--eval-points all: every one)"
        )
        LOGGER.info("log p(x) by importance sampling, K = %d, on %s", args.eval_samples, scope)
        summary = evaluate_summary(
            vae,
            chosen.to(device),
            num_samples=args.eval_samples,
            chunk_size=1000,
            seed=args.seed,
            shards=train_config.shards,
            max_memory=args.eval_max_memory,
        )
        summary.update(points_summary(summary, points, num_test=test_x.shape[0]))
        if rank == 0:
            save_evaluation(out / "evaluation.json", summary)
        for line in headline(summary, given=summary.get("conditional_on") or []):
            say(line)
        say(khat_caveat(summary))
        say(f"run saved to {out}")
    return 0
