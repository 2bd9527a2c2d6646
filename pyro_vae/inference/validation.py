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
  ``check_site_shape``), with no batch dimension outside every plate;
- an objective that cannot handle a site refuses it: ``iwae`` and
  ``mean-field`` need reparameterized guide sites (a discrete site would get a
  silently wrong gradient), ``mean-field`` needs the guide to draw the latents
  in the model's order, and ``iwae``, a bound per data point, cannot train a
  global latent.

Discrete sites marked ``infer={"enumerate": "parallel"}`` are summed out
exactly (by ``TraceEnum_ELBO`` in training, by the evaluators per data point).
Such a site may be drawn by the guide too (q(c | x), enumerated there: then
model and guide must give it the same values to sum over) or by the model
alone (summed out inside p); it must sit in the data plate and in no other
plate, since the evaluators sum it out per data point; and the pair must pass
``TraceEnum_ELBO``'s own checks of the enumerated shapes. A discrete site of
the model that the guide does not draw and that is not marked is refused, as
any missing site is, with the flag as the way out. ``mean-field`` (closed-form
KL) cannot sum a site out, and ``iwae`` sums it out exactly only where the
model alone enumerates it (inside each weight); both refuse the others.

Pyro's own errors while the pair runs (a shape that no plate explains, data
outside a distribution's support) become :class:`PyroVAEError` too, on one line.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
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

    # Latent sites inside the data plate (one value per datum), in the order the model draws them.
    local: tuple[str, ...]
    # Latent sites outside the data plate: global latents shared by all data points.
    global_: tuple[str, ...]
    # Observed sites (the data).
    observed: tuple[str, ...]
    # The deepest plate nesting of any site (the data plate counts 1).
    max_plate_nesting: int
    # Observed sites outside the data plate (a pyro.factor on the globals, say): one term for the whole data
    # set, which training takes and a per-datum log p(x_i) cannot divide among the data points.
    global_observed: tuple[str, ...] = ()
    # Discrete sites marked infer={"enumerate": "parallel"}, summed out exactly: those the guide draws too
    # (q(c | x) enumerated) and those the model alone draws, in the model's order.
    enumerated: tuple[str, ...] = ()
    # Of those, the ones the guide draws.
    enumerated_in_guide: tuple[str, ...] = ()

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


def _one_line(error: BaseException | Warning | str) -> str:
    # Pyro's messages span several lines ("\n  Try one of the following fixes: ...") and, raised inside a
    # trace, end with a table of the trace's shapes: keep the message, on one line.
    message = str(error).split("Trace Shapes:")[0]
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def _options(loss: str) -> str:
    """How to ask for the objective ``loss`` from Python and from the command line."""
    return f"loss={loss!r} (--loss {loss})"


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
    try:
        with torch.no_grad():
            guide_trace, model_trace = dry_traces(model, guide, (sample,), kwargs)
    except PyroVAEError:
        raise
    except ValueError as error:
        # Pyro's checks as the pair runs: a batch shape that disagrees with a plate, an observed value
        # outside its distribution's support. Those are the pair's (or the data's) mistakes, not ours.
        raise PyroVAEError(
            f"running the model and guide on two data points failed: {_one_line(error)}"
        ) from error
    except RuntimeError as error:
        # Pyro's trace refuses two sites of one name (a second data_plate(...) in one function opens a second
        # "data" plate); any other RuntimeError is a bug in the model and keeps its traceback.
        if not str(error).startswith("Multiple sample sites named"):
            raise
        name = str(error).split("'")[1] if "'" in str(error) else "?"
        raise PyroVAEError(
            f"the model or guide has two sample sites named {name!r}: every site needs its own name "
            "(open data_plate(x, num_data) once per function and put every per-datum site inside it)"
        ) from error
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
    enumerated = {
        name: site
        for trace in (model_trace, guide_trace)
        for name, site in _samples(trace, observed=False).items()
        if site["infer"].get("enumerate")
    }
    # A site the model alone enumerates is summed out inside p(x, ...): the guide has nothing to draw.
    model_only = {n for n, s in model_latents.items() if s["infer"].get("enumerate") and n not in guide_sites}
    missing = set(model_latents) - set(guide_sites) - model_only
    extra = set(guide_sites) - set(model_latents)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"the model's latent site(s) {_names(missing)} are not drawn by the guide")
            discrete = sorted(n for n in missing if model_latents[n]["fn"].has_enumerate_support)
            if discrete:
                parts.append(
                    f"a discrete site ({_names(discrete)}) may instead be summed out in the model: mark it "
                    "infer={'enumerate': 'parallel'} there"
                )
        if extra:
            parts.append(f"the guide draws {_names(extra)}, which the model does not have")
        raise PyroVAEError(
            "the guide does not match the model: "
            + "; ".join(parts)
            + f" (model latents: {_names(model_latents) or 'none'}; guide sites: {_names(guide_sites) or 'none'}); "
            "the guide must draw every latent site of the model under the same name, and nothing else"
        )
    _check_enumerated(enumerated, model_latents=model_latents, guide_sites=guide_sites)
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
        if model_only and str(warning.message).startswith("Found vars in model but not guide"):
            continue  # the sites the model alone enumerates (Pyro knows them only once enumerated)
        # Everything about the sites was checked above; what is left (plates in the guide that the
        # model lacks) would also make the numbers wrong.
        raise PyroVAEError(f"the guide does not match the model: {_one_line(warning.message)}")
    for trace, role in ((model_trace, "model"), (guide_trace, "guide")):
        try:
            trace.compute_log_prob()
            for site in _samples(trace).values():
                check_site_shape(site, nesting)
        except ValueError as error:
            raise PyroVAEError(f"in the {role}: {_one_line(error)}") from None
        for name, site in _samples(trace).items():
            # check_site_shape ignores dimensions left of the deepest plate; an evaluator's particle plate
            # goes there, so a batch dimension in no plate would be taken for particles.
            if site["log_prob"].dim() > nesting:
                raise PyroVAEError(
                    f"in the {role}, site {name!r} has batch shape {list(site['log_prob'].shape)}, with "
                    f"{site['log_prob'].dim() - nesting} dimension(s) left of every plate; declare them with "
                    "pyro.plate or move them into the event with .to_event()"
                )
    if not any(_in_data_plate(site) for site in observed.values()):
        raise PyroVAEError(
            f"the observed site(s) {_names(observed)} are outside pyro.plate('data', ...): put the data "
            "in pyro_vae.data_plate(x, num_data) so each data point has its own log p(x)"
        )
    if enumerated:
        _check_enumeration_shapes(model, guide, sample, kwargs, nesting=nesting)
    local = tuple(n for n, s in model_latents.items() if _in_data_plate(s))
    global_ = tuple(n for n, s in model_latents.items() if not _in_data_plate(s))
    in_guide = tuple(n for n in model_latents if n in enumerated and n in guide_sites)
    if loss is not None:
        _check_objective(
            loss,
            model_latents=[n for n in model_latents if n not in model_only],
            guide_sites=guide_sites,
            global_=global_,
            enumerated=tuple(n for n in model_latents if n in enumerated),
            enumerated_in_guide=in_guide,
        )
    return PairStructure(
        local=local,
        global_=global_,
        observed=tuple(observed),
        max_plate_nesting=nesting,
        global_observed=tuple(n for n, s in observed.items() if not _in_data_plate(s)),
        enumerated=tuple(n for n in model_latents if n in enumerated),
        enumerated_in_guide=in_guide,
    )


def _check_enumerated(
    enumerated: dict[str, dict[str, Any]],
    *,
    model_latents: dict[str, dict[str, Any]],
    guide_sites: dict[str, dict[str, Any]],
) -> None:
    """Refuse an enumerated site that cannot be summed out exactly, or whose values model and guide disagree on."""
    for name in sorted(enumerated):
        for role, sites in (("model", model_latents), ("guide", guide_sites)):
            site = sites.get(name)
            if site is None:
                continue
            how = site["infer"].get("enumerate")
            fn = site["fn"]
            if how is not None and how != "parallel":
                raise PyroVAEError(
                    f"the {role}'s site {name!r} asks for enumeration {how!r}; the evaluators sum a discrete "
                    "site out in one vectorized pass, so mark it infer={'enumerate': 'parallel'}"
                )
            if not fn.has_enumerate_support:
                raise PyroVAEError(
                    f"the {role}'s site {name!r} is marked for enumeration, but its {type(fn).__name__} "
                    "distribution has no finite set of values to sum over; enumerate only discrete sites "
                    "(Categorical, Bernoulli, ...) and sample the others"
                )
            plates = [f.name for f in site["cond_indep_stack"] if f.vectorized]
            if "data" not in plates:
                raise PyroVAEError(
                    f"the enumerated site {name!r} is outside pyro.plate('data', ...); the evaluators sum an "
                    "enumerated site out per data point, so draw it inside pyro_vae.data_plate(x, num_data)"
                )
            others = [p for p in plates if p != "data"]
            if others:
                raise PyroVAEError(
                    f"the enumerated site {name!r} sits in plate(s) {_names(others)} besides the data plate; "
                    "the evaluators sum an enumerated site out per data point, which needs one value per "
                    "data point: draw it in the data plate alone"
                )
        model_site, guide_site = model_latents.get(name), guide_sites.get(name)
        if model_site is None or guide_site is None:
            continue
        if not model_site["fn"].has_enumerate_support:
            raise PyroVAEError(
                f"the guide enumerates site {name!r}, but the model draws it from a "
                f"{type(model_site['fn']).__name__}, which has no finite set of values; model and guide must "
                "both draw a discrete distribution there"
            )
        model_values = model_site["fn"].enumerate_support(expand=False)
        guide_values = guide_site["fn"].enumerate_support(expand=False)
        if model_values.shape[0] != guide_values.shape[0] or not torch.equal(
            model_values.reshape(model_values.shape[0], -1)[:, :1],
            guide_values.reshape(guide_values.shape[0], -1)[:, :1],
        ):
            raise PyroVAEError(
                f"the model's site {name!r} takes {model_values.shape[0]} values and the guide's "
                f"{guide_values.shape[0]} (or other ones); an enumerated site must have the same values in "
                "both (the same number of categories)"
            )


def _check_enumeration_shapes(
    model: ModelFn, guide: ModelFn, sample: torch.Tensor, kwargs: dict, *, nesting: int
) -> None:
    """Run the pair once under ``TraceEnum_ELBO`` with Pyro's validation, which checks the enumerated shapes."""
    elbo = TraceEnum_ELBO(max_plate_nesting=max(nesting, 1), strict_enumeration_warning=False)
    devices = [sample.device] if sample.device.type == "cuda" else []
    try:
        with (
            torch.random.fork_rng(devices=devices),
            torch.no_grad(),
            poutine.block(),
            pyro.validation_enabled(True),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")  # the dry run before has reported what matters
            elbo.loss(model, guide, sample, **kwargs)
    except (ValueError, NotImplementedError) as error:
        raise PyroVAEError(f"summing the enumerated sites out failed: {_one_line(error)}") from error
    except RuntimeError as error:
        raise PyroVAEError(
            f"summing the enumerated sites out failed: {_one_line(error)}; an enumerated site takes all its "
            "values at once, in a dimension left of every plate (e.g. a value of shape [C, 1] for a "
            "Categorical in the data plate), so the code that uses it must broadcast over that dimension "
            "(index with it, or torch.nn.functional.one_hot it and broadcast)"
        ) from error


def _check_objective(
    loss: str,
    *,
    model_latents: list[str],
    guide_sites: dict[str, dict[str, Any]],
    global_: tuple[str, ...],
    enumerated: tuple[str, ...] = (),
    enumerated_in_guide: tuple[str, ...] = (),
) -> None:
    """Refuse a pair that the objective ``loss`` would train with a silently wrong gradient or bound."""
    if loss == "mean-field" and enumerated:
        raise PyroVAEError(
            f"the mean-field ELBO ({_options(loss)}) takes KL terms in closed form and cannot sum the "
            f"enumerated site(s) {_names(enumerated)} out; use {_options('elbo')}, which sums them out "
            "exactly (TraceEnum_ELBO)"
        )
    if loss == "iwae" and enumerated_in_guide:
        raise PyroVAEError(
            f"the importance-weighted bound ({_options(loss)}) sums an enumerated site out exactly only "
            "inside each weight, log sum_c p(x, z, c) / q(z | x), i.e. where the model alone enumerates it; "
            f"the guide draws {_names(enumerated_in_guide)}, whose q(c | x) that bound would never train; "
            f"use {_options('elbo')} (TraceEnum_ELBO), or leave the site out of the guide"
        )
    if loss in _NEEDS_RSAMPLE:
        for name, site in guide_sites.items():
            if not site["fn"].has_rsample:
                raise PyroVAEError(
                    f"{_NEEDS_RSAMPLE[loss]} ({_options(loss)}) differentiates through reparameterized "
                    f"samples, but the guide's site {name!r} ({type(site['fn']).__name__}) has none, so its "
                    f"gradient would be wrong; use {_options('elbo')}, which adds the score-function term "
                    "for such sites"
                )
    if loss == "iwae" and global_:
        raise PyroVAEError(
            f"the importance-weighted bound ({_options(loss)}) is a sum of bounds on each data point's "
            f"log p(x_i), which the global latent site(s) {_names(global_)} outside pyro.plate('data', ...) "
            f"tie together; use {_options('elbo')} or {_options('mean-field')}"
        )
    if loss == "mean-field":
        # KL(q(z_l | ...) || p(z_l | z_parents)) is taken at the guide's parent samples; that is the ELBO only
        # when the guide draws the latents in the model's order. A bottom-up guide draws z1 before z2, so
        # the closed-form KL of z1 would condition on a z2 that itself depends on z1: a biased loss.
        guide_order = list(guide_sites)
        if model_latents != guide_order:
            raise PyroVAEError(
                "the mean-field loss needs the guide to draw the latents in the model's order "
                f"({', '.join(model_latents)}), but it draws {', '.join(guide_order)}; use "
                f"{_options('elbo')}, or a guide that draws top-down (for a built-in hierarchical VAE: "
                "inference='ladder', --inference ladder)"
            )
