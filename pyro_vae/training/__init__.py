"""Training by SVI: the loop, its state (checkpoints), the optimizer and data-parallel feeding."""

from .loop import AsyncSVI, EpochRecord, FitResult, fit, mean_elbo, resolve_device, warmup_weight

__all__ = ["AsyncSVI", "EpochRecord", "FitResult", "fit", "mean_elbo", "resolve_device", "warmup_weight"]
