r"""What a consumer may ask of any model: the optional abilities, taken from the object or derived by tracing.

The model contract (:class:`~pyro_vae._typing.VAEModel`) is two Pyro
functions, ``model(x, *, num_data=None)`` and ``guide(x, *, num_data=None)``,
with the per-datum sites in the data plate. Pictures, export and data checks
would like more; each function here answers one such question for any model,
using the model's own method where it has one (the ability Protocols of
:mod:`pyro_vae._typing`) and otherwise deriving the answer from the two
functions::

    latent_sites       the model's per-datum latent sites, in reverse of the order the model
                       draws them (a generative story is written top-down, so the layer next
                       to x comes first)
    posterior_means    E_q[z_s | x] = E_q[ E_q[z_s | x, sites the guide drew before s] ], the
                       conditional means of S vectorized guide draws averaged (exact for a
                       site whose q depends on x alone)
    decode             the mean of p(x | latents): the model traced with the given latent
                       values, every other local latent set to the mean of its conditional
                       prior given the sites drawn before it
    sample_latents     ancestral draws of the local latents from the model's prior
    prior_samples      data from the prior: the decoded means, or draws x ~ p(x | z)
    check_data         the data lie in the support of the model's observed site
    needs_binary_data  the observed site's support is {0, 1} (a Bernoulli likelihood)

A derivation traces the model on a data-shaped tensor ``like`` (only its
shape and rows are used, never its values' meaning). Global latents (sites
outside the data plate) are held at the guide's mean, the same plug-in value
the evaluators condition on. Where an answer cannot be derived, the function
raises :class:`AbilityMissing`, whose message is the one line a consumer prints
before it carries on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites

from .._typing import ChecksData, Decodes, ModelFn, NamesLatents, PosteriorMeans, SamplesLatents, VAEModel
from ..errors import PyroVAEError
from ..inference.traces import plate_nesting
from ..inference.validation import validate_pair

__all__ = [
    "MEAN_SAMPLES",
    "AbilityMissing",
    "check_data",
    "decode",
    "guide_means",
    "latent_sites",
    "needs_binary_data",
    "posterior_means",
    "prior_distribution",
    "prior_samples",
    "sample_latents",
]

# Guide draws averaged for a posterior mean that has no closed form: the Monte-Carlo error of the mean
# of S conditional means is std / sqrt(S), a few percent of a posterior spread with 64 draws.
MEAN_SAMPLES = 64
_PARTICLES = "_ability_particles"


class AbilityMissing(PyroVAEError):
    """A model cannot do what a consumer asked (and it cannot be derived); the message says what and why."""


def _rows(like: torch.Tensor | None, num: int) -> torch.Tensor:
    """``num`` data-shaped rows [num, ...] cycled from ``like``: what the model observes while it is traced."""
    if like is None:
        raise AbilityMissing(
            "the model has no method for this, and deriving it traces the model on data; pass like= a few data rows"
        )
    if not isinstance(like, torch.Tensor) or like.dim() < 1 or like.shape[0] == 0:
        raise PyroVAEError("like must be a non-empty data tensor [N, ...] whose rows have the data's shape")
    return like[torch.arange(num, device=like.device) % like.shape[0]]


@contextmanager
def _dry(x: torch.Tensor) -> Iterator[None]:
    """No gradients, no validation, hidden from outer handlers, on a copy of the random state."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.no_grad(), pyro.validation_enabled(False), poutine.block(), torch.random.fork_rng(devices):
        yield


def _node(trace: Trace, name: str) -> Any:
    """A trace's site as a plain dict (Pyro types it as a Message)."""
    return trace.nodes[name]


def _sample_sites(trace: Trace, *, observed: bool) -> dict[str, Any]:
    return {
        name: site
        for name, site in prune_subsample_sites(trace).nodes.items()
        if site["type"] == "sample" and site["is_observed"] == observed
    }


def _in_data_plate(site: dict[str, Any]) -> bool:
    return any(frame.name == "data" for frame in site["cond_indep_stack"])


def _observed_in_data_plate(trace: Trace) -> dict[str, Any]:
    sites = [s for s in _sample_sites(trace, observed=True).values() if _in_data_plate(s)]
    if len(sites) != 1:
        raise AbilityMissing(
            f"the model observes {len(sites)} sites in the data plate, so there is no one p(x | latents) to "
            "decode; give the model a decode(latents) method"
        )
    return sites[0]


def _per_datum(value: torch.Tensor, num: int, site: str) -> torch.Tensor:
    """A per-datum value [num, *event] as rows [num, d]."""
    if value.dim() == 0 or value.shape[0] != num:
        raise AbilityMissing(
            f"latent site {site!r} has shape {tuple(value.shape)}, not one value per data point "
            f"({num}, ...); give the model the ability a picture needs (see pyro_vae._typing)"
        )
    return value.reshape(num, -1)


class _SetLatents(Messenger):
    """Latent sites take given values; with ``means=True`` every other local latent takes its distribution's mean."""

    def __init__(self, values: Mapping[str, torch.Tensor], *, means: bool) -> None:
        super().__init__()
        self.values = values
        self.means = means

    def _pyro_sample(self, msg: Any) -> None:
        if msg["is_observed"] or type(msg["fn"]).__name__ == "_Subsample":
            return
        fn = msg["fn"]
        if msg["name"] in self.values:
            # Rows [N, d] as the site's own shape (a scalar latent per datum is [N], not [N, 1]).
            msg["value"] = self.values[msg["name"]].reshape(fn.shape())
        elif self.means:
            try:
                msg["value"] = fn.mean
            except NotImplementedError:
                raise AbilityMissing(
                    f"decoding sets latent site {msg['name']!r} to the mean of its prior, but its "
                    f"{type(fn).__name__} distribution has no mean; give the model a decode(latents) method"
                ) from None


def _global_means(model: VAEModel, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """The guide's mean of every global latent (a site outside the data plate): the plug-in value."""
    structure = validate_pair(model.model, model.guide, like)
    if not structure.global_:
        return {}
    with _dry(like):
        trace = poutine.trace(model.guide).get_trace(like)
    means = {}
    for name in structure.global_:
        fn = _node(trace, name)["fn"]
        try:
            means[name] = fn.mean
        except NotImplementedError:
            means[name] = _node(trace, name)["value"]  # one draw: a mean-less guide gives no better plug-in
    return means


def _model_trace(
    model: VAEModel, like: torch.Tensor, latents: Mapping[str, torch.Tensor], *, means: bool
) -> Trace:
    values = {**_global_means(model, like), **latents}
    with torch.no_grad(), pyro.validation_enabled(False), poutine.block():
        return poutine.trace(_SetLatents(values, means=means)(model.model)).get_trace(like)


def latent_sites(model: VAEModel, x: torch.Tensor) -> tuple[str, ...]:
    """The per-datum latent sites of ``model``, the layer next to x first (e.g. ``("z1", "z2")``)."""
    if isinstance(model, NamesLatents):
        return tuple(model.latent_sites)
    local = validate_pair(model.model, model.guide, x).local
    if not local:
        raise AbilityMissing(
            "the model has no latent site in the data plate, so there is no latent space to draw"
        )
    # validate_pair lists them as the model draws them: top-down, so the layer next to x is drawn last.
    return tuple(reversed(local))


def posterior_means(
    model: VAEModel, x: torch.Tensor, *, num_samples: int = MEAN_SAMPLES
) -> dict[str, torch.Tensor]:
    """E_q[z_s | x] [N, d_s] for every latent site s of :func:`latent_sites`.

    Derived as (1/S) sum_k E_q[z_s | x, z_<s^(k)] over ``num_samples`` = S guide
    draws, traced in one vectorized pass: exact for a site whose q depends on x
    alone, unbiased for one that depends on sites drawn before it; a site whose
    distribution has no closed-form mean uses the mean of its S draws. Draws
    from torch's global generator (fork it for a picture that must not move
    the caller's stream).
    """
    if isinstance(model, PosteriorMeans):
        return dict(model.posterior_means(x))
    nesting = plate_nesting(model.model, model.guide, (x[:2],), {})
    return guide_means(model.guide, x, sites=latent_sites(model, x), num_samples=num_samples, nesting=nesting)


def guide_means(
    guide: ModelFn, x: torch.Tensor, *, sites: Sequence[str], num_samples: int, nesting: int = 1
) -> dict[str, torch.Tensor]:
    """(1/S) sum_k E_q[z_s | x, z_<s^(k)] [N, d_s] for each of ``sites``, from S vectorized draws of ``guide``.

    The particle plate sits outside the guide's ``nesting`` plates. Used by
    :func:`posterior_means` and by models whose later layers have no closed-form mean.
    """
    with torch.no_grad(), pyro.validation_enabled(False), poutine.block():
        with pyro.plate(_PARTICLES, num_samples, dim=-nesting - 1):
            trace = poutine.trace(guide).get_trace(x)
    means = {}
    for name in sites:
        site = _node(trace, name)
        try:
            conditional = site["fn"].mean.expand(site["value"].shape)  # [S, N, *event]
        except NotImplementedError:
            conditional = site["value"]
        means[name] = _per_datum(conditional.mean(0), x.shape[0], name)  # [N, d]
    return means


def decode(
    model: VAEModel, latents: Mapping[str, torch.Tensor], *, like: torch.Tensor | None = None
) -> torch.Tensor:
    """The mean of p(x | latents) [N, D] for latent values ``{site: [N, d]}``.

    Latent sites left out are set to the mean of their conditional prior given
    the sites the model draws before them; global latents to the guide's mean.
    ``like`` is data of the model's shape, cycled to N rows, that the model
    observes while it is traced (its values do not change the mean).
    """
    if isinstance(model, Decodes):
        return model.decode(latents)
    if not latents:
        raise PyroVAEError("decode needs the value of at least one latent site")
    num = next(iter(latents.values())).shape[0]
    rows = _rows(like, num)
    known = set(validate_pair(model.model, model.guide, rows).local)
    unknown = sorted(set(latents) - known)
    if unknown:
        raise PyroVAEError(
            f"decode got values for {', '.join(unknown)}, which are not latent sites of the model in the data "
            f"plate ({', '.join(sorted(known))})"
        )
    site = _observed_in_data_plate(_model_trace(model, rows, latents, means=True))
    try:
        mean = site["fn"].mean
    except NotImplementedError:
        raise AbilityMissing(
            f"the model's observed site {site['name']!r} ({type(site['fn']).__name__}) has no mean to decode "
            "to; give the model a decode(latents) method"
        ) from None
    return mean.reshape(num, -1)


def sample_latents(model: VAEModel, num: int, *, like: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``num`` ancestral draws of every latent site from the prior, ``{site: [num, d]}``.

    Derived by tracing the model on ``num`` rows of ``like`` (global latents at
    the guide's mean); draws from torch's global generator.
    """
    if isinstance(model, SamplesLatents):
        return dict(model.sample_latents(num))
    rows = _rows(like, num)
    sites = latent_sites(model, rows)
    trace = _model_trace(model, rows, {}, means=False)
    return {name: _per_datum(_node(trace, name)["value"], num, name) for name in sites}


def prior_samples(
    model: VAEModel, num: int, *, like: torch.Tensor | None = None, mean: bool = True
) -> torch.Tensor:
    """New data from the prior [num, D]: the mean of p(x | z) for z ~ p(z), or (``mean=False``) x ~ p(x | z)."""
    latents = sample_latents(model, num, like=like)
    if mean:
        return decode(model, latents, like=like)
    rows = _rows(like, num)
    site = _observed_in_data_plate(_model_trace(model, rows, latents, means=True))
    with torch.no_grad():
        return site["fn"].sample().reshape(num, -1)


def prior_distribution(model: VAEModel, site: str, *, like: torch.Tensor) -> dist.TorchDistribution:
    """The distribution the model draws latent ``site`` from, in one trace on ``like`` (with a batch over its rows).

    For the top layer of a generative story that is the prior p(z_top); for a
    lower layer, its conditional prior given one draw of the layers above.
    """
    with _dry(like):
        trace = poutine.trace(model.model).get_trace(like)
    if site not in trace.nodes:
        raise PyroVAEError(f"the model has no site {site!r}")
    fn: dist.TorchDistribution = _node(trace, site)["fn"]
    return fn


def _base_support(fn: dist.TorchDistribution) -> constraints.Constraint:
    support: Any = fn.support
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support  # type: ignore[no-any-return]


def _observed_site(model: VAEModel, x: torch.Tensor) -> dict[str, Any]:
    with _dry(x):
        trace = poutine.trace(model.model).get_trace(x[:2])
    observed = list(_sample_sites(trace, observed=True).values())
    if not observed:
        raise PyroVAEError(
            "the model has no observed site: it must score the data with pyro.sample(name, distribution, obs=x)"
        )
    return observed[0]


def needs_binary_data(model: VAEModel, x: torch.Tensor) -> bool:
    """Whether the model's observed site has support {0, 1} (so grey data must be binarized first)."""
    return _base_support(_observed_site(model, x)["fn"]) is constraints.boolean


def check_data(model: VAEModel, x: torch.Tensor) -> None:
    """Raise :class:`~pyro_vae.errors.PyroVAEError` when ``x`` [N, ...] is not data ``model`` can score.

    Derived: every value finite, and inside the support of the model's observed site.
    """
    if isinstance(model, ChecksData):
        model.check_data(x)
        return
    bad = ~torch.isfinite(x)
    if bad.any():
        raise PyroVAEError(
            f"the data hold {int(bad.sum())} NaN or infinite values; clean or drop those data points"
        )
    site = _observed_site(model, x)
    support = _base_support(site["fn"])
    if support is constraints.dependent:
        return  # a support that depends on parameters cannot be checked before the model is fitted
    try:
        inside = support.check(x)
    except RuntimeError:
        # Bounds with a batch shape of their own do not broadcast to all of x: check the traced rows.
        inside = support.check(site["value"])
        x = site["value"]
    outside = x[~inside]
    if outside.numel():
        examples = ", ".join(f"{v:g}" for v in outside[:3].tolist())
        advice = (
            "pass --binarize dynamic or --binarize static, or observe grey values with another distribution"
            if support is constraints.boolean
            else "transform the data into that support, or observe them with another distribution"
        )
        raise PyroVAEError(
            f"the model's observed site {site['name']!r} ({type(site['fn']).__name__}) has support {support}, "
            f"but {outside.numel()} values of the data lie outside it (e.g. {examples}); {advice}"
        )
