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

import math
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from tqdm.auto import tqdm

from ._typing import ModelFn
from .kernels import AUTO_ROWS, compiled_kernels

__all__ = [
    "Bounds",
    "check_sampling_args",
    "default_iwae_ks",
    "evaluate_bounds",
    "latent_layers",
    "log_marginal",
    "log_weights",
    "traced_log_weights",
]

# Particle x datum rows per vectorized pass when data_chunk_size is not given:
# bounds memory to about rows x (decoder width) floats.
_ROWS_PER_PASS = 1 << 16
_PARTICLE_PLATE = "_eval_particles"
# PSIS needs a tail to fit: below this many samples k̂ is not estimated.
_MIN_SAMPLES_FOR_KHAT = 20


def default_iwae_ks(num_samples: int) -> list[int]:
    """1, 5, 50, 500, 5000, ... up to ``num_samples``."""
    ks, k = [1], 5
    while k <= num_samples:
        ks.append(k)
        k *= 10
    return ks


def _paired_traces(model: ModelFn, guide: ModelFn, args: tuple, kwargs: dict) -> tuple[Trace, Trace]:
    """The guide's trace and the model's trace replayed on its samples, plate subsample sites pruned."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)


def _dry_traces(model: ModelFn, guide: ModelFn, args: tuple, kwargs: dict) -> tuple[Trace, Trace]:
    """:func:`_paired_traces` for inspecting structure: hidden from outer handlers, random stream untouched."""
    devices = [x.device for x in args if isinstance(x, torch.Tensor) and x.device.type == "cuda"]
    with torch.random.fork_rng(devices=devices[:1]), poutine.block():
        return _paired_traces(model, guide, args, kwargs)


def _max_plate_nesting(model: ModelFn, guide: ModelFn, args: tuple, kwargs: dict) -> int:
    # A dry run to find how many plates nest; it must not move the random stream the evaluation uses.
    guide_trace, model_trace = _dry_traces(model, guide, args, kwargs)
    dims = [
        -frame.dim
        for trace in (guide_trace, model_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.dim is not None
    ]
    return max(dims, default=0)


def _site_log_density(site: dict[str, Any], *, particle_dim: int) -> torch.Tensor:
    """log-density of one site summed over all but the particle and data dims: [S, n]."""
    frames = {frame.name: frame for frame in site["cond_indep_stack"]}
    if "data" not in frames:
        raise ValueError(
            f"sample site {site['name']!r} is outside pyro.plate('data', ...): per-datum log p(x) needs every "
            "sample site of the model and guide inside the data plate"
        )
    data_dim = frames["data"].dim
    log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    mask = site["mask"]
    if mask is not None and mask is not True:
        log_p = torch.where(torch.as_tensor(mask, device=log_p.device), log_p, log_p.new_zeros(()))
    if log_p.dim() > -particle_dim:
        raise ValueError(
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
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    if max_plate_nesting is None:
        max_plate_nesting = _max_plate_nesting(model, guide, args, kwargs)
    particle_dim = -max_plate_nesting - 1
    with pyro.plate(_PARTICLE_PLATE, num_samples, dim=particle_dim):
        guide_trace, model_trace = _paired_traces(model, guide, args, kwargs)
    log_w: torch.Tensor | float = 0.0
    scale, size = 1.0, None
    for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
        for site in trace.nodes.values():
            if site["type"] != "sample" or (sign < 0 and site["is_observed"]):
                continue
            log_p = _site_log_density(site, particle_dim=particle_dim)  # [S or 1, M or 1]
            log_w = log_w + sign * log_p.double()
            frame = next(f for f in site["cond_indep_stack"] if f.name == "data")
            size = frame.size
            scale = (frame.full_size or frame.size) / frame.size
    if size is None:
        raise ValueError("the model has no sample sites; there is nothing to weigh")
    return torch.as_tensor(log_w).expand(num_samples, size), scale


def log_weights(model: ModelFn, guide: ModelFn, x: torch.Tensor, *, num_samples: int) -> torch.Tensor:
    """log p(x_i, z_k) - log q(z_k | x_i) for k < ``num_samples``, in one vectorized pass: [K, N] float64.

    ``model(x)`` and ``guide(x)`` are called with the data [N, ...] only; see
    :func:`traced_log_weights` for other signatures.
    """
    return traced_log_weights(model, guide, x, num_samples=num_samples)[0]


@dataclass(frozen=True)
class Bounds:
    """Per-datum estimates from one set of K importance samples; every tensor is float64 [N]."""

    elbo: torch.Tensor
    iwae: dict[int, torch.Tensor]
    log_px: torch.Tensor
    log_px_stderr: torch.Tensor
    khat: torch.Tensor | None
    ess: torch.Tensor | None
    num_samples: int

    @property
    def num_data(self) -> int:
        return self.log_px.shape[0]

    @classmethod
    def concatenate(cls, parts: Sequence[Bounds]) -> Bounds:
        """The bounds of consecutive slices of a data set, joined in order (all with the same K)."""
        if not parts or len({part.num_samples for part in parts}) != 1:
            raise ValueError("concatenate needs one or more Bounds, all from the same number of samples")

        def cat(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
            return None if any(t is None for t in tensors) else torch.cat(tensors)  # type: ignore[arg-type]

        return cls(
            elbo=torch.cat([part.elbo for part in parts]),
            iwae={k: torch.cat([part.iwae[k] for part in parts]) for k in parts[0].iwae},
            log_px=torch.cat([part.log_px for part in parts]),
            log_px_stderr=torch.cat([part.log_px_stderr for part in parts]),
            khat=cat([part.khat for part in parts]),
            ess=cat([part.ess for part in parts]),
            num_samples=parts[0].num_samples,
        )

    def summary(self, *, data_dim: int | None = None, bits_scale: float = 1.0) -> dict[str, Any]:
        """Per-datum means in nats, as reported in papers.

        ``log_px_stderr`` is the Monte-Carlo error of the mean log p̂(x);
        ``nll = -log_px``; ``bits_per_dim = nll / (data_dim ln 2)`` when
        ``data_dim`` is given (``bits_scale`` adds a constant number of nats per
        dimension, e.g. ln 256 for data scaled from 0..255 to [0, 1]).
        """
        n = self.num_data
        log_px = float(self.log_px.mean())
        out: dict[str, Any] = {
            "elbo": float(self.elbo.mean()),
            "iwae": {str(k): float(v.mean()) for k, v in self.iwae.items()},
            "log_px": log_px,
            "log_px_stderr": float(self.log_px_stderr.pow(2).sum().sqrt() / n),
            "nll": -log_px,
            "bits_per_dim": None,
            "khat_max": None,
            "khat_frac_above_0_7": None,
            "num_samples": self.num_samples,
            "num_data": n,
        }
        if data_dim is not None:
            out["bits_per_dim"] = (-log_px / data_dim + math.log(bits_scale)) / math.log(2)
        if self.khat is not None and not torch.isnan(self.khat).all():
            # NaN (too few samples to fit a tail) is left out of both; inf counts as above 0.7.
            known = self.khat[~torch.isnan(self.khat)]
            out["khat_max"] = float(known.max())
            out["khat_frac_above_0_7"] = float((known > 0.7).double().mean())
        return out


def _psis_khat(log_w: torch.Tensor) -> torch.Tensor:
    """Pareto k̂ of each column of ``log_w`` [K, n] with ArviZ's PSIS.

    Columns whose weights are equal up to rounding (an exact posterior as the
    guide) have no tail to fit, and PSIS would return inf for them; their
    importance sampling is perfect, so their k̂ is 0.
    """
    from arviz import psislw

    spread = log_w.max(0).values - log_w.min(0).values
    flat = spread <= 1e-8 * log_w.abs().max(0).values.clamp_min(1.0)
    khat = torch.zeros(log_w.shape[1], dtype=torch.float64)
    if not flat.all():
        with warnings.catch_warnings():
            # ArviZ warns once per call when some k̂ > 0.7; the report says so per datum instead.
            warnings.simplefilter("ignore")
            _, fitted = psislw(log_w[:, ~flat].T.cpu().numpy())
        khat[~flat.cpu()] = torch.as_tensor(np.asarray(fitted, dtype=np.float64)).reshape(-1)
    return khat


def check_sampling_args(
    x: torch.Tensor, *, num_samples: int, chunk_size: int, data_chunk_size: int | None
) -> None:
    """Reject, with a sentence each, the arguments every importance-sampling pass over ``x`` shares."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if data_chunk_size is not None and data_chunk_size < 1:
        raise ValueError(f"data_chunk_size must be a positive integer or None, got {data_chunk_size!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError("x must be a non-empty tensor whose first dimension indexes data points")


def evaluate_bounds(
    model: ModelFn,
    guide: ModelFn,
    x: torch.Tensor,
    *,
    num_samples: int,
    chunk_size: int = 1000,
    data_chunk_size: int | None = None,
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
    reduced at once. ``iwae_ks`` defaults to 1, 5, 50, ... up to K. Randomness
    comes from torch's global generator; the same seed and chunk sizes give the
    same numbers. ``compile`` runs the likelihood's elementwise log-density as
    one fused kernel (:mod:`pyro_vae.kernels`); ``None`` does so for evaluations
    of at least ``kernels.AUTO_ROWS`` (datum, sample) rows, where the seconds
    spent compiling are won back.
    """
    check_sampling_args(x, num_samples=num_samples, chunk_size=chunk_size, data_chunk_size=data_chunk_size)
    ks = sorted(set(default_iwae_ks(num_samples) if iwae_ks is None else iwae_ks))
    if any(k < 1 or k > num_samples for k in ks):
        raise ValueError(f"every IWAE k must lie in 1..num_samples={num_samples}, got {ks}")
    chunk_size = min(chunk_size, num_samples)
    if data_chunk_size is None:
        data_chunk_size = max(1, _ROWS_PER_PASS // chunk_size)

    chunks: list[Bounds] = []
    show = sys.stdout.isatty() if progress is None else progress
    fuse = x.shape[0] * num_samples >= AUTO_ROWS if compile is None else compile
    with torch.no_grad(), pyro.validation_enabled(False), poutine.block(), compiled_kernels(fuse):
        nesting = _max_plate_nesting(model, guide, (x[:1],), {})
        for xs in tqdm(
            x.split(data_chunk_size), disable=not show, desc="log p(x)", unit="chunk", file=sys.stderr
        ):
            log_w = torch.cat(
                [
                    traced_log_weights(
                        model,
                        guide,
                        xs,
                        num_samples=min(chunk_size, num_samples - start),
                        max_plate_nesting=nesting,
                    )[0]
                    for start in range(0, num_samples, chunk_size)
                ]
            )  # [K, n] float64
            chunks.append(_reduce(log_w, ks, diagnostics=diagnostics))
    return Bounds.concatenate(chunks)


def _reduce(log_w: torch.Tensor, ks: Sequence[int], *, diagnostics: bool) -> Bounds:
    """The bounds of one chunk of data from its log-weights ``log_w`` [K, n] float64, moved to the CPU."""
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
        if num_samples >= _MIN_SAMPLES_FOR_KHAT:
            khat = _psis_khat(log_w)
        else:
            khat = torch.full((log_w.shape[1],), math.nan, dtype=torch.float64)
    return Bounds(
        elbo=log_w.mean(0).cpu(),
        iwae=iwae,
        log_px=log_px.cpu(),
        log_px_stderr=stderr.cpu(),
        khat=khat,
        ess=ess,
        num_samples=num_samples,
    )


def log_marginal(
    model: ModelFn,
    guide: ModelFn,
    x: torch.Tensor,
    *,
    num_samples: int,
    chunk_size: int = 1000,
    data_chunk_size: int | None = None,
) -> torch.Tensor:
    """log p̂(x_i) = logsumexp_k [log p(x_i, z_k) - log q(z_k | x_i)] - log K for every datum: [N] float64."""
    return evaluate_bounds(
        model,
        guide,
        x,
        num_samples=num_samples,
        chunk_size=chunk_size,
        data_chunk_size=data_chunk_size,
        iwae_ks=[1],
        diagnostics=False,
        progress=False,
    ).log_px


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
      posterior mean does not move with x carries no information about it.

    Returns one dict per layer, lowest first: ``{"site", "dim", "kl", "active_units"}``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    data_chunk_size = data_chunk_size or max(1, _ROWS_PER_PASS // num_samples)
    kl: dict[str, list[torch.Tensor]] = {}
    means: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad(), pyro.validation_enabled(False), poutine.block():
        nesting = _max_plate_nesting(model, guide, (x[:1],), {})
        particle_dim = -nesting - 1
        for xs in x.split(data_chunk_size):
            with pyro.plate(_PARTICLE_PLATE, num_samples, dim=particle_dim):
                guide_trace, model_trace = _paired_traces(model, guide, (xs,), {})
            for name, site in guide_trace.nodes.items():
                if site["type"] != "sample" or site["is_observed"]:
                    continue
                log_q = _site_log_density(site, particle_dim=particle_dim)
                log_p = _site_log_density(model_trace.nodes[name], particle_dim=particle_dim)
                kl.setdefault(name, []).append((log_q - log_p).double().mean(0).cpu())  # [n]
                means.setdefault(name, []).append(_posterior_mean(site, num_samples, xs.shape[0]).cpu())
    layers = []
    for name in sorted(kl, key=_layer_order):
        posterior_means = torch.cat(means[name])  # [N, d]
        activity = posterior_means.var(0, unbiased=False)  # [d]
        layers.append(
            {
                "site": name,
                "dim": posterior_means.shape[1],
                "kl": float(torch.cat(kl[name]).mean()),
                "active_units": int((activity > threshold).sum()),
            }
        )
    return layers
