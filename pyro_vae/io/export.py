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
from dataclasses import dataclass
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
from ..inference.importance import check_sampling_args
from ..inference.psis import MIN_SAMPLES_FOR_KHAT, psis_khat
from ..inference.traces import chunked_passes, site_log_density, traced_log_weights
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


def _one_pass(model: ModelFn, guide: ModelFn, x: torch.Tensor, *, num_samples: int, nesting: int) -> _Draws:
    # traced_log_weights traces the guide in the particle plate and replays the model; the inner tracers
    # keep those very traces, sample for sample, so nothing is drawn here that the evaluator does not draw.
    guide_tracer, model_tracer = poutine.trace(guide), poutine.trace(model)
    traced_log_weights(model_tracer, guide_tracer, x, num_samples=num_samples, max_plate_nesting=nesting)
    guide_trace = prune_subsample_sites(guide_tracer.trace)
    model_trace = prune_subsample_sites(model_tracer.trace)
    particle_dim = -nesting - 1

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
    )


def _draw(
    model: ModelFn,
    guide: ModelFn,
    x: torch.Tensor,
    *,
    num_samples: int,
    chunk_size: int,
    data_chunk_size: int,
    nesting: int,
) -> _Draws:
    # The loop of evaluate_bounds, so that the same seed and chunk sizes give its samples.
    with torch.no_grad(), pyro.validation_enabled(False), poutine.block():
        chunks = [
            _cat(passes, dim=0)
            for passes in chunked_passes(
                lambda xs, k: _one_pass(model, guide, xs, num_samples=k, nesting=nesting),
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
    ``data_chunk_size`` data points, exactly as in
    :func:`~pyro_vae.evaluation.evaluate_bounds`: with torch seeded to the same
    value, ``log_px`` is :func:`~pyro_vae.evaluation.log_marginal` of the same
    ``x`` up to float64 round-off. ``seed`` seeds torch for this call only (the
    global stream is restored afterwards); ``None`` draws from the global stream.
    """
    check_sampling_args(x, num_samples=num_samples, chunk_size=chunk_size, data_chunk_size=data_chunk_size)
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

    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        draws = _draw(
            pair.model,
            pair.guide,
            x,
            num_samples=num_samples,
            chunk_size=chunk_size,
            data_chunk_size=data_chunk_size,
            nesting=pair.max_plate_nesting,
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
        name: ((*sample_dims, f"{name}_dim"), per_draw(value)) for name, value in draws.latents.items()
    }
    sample_stats = {
        "log_weight": (sample_dims, per_draw(log_w)),
        "log_prior": (sample_dims, per_draw(draws.log_prior)),
        "log_q": (sample_dims, per_draw(draws.log_q)),
        "log_px": (("datum",), log_px.cpu().numpy()),
        "khat": (("datum",), khat.cpu().numpy()),
    }
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
