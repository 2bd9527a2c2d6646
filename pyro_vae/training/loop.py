"""Fitting a VAE with stochastic variational inference.

``fit`` runs ``pyro.infer.SVI`` with a Monte-Carlo ELBO and Adam over
minibatches that live on the model's device. Each step is asynchronous on a
GPU: the loss stays a device tensor and is read back only when the progress
bar refreshes and at the end of an epoch.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import SVI
from tqdm.auto import tqdm

from .._typing import DeviceLike
from ..config import ModelConfig, TrainConfig
from ..errors import PyroVAEError, PyroVAETypeError
from ..models.vae import VAE
from ..objectives import LatentWeight, make_loss, scale_latents
from .distributed import DataParallel, Shard, ShardedELBO, Stream, derive_seed, process_group, run_on_main
from .optim import JointAdam
from .state import capture_rng, load_checkpoint, restore_rng, save_checkpoint

__all__ = ["AsyncSVI", "EpochRecord", "FitResult", "fit", "mean_elbo", "resolve_device", "warmup_weight"]

# How often (in steps) the progress bar reads the running ELBO back from the device.
_REFRESH_EVERY = 25


def resolve_device(device: DeviceLike = "auto") -> torch.device:
    """``"auto"`` is the first CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PyroVAEError(
            "device 'cuda' was asked for but torch sees no CUDA device; use --device cpu or auto"
        )
    return device


class AsyncSVI(SVI):
    """``pyro.infer.SVI`` with a step that returns the loss as a device tensor.

    ``SVI.step`` returns a Python float, which forces the host to wait for the
    GPU every step. ``step_async`` does the same work (gradient of the loss,
    one step of each parameter's optimizer, zeroed gradients) and leaves the
    loss on the device, so steps queue up behind each other. ``clip_norm``,
    when set, rescales the gradient of all parameters together to at most that norm.
    """

    clip_norm: float | None = None
    # Called with the parameters (in the order the model and guide first use them) after the backward pass
    # and before clipping and the optimizer: where data-parallel training sums the gradients of all ranks.
    reduce_grads: Callable[[list[torch.Tensor]], None] | None = None

    def step_async(self, *args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        with poutine.trace(param_only=True) as capture:
            loss = self.loss_and_grads(self.model, self.guide, *args, **kwargs)
        # dict.fromkeys: each parameter once, in trace order (the same in every process).
        params = list(dict.fromkeys(site["value"].unconstrained() for site in capture.trace.nodes.values()))
        if self.reduce_grads is not None:
            self.reduce_grads(params)
        if self.clip_norm is not None:
            # One norm over all parameters (no host sync: the scale is applied on the device).
            torch.nn.utils.clip_grad_norm_(list(params), self.clip_norm)
        self.optim(params)
        # Drop the gradients rather than zero them (Pyro's zero_grads allocates a zero tensor per parameter,
        # which the next backward then adds into): the next backward writes them afresh.
        for param in params:
            param.grad = None
        return torch.as_tensor(loss).detach()


@dataclass(frozen=True)
class EpochRecord:
    """Per-datum ELBOs in nats after one epoch, and its wall time."""

    epoch: int
    train_elbo: float
    test_elbo: float | None
    seconds: float


@dataclass
class FitResult:
    """The trained model (on ``device``) and one record per epoch."""

    vae: VAE
    history: list[EpochRecord] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    config: TrainConfig = field(default_factory=TrainConfig)

    @property
    def final(self) -> EpochRecord:
        return self.history[-1]


def mean_elbo(vae: VAE, x: torch.Tensor, *, num_particles: int = 1, batch_size: int = 1024) -> float:
    """The ELBO per data point of ``x`` [N, D], in nats, estimated with ``num_particles`` samples each."""
    return -float(_negative_elbo_sum(vae, x, num_particles=num_particles, batch_size=batch_size)) / x.shape[0]


def _negative_elbo_sum(
    vae: VAE, x: torch.Tensor, *, num_particles: int, batch_size: int = 1024
) -> torch.Tensor:
    # -sum over the points of x of their ELBO estimates: float64 [], on x's device.
    loss = make_loss("elbo", num_particles=num_particles)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    with torch.no_grad(), poutine.block(), pyro.validation_enabled(False):
        for chunk in x.split(batch_size):
            total += loss.differentiable_loss(vae.model, vae.guide, chunk).double()
    return total


def _sharded_mean_elbo(
    vae: VAE, x: torch.Tensor, parallel: DataParallel, *, epoch: int, num_particles: int
) -> float:
    """:func:`mean_elbo` of ``x`` cut into the run's S slices, slice s drawn from (seed, TEST_ELBO, epoch, s)."""
    totals = parallel.map_shards(
        x,
        lambda xs: float(_negative_elbo_sum(vae, xs, num_particles=num_particles)),
        keys=(Stream.TEST_ELBO, epoch),
    )
    return -math.fsum(t for t in totals if t is not None) / x.shape[0]  # fsum: exact, in any order


def warmup_weight(step: int, *, beta: float, warmup_steps: int) -> float:
    """The KL weight at ``step`` (0-based): rises linearly from 0 to ``beta`` over ``warmup_steps``, then stays."""
    return beta if warmup_steps <= 0 else beta * min(1.0, step / warmup_steps)


def fit(
    vae: VAE,
    train: torch.Tensor,
    *,
    test: torch.Tensor | None = None,
    epochs: int = 50,
    batch_size: int = 128,
    lr: float = 1e-3,
    num_particles: int = 1,
    loss: str = "elbo",
    beta: float = 1.0,
    warmup_epochs: int = 0,
    clip_norm: float | None = None,
    seed: int = 0,
    shards: int | None = None,
    device: DeviceLike = "auto",
    fused_adam: bool = True,
    jit: bool = False,
    dynamic_binarization: bool = False,
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    model_config: ModelConfig | None = None,
    progress: bool | None = None,
) -> FitResult:
    """Fit ``vae`` to ``train`` [N, D] by SVI; returns the model and per-epoch ELBOs.

    Each step takes a minibatch of M points, estimates the full-data ELBO as
    (N / M) * sum over the minibatch of [log p(x, z) - log q(z | x)] with
    ``num_particles`` vectorized samples z ~ q(z|x) per point, and takes one
    Adam step on its gradient. ``dynamic_binarization`` draws a fresh binary
    image x ~ Bernoulli(grey values) every time a training point is used
    (``test`` is used as given, so binarize it once beforehand).

    ``loss`` names the objective (``elbo``, ``mean-field``, ``iwae``; see
    :mod:`pyro_vae.objectives`). ``beta`` weighs the KL term,
    E_q[log p(x|z)] - beta KL(q || p), and ``warmup_epochs`` raises that weight
    linearly from 0 to ``beta`` over the first epochs, step by step.
    ``clip_norm`` rescales the gradient of all parameters together whenever
    its norm exceeds it.

    With ``checkpoint`` (a file path) the full training state is written
    atomically at the end of every epoch and every ``checkpoint_every`` steps;
    ``resume=True`` continues from it (same data, same settings; ``epochs``
    may be raised to train longer). On the CPU a resumed run ends with exactly
    the parameters of an uninterrupted one. Ctrl-C (SIGINT) stops after the
    current step, writes the checkpoint and raises KeyboardInterrupt. A NaN or
    infinite loss stops training with FloatingPointError naming the step and
    the last good checkpoint; non-finite weights are never written.
    ``model_config`` is stored in the checkpoint and must match on resume.

    The history holds per-datum figures in nats: ``train_elbo`` averages the
    training objective's minibatch estimates over the epoch (the ELBO itself
    for ``loss="elbo"`` with beta 1; the beta-weighted or IWAE bound
    otherwise); ``test_elbo`` is the plain ELBO of ``test`` after the epoch.
    ``progress=None`` shows a progress bar only when stdout is a terminal.

    ``shards=S`` cuts every minibatch into S shards of M / S points, each with
    its own random streams seeded by (seed, step, shard), and steps on the mean
    of their gradients (see :mod:`pyro_vae.distributed`). In a process group of
    W processes (``torchrun``; give each process its own ``device``,
    ``cuda:LOCAL_RANK``) S defaults to W and must be a multiple of it: each
    process computes S / W shards, the gradients are all-reduced, and only
    rank 0 writes the checkpoint and shows progress. The result depends on S,
    not on W: one process with ``shards=2`` ends with the parameters of two
    processes, and a resume needs the same S but may change W. ``batch_size``
    is the global minibatch, a multiple of S; an epoch visits N rounded down to
    a multiple of S points (a different few left out each epoch); ``test_elbo``
    is computed slice by slice, slice s under the seed (seed, epoch, s).

    Without ``shards`` (the default) one process draws the data order and all
    noise from torch's global generator, as it always has: a seed gives the
    numbers it gave before, and a checkpoint carries that generator's state.
    (The derived streams cost a seeding per shard and step, and would change
    every existing result.) ``shards=1`` trains as one process of ``torchrun``.
    """
    _, world_size = process_group()
    if shards is None and world_size > 1:
        shards = world_size  # data-parallel over the process group: one shard per process
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        num_particles=num_particles,
        loss=loss,
        beta=beta,
        warmup_epochs=warmup_epochs,
        clip_norm=clip_norm,
        seed=seed,
        device=str(device),
        fused_adam=fused_adam,
        jit=jit,
        shards=shards,
    )
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or checkpoint_every < 1):
        raise PyroVAEError(f"checkpoint_every must be a positive number of steps, got {checkpoint_every!r}")
    if (resume or checkpoint_every) and checkpoint is None:
        raise PyroVAEError("resume and checkpoint_every need a checkpoint path")
    run_device = resolve_device(device)
    parallel = None if shards is None else DataParallel(shards=shards, seed=seed, device=run_device)
    _check_data(vae, train, "training", dynamic_binarization=dynamic_binarization)
    if test is not None:
        _check_data(vae, test, "test", dynamic_binarization=False)
    if batch_size > train.shape[0]:
        raise PyroVAEError(
            f"batch_size {batch_size} is larger than the {train.shape[0]} training points; use --batch-size "
            f"{train.shape[0]} or less"
        )
    # Rank 0 reads the checkpoint (it may be on its disk only) and hands it to every process.
    saved = run_on_main(lambda: load_checkpoint(checkpoint)) if resume else None
    if saved is not None:
        _check_resumable(saved, config, model_config, vae, num_data=train.shape[0])

    vae.to(run_device)
    train = train.to(run_device)
    test = test.to(run_device) if test is not None else None
    num_data = train.shape[0]
    per_epoch = num_data if parallel is None else parallel.samples_per_epoch(num_data)
    steps_per_epoch = math.ceil(per_epoch / batch_size)
    show = (sys.stdout.isatty() if progress is None else progress) and (parallel is None or parallel.is_main)
    result = FitResult(vae=vae, device=run_device, config=config)

    # The KL weight: beta, or its warm-up value, read by both model and guide at every step.
    kl_weight = LatentWeight(beta if warmup_epochs == 0 else 0.0)
    warmup_steps = warmup_epochs * steps_per_epoch
    model, guide = vae.model, vae.guide
    if beta != 1 or warmup_epochs:
        model, guide = scale_latents(model, kl_weight), scale_latents(guide, kl_weight)
    # A param store of its own, so a parameter left in the global store by an
    # earlier model of the same name cannot stand in for this model's.
    with pyro.get_param_store().scope(), _StopOnInterrupt() as interrupt:
        optimizer = JointAdam(lr=lr) if fused_adam else pyro.optim.Adam({"lr": lr})
        objective = make_loss(loss, num_particles=num_particles, jit=jit)
        if parallel is not None:
            sharded = ShardedELBO(
                objective, parallel=parallel, preprocess=torch.bernoulli if dynamic_binarization else None
            )
            objective = sharded
        svi = AsyncSVI(model, guide, optimizer, loss=objective)
        svi.clip_norm = clip_norm
        if parallel is not None:
            svi.reduce_grads = sharded.reduce_grads
        # Where training stands: the epoch in progress, its data order and how many minibatches of it are
        # done, and the epoch's running sums (kept on the device).
        epoch, done, order, step = 1, 0, None, 0
        epoch_loss = torch.zeros((), dtype=torch.float64, device=run_device)
        seen = 0
        if saved is None:
            pyro.set_rng_seed(seed)
        else:
            vae.load_state_dict(saved["model"])
            svi.optim.set_state(saved["optim"])
            result.history = [EpochRecord(**record) for record in saved["history"]]
            epoch, done, step, seen = saved["epoch"], saved["done"], saved["step"], saved["seen"]
            order = None if saved["order"] is None else saved["order"].to(run_device)
            epoch_loss = torch.tensor(saved["epoch_loss"], dtype=torch.float64, device=run_device)
            if saved["rng"] is not None:  # None: a sharded run, whose draws follow from (seed, step)
                restore_rng(saved["rng"])
        if parallel is not None:
            # Everything but the device (cuda:LOCAL_RANK differs by process) must agree, or the sums are garbage.
            settings = {k: v for k, v in config.to_dict().items() if k != "device"}
            shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
            parallel.check_same((settings, num_data, shapes), what="the settings, data or model")
            parallel.broadcast_module(vae)
        # The first step whose loss was not finite, found without a host sync: read back only at checks.
        first_bad = torch.full((), -1, dtype=torch.long, device=run_device)

        def snapshot() -> dict:
            return {
                "model_config": None if model_config is None else model_config.to_dict(),
                "train_config": config.to_dict(),
                "num_data": num_data,
                "model": {k: v.detach().cpu() for k, v in vae.state_dict().items()},
                "optim": svi.optim.get_state(),
                "rng": capture_rng() if parallel is None else None,
                "epoch": epoch,
                "done": done,
                "step": step,
                "seen": seen,
                "order": None if order is None else order.cpu(),
                "epoch_loss": float(epoch_loss),
                "history": [asdict(record) for record in result.history],
            }

        def check_finite() -> None:
            bad = int(first_bad)
            if bad >= 0:
                last = (
                    f"the last good checkpoint is {checkpoint}"
                    if checkpoint and Path(checkpoint).exists()
                    else ("no checkpoint was written")
                )
                raise FloatingPointError(
                    f"the loss became NaN or infinite at step {bad + 1} (epoch {epoch}); {last}; "
                    "lower --lr or set --clip-norm"
                )

        def save() -> None:
            check_finite()
            if checkpoint is not None and (parallel is None or parallel.is_main):
                save_checkpoint(checkpoint, snapshot())

        bar = tqdm(
            total=epochs * steps_per_epoch,
            initial=step,
            disable=not show,
            file=sys.stderr,
            unit="step",
            dynamic_ncols=True,
        )
        try:
            while epoch <= epochs:
                start = time.perf_counter()
                bar.set_description(f"epoch {epoch}/{epochs}")
                if parallel is not None:
                    # Each shard's indices from DistributedSampler, drawn from (seed, epoch): nothing to store.
                    batches = parallel.minibatches(num_data, batch_size=batch_size, epoch=epoch)
                else:
                    if order is None:
                        # A fresh permutation every epoch, from the global generator (restored on resume).
                        order = torch.randperm(num_data, device=run_device)
                    batches = order.split(batch_size)
                while done < len(batches):
                    if parallel is None:
                        x = train[batches[done]]  # the last minibatch may be smaller; N/M keeps it unbiased
                        if dynamic_binarization:
                            x = torch.bernoulli(x)
                    else:
                        x = [
                            Shard(s, derive_seed(seed, Stream.TRAIN, step, s), train[i])
                            for s, i in batches[done]
                        ]
                        if interrupt.requested:
                            sharded.request_stop()  # travels with this step's gradients to every process
                    if warmup_steps:
                        kl_weight.beta = warmup_weight(step, beta=beta, warmup_steps=warmup_steps)
                    # Pyro's validation (shapes, supports) on the first step only: every later check would
                    # be a host-device synchronisation, and the data were checked once above.
                    with pyro.validation_enabled(step == 0):
                        step_loss = svi.step_async(x, num_data=num_data)
                    if parallel is None:
                        size = x.shape[0]
                    else:
                        # The mean of the S shard losses, summed over all processes: the same in each.
                        step_loss, size = sharded.global_loss, parallel.shards * x[0].x.shape[0]
                    first_bad = torch.where(
                        (first_bad < 0) & ~torch.isfinite(step_loss),
                        torch.full_like(first_bad, step),
                        first_bad,
                    )
                    epoch_loss += step_loss.double() * (size / num_data)
                    seen += size
                    step += 1
                    done += 1
                    bar.update()
                    checking = run_device.type == "cpu" or step % _REFRESH_EVERY == 0
                    if checking:
                        check_finite()  # free on the CPU; on a GPU only as often as the bar refreshes
                    if show and step % _REFRESH_EVERY == 0:
                        bar.set_postfix(elbo=f"{-float(epoch_loss) / seen:.2f}")
                    # With shards, the flag all processes summed, read back at the same steps in each.
                    stopping = (
                        interrupt.requested if parallel is None else checking and sharded.stop_requested
                    )
                    if stopping:
                        save()
                        if parallel is not None:
                            parallel.barrier()  # torchrun stops everyone at the first exit: after the save
                        raise KeyboardInterrupt(
                            f"stopped at step {step}"
                            + (f"; the checkpoint {checkpoint} resumes it" if checkpoint else "")
                        )
                    if checkpoint_every and step % checkpoint_every == 0 and done < len(batches):
                        save()
                check_finite()
                train_elbo = -float(epoch_loss) / seen
                if test is None:
                    test_elbo = None
                elif parallel is None:
                    test_elbo = mean_elbo(vae, test, num_particles=num_particles)
                else:
                    test_elbo = _sharded_mean_elbo(
                        vae, test, parallel, epoch=epoch, num_particles=num_particles
                    )
                result.history.append(EpochRecord(epoch, train_elbo, test_elbo, time.perf_counter() - start))
                bar.set_postfix(
                    elbo=f"{train_elbo:.2f}", test=f"{test_elbo:.2f}" if test_elbo is not None else "-"
                )
                epoch, done, order, seen = epoch + 1, 0, None, 0
                epoch_loss = torch.zeros((), dtype=torch.float64, device=run_device)
                save()
        finally:
            bar.close()
    return result


def _check_resumable(
    saved: dict, config: TrainConfig, model_config: ModelConfig | None, vae: VAE, *, num_data: int
) -> None:
    """Refuse a checkpoint made with other settings, another model or other data."""
    ours, theirs = config.to_dict(), dict(saved["train_config"])
    then, now = theirs.get("shards"), ours["shards"]
    if then != now:
        # Each shard draws from its own random streams, so the shard count is part of what is computed.
        def shards(count: int | None) -> str:
            return f"--shards {count}" if count else "no shards (one process, without --distributed)"

        raise PyroVAEError(
            f"the checkpoint was trained with {shards(then)} and this run has {shards(now)}; resume with "
            + shards(then)
            + (f" (under torchrun, on a number of processes that divides {then})" if then else "")
        )
    # Training longer is allowed; everything else must be what the checkpoint was made with.
    for free in (
        "epochs",
        "device",
        "jit",
    ):  # the device and the jit change where and how, not what, is computed
        ours.pop(free), theirs.pop(free, None)
    differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if model_config is not None and saved["model_config"] is not None:
        mine, stored = model_config.to_dict(), saved["model_config"]
        differ += sorted(
            f"model.{k}" for k in set(mine) | set(stored) if _plain(mine.get(k)) != _plain(stored.get(k))
        )
    if saved["num_data"] != num_data:
        differ.append(f"number of training points ({saved['num_data']} then, {num_data} now)")
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    stored_shapes = {k: tuple(v.shape) for k, v in saved["model"].items()}
    if expected != stored_shapes:
        differ.append("model weights (names or shapes)")
    if differ:
        raise PyroVAEError(
            f"the checkpoint was made with another configuration (differs in: {', '.join(differ)}); "
            "resume with the original settings, or train afresh with --overwrite"
        )
    if config.epochs < saved["epoch"] - 1:
        raise PyroVAEError(
            f"the checkpoint has finished {saved['epoch'] - 1} epochs, more than --epochs {config.epochs}"
        )


def _plain(value: object) -> object:
    # JSON turns tuples into lists; compare configs in that form.
    return list(value) if isinstance(value, tuple) else value


class _StopOnInterrupt:
    """Turns the first Ctrl-C (SIGINT) into a flag the training loop checks after each step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _check_data(vae: VAE, x: torch.Tensor, what: str, *, dynamic_binarization: bool) -> None:
    if not isinstance(x, torch.Tensor):
        raise PyroVAETypeError(f"the {what} data must be a torch.Tensor [N, D], got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise PyroVAEError(f"the {what} data must be a non-empty 2-D tensor [N, D], got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise PyroVAETypeError(f"the {what} data must be floating point, got {x.dtype}; convert with x.float()")
    if dynamic_binarization:
        if not ((x >= 0) & (x <= 1)).all():
            raise PyroVAEError(
                f"dynamic binarization needs {what} values in [0, 1] (they are Bernoulli probabilities)"
            )
        vae.likelihood.check_data(torch.bernoulli(x[:1]))  # shape and support of what the likelihood will see
    else:
        vae.likelihood.check_data(x)
