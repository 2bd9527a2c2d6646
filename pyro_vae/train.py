"""Fitting a VAE with stochastic variational inference.

``fit`` runs ``pyro.infer.SVI`` with a Monte-Carlo ELBO and Adam over
minibatches that live on the model's device. Each step is asynchronous on a
GPU: the loss stays a device tensor and is read back only when the progress
bar refreshes and at the end of an epoch.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.util import zero_grads
from tqdm.auto import tqdm

from ._typing import DeviceLike
from .config import TrainConfig
from .model import VAE
from .objectives import LatentWeight, make_loss, scale_latents

__all__ = ["AsyncSVI", "EpochRecord", "FitResult", "fit", "mean_elbo", "resolve_device", "warmup_weight"]

# How often (in steps) the progress bar reads the running ELBO back from the device.
_REFRESH_EVERY = 25


def resolve_device(device: DeviceLike = "auto") -> torch.device:
    """``"auto"`` is the first CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' was asked for but torch sees no CUDA device; use --device cpu or auto"
        )
    return device


class AsyncSVI(SVI):
    """``pyro.infer.SVI`` with a step that returns the loss as a device tensor.

    ``SVI.step`` returns a Python float, which forces the host to wait for the
    GPU every step. ``step_async`` does the same work (gradient of the loss,
    one step of each parameter's optimizer, zeroed gradients) and leaves the
    loss on the device, so steps queue up behind each other.
    """

    def step_async(self, *args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        with poutine.trace(param_only=True) as capture:
            loss = self.loss_and_grads(self.model, self.guide, *args, **kwargs)
        params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        self.optim(params)
        zero_grads(params)
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


@torch.no_grad()
def mean_elbo(vae: VAE, x: torch.Tensor, *, num_particles: int = 1, batch_size: int = 1024) -> float:
    """The ELBO per data point of ``x`` [N, D], in nats, estimated with ``num_particles`` samples each."""
    loss = make_loss("elbo", num_particles=num_particles)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    with poutine.block(), pyro.validation_enabled(False):
        for chunk in x.split(batch_size):
            total += loss.differentiable_loss(vae.model, vae.guide, chunk).double()
    return -float(total) / x.shape[0]


def warmup_weight(step: int, *, beta: float, warmup_steps: int) -> float:
    """The KL weight at ``step`` (0-based): rises linearly from 0 to ``beta`` over ``warmup_steps``, then stays."""
    return beta if warmup_steps <= 0 else beta * min(1.0, step / warmup_steps)


def _minibatches(
    x: torch.Tensor, batch_size: int, generator: torch.Generator | None
) -> Iterator[torch.Tensor]:
    # A fresh permutation every epoch, drawn on the data's device; the last
    # minibatch may be smaller, and the plate's N/M scaling keeps it unbiased.
    order = torch.randperm(x.shape[0], device=x.device, generator=generator)
    for index in order.split(batch_size):
        yield x[index]


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
    seed: int = 0,
    device: DeviceLike = "auto",
    dynamic_binarization: bool = False,
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

    The history holds per-datum figures in nats: ``train_elbo`` averages the
    training objective's minibatch estimates over the epoch (the ELBO itself
    for ``loss="elbo"`` with beta 1; the beta-weighted or IWAE bound
    otherwise); ``test_elbo`` is the plain ELBO of ``test`` after the epoch.
    ``progress=None`` shows a progress bar only when stdout is a terminal.
    """
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        num_particles=num_particles,
        loss=loss,
        beta=beta,
        warmup_epochs=warmup_epochs,
        seed=seed,
        device=str(device),
    )
    run_device = resolve_device(device)
    _check_data(vae, train, "training", dynamic_binarization=dynamic_binarization)
    if test is not None:
        _check_data(vae, test, "test", dynamic_binarization=False)
    if batch_size > train.shape[0]:
        raise ValueError(
            f"batch_size {batch_size} is larger than the {train.shape[0]} training points; use --batch-size "
            f"{train.shape[0]} or less"
        )

    pyro.set_rng_seed(seed)
    vae.to(run_device)
    train = train.to(run_device)
    test = test.to(run_device) if test is not None else None
    num_data = train.shape[0]
    steps_per_epoch = math.ceil(num_data / batch_size)
    show = sys.stdout.isatty() if progress is None else progress
    result = FitResult(vae=vae, device=run_device, config=config)

    # A param store of its own, so a parameter left in the global store by an
    # earlier model of the same name cannot stand in for this model's.
    # The KL weight: beta, or its warm-up value, read by both model and guide at every step.
    kl_weight = LatentWeight(beta if warmup_epochs == 0 else 0.0)
    warmup_steps = warmup_epochs * steps_per_epoch
    model, guide = vae.model, vae.guide
    if beta != 1 or warmup_epochs:
        model, guide = scale_latents(model, kl_weight), scale_latents(guide, kl_weight)
    with pyro.get_param_store().scope():
        svi = AsyncSVI(
            model, guide, pyro.optim.Adam({"lr": lr}), loss=make_loss(loss, num_particles=num_particles)
        )
        bar = tqdm(
            total=epochs * steps_per_epoch, disable=not show, file=sys.stderr, unit="step", dynamic_ncols=True
        )
        step = 0
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            bar.set_description(f"epoch {epoch}/{epochs}")
            # Sum over the epoch of the unscaled minibatch losses -sum_n ELBO_n, kept on the device.
            epoch_loss = torch.zeros((), dtype=torch.float64, device=run_device)
            seen = 0
            for x in _minibatches(train, batch_size, None):
                if dynamic_binarization:
                    x = torch.bernoulli(x)
                if warmup_steps:
                    kl_weight.beta = warmup_weight(step, beta=beta, warmup_steps=warmup_steps)
                # Pyro's validation (shapes, supports) on the first step only: every later check would be
                # a host-device synchronisation, and the data were checked once above.
                with pyro.validation_enabled(step == 0):
                    step_loss = svi.step_async(x, num_data=num_data)
                epoch_loss += step_loss.double() * (x.shape[0] / num_data)
                seen += x.shape[0]
                step += 1
                bar.update()
                if show and step % _REFRESH_EVERY == 0:
                    bar.set_postfix(elbo=f"{-float(epoch_loss) / seen:.2f}")
            train_elbo = -float(epoch_loss) / num_data
            if not math.isfinite(train_elbo):
                bar.close()
                raise FloatingPointError(
                    f"the training ELBO became {train_elbo} in epoch {epoch}; lower --lr or check the data"
                )
            test_elbo = mean_elbo(vae, test, num_particles=num_particles) if test is not None else None
            result.history.append(EpochRecord(epoch, train_elbo, test_elbo, time.perf_counter() - start))
            bar.set_postfix(
                elbo=f"{train_elbo:.2f}", test=f"{test_elbo:.2f}" if test_elbo is not None else "-"
            )
        bar.close()
    return result


def _check_data(vae: VAE, x: torch.Tensor, what: str, *, dynamic_binarization: bool) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"the {what} data must be a torch.Tensor [N, D], got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"the {what} data must be a non-empty 2-D tensor [N, D], got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"the {what} data must be floating point, got {x.dtype}; convert with x.float()")
    if dynamic_binarization:
        if not ((x >= 0) & (x <= 1)).all():
            raise ValueError(
                f"dynamic binarization needs {what} values in [0, 1] (they are Bernoulli probabilities)"
            )
        vae.likelihood.check_data(torch.bernoulli(x[:1]))  # shape and support of what the likelihood will see
    else:
        vae.likelihood.check_data(x)


def history_rows(result: FitResult) -> list[dict[str, float | int | None]]:
    """The history as plain dicts (for CSV and JSON)."""
    return [asdict(record) for record in result.history]
