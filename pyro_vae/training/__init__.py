"""Training by SVI in parts: the step (svi), the state and checkpoints (state), the way data is fed (feeding),
the hooks around the steps (hooks), the optimizer (optim) and its learning-rate schedules (schedules), the
validation score and best weights (validation), data-parallel shards (distributed), and ``fit`` assembling
them (loop)."""

from .hooks import Hook
from .loop import AsyncSVI, EpochRecord, FitResult, fit, mean_elbo, resolve_device, warmup_weight
from .state import TrainingState

__all__ = [
    "AsyncSVI",
    "EpochRecord",
    "FitResult",
    "Hook",
    "TrainingState",
    "fit",
    "mean_elbo",
    "resolve_device",
    "warmup_weight",
]
