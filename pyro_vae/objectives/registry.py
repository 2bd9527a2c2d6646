"""The table of objectives by name (``--loss``), and the factory every consumer calls."""

from __future__ import annotations

from pyro.infer import ELBO

from ..errors import PyroVAEError
from ..registry import Registry
from .jit import JitELBO

__all__ = ["LOSSES", "make_loss"]

LOSSES: Registry = Registry("loss")


def make_loss(name: str, *, num_particles: int = 1, jit: bool = False) -> ELBO:
    """The registered objective ``name`` with ``num_particles`` samples per data point, compiled with ``jit``."""
    if num_particles < 1:
        raise PyroVAEError(f"num_particles must be a positive integer, got {num_particles}")
    loss = LOSSES.get(name)(num_particles=num_particles)
    return JitELBO(loss) if jit else loss
