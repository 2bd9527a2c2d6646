r"""Per-datum log-densities from Pyro traces of any model/guide pair.

The guide is traced inside an outer plate over particles and the model
replayed on its samples; every site's log-density is summed over everything
but the particle and data dimensions, so each data point keeps its own
log-weight log w[k, i] = log p(x_i, z_k) - log q(z_k | x_i). (Pyro's own
``vectorized_importance_weights`` sums the data dimension away, so it cannot
give per-datum values.) Every evaluator, the IWAE objective and the export
read their numbers from here.

Discrete sites marked ``infer={"enumerate": "parallel"}`` are summed out
exactly rather than sampled: each takes all its values at once in a dimension
left of the particle plate (``poutine.enum``), the guide's first, then those
only the model draws. For a guide q(c | x) q(z | x, c) every particle k holds
one draw z_k^c ~ q(z | x, c) for each c, and its weight sums over c::

    log w[k, i] = log sum_c p(x_i, z_k^c, c) / q(z_k^c | x_i, c)

an unbiased estimate of p(x_i) with no q(c | x) in it (and, for a site only
the model draws, log sum_c p(x_i, z_k, c) / q(z_k | x_i)). An enumerated
site must sit in the data plate and in no other plate
(:func:`~pyro_vae.inference.validate_pair` refuses others): then every term
that depends on it belongs to one data point, and the sum over c may follow
the sum of the terms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pyro
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites

from .._typing import ModelFn
from ..errors import PyroVAEError

__all__ = [
    "CPU_PASS_BYTES",
    "MAX_MEMORY",
    "MIN_ROWS_PER_PASS",
    "PARTICLE_PLATE",
    "ROWS_PER_PASS",
    "LogWeights",
    "chunked_passes",
    "data_per_pass",
    "dry_traces",
    "enumerated_dim",
    "log_weights",
    "paired_traces",
    "plate_nesting",
    "rows_per_pass",
    "site_log_density",
    "traced_log_weights",
    "traced_weights",
]

# Particle x datum rows per vectorized pass when data_chunk_size is not given (rows_per_pass): as many as
# keep the per-datum tensors of a pass few enough for the machine. On a CPU that is CPU_PASS_BYTES for a
# [rows, D] float32 tensor of data width D (the decoder's output): glibc's malloc serves freed blocks up to
# 32 MiB again, but maps a larger one fresh for every pass, a page fault per 4 KiB. Measured on MNIST
# (benchmarks/README.md): K=5000 over 100 images takes 1.27 s in passes of 8000 rows, 2.13 s in passes of
# 16,000 and 1.41 s in passes of 4000 (more passes, the same arithmetic). Narrow data (the 64-pixel digits)
# keep ROWS_PER_PASS rows, where the passes' Python work would otherwise dominate.
ROWS_PER_PASS = 1 << 16
CPU_PASS_BYTES = 24 * 1024**2
MIN_ROWS_PER_PASS = 1 << 10
# The memory an importance-sampling pass may add (``max_memory``, ``--max-memory``), by default: 2 GiB. The
# passes are sized to it from the model's measured bytes per row (pyro_vae.resources.plan_passes), so a model
# whose rows are dear (a 500-component mixture or VampPrior: [rows, 500, latent] in log p(z)) gets fewer of
# them per pass; a plain VAE's 65k rows fit and keep their passes.
MAX_MEMORY = 2 * 1024**3
PARTICLE_PLATE = "_eval_particles"

T = TypeVar("T")


def rows_per_pass(x: torch.Tensor) -> int:
    """(datum, particle) rows of a vectorized pass over data ``x`` [N, D] when neither caller nor budget says.

    ``ROWS_PER_PASS`` on a GPU (whose caching allocator keeps its blocks, and which a pass must fill); on a
    CPU, fewer where a [rows, D] float32 tensor would pass ``CPU_PASS_BYTES``, and at least
    ``MIN_ROWS_PER_PASS``.
    """
    if x.device.type != "cpu":
        return ROWS_PER_PASS
    width = max(1, math.prod(x.shape[1:]))  # floats of one datum
    return max(MIN_ROWS_PER_PASS, min(ROWS_PER_PASS, CPU_PASS_BYTES // (4 * width)))


def data_per_pass(x: torch.Tensor, particles: int) -> int:
    """Data points of ``x`` a pass of ``particles`` particles takes by default: :func:`rows_per_pass` rows."""
    return max(1, rows_per_pass(x) // particles)


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
    keep a pass near :func:`rows_per_pass` particle-datum rows; ``wrap`` wraps the data chunks (a progress bar).
    """
    chunk_size = min(chunk_size, num_samples)
    if data_chunk_size is None:
        data_chunk_size = data_per_pass(x, chunk_size)
    for xs in wrap(x.split(data_chunk_size)):
        yield [
            one_pass(xs, min(chunk_size, num_samples - start)) for start in range(0, num_samples, chunk_size)
        ]


def paired_traces(
    model: ModelFn, guide: ModelFn, args: tuple, kwargs: dict, *, enum_dim: int | None = None
) -> tuple[Trace, Trace]:
    """The guide's trace and the model's trace replayed on its samples, plate subsample sites pruned.

    With ``enum_dim`` (a negative dim) the sites marked ``infer={"enumerate": "parallel"}`` take all
    their values at once, the guide's from ``enum_dim`` leftwards, then the model's own further left.
    """
    if enum_dim is not None:
        guide = poutine.enum(guide, first_available_dim=enum_dim)
        model = poutine.enum(model)  # no first dim: it allocates left of the guide's enumerated dims
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


def enumerated_dim(site: dict[str, Any]) -> int | None:
    """The (negative) dim in which an enumerated site holds its values, or None for a site not enumerated."""
    dim = site["infer"].get("_enumerate_dim")
    return None if dim is None else int(dim)


def site_log_density(site: dict[str, Any], *, particle_dim: int, enum_dims: int = 0) -> torch.Tensor:
    """log-density of one site summed over all but the particle and data dims: [S, n].

    ``enum_dims`` enumeration dims left of the particle dim are kept: [E_1, ..., E_e, S, n], each 1
    where the site does not depend on that enumerated site.
    """
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
    rank = enum_dims - particle_dim  # enumeration dims, then the particle dim and the plates right of it
    if log_p.dim() > rank:
        raise PyroVAEError(
            f"sample site {site['name']!r} has batch shape {list(log_p.shape)} with dimensions in no plate; "
            "declare them with pyro.plate or move them into the event with .to_event()"
        )
    log_p = log_p.reshape((1,) * (rank - log_p.dim()) + log_p.shape)
    other = [d for d in range(particle_dim, 0) if d not in (particle_dim, data_dim)]
    if other:
        log_p = log_p.sum(dim=other, keepdim=True)
    return log_p.squeeze(tuple(other)) if other else log_p


@dataclass(frozen=True)
class LogWeights:
    """What one vectorized pass of :func:`traced_weights` gives, per particle k and data point i."""

    # log w[k, i] = log p(x_i, z_k) - log q(z_k | x_i), enumerated sites summed out: [K, M] float64.
    log_w: torch.Tensor
    # The ELBO's term of particle k, [K, M] float64: log w[k, i] without enumeration; with it,
    # sum_c q(c | x_i) [log p(x_i, z_k^c, c) - log q(z_k^c | x_i, c) - log q(c | x_i)], the sites only the
    # model enumerates summed inside the logarithm (what TraceEnum_ELBO estimates).
    elbo: torch.Tensor
    # The data plate's N / M for a minibatch of M out of N.
    scale: float


def traced_weights(
    model: ModelFn,
    guide: ModelFn,
    *args: Any,
    num_samples: int,
    max_plate_nesting: int | None = None,
    **kwargs: Any,
) -> LogWeights:
    """The log-weights and ELBO terms of ``num_samples`` particles per data point, from one vectorized pass.

    The guide is traced inside an outer plate of ``num_samples`` particles and the
    model replayed on its samples, both called with ``*args, **kwargs``; enumerated
    sites take all their values in dims left of that plate and are summed out (see
    the module's docstring). The log-densities are unscaled (neither the data plate's
    N / M nor a ``poutine.scale`` enters them), and differentiable when grad is enabled.
    """
    if num_samples < 1:
        raise PyroVAEError(f"num_samples must be a positive integer, got {num_samples}")
    if max_plate_nesting is None:
        max_plate_nesting = plate_nesting(model, guide, args, kwargs)
    particle_dim = -max_plate_nesting - 1
    with pyro.plate(PARTICLE_PLATE, num_samples, dim=particle_dim):
        guide_trace, model_trace = paired_traces(model, guide, args, kwargs, enum_dim=particle_dim - 1)
    sites = [
        (sign, site)
        for sign, trace in ((1.0, model_trace), (-1.0, guide_trace))
        for site in trace.nodes.values()
        if site["type"] == "sample" and not (sign < 0 and site["is_observed"])
    ]
    # The enumeration dims: the guide's (q(c | x) weighs them in the ELBO), then the model's own.
    dims = [(sign, enumerated_dim(site)) for sign, site in sites]
    guide_dims = {dim for sign, dim in dims if sign < 0 and dim is not None}
    all_dims = {dim for _, dim in dims if dim is not None}
    enum_dims = -min(all_dims) + particle_dim if all_dims else 0
    log_joint: torch.Tensor | float = 0.0  # log p(x, z, c) - log q(z | x, c): [E..., S or 1, M or 1]
    log_q_enum: torch.Tensor | float = 0.0  # log q(c | x) of the guide's enumerated sites: [E..., 1, M or 1]
    scale, size = 1.0, None
    for sign, site in sites:
        log_p = site_log_density(site, particle_dim=particle_dim, enum_dims=enum_dims).double()
        if sign < 0 and enumerated_dim(site) is not None:
            log_q_enum = log_q_enum + log_p  # summed over, not sampled: no -log q(c | x) in the weight
        else:
            log_joint = log_joint + sign * log_p
        frame = next(f for f in site["cond_indep_stack"] if f.name == "data")
        size = frame.size
        scale = (frame.full_size or frame.size) / frame.size
    if size is None:
        raise PyroVAEError("the model has no sample sites; there is nothing to weigh")
    log_joint = torch.as_tensor(log_joint)
    if not enum_dims:
        log_w = log_joint.expand(num_samples, size)
        return LogWeights(log_w=log_w, elbo=log_w, scale=scale)
    rank = enum_dims + 2  # site_log_density's [E_1, ..., E_e, S, M]
    log_joint = log_joint.reshape((1,) * (rank - log_joint.dim()) + log_joint.shape)
    # The enumeration dim d (of the traced tensors) is dim d - particle_dim + e of the [E..., S, M] ones.
    model_only = tuple(d - particle_dim + enum_dims for d in sorted(all_dims - guide_dims))
    guide_pos = tuple(d - particle_dim + enum_dims for d in sorted(guide_dims))
    log_w = torch.logsumexp(log_joint, dim=tuple(range(enum_dims)))
    inner = torch.logsumexp(log_joint, dim=model_only, keepdim=True) if model_only else log_joint
    if guide_pos:
        log_q = torch.as_tensor(log_q_enum)
        log_q = log_q.reshape((1,) * (rank - log_q.dim()) + log_q.shape)
        # 0 * (-inf) at a component of zero probability is 0, not NaN: that term is simply absent.
        weighted = torch.where(log_q > -math.inf, log_q.exp() * (inner - log_q), inner.new_zeros(()))
        elbo = weighted.sum(dim=guide_pos, keepdim=True)
    else:
        elbo = inner
    elbo = elbo.reshape(elbo.shape[enum_dims:])
    return LogWeights(log_w=log_w.expand(num_samples, size), elbo=elbo.expand(num_samples, size), scale=scale)


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
    model replayed on its samples, both called with ``*args, **kwargs``; enumerated
    sites are summed out of each weight (:func:`traced_weights`). The
    log-densities are unscaled (neither the data plate's N / M nor a
    ``poutine.scale`` enters them), and differentiable when grad is enabled; the
    second value is the data plate's N / M for a minibatch of M out of N.
    """
    weights = traced_weights(
        model, guide, *args, num_samples=num_samples, max_plate_nesting=max_plate_nesting, **kwargs
    )
    return weights.log_w, weights.scale


def log_weights(model: ModelFn, guide: ModelFn, x: torch.Tensor, *, num_samples: int) -> torch.Tensor:
    """log p(x_i, z_k) - log q(z_k | x_i) for k < ``num_samples``, in one vectorized pass: [K, N] float64.

    ``model(x)`` and ``guide(x)`` are called with the data [N, ...] only; see
    :func:`traced_log_weights` for other signatures.
    """
    return traced_log_weights(model, guide, x, num_samples=num_samples)[0]
