"""The step function of training: one SVI step on a minibatch, its loss left on the device.

:class:`AsyncSVI` is ``pyro.infer.SVI`` whose step does not read the loss back
to the host; :class:`TrainStep` is what the loop calls once per minibatch
(NumPyro's ``SVI.update``): it sets the KL weight of that step, runs Pyro's
validation on the first step only, and steps the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.elbo import ELBO

from .._typing import VAEModel
from ..config import TrainConfig
from ..objectives import LatentWeight, make_loss, scale_latents
from .optim import JointAdam

__all__ = ["AsyncSVI", "TrainStep", "warmup_weight"]


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


def warmup_weight(step: int, *, beta: float, warmup_steps: int) -> float:
    """The KL weight at ``step`` (0-based): rises linearly from 0 to ``beta`` over ``warmup_steps``, then stays."""
    return beta if warmup_steps <= 0 else beta * min(1.0, step / warmup_steps)


class FeedsLoss(Protocol):
    """What the step asks of the way data is fed (:mod:`pyro_vae.training.feeding`)."""

    reduce_grads: Callable[[list[torch.Tensor]], None] | None

    def objective(self, loss: ELBO) -> ELBO: ...


class TrainStep:
    """One training step: the loss of ``config`` on a minibatch, its gradient, one optimizer step.

    With ``beta`` != 1 or a warm-up, every latent site's log-density in model
    and guide is scaled by the KL weight, E_q[log p(x|z)] - beta KL(q || p)
    (Higgins et al., 2017); over the first ``warmup_epochs`` the weight rises
    linearly from 0 to beta, step by step (Sønderby et al., 2016). The
    optimizer is Adam, one fused torch Adam (``fused_adam``) or Pyro's
    per-parameter one; ``feeder`` wraps the loss (shards) and reduces the
    gradients (data parallel). Build it inside the param store scope the
    training uses: the optimizer's parameters are found there.
    """

    def __init__(
        self, model: VAEModel, config: TrainConfig, *, feeder: FeedsLoss, steps_per_epoch: int
    ) -> None:
        self.config = config
        # The KL weight read by both model and guide at every step: beta, or its warm-up value.
        self.kl_weight = LatentWeight(config.beta if config.warmup_epochs == 0 else 0.0)
        self.warmup_steps = config.warmup_epochs * steps_per_epoch
        model_fn, guide_fn = model.model, model.guide
        if config.beta != 1 or config.warmup_epochs:
            model_fn, guide_fn = (
                scale_latents(model_fn, self.kl_weight),
                scale_latents(guide_fn, self.kl_weight),
            )
        optimizer = JointAdam(lr=config.lr) if config.fused_adam else pyro.optim.Adam({"lr": config.lr})
        objective = feeder.objective(
            make_loss(
                config.loss, num_particles=config.num_particles, jit=config.jit, free_bits=config.free_bits
            )
        )
        self.svi = AsyncSVI(model_fn, guide_fn, optimizer, loss=objective)
        self.svi.clip_norm = config.clip_norm
        self.svi.reduce_grads = feeder.reduce_grads

    @property
    def optim(self) -> Any:
        """The optimizer, whose ``get_state`` / ``set_state`` a checkpoint keeps."""
        return self.svi.optim

    def __call__(self, x: Any, *, step: int, num_data: int) -> torch.Tensor:
        """The loss of step ``step`` (0-based) on ``x``, a device scalar; the parameters have been stepped."""
        if self.warmup_steps:
            self.kl_weight.beta = warmup_weight(step, beta=self.config.beta, warmup_steps=self.warmup_steps)
        # Pyro's validation (shapes, supports) on the first step only: every later check would be a
        # host-device synchronisation, and the data were checked once before training.
        with pyro.validation_enabled(step == 0):
            return self.svi.step_async(x, num_data=num_data)
