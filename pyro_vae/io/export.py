r"""The importance samples of a VAE as an ArviZ ``InferenceData`` (0.2x) or ``DataTree`` (1.x), in netCDF.

For every exported data point x_i, K draws z_k ~ q(z | x_i) from the guide, the
model replayed on them, and per draw::

    log_likelihood.x       log p(x_i | z_k)
    sample_stats.log_prior log p(z_k)                          (all latent sites)
    sample_stats.log_q     log q(z_k | x_i)
    sample_stats.log_weight  log w_k = log p(x_i | z_k) + log p(z_k) - log q(z_k | x_i)

and per data point ``log_px`` = log (1/K) sum_k w_k and the PSIS ``khat`` of the
weights, the same estimates as :func:`pyro_vae.evaluation.evaluate_bounds`.

The draws are from q(z | x), the approximate posterior, not from p(z | x):
plain averages over ``posterior`` are guide expectations. Self-normalized
with the weights, sum_k softmax(log w)_k f(z_k), they estimate E_{p(z|x)}[f(z)],
and ``khat`` (< 0.7) says whether that estimate can be trusted.

The samples come from the evaluator's own traced pass
(:func:`~pyro_vae.evaluation.traced_log_weights`, chunked as
:func:`~pyro_vae.evaluation.evaluate_bounds` chunks it), so with the same seed
and chunk sizes they are the samples behind ``log_marginal``.

A discrete site enumerated in the model or guide (``infer={"enumerate":
"parallel"}``; a mixture component c) is summed out of the weights as the
evaluator sums it: particle k holds z_k^c ~ q(z | x_i, c) for every c and
weighs W_k = sum_c w_k^c. Each exported draw is one pair (c_k, z_k^{c_k}),
c_k drawn in proportion to the particle's w_k^c (from a generator of its own,
so the evaluator's samples are unchanged), weighted by W_k: a properly weighted
sample of p(c, z | x_i), so softmax-weighted averages estimate posterior
expectations as before. Then ``posterior.c`` holds the integer c_k (dims
chain, draw, datum); ``log_q`` = log q(z_k | x_i, c_k) + log (w_k^{c_k} / W_k),
the log-density with which the pair was drawn, so that ``log_weight`` =
log p(x_i | z_k) + log p(z_k, c_k) - log q is log W_k and ``log_px`` is the
evaluator's; ``sample_stats.c_probs`` [datum, c_category] is the
importance estimate of p(c | x_i) = sum_k w_k^c / sum_k W_k, and
``sample_stats.c_guide_probs`` the guide's q(c | x_i) where the guide draws c.

References:
    Kumar, Carroll, Hartikainen & Martin, "ArviZ a unified library for
    exploratory analysis of Bayesian models in Python", JOSS 4(33), 2019.
    Vehtari, Simpson, Gelman, Yao & Gabry, "Pareto Smoothed Importance
    Sampling", JMLR 25(72), 2024.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
import xarray
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from .._typing import DeviceLike, ModelFn
from ..errors import PyroVAEError
from ..files import replace_atomic
from ..inference.conditioning import per_datum_pair
from ..inference.importance import check_sampling_args, plan_importance_passes
from ..inference.psis import MIN_SAMPLES_FOR_KHAT, psis_khat
from ..inference.traces import (
    MAX_MEMORY,
    chunked_passes,
    enumerated_dim,
    site_log_density,
    traced_log_weights,
)
from .arviz_compat import InferenceDataLike, group_names, make_inference_data, write_netcdf

__all__ = ["export_run", "to_inference_data"]


@dataclass(frozen=True)
class _Draws:
    """K importance samples for each of n data points; log-densities float64."""

    latents: dict[str, torch.Tensor]  # site -> [K, n, d_site], guide order
    log_lik: dict[str, torch.Tensor]  # observed site -> [K, n]
    observed: dict[str, torch.Tensor]  # observed site -> [n, D_site]
    log_prior: torch.Tensor  # [K, n]
    log_q: torch.Tensor  # [K, n]
    # Enumerated site -> log sum over the other enumerated sites of w_k^c: [K, n, C] float64.
    enum_log_w: dict[str, torch.Tensor] = field(default_factory=dict)
    # Enumerated site the guide draws -> q(c | x): [n, C] float64.
    guide_probs: dict[str, torch.Tensor] = field(default_factory=dict)


def _per_datum(site: dict[str, Any], *, particle_dim: int, num_samples: int) -> torch.Tensor:
    """A site's value as [K, n, -1]: particles first, data second, everything else flattened."""
    value = site["value"]
    event_dim = len(site["fn"].event_shape)
    batch_dim = value.dim() - event_dim
    # Pad the batch to the particle dim (an observed value has none): then particles are axis 0.
    value = value.reshape((1,) * (-particle_dim - batch_dim) + value.shape)
    data_dim = next(f.dim for f in site["cond_indep_stack"] if f.name == "data")
    value = value.expand(num_samples, *value.shape[1:]).movedim(-particle_dim + data_dim, 1)
    return value.reshape(num_samples, value.shape[1], -1)


def _one_pass(
    model: ModelFn,
    guide: ModelFn,
    x: torch.Tensor,
    *,
    num_samples: int,
    nesting: int,
    generator: torch.Generator | None = None,
) -> _Draws:
    # traced_log_weights traces the guide in the particle plate and replays the model; the inner tracers
    # keep those very traces, sample for sample, so nothing is drawn here that the evaluator does not draw.
    guide_tracer, model_tracer = poutine.trace(guide), poutine.trace(model)
    traced_log_weights(model_tracer, guide_tracer, x, num_samples=num_samples, max_plate_nesting=nesting)
    guide_trace = prune_subsample_sites(guide_tracer.trace)
    model_trace = prune_subsample_sites(model_tracer.trace)
    particle_dim = -nesting - 1
    if any(
        enumerated_dim(site) is not None
        for trace in (model_trace, guide_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
    ):
        return _enumerated_pass(
            model_trace, guide_trace, x, num_samples=num_samples, nesting=nesting, generator=generator
        )

    def log_density(site: dict[str, Any]) -> torch.Tensor:
        log_p = site_log_density(site, particle_dim=particle_dim).double()  # [K or 1, n or 1]
        return log_p.expand(num_samples, x.shape[0])

    guide_sites = [s for s in guide_trace.nodes.values() if s["type"] == "sample" and not s["is_observed"]]
    model_sites = [s for s in model_trace.nodes.values() if s["type"] == "sample"]
    observed = [s for s in model_sites if s["is_observed"]]
    zero = x.new_zeros((num_samples, x.shape[0]), dtype=torch.float64)  # 0 + a == a: sums stay exact
    return _Draws(
        latents={
            s["name"]: _per_datum(s, particle_dim=particle_dim, num_samples=num_samples) for s in guide_sites
        },
        log_lik={s["name"]: log_density(s) for s in observed},
        observed={s["name"]: _per_datum(s, particle_dim=particle_dim, num_samples=1)[0] for s in observed},
        log_prior=sum((log_density(s) for s in model_sites if not s["is_observed"]), zero),
        log_q=sum((log_density(s) for s in guide_sites), zero),
    )


def _enumerated_pass(
    model_trace: Any,
    guide_trace: Any,
    x: torch.Tensor,
    *,
    num_samples: int,
    nesting: int,
    generator: torch.Generator | None,
) -> _Draws:
    """One draw (c_k, z_k^{c_k}) per particle from traces whose enumerated sites hold all their values."""
    if nesting != 1:
        raise PyroVAEError(
            "the export of a model with enumerated sites supports the data plate alone (no nested plates); "
            "evaluate it with pyro-vae evaluate instead"
        )
    particle_dim = -2
    guide_sites = [s for s in guide_trace.nodes.values() if s["type"] == "sample" and not s["is_observed"]]
    model_sites = [s for s in model_trace.nodes.values() if s["type"] == "sample"]
    # Every enumerated site once (the model's copy of a site the guide enumerates has the guide's dim).
    enumerated = {}
    for site in [*guide_sites, *model_sites]:
        dim = enumerated_dim(site)
        if dim is not None and site["name"] not in enumerated:
            enumerated[site["name"]] = (dim, site)
    first = min(dim for dim, _ in enumerated.values())
    num_enum = particle_dim - first
    sizes = {dim: site["value"].shape[dim] for dim, site in enumerated.values()}
    shape = (*(sizes.get(d, 1) for d in range(first, particle_dim)), num_samples, x.shape[0])  # [E..., K, n]
    positions = int(np.prod(shape[:num_enum]))
    k_index = torch.arange(num_samples, device=x.device).unsqueeze(1)  # [K, 1]
    n_index = torch.arange(x.shape[0], device=x.device).unsqueeze(0)  # [1, n]

    def full(value: torch.Tensor, event_dim: int) -> torch.Tensor:
        """A value [E..., K or 1, n or 1, *event] broadcast to [P, K, n, *event] (P: all enumerated values)."""
        event = value.shape[value.dim() - event_dim :]
        batch = value.dim() - event_dim
        value = value.reshape((1,) * (num_enum + 2 - batch) + value.shape)
        return value.expand(*shape, *event).reshape(positions, num_samples, x.shape[0], *event)

    def density(site: dict[str, Any]) -> torch.Tensor:
        return full(site_log_density(site, particle_dim=particle_dim, enum_dims=num_enum).double(), 0)

    log_joint = sum(density(s) for s in model_sites) - sum(
        density(s) for s in guide_sites if enumerated_dim(s) is None
    )  # [P, K, n]
    log_w = torch.logsumexp(log_joint, 0)  # [K, n]
    # c_k in proportion to w_k^c, from the export's own generator: the evaluator's stream is left as it is.
    select = torch.softmax(log_joint, 0).permute(1, 2, 0).reshape(-1, positions)  # [K n, P]
    chosen = torch.multinomial(select, 1, generator=generator).reshape(num_samples, x.shape[0])  # [K, n]

    def pick(values: torch.Tensor) -> torch.Tensor:
        return values[chosen, k_index, n_index]  # [K, n, ...]

    latents = {}
    for site in guide_sites:
        value = pick(full(site["value"], len(site["fn"].event_shape)))
        latents[site["name"]] = (
            value if enumerated_dim(site) is not None else value.reshape(*value.shape[:2], -1)
        )
    for name, (_, site) in enumerated.items():
        if name not in latents:  # enumerated in the model alone
            latents[name] = pick(full(site["value"], len(site["fn"].event_shape)))
    log_r = pick(log_joint) - log_w  # log (w_k^{c_k} / W_k): how c_k was drawn
    observed = [s for s in model_sites if s["is_observed"]]
    zero = x.new_zeros((num_samples, x.shape[0]), dtype=torch.float64)
    grid = log_joint.reshape(*shape)  # [E..., K, n]
    enum_log_w, guide_probs = {}, {}
    for name, (dim, _) in enumerated.items():
        at = dim - first
        others = tuple(i for i in range(num_enum) if i != at)
        per_c = torch.logsumexp(grid, others) if others else grid  # [C, K, n]
        enum_log_w[name] = per_c.movedim(0, -1)  # [K, n, C]
        guide_site = guide_trace.nodes.get(name)
        if guide_site is not None and enumerated_dim(guide_site) is not None:
            log_q_c = site_log_density(guide_site, particle_dim=particle_dim, enum_dims=num_enum).double()
            log_q_c = log_q_c.reshape((1,) * (num_enum + 2 - log_q_c.dim()) + log_q_c.shape)
            if all(log_q_c.shape[i] == 1 for i in others):  # q(c | x) alone, not given other sites
                guide_probs[name] = log_q_c.reshape(log_q_c.shape[at], -1).exp().T.expand(x.shape[0], -1)
    return _Draws(
        latents=latents,
        log_lik={s["name"]: pick(density(s)) for s in observed},
        observed={s["name"]: _per_datum(s, particle_dim=particle_dim, num_samples=1)[0] for s in observed},
        log_prior=sum((pick(density(s)) for s in model_sites if not s["is_observed"]), zero),
        log_q=sum((pick(density(s)) for s in guide_sites if enumerated_dim(s) is None), zero) + log_r,
        enum_log_w=enum_log_w,
        guide_probs=guide_probs,
    )


def _cat(parts: Sequence[_Draws], *, dim: int) -> _Draws:
    """Joins passes along particles (dim 0) or data (dim 1); observed values are per datum only."""
    first = parts[0]
    return _Draws(
        latents={name: torch.cat([p.latents[name] for p in parts], dim) for name in first.latents},
        log_lik={name: torch.cat([p.log_lik[name] for p in parts], dim) for name in first.log_lik},
        observed=first.observed
        if dim == 0
        else {name: torch.cat([p.observed[name] for p in parts]) for name in first.observed},
        log_prior=torch.cat([p.log_prior for p in parts], dim),
        log_q=torch.cat([p.log_q for p in parts], dim),
        enum_log_w={name: torch.cat([p.enum_log_w[name] for p in parts], dim) for name in first.enum_log_w},
        guide_probs=first.guide_probs
        if dim == 0
        else {name: torch.cat([p.guide_probs[name] for p in parts]) for name in first.guide_probs},
    )


def _draw(
    model: ModelFn,
    guide: ModelFn,
    x: torch.Tensor,
    *,
    num_samples: int,
    chunk_size: int,
    data_chunk_size: int | None,
    nesting: int,
    generator: torch.Generator | None = None,
) -> _Draws:
    # The loop of evaluate_bounds, so that the same seed and chunk sizes give its samples.
    with torch.no_grad(), pyro.validation_enabled(False), poutine.block():
        chunks = [
            _cat(passes, dim=0)
            for passes in chunked_passes(
                lambda xs, k: _one_pass(
                    model, guide, xs, num_samples=k, nesting=nesting, generator=generator
                ),
                x,
                num_samples=num_samples,
                chunk_size=chunk_size,
                data_chunk_size=data_chunk_size,
            )
        ]
    return _cat(chunks, dim=1)


def to_inference_data(
    model: ModelFn,
    guide: ModelFn,
    x: torch.Tensor,
    *,
    num_samples: int = 1000,
    data_indices: Sequence[int] | None = None,
    seed: int | None = None,
    chunk_size: int = 1000,
    data_chunk_size: int | None = None,
    max_memory: int | None = MAX_MEMORY,
) -> InferenceDataLike:
    r"""K importance samples z_k ~ q(z | x_i) per data point, with their log-densities, for ArviZ.

    The object is the installed ArviZ's: ``arviz.InferenceData`` under 0.2x,
    ``xarray.DataTree`` under 1.x; both index the groups as ``data["posterior"]``.

    ``model(x)`` and ``guide(x)`` are Pyro functions whose sample sites sit in
    ``pyro.plate("data", ...)``, as :class:`~pyro_vae.model.VAE` and
    :class:`~pyro_vae.hierarchical.HierarchicalVAE` write them. Groups, with
    ``chain`` of length 1 (the guide's samples are one chain), ``draw`` = K and
    ``datum`` whose coords are ``data_indices`` (default 0..n-1):

    - ``posterior``: one variable per latent site of the guide (``"z"`` or
      ``"z1"`` ... ``"zL"``), dims (chain, draw, datum, <site>_dim). These are
      draws from q(z | x), the approximate posterior, not from p(z | x);
      weighted by softmax over ``draw`` of ``sample_stats.log_weight`` they give
      self-normalized importance estimates of expectations under p(z | x).
    - ``log_likelihood``: log p(x_i | z_k) per observed site (``"x"``), dims (chain, draw, datum).
    - ``sample_stats``: ``log_weight`` = log p(x_i, z_k) - log q(z_k | x_i) (unnormalized),
      ``log_prior`` = log p(z_k) over all latent sites, ``log_q`` = log q(z_k | x_i), dims
      (chain, draw, datum); and per datum (dims (datum,)) ``log_px`` = logsumexp_k log w_k - log K
      and ``khat``, the PSIS Pareto k̂ of the weights (0 where all weights are equal, NaN below 20 samples).
    - ``observed_data``: each observed site's data, dims (datum, <site>_dim).

    Sampling runs in vectorized passes of ``chunk_size`` particles over
    ``data_chunk_size`` data points, fewer where the memory budget ``max_memory`` (bytes; None: none)
    asks, planned exactly as :func:`~pyro_vae.evaluation.evaluate_bounds` plans them
    (:func:`~pyro_vae.inference.plan_importance_passes`): with torch seeded to the same
    value, ``log_px`` is :func:`~pyro_vae.evaluation.log_marginal` of the same
    ``x`` up to float64 round-off. ``seed`` seeds torch for this call only (the
    global stream is restored afterwards); ``None`` draws from the global stream.
    """
    check_sampling_args(
        x,
        num_samples=num_samples,
        chunk_size=chunk_size,
        data_chunk_size=data_chunk_size,
        max_memory=max_memory,
    )
    indices = np.arange(x.shape[0]) if data_indices is None else np.asarray(data_indices)
    if indices.shape != (x.shape[0],) or indices.dtype.kind not in "iu":
        raise PyroVAEError(
            f"data_indices must be {x.shape[0]} integers, one per row of x; got {list(np.ravel(indices))[:8]}"
        )
    if len(np.unique(indices)) != len(indices):
        raise PyroVAEError(
            "data_indices must not repeat an index: each labels one data point in the 'datum' coords"
        )
    # Validated, and global latents fixed at the guide's plug-in value, exactly as evaluate_bounds does.
    pair = per_datum_pair(model, guide, x)
    sizes = plan_importance_passes(
        model,
        guide,
        x,
        num_samples=num_samples,
        chunk_size=chunk_size,
        data_chunk_size=data_chunk_size,
        max_memory=max_memory,
        pair=pair,
    )

    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        draws = _draw(
            pair.model,
            pair.guide,
            x,
            num_samples=num_samples,
            chunk_size=sizes.particles,
            data_chunk_size=sizes.data,
            nesting=pair.max_plate_nesting,
            # Draws the enumerated sites' c_k, apart from the stream the evaluator's samples come from.
            generator=torch.Generator(device=x.device).manual_seed(0 if seed is None else seed),
        )
    log_lik = sum(draws.log_lik.values(), torch.zeros_like(draws.log_q))
    log_w = log_lik + draws.log_prior - draws.log_q  # [K, n]
    log_px = torch.logsumexp(log_w, 0) - math.log(num_samples)
    if num_samples >= MIN_SAMPLES_FOR_KHAT:
        khat = psis_khat(log_w)
    else:
        khat = torch.full((x.shape[0],), math.nan, dtype=torch.float64)

    def per_draw(values: torch.Tensor) -> np.ndarray:
        return values.cpu().numpy()[np.newaxis]  # [1, K, n, ...]

    sample_dims = ("chain", "draw", "datum")
    coords = {"chain": [0], "draw": np.arange(num_samples), "datum": indices}
    posterior = {
        # An enumerated site's draws are one value per datum [K, n]: dims (chain, draw, datum).
        name: ((*sample_dims, f"{name}_dim") if value.dim() == 3 else sample_dims, per_draw(value))
        for name, value in draws.latents.items()
    }
    sample_stats = {
        "log_weight": (sample_dims, per_draw(log_w)),
        "log_prior": (sample_dims, per_draw(draws.log_prior)),
        "log_q": (sample_dims, per_draw(draws.log_q)),
        "log_px": (("datum",), log_px.cpu().numpy()),
        "khat": (("datum",), khat.cpu().numpy()),
    }
    for name, per_c in draws.enum_log_w.items():
        # p(c | x_i) = sum_k w_k^c / sum_k W_k, each datum's importance estimate.
        probs = torch.softmax(torch.logsumexp(per_c, 0), -1)  # [n, C]
        sample_stats[f"{name}_probs"] = (("datum", f"{name}_category"), probs.cpu().numpy())
    for name, probs in draws.guide_probs.items():
        sample_stats[f"{name}_guide_probs"] = (("datum", f"{name}_category"), probs.cpu().numpy())
    attrs = {
        "created_by": "pyro_vae",
        "pyro_vae_version": _version(),
        "inference_library": "pyro",
        "inference_library_version": pyro.__version__,
        "num_samples": num_samples,
        "sampling": "importance sampling with the guide q(z|x) as proposal",
        # Global latent sites fixed at the guide's plug-in value: every density is then given them.
        "conditional_on": " ".join(pair.conditional_on),
    }
    groups = {
        "posterior": posterior,
        "log_likelihood": {name: (sample_dims, per_draw(v)) for name, v in draws.log_lik.items()},
        "sample_stats": sample_stats,
        "observed_data": {
            name: (("datum", f"{name}_dim"), v.cpu().numpy()) for name, v in draws.observed.items()
        },
    }
    return _inference_data(groups, coords=coords, attrs=attrs)


def _version() -> str:
    from ..version import __version__

    return __version__


def _inference_data(
    groups: dict[str, dict[str, tuple[tuple[str, ...], np.ndarray]]],
    *,
    coords: dict[str, Any],
    attrs: dict[str, Any],
) -> InferenceDataLike:
    """The ArviZ object from {group: {variable: (dims, values)}}.

    Each group is an xarray Dataset with the shared coords (and 0..d-1 for
    every other dim) and ``attrs``; :func:`~pyro_vae.io.arviz_compat.make_inference_data`
    puts them in the installed ArviZ's container. ``arviz.from_dict`` is not
    used: it wants (chain, draw) leading every variable, which the per-datum
    ``khat`` and ``log_px`` do not have.
    """
    datasets = {}
    for group, variables in groups.items():
        used = {dim for dims, _ in variables.values() for dim in dims}
        sizes = {dim: v.shape[i] for dims, v in variables.values() for i, dim in enumerate(dims)}
        group_coords = {dim: coords[dim] if dim in coords else np.arange(sizes[dim]) for dim in used}
        datasets[group] = xarray.Dataset(
            {name: (dims, values) for name, (dims, values) in variables.items()},
            coords=group_coords,
            attrs=attrs,
        )
    return make_inference_data(datasets, attrs=attrs)


def export_run(
    run_dir: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    num_samples: int = 1000,
    split: str = "test",
    indices: Sequence[int] | None = None,
    limit: int = 16,
    seed: int = 0,
    chunk_size: int = 1000,
    device: DeviceLike = "cpu",
) -> Path:
    """Write the importance samples of a trained run to the netCDF file ``path``; returns the path.

    Exports the data points ``indices`` of ``split`` (default: the first
    ``limit`` of them; ``indices``, when given, replaces ``limit``) with
    :func:`to_inference_data`. With the default first ``limit`` points the
    ``log_px`` of the file are those of ``pyro-vae evaluate RUN_DIR --limit
    LIMIT --num-samples K --seed SEED``. The file is written under a temporary
    name and renamed, so ``path`` is never left half-written.
    """
    from .run import load_run

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise PyroVAEError(f"num_samples must be a positive integer, got {num_samples!r}")
    if indices is None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise PyroVAEError(
            f"limit must be a positive integer (how many data points to export), got {limit!r}"
        )
    run = load_run(run_dir, device=device)
    data = run.data(split)
    num_data = data.shape[0]
    if indices is None:
        chosen = list(range(min(limit, num_data)))
    else:
        chosen = list(indices)
        if not chosen:
            raise PyroVAEError("indices is empty; give at least one data point to export, or leave it out")
        bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int | np.integer)]
        if bad:
            raise PyroVAEError(f"indices must be integers, got {bad[:5]}")
        outside = [int(i) for i in chosen if not 0 <= i < num_data]
        if outside:
            raise PyroVAEError(
                f"indices {outside[:5]} are out of range: the {split} split has {num_data} data points, "
                f"numbered 0..{num_data - 1}"
            )
        if len(set(chosen)) != len(chosen):
            raise PyroVAEError("indices must not repeat a data point")
    x = data[torch.as_tensor(chosen, dtype=torch.long)].to(device)
    idata = to_inference_data(
        run.vae.model,
        run.vae.guide,
        x,
        num_samples=num_samples,
        data_indices=chosen,
        seed=seed,
        chunk_size=chunk_size,
    )
    for group in group_names(idata):
        idata[group].attrs.update(run_dir=str(run.path), split=split)
    idata.attrs.update(run_dir=str(run.path), split=split)
    path = Path(path)
    replace_atomic(path, lambda tmp: write_netcdf(idata, tmp))
    return path
