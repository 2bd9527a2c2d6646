r"""Per-datum log-densities from Pyro traces of any model/guide pair.

The guide is traced inside an outer plate over particles and the model
replayed on its samples; every site's log-density is summed over everything
but the particle and data dimensions, so each data point keeps its own
log-weight log w[k, i] = log p(x_i, z_k) - log q(z_k | x_i). (Pyro's own
``vectorized_importance_weights`` sums the data dimension away, so it cannot
give per-datum values.) Every evaluator, the IWAE objective and the export
read their numbers from here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import pyro
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites

from .._typing import ModelFn
from ..errors import PyroVAEError

__all__ = [
    "PARTICLE_PLATE",
    "ROWS_PER_PASS",
    "chunked_passes",
    "dry_traces",
    "log_weights",
    "paired_traces",
    "plate_nesting",
    "site_log_density",
    "traced_log_weights",
]

# Particle x datum rows per vectorized pass when data_chunk_size is not given:
# bounds memory to about rows x (decoder width) floats.
ROWS_PER_PASS = 1 << 16
PARTICLE_PLATE = "_eval_particles"

T = TypeVar("T")


def chunked_passes(
    one_pass: Callable[[torch.Tensor, int], T],
    x: torch.Tensor,
    *,
    num_samples: int,
    chunk_size: int,
    data_chunk_size: int | None = None,
    wrap: Callable[[Iterable[torch.Tensor]], Iterable[torch.Tensor]] = lambda chunks: chunks,
) -> Iterator[list[T]]:
    """For each chunk of data of ``x``, the results of ``one_pass(xs, k)`` over its passes of k particles.

    The one loop order of every sampling evaluator (data chunks outside, particle chunks of at most
    ``chunk_size`` inside), so that the same seed and chunk sizes consume the random stream identically:
    the export's draws are the evaluator's samples. ``data_chunk_size`` defaults to as many data points as
    keep a pass near ``ROWS_PER_PASS`` particle-datum rows; ``wrap`` wraps the data chunks (a progress bar).
    """
    chunk_size = min(chunk_size, num_samples)
    if data_chunk_size is None:
        data_chunk_size = max(1, ROWS_PER_PASS // chunk_size)
    for xs in wrap(x.split(data_chunk_size)):
        yield [
            one_pass(xs, min(chunk_size, num_samples - start)) for start in range(0, num_samples, chunk_size)
        ]


def paired_traces(model: ModelFn, guide: ModelFn, args: tuple, kwargs: dict) -> tuple[Trace, Trace]:
    """The guide's trace and the model's trace replayed on its samples, plate subsample sites pruned."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)


def dry_traces(model: ModelFn, guide: ModelFn, args: tuple, kwargs: dict) -> tuple[Trace, Trace]:
    """:func:`paired_traces` for inspecting structure: hidden from outer handlers, random stream untouched."""
    devices = [x.device for x in args if isinstance(x, torch.Tensor) and x.device.type == "cuda"]
    with torch.random.fork_rng(devices=devices[:1]), poutine.block():
        return paired_traces(model, guide, args, kwargs)


def plate_nesting(model: ModelFn, guide: ModelFn, args: tuple, kwargs: dict) -> int:
    # A dry run to find how many plates nest; it must not move the random stream the evaluation uses.
    guide_trace, model_trace = dry_traces(model, guide, args, kwargs)
    dims = [
        -frame.dim
        for trace in (guide_trace, model_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.dim is not None
    ]
    return max(dims, default=0)


def site_log_density(site: dict[str, Any], *, particle_dim: int) -> torch.Tensor:
    """log-density of one site summed over all but the particle and data dims: [S, n]."""
    frames = {frame.name: frame for frame in site["cond_indep_stack"]}
    if "data" not in frames:
        raise PyroVAEError(
            f"sample site {site['name']!r} is outside pyro.plate('data', ...): per-datum log-weights need every "
            "sample site of the model and guide inside the data plate (the evaluators fix global latents at "
            "the guide's plug-in value first: pyro_vae.inference.per_datum_pair)"
        )
    data_dim = frames["data"].dim
    log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    mask = site["mask"]
    if mask is not None and mask is not True:
        log_p = torch.where(torch.as_tensor(mask, device=log_p.device), log_p, log_p.new_zeros(()))
    if log_p.dim() > -particle_dim:
        raise PyroVAEError(
            f"sample site {site['name']!r} has batch shape {list(log_p.shape)} with dimensions in no plate; "
            "declare them with pyro.plate or move them into the event with .to_event()"
        )
    log_p = log_p.reshape((1,) * (-particle_dim - log_p.dim()) + log_p.shape)
    other = [d for d in range(particle_dim, 0) if d not in (particle_dim, data_dim)]
    if other:
        log_p = log_p.sum(dim=other, keepdim=True)
    return log_p.squeeze(tuple(other)) if other else log_p


def traced_log_weights(
    model: ModelFn,
    guide: ModelFn,
    *args: Any,
    num_samples: int,
    max_plate_nesting: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, float]:
    """log w[k, i] = log p(x_i, z_k) - log q(z_k | x_i) from one vectorized pass: ([K, M] float64, N / M).

    The guide is traced inside an outer plate of ``num_samples`` particles and the
    model replayed on its samples, both called with ``*args, **kwargs``. The
    log-densities are unscaled (neither the data plate's N / M nor a
    ``poutine.scale`` enters them), and differentiable when grad is enabled; the
    second value is the data plate's N / M for a minibatch of M out of N.
    """
    if num_samples < 1:
        raise PyroVAEError(f"num_samples must be a positive integer, got {num_samples}")
    if max_plate_nesting is None:
        max_plate_nesting = plate_nesting(model, guide, args, kwargs)
    particle_dim = -max_plate_nesting - 1
    with pyro.plate(PARTICLE_PLATE, num_samples, dim=particle_dim):
        guide_trace, model_trace = paired_traces(model, guide, args, kwargs)
    log_w: torch.Tensor | float = 0.0
    scale, size = 1.0, None
    for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
        for site in trace.nodes.values():
            if site["type"] != "sample" or (sign < 0 and site["is_observed"]):
                continue
            log_p = site_log_density(site, particle_dim=particle_dim)  # [S or 1, M or 1]
            log_w = log_w + sign * log_p.double()
            frame = next(f for f in site["cond_indep_stack"] if f.name == "data")
            size = frame.size
            scale = (frame.full_size or frame.size) / frame.size
    if size is None:
        raise PyroVAEError("the model has no sample sites; there is nothing to weigh")
    return torch.as_tensor(log_w).expand(num_samples, size), scale


def log_weights(model: ModelFn, guide: ModelFn, x: torch.Tensor, *, num_samples: int) -> torch.Tensor:
    """log p(x_i, z_k) - log q(z_k | x_i) for k < ``num_samples``, in one vectorized pass: [K, N] float64.

    ``model(x)`` and ``guide(x)`` are called with the data [N, ...] only; see
    :func:`traced_log_weights` for other signatures.
    """
    return traced_log_weights(model, guide, x, num_samples=num_samples)[0]
