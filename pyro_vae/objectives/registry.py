"""The table of objectives by name (``--loss``), and the factory every consumer calls."""

from __future__ import annotations

from pyro.infer import ELBO

from ..errors import PyroVAEError
from ..registry import Registry
from .enum import SumsEnumerated
from .free_bits import check_free_bits, free_bits_elbo
from .jit import JitELBO

__all__ = ["LOSSES", "make_loss"]

LOSSES: Registry = Registry("loss")


def make_loss(
    name: str, *, num_particles: int = 1, jit: bool = False, free_bits: float | None = None
) -> ELBO:
    """The registered objective ``name`` with ``num_particles`` samples per data point, compiled with ``jit``.

    ``free_bits`` (nats, with ``name="elbo"`` only) clamps each latent layer's KL term of the ELBO at
    max(lambda, KL_l) (:class:`~pyro_vae.objectives.free_bits.FreeBits_ELBO`, Kingma et al., 2016).
    """
    if num_particles < 1:
        raise PyroVAEError(f"num_particles must be a positive integer, got {num_particles}")
    if free_bits is not None:
        check_free_bits(free_bits, loss=name)
        loss = free_bits_elbo(num_particles=num_particles, free_bits=free_bits)
        return JitELBO(loss) if jit else loss
    # A pair with enumerated discrete sites gets the loss that sums them out (TraceEnum_ELBO for elbo).
    loss = SumsEnumerated(LOSSES.get(name)(num_particles=num_particles), name=name)
    return JitELBO(loss) if jit else loss
