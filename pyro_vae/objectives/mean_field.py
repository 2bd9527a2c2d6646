"""The ELBO with closed-form KL terms where they exist (Pyro's TraceMeanField_ELBO)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from pyro.infer import ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence

from ..errors import PyroVAEError
from ..inference.traces import dry_traces
from .base import _TensorLoss, base_distribution, random_state_kept
from .registry import LOSSES

__all__ = ["MeanField_ELBO", "mean_field_elbo"]


class MeanField_ELBO(_TensorLoss, TraceMeanField_ELBO):
    """Pyro's TraceMeanField_ELBO: closed-form KL terms, with a warning for sites that have none.

    Pyro silently estimates a site's KL by Monte Carlo when torch has no
    closed form for the pair (a mixture or flow prior, a low-rank or flow
    guide). The first call checks each latent site and warns once, naming
    the distributions, so nobody believes an estimate is analytic when it is not.
    It also refuses a guide that draws the latents in another order than the
    model (a bottom-up hierarchical guide): each closed-form KL would then be
    taken at parent samples drawn after, and dependent on, its own site.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._checked = False

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        if not self._checked:
            # On a copy of the random state, so the check does not shift the draws of the loss itself.
            with random_state_kept(args):
                self._check_guide(model, guide, args, kwargs)
            self._checked = True
        # TraceMeanField_ELBO returns loss + (surrogate - surrogate.item()): a host sync every step, and a
        # constant that a traced (jit) loss would keep from its first call. The detached tensor does neither.
        loss: torch.Tensor | float = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss = loss + self._particle_term(*self._differentiable_loss_particle(model_trace, guide_trace))
        return torch.as_tensor(loss)

    @staticmethod
    def _check_guide(model, guide, args, kwargs) -> None:  # type: ignore[no-untyped-def]
        with torch.no_grad():
            guide_trace, model_trace = dry_traces(model, guide, args, kwargs)
        # KL(q(z_l | ...) || p(z_l | z_parents)) is taken at the guide's parent samples; that is the ELBO only
        # when the guide draws the latents in the model's order. A bottom-up guide draws z1 before z2, so
        # the closed-form KL of z1 would condition on a z2 that itself depends on z1: a biased loss.
        model_order = [
            n for n, s in model_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]
        ]
        guide_order = [
            n for n, s in guide_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]
        ]
        if model_order != guide_order:
            raise PyroVAEError(
                f"the mean-field loss needs the guide to draw the latents in the model's order ({', '.join(model_order)}), "
                f"but it draws {', '.join(guide_order)}; use --loss elbo, or --inference ladder for stacked layers"
            )
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
                    "exactly as with --loss elbo",
                    stacklevel=4,
                )


@LOSSES.register("mean-field")
def mean_field_elbo(*, num_particles: int = 1) -> ELBO:
    """The ELBO with KL(q || p) in closed form where it exists (TraceMeanField_ELBO), Monte Carlo elsewhere."""
    return MeanField_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
