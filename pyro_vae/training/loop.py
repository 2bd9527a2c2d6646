"""Fitting a model of the contract with stochastic variational inference.

``fit`` assembles the parts of :mod:`pyro_vae.training`: the options
(:class:`~pyro_vae.config.TrainConfig`, passed whole or as keywords), the way
data is fed (:mod:`.feeding`: one process, or shards), the step function
(:mod:`.svi`), the training state that saves and restores itself
(:mod:`.state`) and the hooks around the steps (:mod:`.hooks`: progress,
checkpoints, the NaN guard, Ctrl-C). Each step is asynchronous on a GPU: the
loss stays a device tensor and is read back only when the progress bar
refreshes and at the end of an epoch.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch

from .._typing import DeviceLike, VAEModel
from ..config import TrainConfig
from ..errors import PyroVAEError, PyroVAETypeError
from ..inference.validation import validate_pair
from ..resources import check_fits, training_bytes
from .distributed import process_group, run_on_main
from .elbo import mean_elbo
from .feeding import Feeder, make_feeder
from .hooks import (
    REFRESH_EVERY,
    Checkpoints,
    EpochLog,
    Hook,
    NaNGuard,
    ProgressBar,
    RefuseEndless,
    StopOnInterrupt,
)
from .schedules import LearningRateSchedule
from .state import (
    EpochRecord,
    TrainingState,
    check_resumable,
    describe_model,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from .svi import AsyncSVI, TrainStep, warmup_weight
from .validation import BEST_FILE, BestCheckpoint, Validation

__all__ = ["AsyncSVI", "EpochRecord", "FitResult", "fit", "mean_elbo", "resolve_device", "warmup_weight"]

# The training options: every field of TrainConfig is also a keyword of fit, with the same default.
_OPTIONS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def resolve_device(device: DeviceLike = "auto") -> torch.device:
    """``"auto"`` is the first CUDA device when there is one, else the CPU; a device this machine lacks is refused."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise PyroVAEError(f"unknown device {str(device)!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise PyroVAEError(
                f"device {str(device)!r} was asked for but torch sees no CUDA device; use --device cpu or auto"
            )
        if device.index is not None and device.index >= count:
            raise PyroVAEError(f"device {str(device)!r} was asked for but torch sees {count} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise PyroVAEError("device 'mps' was asked for but this machine has no Apple GPU; use --device cpu")
    elif device.type not in ("cpu", "mps"):
        raise PyroVAEError(
            f"device {str(device)!r} cannot train or evaluate here; use auto, cpu, cuda or cuda:N"
        )
    return device


@dataclass
class FitResult:
    """The trained model (on ``device``), one record per epoch, and the options it was trained with."""

    vae: VAEModel
    history: list[EpochRecord] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    config: TrainConfig = field(default_factory=TrainConfig)

    @property
    def final(self) -> EpochRecord:
        return self.history[-1]


def fit(
    model: VAEModel,
    train: torch.Tensor,
    *,
    test: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    config: TrainConfig | None = None,
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
    free_bits: float | None = None,
    lr_schedule: str = "constant",
    lr_step_epochs: int | None = None,
    lr_gamma: float = 0.1,
    lr_min: float = 0.0,
    eval_every: int | None = None,
    valid_samples: int = 1,
    dynamic_binarization: bool = False,
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    model_config: Any = None,
    progress: bool | None = None,
    hooks: Sequence[Hook] = (),
) -> FitResult:
    """Fit ``model`` to ``train`` [N, D] by SVI; returns the model and per-epoch ELBOs.

    ``model`` is any model of the contract (:class:`~pyro_vae.VAEModel`): an
    ``nn.Module`` with ``model(x, *, num_data=None)`` and ``guide(x, *,
    num_data=None)``. Before any parameter changes, the data are checked
    (``model.check_data`` if it has one, else ``model.likelihood.check_data``
    if it has that) and the pair is validated against each other
    (:func:`~pyro_vae.inference.validate_pair`).

    Each step takes a minibatch of M points, estimates the full-data ELBO as
    (N / M) * sum over the minibatch of [log p(x, z) - log q(z | x)] with
    ``num_particles`` vectorized samples z ~ q(z|x) per point, and takes one
    Adam step on its gradient. ``dynamic_binarization`` draws a fresh binary
    image x ~ Bernoulli(grey values) every time a training point is used
    (``test`` is used as given, so binarize it once beforehand).

    The training options are the fields of :class:`~pyro_vae.config.TrainConfig`
    (see their help there), given whole as ``config`` or one by one as
    keywords of the same names and defaults; not both: a keyword that differs
    from its default must agree with ``config``, or fit refuses. ``device``
    (a name or a ``torch.device``; torchrun's process device) overrides
    ``config.device`` when it is not ``"auto"``.

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
    the parameters of an uninterrupted one. Ctrl-C (SIGINT) or SIGTERM stops after
    the current step, writes the checkpoint and raises :class:`~pyro_vae.training.hooks.Interrupted`
    (a KeyboardInterrupt carrying the signal). A NaN or
    infinite loss stops training with FloatingPointError naming the step and
    the last good checkpoint; non-finite weights are never written.
    ``model_config`` (a :class:`~pyro_vae.ModelConfig`, or any JSON-able dict
    describing the model) is stored in the checkpoint and must match on resume.

    The history holds per-datum figures in nats: ``train_elbo`` averages the
    training objective's minibatch estimates over the epoch (the ELBO itself
    for ``loss="elbo"`` with beta 1; the beta-weighted or IWAE bound
    otherwise); ``test_elbo`` is the plain ELBO of ``test`` after the epoch.
    ``progress=None`` shows a progress bar only when stderr is a terminal; every epoch is also
    logged as one line on the ``pyro_vae.training`` logger (INFO), which the command line shows when piped.
    ``hooks`` are called after the built-in ones at every event (see
    :mod:`pyro_vae.training.hooks`).

    ``lr_schedule`` sets the learning rate of every epoch (constant, Burda et
    al.'s stages, step or cosine; :mod:`pyro_vae.training.schedules`). With
    ``eval_every`` = N, the validation data ``valid`` [N_valid, D] (used as
    given, like ``test``) are scored after every N-th epoch and after the last
    (the ELBO, or IWAE_K with ``valid_samples`` = K > 1; the history's
    ``valid_elbo``), and with a ``checkpoint`` the weights of the best-scoring
    epoch are kept in ``best.pt`` beside it (:mod:`pyro_vae.training.validation`).

    ``shards=S`` cuts every minibatch into S shards of M / S points, each with
    its own random streams seeded by (seed, step, shard), and steps on the mean
    of their gradients (see :mod:`pyro_vae.training.distributed`). In a process
    group of W processes (``torchrun``; give each process its own ``device``,
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
    ``shards=1`` trains as one process of ``torchrun``.
    """
    config = _train_config(config, {k: v for k, v in locals().items() if k in _OPTIONS})
    _check_model(model)
    run_device = resolve_device(config.device)
    checkpoint = _checkpoint_path(checkpoint, every=checkpoint_every, resume=resume)
    description = describe_model(model_config)
    _check_data(model, train, "training", dynamic_binarization=dynamic_binarization)
    for what, held in (("test", test), ("validation", valid)):
        if held is None:
            continue
        _check_data(model, held, what, dynamic_binarization=False)
        if held.shape[1:] != train.shape[1:]:
            raise PyroVAEError(
                f"the {what} data have shape [N, {', '.join(map(str, held.shape[1:]))}] and the training data "
                f"[N, {', '.join(map(str, train.shape[1:]))}]; give both the same width"
            )
    if config.eval_every is not None and valid is None:
        raise PyroVAEError(
            "eval_every scores a validation split, and none was given; pass valid= (on the command line: "
            "--validation N or a fraction, or a data set with its own valid split), or drop eval_every"
        )
    num_data = train.shape[0]
    if config.batch_size > num_data:
        raise PyroVAEError(
            f"batch_size {config.batch_size} is larger than the {num_data} training points; use --batch-size "
            f"{num_data} or less"
        )
    _check_memory(model, config, data_dim=train[0].numel(), device=run_device)
    model.to(run_device)  # type: ignore[attr-defined]
    train = train.to(run_device)
    test = test.to(run_device) if test is not None else None
    valid = valid.to(run_device) if valid is not None and config.eval_every is not None else None
    # Binary stand-ins for grey data under dynamic binarization, so the likelihood's support check passes.
    sample = train[:2].round() if dynamic_binarization else train[:2]
    with pyro.get_param_store().scope():  # a store of its own: validation leaves no parameter behind
        validate_pair(model.model, model.guide, sample, loss=config.loss, num_data=num_data)
    saved = None
    if resume:
        # Rank 0 reads the checkpoint (it may be on its disk only) and hands it to every process.
        saved = run_on_main(lambda: load_checkpoint(checkpoint))  # type: ignore[arg-type]
        weights = model.state_dict()  # type: ignore[attr-defined]
        check_resumable(saved, config, model_config=description, weights=weights, num_data=num_data)

    feeder = make_feeder(train, config, dynamic_binarization=dynamic_binarization, device=run_device)
    steps_per_epoch = math.ceil(feeder.samples_per_epoch / config.batch_size)
    # The bar draws on stderr, so it is stderr that must be a terminal (else a log fills with bar frames).
    show = (sys.stderr.isatty() if progress is None else progress) and feeder.is_main
    # In this order at every event: nothing reads a bad loss, and the bar has counted a step before it stops.
    built_in = [
        *([LearningRateSchedule()] if config.lr_schedule != "constant" else []),
        NaNGuard(),
        ProgressBar(show=show),
        StopOnInterrupt(),
        *([Validation(valid)] if valid is not None else []),
        # Before the checkpoint, whose history names the best epoch: best.pt is on disk by then.
        *([BestCheckpoint(checkpoint.with_name(BEST_FILE))] if valid is not None and checkpoint else []),
        Checkpoints(every=checkpoint_every),
        RefuseEndless(),  # after the epoch's checkpoint: a refusal loses nothing
        *([EpochLog()] if feeder.is_main else []),
    ]
    # A param store of its own, so a parameter left in the global store by an
    # earlier model of the same name cannot stand in for this model's.
    with pyro.get_param_store().scope():
        step = TrainStep(model, config, feeder=feeder, steps_per_epoch=steps_per_epoch)
        if saved is None:
            pyro.set_rng_seed(config.seed)
            state = TrainingState.start(device=run_device)
        else:
            _restore(model, step, saved, path=checkpoint)  # type: ignore[arg-type]
            state = TrainingState.from_checkpoint(saved, device=run_device)
        feeder.start(model)
        _Loop(
            model=model,
            step=step,
            feeder=feeder,
            state=state,
            config=config,
            device=run_device,
            steps_per_epoch=steps_per_epoch,
            num_data=num_data,
            test=test,
            checkpoint=checkpoint,
            saved_at=None if saved is None else saved["step"],
            model_config=description,
            hooks=[*built_in, *hooks],
        ).run()
    return FitResult(vae=model, history=state.history, device=run_device, config=config)


@dataclass
class _Loop:
    """The epochs and steps of one fit, the hooks called around them (see :mod:`.hooks` for the events)."""

    model: VAEModel
    step: TrainStep
    feeder: Feeder
    state: TrainingState
    config: TrainConfig
    device: torch.device
    steps_per_epoch: int
    num_data: int
    test: torch.Tensor | None  # [N_test, D] on the device, scored after every epoch
    checkpoint: Path | None
    saved_at: int | None  # the step of the last checkpoint this fit wrote or resumed from
    model_config: Mapping[str, Any] | None  # describe_model's description, kept in the checkpoint
    hooks: Sequence[Hook]

    @property
    def optimizer(self) -> Any:
        return self.step.optim

    @property
    def at_sync(self) -> bool:
        # Every step on the CPU, where a read-back is free; on a GPU only as often as the bar refreshes.
        return self.device.type == "cpu" or self.state.step % REFRESH_EVERY == 0

    def run(self) -> None:
        try:
            self._emit("on_fit_start")
            while self.state.epoch <= self.config.epochs:
                self._epoch()
        finally:
            self._emit("on_fit_end")

    def _epoch(self) -> None:
        state, start = self.state, time.perf_counter()
        self._emit("on_epoch_start")
        minibatches = self.feeder.epoch(state)
        while state.done < len(minibatches):
            self._emit("on_step_start")
            fed = self.feeder.feed(minibatches[state.done], step=state.step)
            loss, size = self.feeder.step_loss(self.step(fed, step=state.step, num_data=self.num_data), fed)
            state.add_step(loss, size=size, num_data=self.num_data)
            self._emit("on_step_end", loss)
        self._emit("on_epoch_steps_end")
        train_elbo = -float(state.epoch_loss) / state.seen
        test_elbo = (
            None if self.test is None else self.feeder.test_elbo(self.model, self.test, epoch=state.epoch)
        )
        scores: dict[str, float] = {}
        self._emit("on_epoch_scores", scores)  # the validation score, on the epochs that have one
        record = EpochRecord(
            state.epoch,
            train_elbo,
            test_elbo,
            time.perf_counter() - start,
            valid_elbo=scores.get("valid_elbo"),
        )
        state.finish_epoch(record)
        self._emit("on_epoch_end", record)

    def save(self) -> None:
        self._emit("on_save")
        if self.checkpoint is not None and self.feeder.is_main:
            try:
                save_checkpoint(self.checkpoint, self._snapshot())
            except OSError as error:  # a full disk, above all: the file written before is still whole
                kept = (
                    f"the last checkpoint, {self.checkpoint} (step {self.saved_at}), is intact: make room and "
                    "rerun with --resume"
                    if self.saved_at is not None
                    else "no checkpoint was written before"
                )
                raise OSError(
                    error.errno,
                    f"{error.strerror or error} writing {self.checkpoint} at step {self.state.step}; {kept}",
                ) from error
            self.saved_at = self.state.step

    def _snapshot(self) -> dict[str, Any]:
        return {
            "model_config": self.model_config,
            "train_config": self.config.to_dict(),
            "num_data": self.num_data,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},  # type: ignore[attr-defined]
            "optim": self.step.optim.get_state(),
            "rng": self.feeder.rng_state(),
            **self.state.to_checkpoint(),
        }

    def _emit(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *args)


def _checkpoint_path(path: str | Path | None, *, every: int | None, resume: bool) -> Path | None:
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise PyroVAEError(f"checkpoint_every must be a positive number of steps, got {every!r}")
    if (resume or every) and path is None:
        raise PyroVAEError("resume and checkpoint_every need a checkpoint path")
    if path is None:
        return None
    if not isinstance(path, str | Path):
        raise PyroVAETypeError(f"checkpoint must be a file path (str or Path), got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise PyroVAEError(
            f"checkpoint {path} is a folder; give the path of a file in it, e.g. {path / 'checkpoint.pt'}"
        )
    return path


def _check_memory(model: VAEModel, config: TrainConfig, *, data_dim: int, device: torch.device) -> None:
    """Refuse a training whose parameters and step activations cannot fit in ``device``'s memory."""
    parameters = sum(p.numel() for p in model.parameters())  # type: ignore[attr-defined]
    widths = sum(m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))  # type: ignore[attr-defined]
    need = training_bytes(
        parameters=parameters,
        widths=widths,
        data_dim=data_dim,
        batch_size=config.batch_size,
        num_particles=config.num_particles,
    )
    check_fits(
        need,
        device=device,
        what=f"training with batch_size {config.batch_size} and num_particles {config.num_particles}",
        advice="lower --num-particles or --batch-size",
    )


def _restore(model: torch.nn.Module, step: TrainStep, saved: Mapping[str, Any], *, path: Path) -> None:
    """Load a checkpoint's weights, optimizer and random states; a state that does not fit is a damaged checkpoint."""
    for what, restore in (
        ("model weights", lambda: model.load_state_dict(saved["model"])),
        ("optimizer state", lambda: step.optim.set_state(saved["optim"])),
        # None: a sharded run, whose draws follow from (seed, step)
        ("random state", lambda: saved["rng"] is not None and restore_rng(saved["rng"])),
    ):
        try:
            restore()
        except PyroVAEError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
            raise PyroVAEError(
                f"the {what} in {path} cannot be restored ({type(error).__name__}: {error}); the checkpoint is "
                "damaged: train afresh with --overwrite"
            ) from None


def _train_config(config: TrainConfig | None, keywords: Mapping[str, Any]) -> TrainConfig:
    """The options of a fit: ``config``, or the keywords; a keyword off its default must agree with ``config``.

    ``device`` is not an option that conflicts: when it is not ``"auto"`` it
    overrides the config's (the process device under torchrun). In a process
    group of W processes, ``shards`` defaults to W (one shard per process).
    """
    keywords = dict(keywords)
    device = str(keywords.pop("device"))
    if config is None:
        config = TrainConfig(**keywords, device=device)
    else:
        if not isinstance(config, TrainConfig):
            raise PyroVAETypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        conflicts = [
            f"{name}={value!r} (the config has {getattr(config, name)!r})"
            for name, value in keywords.items()
            if value != _OPTIONS[name] and value != getattr(config, name)
        ]
        if conflicts:
            raise PyroVAEError(
                f"fit was given a config and the keyword(s) {', '.join(conflicts)}; give each option in one "
                "place: leave the keyword out, or pass dataclasses.replace(config, ...)"
            )
        if device != "auto":
            config = dataclasses.replace(config, device=device)
    _, world_size = process_group()
    if config.shards is None and world_size > 1:
        config = dataclasses.replace(config, shards=world_size)  # data-parallel: one shard per process
    return config


def _check_model(model: object) -> None:
    methods = [name for name in ("model", "guide") if not callable(getattr(model, name, None))]
    if not isinstance(model, torch.nn.Module) or methods:
        lacks = f"it lacks {' and '.join(methods)}" if methods else "it is not a torch.nn.Module"
        raise PyroVAETypeError(
            f"fit trains an nn.Module with methods model(x, *, num_data=None) and guide(x, *, num_data=None) "
            f"(the contract pyro_vae.VAEModel), but got {type(model).__name__}: {lacks}"
        )


def _data_check(model: object) -> Any:
    """The model's data check: its own ``check_data``, else its likelihood's, else None."""
    for owner in (model, getattr(model, "likelihood", None)):
        check = getattr(owner, "check_data", None)
        if callable(check):
            return check
    return None


def _check_data(model: VAEModel, x: torch.Tensor, what: str, *, dynamic_binarization: bool) -> None:
    if not isinstance(x, torch.Tensor):
        raise PyroVAETypeError(f"the {what} data must be a torch.Tensor [N, D], got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise PyroVAEError(
            f"the {what} data must be a non-empty 2-D tensor [N, D], got shape {list(x.shape)}"
        )
    if x.device.type == "meta":
        raise PyroVAEError(f"the {what} data are on the meta device, which holds shapes but no values")
    # Refused rather than converted, as torch's own layers refuse a float64 input to float32 weights: a silent
    # cast would hide that the data are not what the user thinks (and half precision would lose them).
    weight = next(iter(model.parameters()), None)  # type: ignore[attr-defined]
    dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
    if x.dtype != dtype:
        convert = "x.float()" if dtype == torch.float32 else f"x.to({dtype})"
        raise PyroVAETypeError(
            f"the {what} data are {x.dtype} but the model's weights are {dtype}; convert with {convert}"
        )
    check = _data_check(model)
    if dynamic_binarization:
        if not ((x >= 0) & (x <= 1)).all():
            raise PyroVAEError(
                f"dynamic binarization needs {what} values in [0, 1] (they are Bernoulli probabilities)"
            )
        if check is not None:
            check(torch.bernoulli(x[:1]))  # shape and support of what the likelihood will see
    elif check is not None:
        check(x)
