r"""The inference gaps of an amortized guide (Cremer, Li & Duvenaud, 2018), per data point.

For a guide family Q (here: the guide's own distributions, Normal per site) and an encoder
that picks q_φ(z | x) in Q::

    log p(x) - ELBO(q_φ)  =  [log p(x) - ELBO(q*)]  +  [ELBO(q*) - ELBO(q_φ)]
                          =  approximation gap      +  amortization gap,

where q* is the best member of Q for that one datum, ELBO(q) = E_q[log p(x, z) - log q(z)].
The approximation gap is what the family costs, the amortization gap what sharing one
encoder across the data costs.

- ``log_px``: the best estimate the run affords, AIS (:func:`~pyro_vae.inference.ais.ais`;
  a stochastic lower bound that is tight as its steps grow) or importance sampling at large K.
- ``elbo``: the encoder's ELBO, a mean over ``elbo_samples`` draws.
- ``elbo_optimized``: the ELBO of q*, found per datum by Adam over the guide's distribution
  parameters, started at the encoder's output: every guide site's Normal(loc, scale) is
  replaced (a Pyro messenger) by Normal(loc_i, exp(log_scale_i)) with free tensors [n, ...],
  optimized all at once (Adam is elementwise, so the data points do not interact) on the
  reparameterized ELBO of ``optimize_samples`` draws per step (its path derivative, whose
  noise vanishes at the exact posterior), the learning rate decayed to 0 on a cosine; then its
  ELBO over ``elbo_samples`` fresh draws.

Each estimate carries Monte-Carlo error; an approximation gap slightly below 0 is that error
(or ``log_px`` short of the truth), not a better-than-exact guide. Only guides whose sites are
(independent) Normals whose parameters depend on x alone are supported: a site that depends
on the draws of other sites has no per-datum parameters to free.

References:
    Cremer, Li & Duvenaud, "Inference suboptimality in variational autoencoders", ICML 2018.
    Kingma & Ba, "Adam: a method for stochastic optimization", ICLR 2015.
    Roeder, Wu & Duvenaud, "Sticking the landing: simple, lower-variance gradient estimators
    for variational inference", NeurIPS 2017.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger

from ..errors import PyroVAEError
from .ais import AnnealingSettings, ais, check_continuous, parameters_frozen
from .conditioning import PerDatumPair, per_datum_pair
from .importance import log_marginal
from .progress import ChunkProgress
from .traces import MAX_MEMORY, PARTICLE_PLATE, chunked_passes, rows_per_pass, traced_log_weights

__all__ = ["GapSettings", "GapsResult", "gaps"]

# (datum, particle) rows of one data chunk whose guide parameters are optimized together (a training batch,
# not an evaluation pass: its size sets how many optimizations run, so it stays what it was measured at).
OPTIMIZED_ROWS = 1 << 16

LOG_PX_METHODS = ("ais", "is")


@dataclass(frozen=True)
class GapSettings:
    """How the per-datum guide is optimized, and how each ELBO and log p(x) is estimated."""

    optimize_steps: int = 500
    learning_rate: float = 0.05  # Adam's, on loc and log scale; decayed to 0 on a cosine
    optimize_samples: int = 8  # reparameterized draws per datum in each step's ELBO
    elbo_samples: int = 1000  # draws behind each reported ELBO (error ~ sd(log w) / sqrt(K))
    log_px_method: Literal["ais", "is"] = "ais"
    is_samples: int = 5000  # K of log p̂(x) when log_px_method == "is"

    def __post_init__(self) -> None:
        for name in ("optimize_steps", "optimize_samples", "elbo_samples", "is_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PyroVAEError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.learning_rate, int | float) and 0 < self.learning_rate < math.inf):
            raise PyroVAEError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if self.log_px_method not in LOG_PX_METHODS:
            raise PyroVAEError(
                f"log_px_method must be one of {', '.join(LOG_PX_METHODS)}, got {self.log_px_method!r}"
            )


@dataclass(frozen=True)
class GapsResult:
    """Per-datum log p̂(x), ELBOs and gaps in nats: float64 [N] on the CPU."""

    log_px: torch.Tensor
    elbo: torch.Tensor
    elbo_optimized: torch.Tensor
    log_px_method: str  # "ais", "is", or "given" (passed in by the caller)
    conditional_on: tuple[str, ...] = ()

    @property
    def approximation_gap(self) -> torch.Tensor:
        return self.log_px - self.elbo_optimized

    @property
    def amortization_gap(self) -> torch.Tensor:
        return self.elbo_optimized - self.elbo

    @property
    def num_data(self) -> int:
        return self.log_px.shape[0]

    def summary(self) -> dict[str, Any]:
        """Means over the data, in nats."""
        return {
            "num_data": self.num_data,
            "log_px": float(self.log_px.mean()),
            "elbo": float(self.elbo.mean()),
            "elbo_optimized": float(self.elbo_optimized.mean()),
            "approximation_gap": float(self.approximation_gap.mean()),
            "amortization_gap": float(self.amortization_gap.mean()),
        }


def _normal(fn: Any, name: str) -> tuple[torch.distributions.Normal, int]:
    """The Normal inside ``fn`` (unwrapping ``.to_event``) and how many dims were reinterpreted."""
    reinterpreted = 0
    base = fn
    while isinstance(base, torch.distributions.Independent):
        reinterpreted += base.reinterpreted_batch_ndims
        base = base.base_dist
    if not isinstance(base, torch.distributions.Normal):
        raise PyroVAEError(
            f"the inference gaps optimize a per-datum guide of the guide's own family, which is supported for "
            f"Normal sites only, but the guide's site {name!r} is a {type(fn).__name__}; use a diagonal "
            "Normal guide (--guide diagonal), or compare evaluators with --method ais"
        )
    return base, reinterpreted


class _PathDerivativeNormal(dist.Normal):
    """A Normal whose ``log_prob`` sees its parameters detached: the ELBO's gradient keeps only its path term.

    E_q[∇_φ log q_φ(z)] = 0, so dropping that score term leaves the gradient unbiased and makes it
    exactly 0 at a q equal to the posterior (log p(x, z) - log q(z) constant in z): "sticking the
    landing" (Roeder, Wu & Duvenaud, 2017), so that Adam started at the optimum stays there.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return dist.Normal(self.loc.detach(), self.scale.detach()).log_prob(value)


class FreeNormals(Messenger):
    """Each named guide site drawn from Normal(loc, exp(log_scale)).to_event(k) with the given tensors."""

    def __init__(self, parameters: Mapping[str, tuple[torch.Tensor, torch.Tensor, int]]) -> None:
        super().__init__()
        self.parameters = parameters

    def _pyro_sample(self, msg: Any) -> None:
        if msg["name"] in self.parameters:
            loc, log_scale, reinterpreted = self.parameters[msg["name"]]
            # Batch [n, ...] here; the particle plate, further out, broadcasts it to [C, n, ...].
            msg["fn"] = _PathDerivativeNormal(loc, log_scale.exp()).to_event(reinterpreted)


def _initial_parameters(
    pair: PerDatumPair, xs: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """The encoder's loc and log scale of every guide site for the data ``xs``, refusing what cannot be freed."""
    particle_dim = -pair.max_plate_nesting - 1
    with torch.no_grad():
        plain = poutine.trace(pair.guide).get_trace(xs)
        with pyro.plate(PARTICLE_PLATE, 2, dim=particle_dim):
            paired = poutine.trace(pair.guide).get_trace(xs)
    parameters = {}
    for name, site in plain.nodes.items():
        if site["type"] != "sample" or type(site["fn"]).__name__ == "_Subsample":
            continue
        base, reinterpreted = _normal(site["fn"], name)
        twice, _ = _normal(paired.nodes[name]["fn"], name)
        for tensor in (twice.loc, twice.scale):
            extra = tensor.dim() - base.loc.dim()
            if extra > 0 and tensor.shape[0] == 2 and not torch.equal(tensor[0], tensor[1]):
                raise PyroVAEError(
                    f"the guide's site {name!r} depends on the draws of other latent sites, so it has no "
                    "per-datum parameters to optimize; the inference gaps need a guide whose every site "
                    "depends on x alone"
                )
        shape = site["fn"].batch_shape + site["fn"].event_shape
        loc = base.loc.expand(shape).detach().clone()
        log_scale = base.scale.expand(shape).detach().log().clone()
        parameters[name] = (loc, log_scale, reinterpreted)
    return parameters


def _elbo(
    pair: PerDatumPair, guide: Any, xs: torch.Tensor, *, num_samples: int, max_memory: int | None = MAX_MEMORY
) -> torch.Tensor:
    """(1/K) sum_k [log p(x_i, z_k) - log q(z_k | x_i)] over ``num_samples`` draws, in particle chunks: [n]."""

    def one_pass(chunk: torch.Tensor, k: int) -> torch.Tensor:
        log_w = traced_log_weights(
            pair.model, guide, chunk, num_samples=k, max_plate_nesting=pair.max_plate_nesting
        )[0]
        return log_w.sum(0)  # [n] float64

    from ..resources import plan_passes  # resources imports inference: imported when first used

    # Passes of at most rows_per_pass rows over all of xs, fewer particles where the default budget says so.
    sizes = plan_passes(
        one_pass,
        xs,
        num_samples=num_samples,
        chunk_size=max(1, rows_per_pass(xs) // xs.shape[0]),
        data_chunk_size=xs.shape[0],
        held_bytes_per_sample=0,
        split_data=False,  # the optimized guide's parameters are those of all of xs
        max_memory=max_memory,
        what=f"the ELBO with {num_samples} draws",
    )
    with torch.no_grad():
        (passes,) = chunked_passes(
            one_pass, xs, num_samples=num_samples, chunk_size=sizes.particles, data_chunk_size=xs.shape[0]
        )
    return torch.stack(passes).sum(0) / num_samples


def optimized_elbo(
    pair: PerDatumPair,
    xs: torch.Tensor,
    *,
    settings: GapSettings,
    progress: ChunkProgress | None = None,
    max_memory: int | None = MAX_MEMORY,
) -> torch.Tensor:
    """ELBO(q*_i) [n] float64 of the per-datum optimized guide, started at the encoder's output."""
    parameters = _initial_parameters(pair, xs)
    free = FreeNormals(parameters)
    guide = free(pair.guide)
    leaves = [
        tensor.requires_grad_() for loc, log_scale, _ in parameters.values() for tensor in (loc, log_scale)
    ]
    optimizer = torch.optim.Adam(leaves, lr=settings.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.optimize_steps)
    for _ in range(settings.optimize_steps):
        log_w = traced_log_weights(
            pair.model,
            guide,
            xs,
            num_samples=settings.optimize_samples,
            max_plate_nesting=pair.max_plate_nesting,
        )[0]  # [S, n] float64
        # The sum over data of per-datum ELBOs: each datum's parameters get their own ELBO's gradient.
        # autograd.grad, not backward: the model's own parameters must not collect gradients.
        grads = torch.autograd.grad(-log_w.mean(0).sum(), leaves)
        for leaf, grad in zip(leaves, grads, strict=True):
            leaf.grad = grad
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress.step()
    for leaf in leaves:
        leaf.requires_grad_(False)
    return _elbo(pair, guide, xs, num_samples=settings.elbo_samples, max_memory=max_memory)


def gaps(
    model: Any,
    guide: Any,
    x: torch.Tensor,
    *,
    settings: GapSettings = GapSettings(),
    annealing: AnnealingSettings = AnnealingSettings(),  # noqa: B008 (frozen)
    data_chunk_size: int | None = None,
    progress: bool | None = None,
    log_px: torch.Tensor | None = None,
    max_memory: int | None = MAX_MEMORY,
) -> GapsResult:
    """log p̂(x), the encoder's ELBO and the optimized guide's ELBO for every point of ``x`` [N, ...].

    The gaps are the result's ``approximation_gap`` and ``amortization_gap``. ``annealing``
    configures log p̂(x) when ``settings.log_px_method == "ais"``. ``log_px`` [N] passes an
    estimate made already for these same data (say the ``log_px`` of an :func:`ais` run on
    ``x``), which is then used instead of a new one (``log_px_method`` "given"). Draws from
    torch's global generator. ``max_memory`` (bytes; None: none) bounds the passes of the evaluations
    (log p̂(x) by IS or AIS, both ELBOs) as :func:`~pyro_vae.inference.evaluate_bounds` bounds its own;
    the optimization's steps (``optimize_samples`` draws over a chunk of ``data_chunk_size`` points, with
    gradients) are sized by ``data_chunk_size`` alone.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise PyroVAEError("x must be a non-empty tensor whose first dimension indexes data points")
    if data_chunk_size is not None and (isinstance(data_chunk_size, bool) or data_chunk_size < 1):
        raise PyroVAEError(f"data_chunk_size must be a positive integer or None, got {data_chunk_size!r}")
    if log_px is not None and not (
        isinstance(log_px, torch.Tensor)
        and log_px.shape == (x.shape[0],)
        and bool(torch.isfinite(log_px).all())
    ):
        raise PyroVAEError(
            f"log_px must be a finite tensor of one estimate per data point, shape [{x.shape[0]}], got "
            f"{list(log_px.shape) if isinstance(log_px, torch.Tensor) else type(log_px).__name__}; pass the "
            "log_px of an evaluation of these same data, or None to estimate it here"
        )
    pair = per_datum_pair(model, guide, x)
    check_continuous(pair, x, method="the inference gaps")
    _initial_parameters(pair, x[:2])  # refuse a guide that cannot be freed before any long computation
    method: str = settings.log_px_method
    if log_px is not None:
        log_px, method = log_px.detach().double().cpu(), "given"
    elif settings.log_px_method == "ais":
        log_px = ais(model, guide, x, settings=annealing, progress=progress, max_memory=max_memory).log_px
    else:
        log_px = log_marginal(model, guide, x, num_samples=settings.is_samples, max_memory=max_memory)
    size = data_chunk_size or max(1, OPTIMIZED_ROWS // (16 * settings.optimize_samples))
    chunks = x.split(size)
    elbo, elbo_optimized = [], []
    with (
        pyro.validation_enabled(False),
        poutine.block(),
        parameters_frozen(model, guide),  # the steps move the per-datum guide, never the model
        ChunkProgress(
            desc="optimized guide",
            num_data=x.shape[0],
            total_steps=len(chunks) * settings.optimize_steps,
            show=progress,
        ) as bar,
    ):
        for xs in chunks:
            elbo.append(
                _elbo(pair, pair.guide, xs, num_samples=settings.elbo_samples, max_memory=max_memory).cpu()
            )
            elbo_optimized.append(
                optimized_elbo(pair, xs, settings=settings, progress=bar, max_memory=max_memory).cpu()
            )
            bar.chunk_done(
                xs.shape[0], f"mean amortization gap {float((elbo_optimized[-1] - elbo[-1]).mean()):.3f}"
            )
    return GapsResult(
        log_px=log_px,
        elbo=torch.cat(elbo),
        elbo_optimized=torch.cat(elbo_optimized),
        log_px_method=method,
        conditional_on=pair.conditional_on,
    )
