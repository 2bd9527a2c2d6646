"""Per latent layer: its share of the KL term and its active units, so posterior collapse shows."""

from __future__ import annotations

import re
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from .._typing import ModelFn
from ..errors import PyroVAEError
from .conditioning import per_datum_pair
from .traces import PARTICLE_PLATE, data_per_pass, paired_traces, site_log_density

__all__ = ["latent_layers"]


def _layer_order(name: str) -> tuple[int, str]:
    match = re.fullmatch(r"z(\d+)", name)
    return (int(match.group(1)) if match else 0, name)


def _posterior_mean(site: dict[str, Any], num_samples: int, num_data: int) -> torch.Tensor:
    """E_q[z | x] per datum, [n, d] float64, averaged over the K particles.

    Where the site's distribution has a closed-form mean (Gaussians), the K
    conditional means are averaged: for an upper layer of a bottom-up guide that
    is E_{z1}[E[z2 | z1]], with far less Monte-Carlo noise than the average of
    the samples, whose noise (about sigma^2 / K in variance) would otherwise
    count as activity. Other distributions (flows) average the samples.
    """
    closed_form = (dist.Normal, dist.MultivariateNormal, dist.LowRankMultivariateNormal)
    fn = site["fn"]
    while isinstance(fn, dist.Independent | dist.ExpandedDistribution):
        fn = fn.base_dist
    values = site["fn"].mean if isinstance(fn, closed_form) else site["value"]
    values = values.expand(site["value"].shape).reshape(num_samples, num_data, -1)  # [K, n, d]
    return values.double().mean(0)


def _per_unit_log_density(site: dict[str, Any]) -> torch.Tensor | None:
    """log-density of each coordinate of a site that factorizes over them, [..., d]; None for one that does not.

    An ``Independent`` of a univariate distribution (a diagonal Gaussian, a Laplace) is a product over its
    last dimension; flows, mixtures and full-covariance Gaussians are not, and have no per-unit share.
    """
    fn = site["fn"]
    if not (
        isinstance(fn, dist.Independent)
        and fn.reinterpreted_batch_ndims == 1
        and fn.base_dist.event_shape == ()
    ):
        return None
    return fn.base_dist.log_prob(site["value"])


def latent_layers(
    model: ModelFn,
    guide: ModelFn,
    x: torch.Tensor,
    *,
    num_samples: int = 100,
    data_chunk_size: int | None = None,
    threshold: float = 0.01,
) -> list[dict[str, Any]]:
    """Per latent layer: its KL term and its number of active units, so posterior collapse shows.

    For each latent site z_l of the guide (``"z"``, or ``"z1"`` ... ``"zL"``),
    with K = ``num_samples`` draws from the guide per data point:

    - ``kl``: the layer's share of KL(q(z|x) || p(z)) per datum in nats,
      E_q[log q(z_l | ...) - log p(z_l | ...)], averaged over the data; the
      shares add up to the whole KL;
    - ``active_units``: how many coordinates u have A_u = Var_x(E_q[z_u | x])
      above ``threshold`` (Burda et al., 2016, section 5.2: 0.01). A unit whose
      posterior mean does not move with x carries no information about it;
    - ``unit_kl``: each coordinate's share of the layer's KL,
      E_q[log q(z_u | ...) - log p(z_u | ...)], where both q and p factorize over
      the coordinates (diagonal Gaussians; else None), and ``units_with_kl``, how
      many carry more than ``threshold`` nats. With a learned prior scale the
      active-unit count misleads (a unit can vary with x on a tiny scale and
      carry nothing); the KL per unit is the information it carries.

    The data go in chunks of ``data_chunk_size`` points (default: as many as make
    :func:`~pyro_vae.inference.traces.rows_per_pass` rows), with no memory budget;
    :func:`~pyro_vae.inference.importance.latent_layers_within` sizes them to one.

    Returns one dict per layer, lowest first:
    ``{"site", "dim", "kl", "active_units", "unit_kl", "units_with_kl"}``.
    The pair is validated first; global latents (sites outside the data plate)
    are not layers: they are fixed at the guide's plug-in value, and every
    share is then conditional on it (:mod:`pyro_vae.inference.conditioning`).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise PyroVAEError(f"num_samples must be a positive integer, got {num_samples!r}")
    pair = per_datum_pair(model, guide, x)
    data_chunk_size = data_chunk_size or data_per_pass(x, num_samples)
    kl: dict[str, list[torch.Tensor]] = {}
    means: dict[str, list[torch.Tensor]] = {}
    unit_kl: dict[str, list[torch.Tensor] | None] = {}
    with torch.no_grad(), pyro.validation_enabled(False), poutine.block():
        particle_dim = -pair.max_plate_nesting - 1
        for xs in x.split(data_chunk_size):
            with pyro.plate(PARTICLE_PLATE, num_samples, dim=particle_dim):
                guide_trace, model_trace = paired_traces(pair.model, pair.guide, (xs,), {})
            for name, site in guide_trace.nodes.items():
                if site["type"] != "sample" or site["is_observed"]:
                    continue
                log_q = site_log_density(site, particle_dim=particle_dim)
                log_p = site_log_density(model_trace.nodes[name], particle_dim=particle_dim)
                kl.setdefault(name, []).append((log_q - log_p).double().mean(0).cpu())  # [n]
                means.setdefault(name, []).append(_posterior_mean(site, num_samples, xs.shape[0]).cpu())
                unit_q = _per_unit_log_density(site)
                unit_p = _per_unit_log_density(model_trace.nodes[name])
                if unit_q is None or unit_p is None or unit_kl.get(name, []) is None:
                    unit_kl[name] = None
                else:
                    per_unit = (unit_q - unit_p).double().reshape(num_samples, xs.shape[0], -1)  # [K, n, d]
                    unit_kl.setdefault(name, []).append(per_unit.mean(0).sum(0).cpu())  # [d], summed over n
    layers = []
    for name in sorted(kl, key=_layer_order):
        posterior_means = torch.cat(means[name])  # [N, d]
        activity = posterior_means.var(0, unbiased=False)  # [d]
        parts = unit_kl.get(name)
        units = None if parts is None else (torch.stack(parts).sum(0) / x.shape[0])  # [d], mean over the data
        layers.append(
            {
                "site": name,
                "dim": posterior_means.shape[1],
                "kl": float(torch.cat(kl[name]).mean()),
                "active_units": int((activity > threshold).sum()),
                "unit_kl": None if units is None else units.tolist(),
                "units_with_kl": None if units is None else int((units > threshold).sum()),
            }
        )
    return layers
