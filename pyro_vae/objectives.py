"""Training objectives: Pyro ELBO classes chosen by name (``--loss``).

``LOSSES`` maps a name to a factory ``(*, num_particles) -> pyro.infer.ELBO``.
All of them treat the model's ``"data"`` plate as the only plate
(``max_plate_nesting=1``) and draw their particles in one vectorized pass.
"""

from __future__ import annotations

import torch
from pyro.infer import ELBO, Trace_ELBO

from .registry import Registry

__all__ = ["LOSSES", "DeviceTrace_ELBO", "make_loss", "trace_elbo"]

LOSSES: Registry = Registry("loss")


class DeviceTrace_ELBO(Trace_ELBO):
    """Pyro's Trace_ELBO, with the loss kept as a tensor on the model's device.

    Trace_ELBO converts each site's log-probability sum to a Python float while
    it assembles the loss: one host-device synchronisation per site per step,
    which stalls a GPU. When every latent site of the guide is reparameterized
    (as in every guide of this package) the surrogate loss *is* the loss,
    -(sum of model log-probs - sum of guide log-probs) / num_particles, so it is
    built from tensors alone. Guides with non-reparameterized sites get
    Trace_ELBO's score-function surrogate unchanged.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        loss: torch.Tensor | float = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            latent_sites = [
                s for s in guide_trace.nodes.values() if s["type"] == "sample" and not s["is_observed"]
            ]
            if all(site["fn"].has_rsample for site in latent_sites):
                elbo = sum(s["log_prob_sum"] for s in model_trace.nodes.values() if s["type"] == "sample")
                elbo = elbo - sum(site["log_prob"].sum() for site in latent_sites)
                loss = loss - elbo / self.num_particles
            else:
                particle_loss, surrogate = self._differentiable_loss_particle(model_trace, guide_trace)
                surrogate = torch.as_tensor(surrogate)
                loss = loss + (particle_loss + (surrogate - surrogate.detach())) / self.num_particles
        return torch.as_tensor(loss)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return loss.detach()


@LOSSES.register("elbo")
def trace_elbo(*, num_particles: int = 1) -> ELBO:
    """The ELBO, E_q[log p(x, z) - log q(z|x)], by Monte Carlo with reparameterized samples (Trace_ELBO)."""
    return DeviceTrace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)


def make_loss(name: str, *, num_particles: int = 1) -> ELBO:
    """The registered objective ``name`` with ``num_particles`` samples per data point."""
    if num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles}")
    return LOSSES.get(name)(num_particles=num_particles)
