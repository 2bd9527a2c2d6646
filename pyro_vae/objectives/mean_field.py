"""The ELBO with closed-form KL terms where they exist (Pyro's TraceMeanField_ELBO)."""

from __future__ import annotations

import warnings

import torch
from pyro.infer import ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence

from ..inference.traces import dry_traces
from .base import _ChecksPair, _TensorLoss, base_distribution
from .registry import LOSSES

__all__ = ["MeanField_ELBO", "mean_field_elbo"]


class MeanField_ELBO(_ChecksPair, _TensorLoss, TraceMeanField_ELBO):
    """Pyro's TraceMeanField_ELBO: closed-form KL terms, with a warning for sites that have none.

    Pyro silently estimates a site's KL by Monte Carlo when torch has no
    closed form for the pair (a mixture or flow prior, a low-rank or flow
    guide). The first call checks each latent site and warns once, naming
    the distributions, so nobody believes an estimate is analytic when it is not.
    It also validates the pair (:func:`~pyro_vae.inference.validate_pair` with
    ``loss="mean-field"``), which refuses a guide that draws the latents in
    another order than the model (a bottom-up hierarchical guide: each
    closed-form KL would then be taken at parent samples drawn after, and
    dependent on, its own site) and a guide site with no ``rsample``, whose
    score-function term TraceMeanField_ELBO leaves out of the gradient (with
    Pyro's validation on it raises instead; off, the gradient is silently wrong).
    """

    validates_as = "mean-field"

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        self.check_pair(model, guide, args, kwargs)
        # TraceMeanField_ELBO returns loss + (surrogate - surrogate.item()): a host sync every step, and a
        # constant that a traced (jit) loss would keep from its first call. The detached tensor does neither.
        loss: torch.Tensor | float = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss = loss + self._particle_term(*self._differentiable_loss_particle(model_trace, guide_trace))
        return torch.as_tensor(loss)

    def loss(self, model, guide, *args, **kwargs) -> float:  # type: ignore[no-untyped-def]
        self.check_pair(model, guide, args, kwargs)
        return super().loss(model, guide, *args, **kwargs)

    def _check(self, model, guide, x, *, num_data) -> None:  # type: ignore[no-untyped-def]
        super()._check(model, guide, x, num_data=num_data)
        kwargs = {} if num_data is None else {"num_data": num_data}
        with torch.no_grad():
            guide_trace, model_trace = dry_traces(model, guide, (x[:2],), kwargs)
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            q, p = guide_trace.nodes[name]["fn"], site["fn"]
            try:
                kl_divergence(q, p)
            except NotImplementedError:
                warnings.warn(
                    f"mean-field loss: torch has no closed-form KL({type(base_distribution(q)).__name__} || "
                    f"{type(base_distribution(p)).__name__}) for site {name!r}; that term is estimated by Monte Carlo, "
                    "exactly as with loss='elbo' (--loss elbo)",
                    stacklevel=5,
                )


@LOSSES.register("mean-field")
def mean_field_elbo(*, num_particles: int = 1) -> ELBO:
    """The ELBO with KL(q || p) in closed form where it exists (TraceMeanField_ELBO), Monte Carlo elsewhere."""
    return MeanField_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
