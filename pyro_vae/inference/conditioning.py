r"""Per-datum evaluation of any valid pair: global latents fixed at a plug-in value from the guide.

A global latent g (a site outside ``pyro.plate("data", ...)``: a Bayesian
decoder weight, a noise scale shared by the whole data set) ties the data
points together, log p(x) = log ∫ p(g) prod_i p(x_i | g) dg, so there is no
per-datum log p(x_i) to estimate. The evaluators report instead, for each data
point, the log-likelihood at one plug-in value g* of the globals::

    log p(x_i | g*) = log ∫ p(x_i, z_i | g*) dz_i,
    log w_ik        = log p(x_i, z_ik | g*) - log q(z_ik | x_i, g*),   z_ik ~ q(z | x_i, g*),

where g* is the mean of the guide's q(g) at each global site (the median
where the mean is not finite or not in the support, e.g. a Cauchy or a
discrete site). Neither log p(g*) nor log q(g*) enters the weights: the
global sites are conditioned on g* (``poutine.condition``) in the model and the
guide alike and hidden from the evaluator's traces (``poutine.block``), so
they are also left out of the particle plate. Global sites the guide draws in
sequence get their plug-in values in that order, each given the ones before.
The sites conditioned on are reported (``Bounds.conditional_on``).

q(g) must not depend on the data (as for SVI on minibatches, where it cannot):
g* is taken from the guide run on the first two data points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from torch.distributions import Distribution

from .._typing import ModelFn
from ..errors import PyroVAEError
from .validation import validate_pair

__all__ = ["PerDatumPair", "per_datum_pair", "plug_in_value"]

# Samples behind the coordinate-wise median of a distribution that has neither a usable mean nor an icdf.
MEDIAN_SAMPLES = 1001


@dataclass(frozen=True)
class PerDatumPair:
    """A validated model and guide whose every sample site left in their traces is per datum."""

    model: ModelFn
    guide: ModelFn
    # The global latent sites fixed at their plug-in values, in the model's order; () for most models.
    conditional_on: tuple[str, ...]
    # Plate nesting of the original pair: the particle plate of an evaluation goes left of it.
    max_plate_nesting: int


def _in_support(fn: Distribution, value: torch.Tensor) -> bool:
    support = fn.support
    return bool(torch.isfinite(value).all()) and (support is None or bool(support.check(value).all()))


def plug_in_value(fn: Distribution, *, name: str = "g") -> torch.Tensor:
    """The guide's point value for a global site: its mean, else its median; shape batch + event shape.

    The mean is used where it is finite and lies in the support (not, say, a
    Bernoulli's probability); the median otherwise, from ``icdf(0.5)`` of a
    distribution of independent coordinates that has one (a Cauchy), else the
    coordinate-wise median of ``MEDIAN_SAMPLES`` draws (randomness the caller
    confines).
    """
    shape = fn.batch_shape + fn.event_shape
    candidates = [lambda: fn.mean, lambda: _icdf_median(fn)]
    candidates.append(lambda: fn.sample((MEDIAN_SAMPLES,)).median(dim=0).values)
    for candidate in candidates:
        try:
            value = candidate()
        except (NotImplementedError, AttributeError):
            continue
        value = value.expand(shape)
        if _in_support(fn, value):
            return value
    raise PyroVAEError(
        f"the guide's distribution at global site {name!r} ({type(fn).__name__}) has neither a mean nor a "
        "median in its support, so there is no plug-in value to evaluate the model at; give that site a "
        "guide distribution with a mean (a Normal, a Delta)"
    )


def _icdf_median(fn: Distribution) -> torch.Tensor:
    """The coordinate-wise median icdf(0.5) of a univariate distribution, or of one made ``Independent``."""
    base = fn
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    if base.event_shape:
        raise NotImplementedError("no coordinate-wise icdf")
    return base.icdf(torch.full_like(base.sample(), 0.5))  # base batch shape == fn's batch + event shape


class _PlugIn(Messenger):
    """Replaces each named site's draw by the plug-in value of its distribution, and records them."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = names
        self.values: dict[str, torch.Tensor] = {}

    def _pyro_sample(self, msg: dict[str, Any]) -> None:  # type: ignore[override]
        if msg["name"] in self.names and not msg["is_observed"]:
            msg["value"] = plug_in_value(msg["fn"], name=msg["name"])
            msg["is_observed"] = True  # so that no later handler samples it
            self.values[msg["name"]] = msg["value"]


def _plug_in_values(guide: ModelFn, x: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The plug-in value of every global site, from one run of the guide, each given those drawn before it."""
    plug_in = _PlugIn(names)
    devices = [x.device] if x.device.type == "cuda" else []
    # Hidden from outer handlers, without gradients, on a copy of the random state (a median by sampling
    # draws from it): the evaluation that follows consumes the stream as if this never ran.
    with torch.random.fork_rng(devices=devices), torch.no_grad(), poutine.block(), plug_in:
        guide(x[:2])
    return plug_in.values


def per_datum_pair(model: ModelFn, guide: ModelFn, x: torch.Tensor) -> PerDatumPair:
    """``model`` and ``guide`` validated, their global latents (if any) fixed at the guide's plug-in values.

    Raises :class:`PyroVAEError` for a pair :func:`validate_pair` refuses and
    for an observed site outside the data plate, whose log-density belongs to
    no one data point.
    """
    structure = validate_pair(model, guide, x)
    if structure.global_observed:
        names = ", ".join(repr(n) for n in structure.global_observed)
        raise PyroVAEError(
            f"the model observes {names} outside pyro.plate('data', ...): one term for the whole data set, "
            "which a per-datum log p(x_i) cannot divide among the data points; move it into the data plate "
            "to evaluate the model"
        )
    if not structure.global_:
        return PerDatumPair(model, guide, (), structure.max_plate_nesting)
    values = _plug_in_values(guide, x, structure.global_)
    hidden = list(values)
    return PerDatumPair(
        model=poutine.block(poutine.condition(model, data=values), hide=hidden),
        guide=poutine.block(poutine.condition(guide, data=values), hide=hidden),
        conditional_on=structure.global_,
        max_plate_nesting=structure.max_plate_nesting,
    )
