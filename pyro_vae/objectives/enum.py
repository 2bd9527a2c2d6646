r"""Discrete latents summed out exactly: Pyro's TraceEnum_ELBO, chosen for any pair with enumerated sites.

A discrete site marked ``infer={"enumerate": "parallel"}`` takes all its values
at once, and ``TraceEnum_ELBO`` sums over them instead of sampling. For a
guide q(c | x) q(z | x, c) of a model p(c) p(z | c) p(x | z)::

    ELBO(x) = sum_c q(c | x) E_{q(z | x, c)}[log p(x, z, c) - log q(z | x, c) - log q(c | x)]

with no score-function term for c; a site the model alone enumerates is summed
inside the logarithm, log sum_c p(x, z, c).

:func:`make_loss <pyro_vae.objectives.make_loss>` wraps every registered loss
in :class:`SumsEnumerated`, which looks at each model and guide the first time
it sees them (:func:`~pyro_vae.inference.validate_pair`): without enumerated
sites the registered loss runs as it is; with them ``elbo`` becomes
:class:`Enum_ELBO` (with ``max_plate_nesting`` the pair's own), ``iwae`` sums a
site the model alone enumerates inside each weight (exact; a site the guide
enumerates is refused there), and any other loss refuses the pair with a
sentence rather than sample the site and report a different objective.

References:
    Obermeyer, Bingham, Jankowiak, Pradhan, Chiu, Rush & Goodman, "Tensor
    Variable Elimination for Plated Factor Graphs", ICML 2019.
    Dilokthanakul et al., "Deep Unsupervised Clustering with Gaussian Mixture
    Variational Autoencoders", arXiv:1611.02648, 2016.
"""

from __future__ import annotations

from typing import Any

import torch
from pyro.infer import ELBO, TraceEnum_ELBO

# The particle's ELBO as TraceEnum_ELBO computes it (its own differentiable_loss refuses a loss without
# gradient, which an evaluation under torch.no_grad is); Pyro's JitTraceEnum_ELBO calls it the same way.
from pyro.infer.traceenum_elbo import _compute_dice_elbo

from .._typing import ModelFn
from ..errors import PyroVAEError
from ..inference.validation import validate_pair
from .base import _ChecksPair, _TensorLoss, pair_key, random_state_kept

__all__ = ["ENUMERATING_LOSSES", "Enum_ELBO", "SumsEnumerated", "enum_elbo"]

# Registered losses that sum enumerated sites out exactly: "elbo" through Enum_ELBO, "iwae" inside each
# weight (validate_pair refuses it a site the guide enumerates).
ENUMERATING_LOSSES = ("elbo", "iwae")


class Enum_ELBO(_ChecksPair, _TensorLoss, TraceEnum_ELBO):
    """Pyro's TraceEnum_ELBO, its loss a tensor on the model's device, its value available without gradient.

    The pair is validated on first use (:class:`~pyro_vae.objectives.base._ChecksPair`,
    as ``elbo``): :func:`~pyro_vae.inference.validate_pair` runs it once under
    TraceEnum_ELBO's own shape checks.
    """

    validates_as = "elbo"

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        self.check_pair(model, guide, args, kwargs)
        elbo: torch.Tensor | float = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            elbo = elbo + _compute_dice_elbo(model_trace, guide_trace)
        return -torch.as_tensor(elbo) / self.num_particles

    def loss(self, model, guide, *args, **kwargs) -> float:  # type: ignore[no-untyped-def]
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))


def enum_elbo(*, num_particles: int = 1, max_plate_nesting: int = 1) -> Enum_ELBO:
    """The ELBO with every enumerated site summed out (TraceEnum_ELBO), particles vectorized."""
    return Enum_ELBO(
        num_particles=num_particles,
        vectorize_particles=True,
        max_plate_nesting=max_plate_nesting,
        strict_enumeration_warning=False,
    )


class SumsEnumerated(_TensorLoss, ELBO):
    """The registered loss ``name``, or, for a pair with enumerated sites, the loss that sums them out.

    The choice is made once per model and guide (keyed as the pair checks are,
    the pair kept alive with its key), at the first call of the contract's form
    ``loss(model, guide, x)`` with an optional ``num_data=``. A call of another
    form (say ``(x, y)`` for labelled data) cannot be inspected: it runs the loss
    chosen before, or the registered one when none has been chosen yet.
    """

    def __init__(self, loss: ELBO, *, name: str) -> None:
        super().__init__(
            num_particles=loss.num_particles,
            max_plate_nesting=loss.max_plate_nesting,
            vectorize_particles=loss.vectorize_particles,
        )
        self.inner = loss
        self.name = name
        self._chosen: dict[tuple, tuple[ELBO, ModelFn, ModelFn]] = {}

    def choose(self, model: ModelFn, guide: ModelFn, args: tuple, kwargs: dict) -> ELBO:
        """The loss that trains this pair: the registered one, or one that sums its enumerated sites out."""
        key = pair_key(model, guide)
        if key in self._chosen:
            return self._chosen[key][0]
        if not (len(args) == 1 and isinstance(args[0], torch.Tensor) and set(kwargs) <= {"num_data"}):
            return self.inner  # not kept: a later call of the contract's form may still find enumerated sites
        chosen = self.inner
        with random_state_kept(args):
            structure = validate_pair(model, guide, args[0], loss=self.name, num_data=kwargs.get("num_data"))
        if structure.enumerated and self.name not in ENUMERATING_LOSSES:
            names = ", ".join(repr(n) for n in structure.enumerated)
            raise PyroVAEError(
                f"the {self.name} loss (--loss {self.name}) would sample the enumerated site(s) {names} instead "
                "of summing them out; use loss='elbo' (--loss elbo), which sums them out exactly (TraceEnum_ELBO)"
            )
        if structure.enumerated and self.name == "elbo":
            nesting = max(1, structure.max_plate_nesting)
            chosen = enum_elbo(num_particles=self.num_particles, max_plate_nesting=nesting)
        self._chosen[key] = (chosen, model, guide)
        return chosen

    def check_pair(self, model: ModelFn, guide: ModelFn, args: tuple, kwargs: dict) -> None:
        """Choose the loss for this pair and let it check the pair (eagerly: a compiled loss calls this first)."""
        chosen = self.choose(model, guide, args, kwargs)
        check = getattr(chosen, "check_pair", None)
        if check is not None:
            check(model, guide, args, kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        loss: Any = self.choose(model, guide, args, kwargs)
        return loss.differentiable_loss(model, guide, *args, **kwargs)  # type: ignore[no-any-return]

    def loss(self, model, guide, *args, **kwargs) -> float:  # type: ignore[no-untyped-def]
        return float(self.choose(model, guide, args, kwargs).loss(model, guide, *args, **kwargs))

    def _get_trace(self, model, guide, args, kwargs):  # type: ignore[no-untyped-def]
        return self.choose(model, guide, args, kwargs)._get_trace(model, guide, args, kwargs)
