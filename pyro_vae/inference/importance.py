r"""Importance-sampled estimates of log p(x), the bounds below it, and their diagnostics.

For every data point x_i, with K samples z_k ~ q(z | x_i) from the guide and
log-weights log w_k = log p(x_i, z_k) - log q(z_k | x_i)::

    ELBO     = (1/K) sum_k log w_k
    IWAE-k   = mean over the K // k disjoint groups G of  log (1/k) sum_{k in G} w_k
    log p̂(x) = log (1/K) sum_k w_k                                 (= IWAE-K)

On average ELBO <= IWAE-5 <= IWAE-50 <= ... <= log p̂(x), and log p̂(x)
converges to log p(x) as K grows (Burda et al., 2016). The standard error of
log p̂(x) comes from the delta method: sd(w) / (sqrt(K) mean(w)). The Pareto
k̂ of the weights (PSIS, Vehtari et al., 2024) says when that error cannot be
trusted: above 0.7 the weights have too heavy a tail for the estimate to
converge at a usable rate.

log p(x_i, z) and log q(z | x_i) come from Pyro traces of any model/guide
pair whose data points sit in ``pyro.plate("data", ...)``: the guide is
traced inside an outer plate over particles and the model replayed on its
samples; every site's log-density is summed over everything but the
particle and data dimensions (Pyro's own ``vectorized_importance_weights``
sums the data dimension away, so it cannot give per-datum values).

References:
    Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
    Vehtari, Simpson, Gelman, Yao & Gabry, "Pareto Smoothed Importance
    Sampling", JMLR 25(72), 2024.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import pyro
import torch
from pyro import poutine
from tqdm.auto import tqdm

from .._typing import ModelFn
from ..components.kernels import AUTO_ROWS, compiled_kernels
from ..errors import PyroVAEError, PyroVAETypeError
from .bounds import Bounds, default_iwae_ks
from .conditioning import PerDatumPair, per_datum_pair
from .layers import latent_layers
from .progress import log_chunk
from .psis import MIN_SAMPLES_FOR_KHAT, psis_khat
from .traces import MAX_MEMORY, LogWeights, chunked_passes, traced_weights

__all__ = [
    "check_sampling_args",
    "evaluate_bounds",
    "latent_layers_within",
    "log_marginal",
    "plan_importance_passes",
]

LOGGER = logging.getLogger("pyro_vae.inference")


def check_sampling_args(
    x: torch.Tensor,
    *,
    num_samples: int,
    chunk_size: int,
    data_chunk_size: int | None,
    model: object = None,
    max_memory: int | None = None,
) -> None:
    """Reject, with a sentence each, the arguments every importance-sampling pass over ``x`` shares.

    ``x`` must be a non-empty floating-point tensor with real storage (not on
    the meta device), in float32 or float64 but not half precision, whose
    K log-weights per datum of a data chunk fit in memory
    (:func:`~pyro_vae.resources.evaluation_bytes`); ``max_memory`` must be a whole
    number of bytes or None (:func:`~pyro_vae.resources.check_memory_budget`). With ``model`` (the model
    function; a bound method of an ``nn.Module`` is checked against that
    module) ``x`` must also have the module's dtype and be data it can score:
    :func:`~pyro_vae.models.abilities.check_data`, its width, finite values and
    the support of its likelihood (grey values on a Bernoulli model are refused).
    """
    from ..models.abilities import check_data  # models import inference: imported when first used
    from ..resources import check_fits, check_memory_budget, evaluation_bytes

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise PyroVAEError(f"num_samples must be a positive integer, got {num_samples!r}")
    if chunk_size < 1:
        raise PyroVAEError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if data_chunk_size is not None and data_chunk_size < 1:
        raise PyroVAEError(f"data_chunk_size must be a positive integer or None, got {data_chunk_size!r}")
    check_memory_budget(max_memory)
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise PyroVAEError("x must be a non-empty tensor whose first dimension indexes data points")
    if x.device.type == "meta":
        raise PyroVAEError("x is on the meta device, which holds shapes but no values; pass data with values")
    if x.dtype not in (torch.float32, torch.float64):
        raise PyroVAETypeError(
            f"x must be float32 (or float64 for a float64 model), got {x.dtype}; use x.float()"
        )
    need = evaluation_bytes(
        num_samples=num_samples, num_data=x.shape[0], chunk_size=chunk_size, data_chunk_size=data_chunk_size
    )
    check_fits(
        need, device=x.device, what=f"importance sampling with K={num_samples}", advice="lower the samples K"
    )
    module = getattr(model, "__self__", None)
    if isinstance(module, torch.nn.Module):
        weight = next(iter(module.parameters()), None)
        if weight is not None and weight.is_floating_point() and weight.dtype != x.dtype:
            raise PyroVAETypeError(
                f"x is {x.dtype} but the model's weights are {weight.dtype}; convert the data with "
                f"x.to({weight.dtype}) (x.float() for a float32 model)"
            )
        check_data(module, x)


def evaluate_bounds(
    model: ModelFn,
    guide: ModelFn,
    x: torch.Tensor,
    *,
    num_samples: int,
    chunk_size: int = 1000,
    data_chunk_size: int | None = None,
    max_memory: int | None = MAX_MEMORY,
    iwae_ks: Sequence[int] | None = None,
    diagnostics: bool = True,
    progress: bool | None = None,
    compile: bool | None = None,
) -> Bounds:
    """ELBO, IWAE-k, log p̂(x) with its standard error, and PSIS diagnostics, per data point.

    Draws ``num_samples`` samples z ~ q(z | x_i) for every point of ``x`` [N, ...]
    in vectorized passes of ``chunk_size`` particles over ``data_chunk_size``
    data points (default: as many as keep a pass near 65k particle-datum rows),
    on ``x``'s device, with no Python loop over data points. The K log-weights
    of a data chunk are held in float64 (K x data_chunk_size numbers) and
    reduced at once. ``iwae_ks`` defaults to 1, 5, 50, ... up to K.

    ``max_memory`` (bytes; default 2 GiB, :data:`~pyro_vae.inference.traces.MAX_MEMORY`)
    bounds what a pass and its chunk's log-weights add to the memory in use: one
    pass on a few rows measures the model's bytes per (datum, particle) row and
    the passes are shrunk to fit (:func:`~pyro_vae.resources.plan_passes`;
    ``chunk_size`` and ``data_chunk_size`` are upper bounds), or, when not one row
    fits, :class:`PyroVAEError` says so; ``None``: no budget. A plain VAE's default
    passes fit in the default budget and are kept; a 500-component mixture or
    VampPrior gets fewer rows per pass.

    Randomness comes from torch's global generator (the measuring pass runs on a
    fork of it); the same seed, budget and chunk sizes give the same numbers. The
    draws depend on how the passes are cut, so a budget that changes the pass
    sizes gives another draw of the same estimator: the numbers then agree within
    their Monte-Carlo error, not to the last digit (keeping the stream apart from
    the pass sizes would need a generator per datum, which one vectorized draw
    cannot have). ``compile`` runs the likelihood's elementwise log-density as
    one fused kernel (:mod:`pyro_vae.kernels`); ``None`` does so for evaluations
    of at least ``kernels.AUTO_ROWS`` (datum, sample) rows, where the seconds
    spent compiling are won back.

    The pair is validated first (:func:`~pyro_vae.inference.validate_pair`):
    a guide that does not match its model raises :class:`PyroVAEError`
    instead of giving a number. A model with global latents (sites outside the
    data plate) is evaluated at the guide's plug-in value g* of them, as
    log p(x_i | g*) (:mod:`pyro_vae.inference.conditioning`); the bounds name
    those sites in ``conditional_on``.

    Discrete sites marked ``infer={"enumerate": "parallel"}`` are summed out
    exactly (:mod:`pyro_vae.inference.traces`): log p̂(x) = log (1/K) sum_k
    sum_c p(x, z_k^c, c) / q(z_k^c | x, c), every particle holding one draw
    z_k^c ~ q(z | x, c) per component, all components in one vectorized pass;
    the IWAE-k bounds, the standard error and the PSIS k̂ are those of the
    per-particle weights sum_c w_k^c (the continuous part), and ``elbo`` is the
    ELBO that TraceEnum_ELBO trains, sum_c q(c | x) E_q[log p(x, z, c) -
    log q(z | x, c) - log q(c | x)]. A model whose only latent is enumerated is
    scored exactly, every particle alike.
    """
    check_sampling_args(
        x,
        num_samples=num_samples,
        chunk_size=chunk_size,
        data_chunk_size=data_chunk_size,
        model=model,
        max_memory=max_memory,
    )
    ks = sorted(set(default_iwae_ks(num_samples) if iwae_ks is None else iwae_ks))
    if any(k < 1 or k > num_samples for k in ks):
        raise PyroVAEError(f"every IWAE k must lie in 1..num_samples={num_samples}, got {ks}")
    pair = per_datum_pair(model, guide, x)
    chunks: list[Bounds] = []
    show = sys.stderr.isatty() if progress is None else progress  # the bar draws on stderr
    fuse = x.shape[0] * num_samples >= AUTO_ROWS if compile is None else compile

    one_pass = _weights_pass(pair)

    def bar(data_chunks: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
        return tqdm(data_chunks, disable=not show, desc="log p(x)", unit="chunk", file=sys.stderr)

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
    LOGGER.debug(
        "log p(x) passes: %d particles x %d data points, %.0f bytes a row measured, budget %s bytes",
        sizes.particles,
        sizes.data,
        sizes.row_bytes,
        max_memory,
    )
    done, start = 0, time.perf_counter()
    with torch.no_grad(), pyro.validation_enabled(False), poutine.block(), compiled_kernels(fuse):
        for passes in chunked_passes(
            one_pass,
            x,
            num_samples=num_samples,
            chunk_size=sizes.particles,
            data_chunk_size=sizes.data,
            wrap=bar,
        ):
            log_w = torch.cat([p.log_w for p in passes])  # [K, n] float64
            elbo = torch.cat([p.elbo for p in passes])  # [K, n] float64
            chunks.append(
                _reduce(log_w, ks, diagnostics=diagnostics, conditional_on=pair.conditional_on, elbo=elbo)
            )
            done += log_w.shape[1]
            # A line per chunk on the package's logger (the command line shows it when piped).
            log_chunk(f"log p(x), K = {num_samples}", done=done, total=x.shape[0], start=start)
    return Bounds.concatenate(chunks)


def _weights_pass(pair: PerDatumPair) -> Any:
    """One vectorized pass of the evaluator: the log-weights of ``k`` particles for each datum of ``xs``."""

    def one_pass(xs: torch.Tensor, k: int) -> LogWeights:
        return traced_weights(
            pair.model, pair.guide, xs, num_samples=k, max_plate_nesting=pair.max_plate_nesting
        )

    return one_pass


def plan_importance_passes(
    model: ModelFn,
    guide: ModelFn,
    x: torch.Tensor,
    *,
    num_samples: int,
    chunk_size: int = 1000,
    data_chunk_size: int | None = None,
    max_memory: int | None = MAX_MEMORY,
    pair: PerDatumPair | None = None,
) -> Any:
    """The passes :func:`evaluate_bounds` makes over ``x`` with these arguments (a ``PassSizes``).

    Whoever draws the evaluator's samples again (:func:`~pyro_vae.io.export.to_inference_data`) takes
    these sizes, so that the same seed gives the same draws, and the same memory budget bounds them.
    ``pair`` is ``per_datum_pair(model, guide, x)`` when the caller has it already.
    """
    # resources imports inference: imported when first used
    from ..resources import plan_passes, structure_key

    return plan_passes(
        _weights_pass(per_datum_pair(model, guide, x) if pair is None else pair),
        x,
        num_samples=num_samples,
        chunk_size=chunk_size,
        data_chunk_size=data_chunk_size,
        max_memory=max_memory,
        what=f"importance sampling with K={num_samples}",
        cache_key=structure_key(model, guide),
    )


def _reduce(
    log_w: torch.Tensor,
    ks: Sequence[int],
    *,
    diagnostics: bool,
    conditional_on: tuple[str, ...] = (),
    elbo: torch.Tensor | None = None,
) -> Bounds:
    """The bounds of one chunk of data from its log-weights ``log_w`` [K, n] float64, moved to the CPU.

    ``elbo`` [K, n] holds each particle's ELBO term where it differs from log w (a guide that enumerates a
    discrete site: its ELBO weighs the components by q(c | x), the weight sums them); default ``log_w``.
    """
    num_samples = log_w.shape[0]
    log_px = torch.logsumexp(log_w, 0) - math.log(num_samples)
    iwae = {}
    for k in ks:
        groups = num_samples // k
        grouped = log_w[: groups * k].reshape(groups, k, -1)  # [G, k, n]
        iwae[k] = (torch.logsumexp(grouped, 1) - math.log(k)).mean(0).cpu()
    # Delta method on w / max(w), which leaves sd(w) / mean(w) unchanged and cannot overflow.
    w = torch.exp(log_w - log_w.max(0).values)  # [K, n]
    if num_samples > 1:
        stderr = w.std(0) / (w.mean(0) * math.sqrt(num_samples))
    else:
        stderr = torch.full_like(log_px, math.nan)
    ess = khat = None
    if diagnostics:
        normalized = torch.softmax(log_w, 0)
        ess = (1.0 / normalized.pow(2).sum(0)).cpu()
        if num_samples >= MIN_SAMPLES_FOR_KHAT:
            khat = psis_khat(log_w)
        else:
            khat = torch.full((log_w.shape[1],), math.nan, dtype=torch.float64)
    return Bounds(
        elbo=(log_w if elbo is None else elbo).mean(0).cpu(),
        iwae=iwae,
        log_px=log_px.cpu(),
        log_px_stderr=stderr.cpu(),
        khat=khat,
        ess=ess,
        num_samples=num_samples,
        conditional_on=conditional_on,
    )


def log_marginal(
    model: ModelFn,
    guide: ModelFn,
    x: torch.Tensor,
    *,
    num_samples: int,
    chunk_size: int = 1000,
    data_chunk_size: int | None = None,
    max_memory: int | None = MAX_MEMORY,
) -> torch.Tensor:
    """log p̂(x_i) = logsumexp_k [log p(x_i, z_k) - log q(z_k | x_i)] - log K for every datum: [N] float64.

    The ``log_px`` of :func:`evaluate_bounds` (validation and global latents included), without the rest.
    """
    return evaluate_bounds(
        model,
        guide,
        x,
        num_samples=num_samples,
        chunk_size=chunk_size,
        data_chunk_size=data_chunk_size,
        max_memory=max_memory,
        iwae_ks=[1],
        diagnostics=False,
        progress=False,
    ).log_px


def latent_layers_within(
    model: ModelFn,
    guide: ModelFn,
    x: torch.Tensor,
    *,
    num_samples: int = 100,
    max_memory: int | None = MAX_MEMORY,
) -> list[dict[str, Any]]:
    """:func:`~pyro_vae.inference.latent_layers` with its data chunks sized to the budget ``max_memory``.

    Its pass over a chunk draws all K = ``num_samples`` samples of each datum at once; the chunk is as
    many data points as the passes of :func:`evaluate_bounds` would take (at most :func:`rows_per_pass` / K)
    that keep the pass under the budget, measured the same way (:func:`~pyro_vae.resources.plan_passes`).
    """
    from ..resources import plan_passes  # resources imports inference: imported when first used

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise PyroVAEError(f"num_samples must be a positive integer, got {num_samples!r}")
    sizes = plan_passes(
        lambda xs, k: latent_layers(model, guide, xs, num_samples=k, data_chunk_size=xs.shape[0]),
        x,
        num_samples=num_samples,
        chunk_size=num_samples,
        max_memory=max_memory,
        held_bytes_per_sample=0,
        split_particles=False,
        what=f"the per-layer KL with K={num_samples}",
    )
    return latent_layers(model, guide, x, num_samples=num_samples, data_chunk_size=sizes.data)
