r"""Bidirectional Monte Carlo: a stochastic sandwich of log p(x) on data simulated from the model.

Draw (z_i, x_i) ~ p(z) p(x | z) for i < N. Then z_i is an exact draw from the posterior
p(z | x_i), which is all that reverse AIS needs (Grosse, Ghahramani & Adams, 2015):

- forward AIS from f_0 = q(z | x_i) to p(z | x_i) (:func:`~pyro_vae.inference.ais.ais`) has
  E[w] = p(x_i), so ``lower`` = log (1/C) sum_c w_c satisfies E[lower] <= log p(x_i);
- reverse AIS starts at the exact z_i and runs the same transitions backwards, from β = 1
  to β = 0; its weights w' = prod_t f_{t-1}(z_t) / f_t(z_t) have E[w'] = 1 / p(x_i), so
  ``upper`` = -log (1/C) sum_c w'_c satisfies E[upper] >= log p(x_i).

``gap`` = upper - lower bounds (in expectation) how far *any* of the two estimates, and
any estimator at least as good as forward AIS, is from the truth on such data; it shrinks
to 0 as the number of annealing steps grows. Both directions share the schedule and the
step sizes, adapted on a pilot run of forward chains of their own (see
:mod:`~pyro_vae.inference.ais`), and the reverse chains of a datum all start at its one
exact z.

The simulated data come from the model itself (the guide only gives the proposal), so the
sandwich says how good the *evaluator* is for this model, not how well the model fits real
data. Global latents are held at the guide's plug-in value, as everywhere.

References:
    Grosse, Ghahramani & Adams, "Sandwiching the marginal likelihood using bidirectional
    Monte Carlo", arXiv:1511.02543, 2015.
    Wu, Burda, Salakhutdinov & Grosse, "On the quantitative analysis of decoder-based
    generative models", ICLR 2017 (BDMC for VAE decoders).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from ..components.kernels import compiled_kernels
from ..errors import PyroVAEError
from .ais import (
    AnnealingPath,
    AnnealingSettings,
    anneal,
    annealing_schedule,
    budgeted_chunk_rows,
    check_continuous,
    fuse_kernels,
    parameters_frozen,
    pilot_step_sizes,
)
from .conditioning import PerDatumPair, per_datum_pair
from .progress import ChunkProgress
from .traces import MAX_MEMORY

__all__ = ["BDMCResult", "bdmc", "simulate"]


@dataclass(frozen=True)
class BDMCResult:
    """Per-datum forward (lower) and reverse (upper) AIS estimates on simulated data: float64 [N] on the CPU."""

    lower: torch.Tensor
    upper: torch.Tensor
    x: torch.Tensor  # the simulated data [N, ...]
    latents: dict[str, torch.Tensor]  # their exact latents, data dimension first [N, ...]
    num_chains: int
    num_steps: int
    conditional_on: tuple[str, ...] = ()

    @property
    def gap(self) -> torch.Tensor:
        return self.upper - self.lower

    @property
    def num_data(self) -> int:
        return self.lower.shape[0]

    def summary(self) -> dict[str, Any]:
        """Means over the simulated data, in nats."""
        return {
            "num_data": self.num_data,
            "lower": float(self.lower.mean()),
            "upper": float(self.upper.mean()),
            "gap": float(self.gap.mean()),
            "num_chains": self.num_chains,
            "num_steps": self.num_steps,
        }


def simulate(
    pair: PerDatumPair, like: torch.Tensor, num: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``num`` draws (x_i, z_i) ~ p(z) p(x | z): the data [num, ...] and the latents ``{site: [num, ...]}``.

    Each latent's value has its data dimension moved to the front.

    The model is traced on ``num`` rows of ``like`` (only their shape matters) with its observed
    site drawn instead of observed (``poutine.uncondition``); it must observe one site in the
    data plate, of the rows' shape.
    """
    rows = like[torch.arange(num, device=like.device) % like.shape[0]]
    with torch.no_grad(), poutine.block():
        trace = prune_subsample_sites(poutine.trace(poutine.uncondition(pair.model)).get_trace(rows))
    observed = [s for s in trace.nodes.values() if s["type"] == "sample" and s["infer"].get("was_observed")]
    if len(observed) != 1 or observed[0]["value"].shape != rows.shape:
        raise PyroVAEError(
            f"simulating data needs a model that observes one site of the data's shape {list(rows.shape)}, but "
            f"this one observes {', '.join(repr(s['name']) for s in observed) or 'none'}; evaluate it on real "
            "data with --method ais instead"
        )
    latents = {}
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["infer"].get("was_observed"):
            data_dim = next(f.dim for f in site["cond_indep_stack"] if f.name == "data")
            batch_rank = site["value"].dim() - len(site["fn"].event_shape)
            latents[name] = site["value"].movedim(batch_rank + data_dim, 0)
    return observed[0]["value"], latents


def bdmc(
    model: Any,
    guide: Any,
    like: torch.Tensor,
    *,
    num_data: int | None = None,
    settings: AnnealingSettings = AnnealingSettings(),  # noqa: B008 (frozen)
    data_chunk_size: int | None = None,
    progress: bool | None = None,
    fast: bool = True,
    compile: bool | None = None,
    max_memory: int | None = MAX_MEMORY,
) -> BDMCResult:
    """Forward and reverse AIS on ``num_data`` points simulated from ``model`` (default: as many as ``like``).

    ``like`` [M, ...] is data of the model's shape; the pair is validated on it. Refuses models
    with discrete latents. Draws from torch's global generator. ``fast`` and ``compile`` are
    :func:`~pyro_vae.inference.ais.ais`'s, and so is ``max_memory``.
    """
    if not isinstance(like, torch.Tensor) or like.dim() < 1 or like.shape[0] == 0:
        raise PyroVAEError("like must be a non-empty tensor whose first dimension indexes data points")
    num = like.shape[0] if num_data is None else num_data
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise PyroVAEError(f"num_data must be a positive integer, got {num_data!r}")
    pair = per_datum_pair(model, guide, like)
    check_continuous(pair, like, method="bidirectional Monte Carlo")
    x, latents = simulate(pair, like, num)
    betas = annealing_schedule(settings.num_steps, kind=settings.schedule)
    size = budgeted_chunk_rows(pair, x, settings, data_chunk_size, fast=fast, max_memory=max_memory)
    starts = range(0, num, size)
    passes = 3 if settings.pilot_chains else 2
    fuse = fuse_kernels(settings, like, num, passes=2) if compile is None else compile
    lower, upper = [], []
    with (
        pyro.validation_enabled(False),
        poutine.block(),
        compiled_kernels(fuse),
        parameters_frozen(model, guide),
        ChunkProgress(
            desc="BDMC",
            num_data=num,
            total_steps=len(starts) * passes * max(settings.num_steps - 1, 0),
            show=progress,
        ) as bar,
    ):
        for start in starts:
            xs = x[start : start + size]
            step_sizes = pilot_step_sizes(pair, xs, betas, settings=settings, progress=bar, fast=fast)
            path = AnnealingPath(pair, xs, num_chains=settings.num_chains, start=settings.start, fast=fast)
            log_w, _, _ = anneal(
                path, path.draw_start(), betas, settings=settings, step_sizes=step_sizes, progress=bar
            )
            exact = path.space.flatten(_site_values(path, latents, start))
            log_w_reverse, _, _ = anneal(
                path, exact, betas.flip(0), settings=settings, step_sizes=step_sizes.flip(0), progress=bar
            )
            log_c = math.log(settings.num_chains)
            lower.append((torch.logsumexp(log_w, 0) - log_c).cpu())
            upper.append((log_c - torch.logsumexp(log_w_reverse, 0)).cpu())
            bar.chunk_done(xs.shape[0], f"mean gap {float((upper[-1] - lower[-1]).mean()):.3f} nats")
    return BDMCResult(
        lower=torch.cat(lower),
        upper=torch.cat(upper),
        x=x.cpu(),
        latents={name: value.cpu() for name, value in latents.items()},
        num_chains=settings.num_chains,
        num_steps=settings.num_steps,
        conditional_on=pair.conditional_on,
    )


def _site_values(
    path: AnnealingPath, latents: dict[str, torch.Tensor], start: int
) -> dict[str, torch.Tensor]:
    """The chunk's rows of ``latents`` (data dimension first) in the layout of the path's sites."""
    values = {}
    for site in path.space.sites:
        rows = latents[site.name][start : start + path.space.num_data]  # [n, ...]
        event_rank = len(site.shape) - site.batch_rank
        # The data dimension's place counted from the right of the batch dims, as in the particle plate.
        position = rows.dim() - event_rank + (site.data_pos - site.batch_rank)
        values[site.name] = rows.movedim(0, position)
    return values
