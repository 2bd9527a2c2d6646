"""Learning-rate schedules: the rate of each epoch as a closed-form function of the epoch.

``TrainConfig.lr_schedule`` names one (``lr`` is the rate it starts from;
epochs e = 1, 2, ... as the training log counts them):

- ``constant``: lr.
- ``burda``: Burda et al. (2016, section 5): stage i = 0, ..., 7 lasts 3^i
  epochs, at the rate lr * 10^(-i/7); the stages end after 1, 4, 13, 40, 121,
  364, 1093 and 3280 epochs. A run shorter than 3,280 epochs stops inside its
  stages; a longer one stays at the last rate, lr / 10.
- ``step``: lr * lr_gamma^floor((e - 1) / lr_step_epochs) (torch's ``StepLR``).
- ``cosine``: lr_min + (lr - lr_min) (1 + cos(pi (e - 1) / epochs)) / 2
  (Loshchilov & Hutter, 2017, without restarts; torch's ``CosineAnnealingLR``
  with T_max = epochs, in its closed form).

The rate is set by a hook at the start of every epoch, on the fused Adam
(:class:`~pyro_vae.training.optim.JointAdam`). It is not one of torch's
``lr_scheduler`` objects because those step one torch optimizer and carry a
state of their own, where the rate here is a function of the epoch alone: a
resumed run sets the rate of the epoch it resumes in, and the checkpoint needs
nothing new. ``tests/test_schedules.py`` checks the rates against torch's
``StepLR``, ``CosineAnnealingLR`` and ``LambdaLR``. Pyro's per-parameter Adam
is refused with a schedule (``TrainConfig``): it restores each parameter's
saved rate lazily, at that parameter's first step after a resume.

References:
    Burda, Grosse, Salakhutdinov (2016). Importance weighted autoencoders. ICLR.
    Loshchilov, Hutter (2017). SGDR: stochastic gradient descent with warm restarts. ICLR.
"""

from __future__ import annotations

import math

from ..config import TrainConfig
from ..errors import PyroVAEError
from .hooks import Hook, Loop

__all__ = ["BURDA_STAGES", "LearningRateSchedule", "burda_stage", "learning_rate"]

# Burda et al.'s stages: i = 0..7, stage i lasting 3^i epochs (3,280 epochs in all).
BURDA_STAGES = 8


def burda_stage(epoch: int) -> int:
    """The stage i (0..7) of Burda et al.'s schedule that epoch ``epoch`` (from 1) lies in.

    Stages 0..i cover sum_{j <= i} 3^j = (3^(i+1) - 1) / 2 epochs, so epoch e
    is in the first stage i with e <= (3^(i+1) - 1) / 2; after 3,280 epochs, 7.
    """
    _check_epoch(epoch)
    stage, end = 0, 1
    while epoch > end and stage < BURDA_STAGES - 1:
        stage += 1
        end += 3**stage
    return stage


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (from 1) under ``config``'s schedule (see the module docstring)."""
    _check_epoch(epoch)
    lr, schedule = config.lr, config.lr_schedule
    if schedule == "constant":
        return lr
    if schedule == "burda":
        return lr * 10.0 ** (-burda_stage(epoch) / 7)
    if schedule == "step":
        assert config.lr_step_epochs is not None  # TrainConfig refuses step without it
        return lr * config.lr_gamma ** ((epoch - 1) // config.lr_step_epochs)
    if schedule == "cosine":
        return (
            config.lr_min + (lr - config.lr_min) * (1 + math.cos(math.pi * (epoch - 1) / config.epochs)) / 2
        )
    raise PyroVAEError(f"unknown learning-rate schedule {schedule!r}")  # TrainConfig refuses it first


def _check_epoch(epoch: int) -> None:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise PyroVAEError(f"epochs are counted from 1; got {epoch!r}")


class LearningRateSchedule(Hook):
    """At the start of every epoch, set the optimizer's rate to :func:`learning_rate` of that epoch.

    The optimizer is the step's (a :class:`~pyro_vae.training.optim.JointAdam`,
    with ``set_lr``); a resumed run sets the rate of the epoch it resumes in.
    """

    def on_epoch_start(self, loop: Loop) -> None:
        set_lr = getattr(loop.optimizer, "set_lr", None)
        if set_lr is None:  # TrainConfig refuses a schedule with Pyro's per-parameter Adam
            raise PyroVAEError("a learning-rate schedule needs the fused Adam (drop --no-fused-adam)")
        set_lr(learning_rate(loop.config, loop.state.epoch))
