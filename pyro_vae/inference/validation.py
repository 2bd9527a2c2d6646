"""One check of a model and guide against each other, before any number is computed from them.

Importance sampling, the ELBO and every bound of this package are right only
when the guide draws exactly the model's latent sites: a guide that leaves a
latent out (the model then draws it from its prior and the weight misses its
density), names it differently, or draws a site the model does not have gives
a number with no error at all. So every consumer calls :func:`validate_pair`
first, and it refuses, with one sentence, anything that would make a number
silently wrong:

- each latent site of the model is drawn by the guide under the same name,
  and each site the guide draws is a latent site of the model (Pyro's
  ``check_model_guide_match``, whose warnings become errors here);
- model and guide agree on each site's event and batch shape (the same check);
- observed sites are not drawn by the guide;
- every site's log-density has the shape its plates declare (Pyro's
  ``check_site_shape``);
- an objective that cannot handle a site refuses it: ``iwae`` and
  ``mean-field`` need reparameterized guide sites (a discrete site would get a
  silently wrong gradient), and ``mean-field`` needs the guide to draw the
  latents in the model's order.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from pyro.poutine.trace_struct import Trace
from pyro.util import check_model_guide_match, check_site_shape

from .._typing import ModelFn
from ..errors import PyroVAEError
from .traces import dry_traces

__all__ = ["PairStructure", "validate_pair"]

# Objectives that differentiate through reparameterized samples only (no score-function term).
_NEEDS_RSAMPLE = {"iwae": "the importance-weighted bound", "mean-field": "the mean-field ELBO"}


@dataclass(frozen=True)
class PairStructure:
    """What :func:`validate_pair` found: site names in the model's order."""

    # Latent sites inside the data plate (one value per datum), lowest layer first as the model draws them.
    local: tuple[str, ...]
    # Latent sites outside the data plate: global latents shared by all data points.
    global_: tuple[str, ...]
    # Observed sites (the data).
    observed: tuple[str, ...]
    # The deepest plate nesting of any site (the data plate counts 1).
    max_plate_nesting: int

    @property
    def latent(self) -> tuple[str, ...]:
        return self.global_ + self.local


def _samples(trace: Trace, *, observed: bool | None = None) -> dict[str, dict[str, Any]]:
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and type(site["fn"]).__name__ != "_Subsample"
        and (observed is None or site["is_observed"] == observed)
    }


def _in_data_plate(site: dict[str, Any]) -> bool:
    return any(frame.name == "data" for frame in site["cond_indep_stack"])


def _names(names: Any) -> str:
    return ", ".join(repr(n) for n in sorted(names))


def _one_line(error: BaseException) -> str:
    # Pyro's messages span several lines ("\n  Try one of the following fixes: ..."): keep them as one.
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())


def validate_pair(
    model: ModelFn,
    guide: ModelFn,
    x: torch.Tensor,
    *,
    loss: str | None = None,
    num_data: int | None = None,
) -> PairStructure:
    """Check that ``guide`` is a guide for ``model`` on data like ``x``; raise :class:`PyroVAEError` if not.

    Both are run once on the first two points of ``x`` (hidden from outer
    handlers, on a copy of the random state, so nothing a later computation
    draws changes). ``loss`` names the objective that will train the pair, so
    that one which cannot handle a site refuses it here.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise PyroVAEError("x must be a non-empty tensor whose first dimension indexes data points")
    sample = x[:2]
    kwargs = {} if num_data is None else {"num_data": num_data}
    with torch.no_grad():
        guide_trace, model_trace = dry_traces(model, guide, (sample,), kwargs)
    observed = _samples(model_trace, observed=True)
    model_latents = _samples(model_trace, observed=False)
    guide_sites = _samples(guide_trace)
    if not observed:
        raise PyroVAEError(
            "the model has no observed site: it must score the data with pyro.sample(name, distribution, obs=x)"
        )
    drawn_observed = sorted(set(observed) & set(guide_sites))
    if drawn_observed:
        raise PyroVAEError(
            f"the guide draws {_names(drawn_observed)}, which the model observes (obs=...); a guide draws "
            "only the model's latent sites"
        )
    for name, site in guide_sites.items():
        if site["is_observed"]:
            raise PyroVAEError(
                f"the guide observes site {name!r} (obs=...); a guide only draws latents, so remove obs there"
            )
    missing = set(model_latents) - set(guide_sites)
    extra = set(guide_sites) - set(model_latents)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"the model's latent site(s) {_names(missing)} are not drawn by the guide")
        if extra:
            parts.append(f"the guide draws {_names(extra)}, which the model does not have")
        raise PyroVAEError(
            "the guide does not match the model: "
            + "; ".join(parts)
            + f" (model latents: {_names(model_latents) or 'none'}; guide sites: {_names(guide_sites) or 'none'}); "
            "the guide must draw every latent site of the model under the same name, and nothing else"
        )
    nesting = max(
        (
            -frame.dim
            for trace in (model_trace, guide_trace)
            for site in _samples(trace).values()
            for frame in site["cond_indep_stack"]
            if frame.vectorized and frame.dim is not None
        ),
        default=0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            check_model_guide_match(model_trace, guide_trace, nesting)
        except ValueError as error:
            raise PyroVAEError(f"{_one_line(error)}; make the guide's site the model's shape") from None
    for warning in caught:
        # Everything about the sites was checked above; what is left (plates in the guide that the
        # model lacks) would also make the numbers wrong.
        raise PyroVAEError(f"the guide does not match the model: {_one_line(warning.message)}")  # type: ignore[arg-type]
    for trace, role in ((model_trace, "model"), (guide_trace, "guide")):
        try:
            trace.compute_log_prob()
            for site in _samples(trace).values():
                check_site_shape(site, nesting)
        except ValueError as error:
            raise PyroVAEError(f"in the {role}: {_one_line(error)}") from None
    if not any(_in_data_plate(site) for site in observed.values()):
        raise PyroVAEError(
            f"the observed site(s) {_names(observed)} are outside pyro.plate('data', ...): put the data "
            "in pyro_vae.data_plate(x, num_data) so each data point has its own log p(x)"
        )
    if loss in _NEEDS_RSAMPLE:
        for name, site in guide_sites.items():
            if not site["fn"].has_rsample:
                raise PyroVAEError(
                    f"{_NEEDS_RSAMPLE[loss]} (--loss {loss}) differentiates through reparameterized samples, "
                    f"but the guide's site {name!r} ({type(site['fn']).__name__}) has none, so its gradient "
                    "would be wrong; use --loss elbo, which adds the score-function term for such sites"
                )
    if loss == "mean-field":
        model_order = [n for n in model_latents]
        guide_order = [n for n in guide_sites]
        if model_order != guide_order:
            raise PyroVAEError(
                "the mean-field loss needs the guide to draw the latents in the model's order "
                f"({', '.join(model_order)}), but it draws {', '.join(guide_order)}; use --loss elbo, or "
                "a guide that draws top-down (for a hierarchical VAE: --inference ladder)"
            )
    local = tuple(n for n, s in model_latents.items() if _in_data_plate(s))
    global_ = tuple(n for n, s in model_latents.items() if not _in_data_plate(s))
    return PairStructure(local=local, global_=global_, observed=tuple(observed), max_plate_nesting=nesting)
