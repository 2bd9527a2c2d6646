r"""Free bits per latent layer (Kingma et al., 2016): the ELBO whose KL term stops penalizing a layer below lambda nats."""

from __future__ import annotations

import math
from typing import Any

import torch
from pyro.infer import ELBO, Trace_ELBO

from .._typing import ModelFn
from ..errors import PyroVAEError
from ..inference.validation import validate_pair
from .base import _ChecksPair, _TensorLoss

__all__ = ["FreeBits_ELBO", "check_free_bits", "free_bits_elbo"]


def check_free_bits(free_bits: object, *, loss: str = "elbo") -> None:
    """Refuse a free-bits lambda that is not a finite non-negative number, or an objective it cannot modify."""
    if isinstance(free_bits, bool) or not (
        isinstance(free_bits, int | float) and math.isfinite(free_bits) and free_bits >= 0
    ):
        raise PyroVAEError(
            f"free bits (--free-bits) must be a non-negative number of nats per latent layer, got {free_bits!r}"
        )
    if loss != "elbo":
        raise PyroVAEError(
            f"free bits replace each latent layer's KL term of the ELBO by max(lambda, KL); the {loss!r} "
            "objective has no per-layer KL term to clamp; use --loss elbo with --free-bits, or drop --free-bits"
        )


def _in_data_plate(site: dict[str, Any]) -> bool:
    return any(frame.name == "data" for frame in site["cond_indep_stack"])


class FreeBits_ELBO(_ChecksPair, _TensorLoss, Trace_ELBO):
    r"""The ELBO with each latent layer's KL term replaced by max(lambda, KL_l) (Kingma et al., 2016, "free bits").

    A latent layer is a latent sample site of the guide inside the ``"data"``
    plate (``"z"``, or ``"z1"`` ... ``"zL"`` of a hierarchical model). For a
    minibatch of M out of N points and S samples z ~ q(z | x_i) per point::

        KL_l  = (1 / (S M)) sum_{i, s} [log q(z_l^is | ...) - log p(z_l^is | ...)]     (nats per datum)
        L_fb  = (N / M) sum_i (1 / S) sum_s log p(x_i | z^is) - N sum_l max(lambda, KL_l)

    KL_l is the layer's Monte Carlo KL share averaged over the minibatch, from
    the same traces as the ELBO (log-density differences at each layer's site,
    not a closed form), so on the same samples L_fb equals the ELBO exactly
    when every KL_l >= lambda, and is lower by N (lambda - KL_l) for each layer
    below it. A layer under lambda gets no gradient from its KL term: the
    encoder may use its first lambda nats for free, which keeps layers from
    collapsing onto their prior early in training. A beta weight or warm-up
    (``scale_latents``) multiplies the clamped term as it does the KL.
    Latent sites outside the data plate (global latents) keep their plain
    ELBO terms. The guide's layer sites must be reparameterized.

    Reference:
        Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling, "Improved
        Variational Inference with Inverse Autoregressive Flow", NeurIPS 2016.
    """

    validates_as = "elbo"

    def __init__(self, *, free_bits: float, **kwargs: Any) -> None:
        check_free_bits(free_bits)
        super().__init__(**kwargs)
        self.free_bits = float(free_bits)

    def _check(self, model: ModelFn, guide: ModelFn, x: torch.Tensor, *, num_data: int | None) -> None:
        structure = validate_pair(model, guide, x, loss=self.validates_as, num_data=num_data)
        if not structure.local:
            raise PyroVAEError(
                "free bits clamp the KL term of each latent layer (a latent site inside "
                "pyro.plate('data', ...)), but the model has none; train it with --loss elbo and no --free-bits"
            )

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        self.check_pair(model, guide, args, kwargs)
        elbo: torch.Tensor | float = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            num_layers = 0
            for site in model_trace.nodes.values():
                if site["type"] == "sample" and site["is_observed"]:
                    elbo = elbo + site["log_prob_sum"] / self.num_particles
            for name, site in guide_trace.nodes.items():
                if site["type"] != "sample" or site["is_observed"]:
                    continue
                prior = model_trace.nodes[name]
                if not _in_data_plate(site):
                    elbo = elbo + (prior["log_prob_sum"] - site["log_prob_sum"]) / self.num_particles
                    continue
                if not site["fn"].has_rsample:
                    raise PyroVAEError(
                        f"free bits differentiate through reparameterized samples, but the guide's layer "
                        f"{name!r} ({type(site['fn']).__name__}) has none; use --loss elbo without --free-bits"
                    )
                if site["mask"] is not None or prior["mask"] is not None:
                    raise PyroVAEError(
                        f"the layer {name!r} is masked (poutine.mask), so its KL per datum is not defined for "
                        "every data point; free bits need an unmasked layer"
                    )
                num_layers += 1
                # [S, M] with S > 1 particles (their plate left of the data plate), else [M]: the unscaled
                # log-densities; the data plate's N / M and any KL weight are in the site's scale.
                kl = site["unscaled_log_prob"] - prior["unscaled_log_prob"]
                num_points = kl.shape[-1] if kl.dim() else 1
                clamped = torch.clamp(kl.mean(), min=self.free_bits)  # max(lambda, KL_l), nats per datum
                elbo = elbo - site["scale"] * num_points * clamped
            if num_layers == 0:
                raise PyroVAEError(
                    "free bits clamp the KL term of each latent layer (a latent site inside "
                    "pyro.plate('data', ...)), but the guide drew none; use --loss elbo without --free-bits"
                )
        return -torch.as_tensor(elbo)

    def loss(self, model, guide, *args, **kwargs) -> float:  # type: ignore[no-untyped-def]
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))


def free_bits_elbo(*, num_particles: int = 1, free_bits: float) -> ELBO:
    """The ELBO with every latent layer's KL term at least ``free_bits`` nats per datum (Kingma et al., 2016)."""
    return FreeBits_ELBO(
        free_bits=free_bits, num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1
    )
