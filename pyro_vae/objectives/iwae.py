"""The importance-weighted bound of Burda et al. (2016), per data point and vectorized."""

from __future__ import annotations

import math

import torch
from pyro.infer import ELBO, Trace_ELBO

from ..inference.traces import traced_log_weights
from .base import _ChecksPair, _TensorLoss
from .registry import LOSSES

__all__ = ["IWAE_ELBO", "iwae"]


class IWAE_ELBO(_ChecksPair, _TensorLoss, Trace_ELBO):
    r"""The importance-weighted bound of Burda et al. (2016), per data point and vectorized.

    For a minibatch of M out of N data points and K samples z_k ~ q(z | x_i)::

        L_K = (N / M) sum_i [ log sum_k exp(log p(x_i, z_ik) - log q(z_ik | x_i)) - log K ]

    L_1 is the ELBO and L_K increases to log p(x) with K. The log-weights come
    from the same traces as the evaluator's (:func:`traced_log_weights`), so
    its value on given samples equals the evaluator's IWAE-K. The N / M
    scale multiplies the per-datum bounds, never the log-weights inside the
    log-sum-exp (scaling inside, as pyro's RenyiELBO does with subsampling,
    changes the bound).

    The gradient is that of the reparameterized samples alone (no
    score-function term), and the bound is a sum over data points: the first
    call refuses a guide with a site that has no ``rsample`` (a discrete site)
    and a model with global latents, naming the site
    (:func:`~pyro_vae.inference.validate_pair` with ``loss="iwae"``).
    """

    validates_as = "iwae"

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        self.check_pair(model, guide, args, kwargs)
        log_w, scale = traced_log_weights(
            model,
            guide,
            *args,
            num_samples=self.num_particles,
            max_plate_nesting=self.max_plate_nesting,
            **kwargs,
        )  # [K, M] float64
        bound = torch.logsumexp(log_w, 0) - math.log(self.num_particles)  # [M]
        return -(scale * bound.sum()).float()

    def loss(self, model, guide, *args, **kwargs) -> float:  # type: ignore[no-untyped-def]
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))


@LOSSES.register("iwae")
def iwae(*, num_particles: int = 1) -> ELBO:
    """The importance-weighted bound with K = --num-particles samples per datum (Burda et al., 2016)."""
    return IWAE_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
