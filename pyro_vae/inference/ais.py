r"""Annealed importance sampling (AIS) of log p(x), per data point, for any model with continuous latents.

For each data point x, AIS moves C chains from a start distribution f_0 = q(z | x)
(the guide; or the prior p(z)) to the posterior along the geometric path

    f_t(z) = f_0(z)^(1 - β_t) p(x, z)^β_t,      0 = β_0 < β_1 < ... < β_T = 1,

with one Hamiltonian Monte Carlo transition leaving f_t / Z_t invariant after each
intermediate step. With z_0 ~ f_0 and z_t ~ HMC_t(z_{t-1}), each chain's log-weight

    log w = sum_{t=1..T} (β_t - β_{t-1}) [log p(x, z_{t-1}) - log f_0(z_{t-1})]

has E[w] = p(x) (Neal, 2001), so log p̂(x) = log (1/C) sum_c w_c is a stochastic lower bound
(E log p̂(x) <= log p(x)) that reaches log p(x) as T grows, however poor f_0 is. Its
standard error is the delta method's sd(w) / (sqrt(C) mean(w)), the effective sample size
of the final weights 1 / sum_c w̄_c^2 (normalized weights w̄).

The chains live in the unconstrained space of all latent sites of the datum: each site's
value z_s = T_s(u_s) with T_s = ``biject_to(support)`` of the model's distribution there,
and the density of u adds log |det dT_s/du_s| (the same for every f_t, so it cancels in
the weights). Every log-density comes from the model's and guide's own ``.log_prob``, inside
a plate of C particles. On the plain path (``fast=False``) the model and the guide are
conditioned on the chains' values (``poutine.condition``) and traced at every leapfrog
position. The fast path (the default) gives the same numbers with less work per position:
the model runs under a messenger that sets the latent values and keeps each site's
log-density as it goes (no trace is built), and q(z | x), whose parameters come from the
encoder run on x and do not move along the path, is computed once per data chunk and only
its ``.log_prob`` is evaluated at each position. A guide whose later sites depend on the
values of earlier ones (q(z2 | z1, x)) is detected and traced at every position, so that each
site is scored given the chains' values of those. Gradients in u come from autograd; the
leapfrog steps are Pyro's ``velocity_verlet``.

HMC step sizes are one per data point and annealing step, adapted towards an acceptance
rate ``target_accept`` on a separate *pilot* run of ``pilot_chains`` independent chains
(log ε += ADAPT_RATE (acceptance - target) after each step; Pyro's dual averaging converges
to one step size for one fixed target, while here the target moves along the path). The
estimation chains then run with those step sizes, fixed in advance: each transition leaves
its f_t invariant whatever the chains do, so E[w] = p(x) holds exactly. (Adapting on the
estimation chains themselves would make each transition depend on the chain's own past and
bias the estimator, slightly, as Wu et al.'s code accepts.) ``pilot_chains=0`` uses
``step_size`` throughout.

The data are evaluated in chunks of ``data_chunk_size`` points x C chains (default: about
``AIS_ROWS`` rows), vectorized, with no Python loop over data points; the log-weights are
accumulated in float64; everything runs on ``x``'s device.

References:
    Neal, "Annealed importance sampling", Statistics and Computing 11, 2001.
    Wu, Burda, Salakhutdinov & Grosse, "On the quantitative analysis of decoder-based
    generative models", ICLR 2017.
    Grosse, Ghahramani & Adams, "Sandwiching the marginal likelihood using bidirectional
    Monte Carlo", arXiv:1511.02543, 2015 (the sigmoid schedule).
    Neal, "MCMC using Hamiltonian dynamics", Handbook of MCMC, 2011.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pyro
import torch
from pyro import poutine
from pyro.ops.integrator import velocity_verlet
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from torch.distributions import biject_to, constraints
from torch.distributions.transforms import Transform

from ..components.kernels import AUTO_ROWS, compiled_kernels
from ..errors import PyroVAEError
from .conditioning import PerDatumPair, per_datum_pair
from .progress import ChunkProgress
from .traces import MAX_MEMORY, PARTICLE_PLATE, dry_traces, site_log_density

__all__ = [
    "AIS_ROWS",
    "AISResult",
    "AnnealingSettings",
    "ais",
    "annealing_schedule",
    "check_continuous",
    "parameters_frozen",
]

# (datum, chain) rows per vectorized pass: each leapfrog step keeps one autograd graph of the model
# (and guide) over these rows, a few activations of decoder width each.
AIS_ROWS = 1 << 14
# log ε moves by ADAPT_RATE x (acceptance - target) per pilot step: from an acceptance of 0 the step
# size shrinks by e^-0.33 = 0.72 per step, so a start 100x too large is corrected within 15 steps.
ADAPT_RATE = 0.5
STEP_SIZE_RANGE = (1e-5, 10.0)
SCHEDULES = ("sigmoid", "geometric", "linear")
STARTS = ("guide", "prior")


@dataclass(frozen=True)
class AnnealingSettings:
    """The schedule and the HMC transitions of annealed importance sampling (checked when made)."""

    # Each field's metadata["help"] is the line ``pyro-vae evaluate --help`` shows for its flag.
    num_chains: int = field(default=16, metadata={"help": "AIS chains per datum"})
    # T: intermediate distributions, the HMC transitions are T - 1.
    num_steps: int = field(default=500, metadata={"help": "annealing steps T (intermediate distributions)"})
    schedule: Literal["sigmoid", "geometric", "linear"] = field(
        default="sigmoid", metadata={"help": "spacing of the inverse temperatures"}
    )
    start: Literal["guide", "prior"] = field(
        default="guide", metadata={"help": "the start of the path: q(z|x) or p(z)"}
    )
    leapfrog_steps: int = field(default=10, metadata={"help": "leapfrog steps per HMC transition"})
    # The pilot's first step size (and every step's, with pilot_chains=0).
    step_size: float = field(default=0.05, metadata={"help": "the first HMC step size"})
    # Neal (2011): 0.65 is near optimal for HMC.
    target_accept: float = field(default=0.65, metadata={"help": "acceptance the step size adapts to"})
    pilot_chains: int = field(
        default=4, metadata={"help": "chains of the step-size pilot run (0: no adaptation)"}
    )

    def __post_init__(self) -> None:
        for name in ("num_chains", "num_steps", "leapfrog_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PyroVAEError(f"{name} must be a positive integer, got {value!r}")
        if (
            isinstance(self.pilot_chains, bool)
            or not isinstance(self.pilot_chains, int)
            or self.pilot_chains < 0
        ):
            raise PyroVAEError(f"pilot_chains must be a non-negative integer, got {self.pilot_chains!r}")
        if self.schedule not in SCHEDULES:
            raise PyroVAEError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.start not in STARTS:
            raise PyroVAEError(f"start must be one of {', '.join(STARTS)}, got {self.start!r}")
        if not (
            isinstance(self.step_size, int | float) and math.isfinite(self.step_size) and self.step_size > 0
        ):
            raise PyroVAEError(f"step_size must be a positive number, got {self.step_size!r}")
        if not (isinstance(self.target_accept, int | float) and 0 < self.target_accept < 1):
            raise PyroVAEError(f"target_accept must lie strictly between 0 and 1, got {self.target_accept!r}")


def annealing_schedule(num_steps: int, *, kind: str = "sigmoid", delta: float = 4.0) -> torch.Tensor:
    """β_0 = 0 < β_1 < ... < β_T = 1 as float64 [T + 1].

    ``sigmoid`` (Grosse et al., 2015): β_t ∝ σ(δ (2t/T - 1)) rescaled to [0, 1], dense at both
    ends, where the densities change fastest; ``geometric``: β_t = 10^(-4 (T - t) / (T - 1)) for
    t >= 1, dense near 0; ``linear``: t / T.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise PyroVAEError(f"num_steps must be a positive integer, got {num_steps!r}")
    t = torch.arange(num_steps + 1, dtype=torch.float64)
    if kind == "sigmoid":
        s = torch.sigmoid(delta * (2 * t / num_steps - 1))
        return (s - s[0]) / (s[-1] - s[0])
    if kind == "geometric":
        if num_steps == 1:
            return t
        beta = torch.logspace(-4, 0, num_steps, dtype=torch.float64)
        return torch.cat([beta.new_zeros(1), beta])
    if kind == "linear":
        return t / num_steps
    raise PyroVAEError(f"schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")


@dataclass(frozen=True)
class AISResult:
    """Per-datum AIS estimates; every tensor is float64 [N] on the CPU, ``log_weights`` [C, N]."""

    log_px: torch.Tensor
    log_px_stderr: torch.Tensor
    ess: torch.Tensor
    # Mean acceptance rate of the estimation chains' HMC transitions (NaN when T = 1: none).
    accept_rate: torch.Tensor
    log_weights: torch.Tensor
    num_chains: int
    num_steps: int
    conditional_on: tuple[str, ...] = ()

    @property
    def num_data(self) -> int:
        return self.log_px.shape[0]

    @classmethod
    def concatenate(cls, parts: Sequence[AISResult]) -> AISResult:
        """The results of consecutive slices of a data set, in order."""
        first = parts[0]
        return cls(
            log_px=torch.cat([p.log_px for p in parts]),
            log_px_stderr=torch.cat([p.log_px_stderr for p in parts]),
            ess=torch.cat([p.ess for p in parts]),
            accept_rate=torch.cat([p.accept_rate for p in parts]),
            log_weights=torch.cat([p.log_weights for p in parts], dim=1),
            num_chains=first.num_chains,
            num_steps=first.num_steps,
            conditional_on=first.conditional_on,
        )

    def summary(self) -> dict[str, Any]:
        """Means over the data: ``log_px`` (its stderr combined over data), ``nll``, ``accept_rate``."""
        n = self.num_data
        log_px = float(self.log_px.mean())
        return {
            "num_data": n,
            "log_px": log_px,
            "log_px_stderr": float(self.log_px_stderr.pow(2).sum().sqrt() / n),
            "nll": -log_px,
            "num_chains": self.num_chains,
            "num_steps": self.num_steps,
            "accept_rate": float(self.accept_rate.mean()),
        }


def weights_summary(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log (1/C) sum_c w_c, its delta-method standard error, and the ESS, from log w [C, n] float64."""
    num_chains = log_w.shape[0]
    log_px = torch.logsumexp(log_w, 0) - math.log(num_chains)
    w = torch.exp(log_w - log_w.max(0).values)  # sd(w) / mean(w) is unchanged by the scaling
    if num_chains > 1:
        stderr = w.std(0) / (w.mean(0) * math.sqrt(num_chains))
    else:
        stderr = torch.full_like(log_px, math.nan)
    ess = 1.0 / torch.softmax(log_w, 0).pow(2).sum(0)
    return log_px, stderr, ess


def check_continuous(pair: PerDatumPair, x: torch.Tensor, *, method: str) -> None:
    """Refuse, with a sentence, a pair with a latent site whose support is discrete (HMC cannot move it)."""
    guide_trace, model_trace = dry_traces(pair.model, pair.guide, (x[:2],), {})
    for role, trace in (("model", model_trace), ("guide", guide_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or type(site["fn"]).__name__ == "_Subsample":
                continue
            if site["fn"].support.is_discrete:
                raise PyroVAEError(
                    f"{method} moves the latents with Hamiltonian Monte Carlo, which needs continuous latents, "
                    f"but the {role}'s site {name!r} ({type(site['fn']).__name__}) is discrete; evaluate this "
                    "model with importance sampling (--method is), which handles discrete latents"
                )


@dataclass(frozen=True)
class _Site:
    """Where one latent site's values sit in the flat rows [C, n, D_s] of the unconstrained space."""

    name: str
    support: constraints.Constraint
    transform: Transform | None  # unconstrained -> support; None for the identity (real support)
    shape: torch.Size  # the constrained value's shape in the particle plate, [C, ..., n, ...] + event
    batch_rank: int
    data_pos: int  # index of the data dimension in ``shape``
    moved_shape: torch.Size  # the unconstrained value's shape with the data dimension moved to 1


def _component_support(support: constraints.Constraint) -> constraints.Constraint:
    """A mixture's support is its components' (MixtureSameFamily wraps theirs, and biject_to knows only theirs)."""
    while isinstance(support, constraints.MixtureSameFamilyConstraint):
        support = support.base_constraint
    return support


def _unconstrained_base(support: constraints.Constraint) -> bool:
    support = _component_support(support)
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


class LatentSpace:
    """The latent sites of a data chunk as unconstrained rows u_s [C, n, D_s], one dict entry per site."""

    def __init__(self, trace: Trace, names: Sequence[str], *, num_chains: int) -> None:
        self.num_chains = num_chains
        self.sites: list[_Site] = []
        for name in names:
            site = trace.nodes[name]
            fn, value = site["fn"], site["value"]
            batch_rank = value.dim() - len(fn.event_shape)
            data_dim = next(f.dim for f in site["cond_indep_stack"] if f.name == "data")
            transform = None if _unconstrained_base(fn.support) else biject_to(_component_support(fn.support))
            u = value if transform is None else transform.inv(value)
            pos = batch_rank + data_dim
            self.sites.append(
                _Site(name, fn.support, transform, value.shape, batch_rank, pos, u.movedim(pos, 1).shape)
            )
        self.num_data = self.sites[0].shape[self.sites[0].data_pos]

    def flatten(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Constrained values (each broadcastable to its site's shape) -> rows u_s [C, n, D_s], detached."""
        rows = {}
        for s in self.sites:
            value = values[s.name].detach().expand(s.shape)
            u = value if s.transform is None else s.transform.inv(value)
            rows[s.name] = u.movedim(s.data_pos, 1).reshape(self.num_chains, self.num_data, -1)
        return rows

    def unflatten(self, rows: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Rows u_s [C, n, D_s] -> the sites' constrained values and sum_s log |det dT_s/du_s| [C, n]."""
        values: dict[str, torch.Tensor] = {}
        log_det: torch.Tensor | float = 0.0
        for s in self.sites:
            u = rows[s.name].reshape(s.moved_shape).movedim(1, s.data_pos)
            if s.transform is None:
                values[s.name] = u
                continue
            value = s.transform(u)
            values[s.name] = value
            ladj = s.transform.log_abs_det_jacobian(u, value).expand(s.shape[: s.batch_rank])
            log_det = log_det + ladj.movedim(s.data_pos, 1).reshape(self.num_chains, self.num_data, -1).sum(
                -1
            )
        return values, torch.as_tensor(log_det).expand(self.num_chains, self.num_data)

    def in_support(self, values: Mapping[str, torch.Tensor]) -> bool:
        # The support itself: a composed transform's codomain is often just Real.
        return all(bool(s.support.check(values[s.name]).all()) for s in self.sites)


class SiteScores(Messenger):
    """Sets the model's latent sites to the chains' values and keeps every sample site's log-density.

    What ``poutine.condition`` plus ``poutine.trace`` plus :func:`site_log_density` give, with no
    trace built: each latent site takes its value from ``values`` (and is scored, not sampled),
    and after each sample statement its ``fn.log_prob(value)``, summed to [C or 1, n or 1], goes
    to ``latent`` or ``observed`` in the order the model runs. Plate subsample sites are skipped.
    """

    def __init__(self, values: Mapping[str, torch.Tensor], *, particle_dim: int) -> None:
        super().__init__()
        self.values = values
        self.particle_dim = particle_dim
        self.latent: list[torch.Tensor] = []
        self.observed: list[torch.Tensor] = []

    def _pyro_sample(self, msg: Any) -> None:
        if msg["name"] in self.values:
            msg["value"] = self.values[msg["name"]]
            msg["is_observed"] = True

    def _pyro_post_sample(self, msg: Any) -> None:
        if site_is_subsample(msg):
            return
        terms = self.latent if msg["name"] in self.values else self.observed
        terms.append(site_log_density(msg, particle_dim=self.particle_dim))


class AnnealingPath:
    """log f_0(z) and log p(x, z) - log f_0(z) of one data chunk at C chains' values, from traces.

    f_0 is the guide's q(z | x) (``start="guide"``) or the model's prior p(z) (``start="prior"``,
    where the difference is log p(x | z) and the guide is never run).
    """

    def __init__(
        self, pair: PerDatumPair, xs: torch.Tensor, *, num_chains: int, start: str, fast: bool = True
    ) -> None:
        self.pair = pair
        self.xs = xs
        self.num_chains = num_chains
        self.start = start
        self.fast = fast
        self.particle_dim = -pair.max_plate_nesting - 1
        devices = [xs.device] if xs.device.type == "cuda" else []
        # The layout (shapes, supports) from one prior draw, on a copy of the random state.
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            prior = self._trace(pair.model, {})
            self.names = [
                name
                for name, site in prior.nodes.items()
                if site["type"] == "sample" and not site["is_observed"]
            ]
            self.space = LatentSpace(prior, self.names, num_chains=num_chains)
            # The guide's sites, kept when q(z | x) does not depend on the chains' values (fast path only).
            self.guide_sites = (
                self._fixed_guide_sites({name: prior.nodes[name]["value"] for name in self.names})
                if fast and start == "guide"
                else None
            )

    def _fixed_guide_sites(self, values: Mapping[str, torch.Tensor]) -> list[dict[str, Any]] | None:
        """The guide's sample sites (their distributions q(z_s | x)) if none depends on the latents' values.

        q's parameters come from the encoder run on x and stay put along the whole path, so the
        fast path computes them once per chunk and scores each leapfrog position with their
        ``.log_prob`` alone. A guide whose site depends on another site's value (q(z2 | z1, x))
        is detected by scoring the same values under the guide conditioned on two different
        sets of values (these, and these moved by 0.5 in the unconstrained space): any
        difference, and the guide is traced at every position as on the plain path (None).
        """
        rows = self.space.flatten(values)
        moved, _ = self.space.unflatten({name: u + 0.5 for name, u in rows.items()})
        first = self._trace(self.pair.guide, values)
        second = self._trace(self.pair.guide, moved)
        sites = [site for site in first.nodes.values() if site["type"] == "sample"]
        for site in sites:
            other = second.nodes[site["name"]]
            here = site_log_density(site, particle_dim=self.particle_dim)
            there = site_log_density({**other, "value": site["value"]}, particle_dim=self.particle_dim)
            if not torch.equal(here, there):
                return None
        return sites

    def _trace(self, fn: Any, values: Mapping[str, torch.Tensor]) -> Trace:
        with pyro.plate(PARTICLE_PLATE, self.num_chains, dim=self.particle_dim):
            conditioned = poutine.condition(fn, data=dict(values)) if values else fn
            return prune_subsample_sites(poutine.trace(conditioned).get_trace(self.xs))

    def _sum(self, sites: Sequence[dict[str, Any]]) -> torch.Tensor:
        return self._total([site_log_density(site, particle_dim=self.particle_dim) for site in sites])

    def _total(self, terms: Sequence[torch.Tensor]) -> torch.Tensor:
        """sum of per-site log-densities, each broadcastable to [C, n]: [C, n]."""
        total: torch.Tensor | float = 0.0
        for term in terms:
            total = total + term
        return torch.as_tensor(total).expand(self.num_chains, self.space.num_data)

    def draw_start(self) -> dict[str, torch.Tensor]:
        """C draws z ~ f_0 for every datum of the chunk, as unconstrained rows."""
        with torch.no_grad():
            trace = self._trace(self.pair.guide if self.start == "guide" else self.pair.model, {})
        values = {name: trace.nodes[name]["value"] for name in self.names}
        if not self.space.in_support(values):
            raise PyroVAEError(
                "the guide draws latent values outside the support of the model's prior (say, a Normal guide "
                "for a positive latent), where p(x, z) = 0; give the guide a distribution on the same support, "
                "or pass start='prior' (--start prior)"
            )
        return self.space.flatten(values)

    def terms(self, rows: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """log f_0(z) + log |det dz/du| and log p(x, z) - log f_0(z), each [C, n] in the model's dtype.

        The plain path traces the model and the guide conditioned on the chains' values; the fast
        path (the default) runs the model under :class:`SiteScores`, which sets the values and keeps
        each site's log-density without building a trace, and scores q with the distributions kept
        by :meth:`_fixed_guide_sites` where it can. Both sum the same ``.log_prob`` terms in the same
        order, so they agree to rounding.
        """
        values, log_det = self.space.unflatten(rows)
        if self.fast:
            scores = SiteScores(values, particle_dim=self.particle_dim)
            with scores, pyro.plate(PARTICLE_PLATE, self.num_chains, dim=self.particle_dim):
                self.pair.model(self.xs)
            log_prior, log_lik = self._total(scores.latent), self._total(scores.observed)
        else:
            model_trace = self._trace(self.pair.model, values)
            sites = [s for s in model_trace.nodes.values() if s["type"] == "sample"]
            log_prior = self._sum([s for s in sites if s["name"] in values])
            log_lik = self._sum([s for s in sites if s["name"] not in values])
        if self.start == "prior":
            return log_prior + log_det, log_lik
        if self.guide_sites is not None:
            log_q = self._sum([{**site, "value": values[site["name"]]} for site in self.guide_sites])
        else:
            guide_trace = self._trace(self.pair.guide, values)
            log_q = self._sum([s for s in guide_trace.nodes.values() if s["type"] == "sample"])
        return log_q + log_det, log_prior + log_lik - log_q


def _kinetic(momenta: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """½ |r|² per (chain, datum): [C, n]."""
    return sum(0.5 * r.pow(2).sum(-1) for r in momenta.values())  # type: ignore[return-value]


def _hmc(
    path: AnnealingPath,
    rows: dict[str, torch.Tensor],
    *,
    beta: float,
    energy: torch.Tensor,
    grads: dict[str, torch.Tensor],
    step_size: torch.Tensor,
    leapfrog_steps: int,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One HMC transition per (chain, datum) leaving f_β invariant: the new rows and the acceptances [C, n].

    ``energy`` [C, n] and ``grads`` are -log f_β(u) and its gradient at ``rows``; ``step_size`` [n].
    """
    last: dict[str, torch.Tensor] = {}

    def potential(u: dict[str, torch.Tensor]) -> torch.Tensor:
        base, diff = path.terms(u)
        last["energy"] = -(base + beta * diff).detach()  # [C, n]: velocity_verlet only sees the sum
        return -(base + beta * diff).sum()

    momenta = {name: torch.randn_like(u) for name, u in rows.items()}
    eps = step_size.to(energy.dtype).reshape(1, -1, 1)  # [1, n, 1]: one step size per datum
    with torch.enable_grad():
        new, new_momenta, _, _ = velocity_verlet(
            rows, momenta, potential, lambda r: r, eps, num_steps=leapfrog_steps, z_grads=grads
        )
    log_accept = (energy + _kinetic(momenta) - last["energy"] - _kinetic(new_momenta)).double()
    log_accept = torch.nan_to_num(log_accept, nan=-math.inf)  # a divergent trajectory is rejected
    accept = torch.rand_like(log_accept).log() < log_accept  # [C, n]
    moved = {name: torch.where(accept.unsqueeze(-1), new[name], u).detach() for name, u in rows.items()}
    return moved, accept


def _evaluate(
    path: AnnealingPath, rows: dict[str, torch.Tensor], *, beta: float, grad: bool
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
    """-log f_β(u) [C, n], log p(x, z) - log f_0(z) [C, n], and the energy's gradient (when ``grad``)."""
    with torch.enable_grad() if grad else torch.no_grad():
        leaves = {name: u.detach().requires_grad_(grad) for name, u in rows.items()}
        base, diff = path.terms(leaves)
        energy = -(base + beta * diff)
        grads = None
        if grad:
            grads = dict(zip(leaves, torch.autograd.grad(energy.sum(), list(leaves.values())), strict=True))
    return energy.detach(), diff.detach(), grads


def anneal(
    path: AnnealingPath,
    rows: dict[str, torch.Tensor],
    betas: torch.Tensor,
    *,
    settings: AnnealingSettings,
    step_sizes: torch.Tensor | None,
    progress: ChunkProgress | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the chains at ``rows`` along ``betas`` [T + 1]: log w [C, n] float64, acceptance [n], step sizes.

    The transition after step t targets f_{β_t}; none follows the last step. With
    ``step_sizes`` [T + 1, n] the transition at β_t uses ``step_sizes[t]``; with ``None`` the step
    sizes are adapted as the chains go (the pilot run), and returned in the same layout.
    """
    num_steps = betas.shape[0] - 1
    n = path.space.num_data
    log_w = torch.zeros(path.num_chains, n, dtype=torch.float64, device=path.xs.device)
    accepted = torch.zeros(n, dtype=torch.float64, device=path.xs.device)
    used = torch.full((num_steps + 1, n), settings.step_size, dtype=torch.float64, device=path.xs.device)
    eps = used[0].clone()
    for t in range(1, num_steps + 1):
        beta = float(betas[t])
        energy, diff, grads = _evaluate(path, rows, beta=beta, grad=t < num_steps)
        log_w += float(betas[t] - betas[t - 1]) * diff.double()
        if t == num_steps:
            break
        current = eps if step_sizes is None else step_sizes[t]
        assert grads is not None
        rows, accept = _hmc(
            path,
            rows,
            beta=beta,
            energy=energy,
            grads=grads,
            step_size=current,
            leapfrog_steps=settings.leapfrog_steps,
        )
        rate = accept.double().mean(0)  # [n]
        accepted += rate
        used[t] = current
        if step_sizes is None:
            eps = (eps * torch.exp(ADAPT_RATE * (rate - settings.target_accept))).clamp(*STEP_SIZE_RANGE)
        if progress is not None:
            progress.step()
    accept_rate = accepted / (num_steps - 1) if num_steps > 1 else torch.full_like(accepted, math.nan)
    return log_w, accept_rate, used


def pilot_step_sizes(
    pair: PerDatumPair,
    xs: torch.Tensor,
    betas: torch.Tensor,
    *,
    settings: AnnealingSettings,
    progress: ChunkProgress | None = None,
    fast: bool = True,
) -> torch.Tensor:
    """Step sizes [T + 1, n] adapted on ``settings.pilot_chains`` chains of their own (or all ``step_size``)."""
    n = xs.shape[0]
    if settings.pilot_chains == 0 or betas.shape[0] <= 2:
        return torch.full((betas.shape[0], n), settings.step_size, dtype=torch.float64, device=xs.device)
    pilot = AnnealingPath(pair, xs, num_chains=settings.pilot_chains, start=settings.start, fast=fast)
    _, _, step_sizes = anneal(
        pilot, pilot.draw_start(), betas, settings=settings, step_sizes=None, progress=progress
    )
    return step_sizes


def _check_data(x: torch.Tensor, data_chunk_size: int | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise PyroVAEError("x must be a non-empty tensor whose first dimension indexes data points")
    if data_chunk_size is not None and (isinstance(data_chunk_size, bool) or data_chunk_size < 1):
        raise PyroVAEError(f"data_chunk_size must be a positive integer or None, got {data_chunk_size!r}")


def chunk_rows(settings: AnnealingSettings, data_chunk_size: int | None) -> int:
    return data_chunk_size or max(1, AIS_ROWS // max(settings.num_chains, settings.pilot_chains))


def budgeted_chunk_rows(
    pair: PerDatumPair,
    x: torch.Tensor,
    settings: AnnealingSettings,
    data_chunk_size: int | None,
    *,
    fast: bool = True,
    max_memory: int | None = MAX_MEMORY,
) -> int:
    """:func:`chunk_rows`, lowered where one HMC transition of a chunk's chains would not fit in ``max_memory``.

    Measured as importance sampling's passes are (:func:`~pyro_vae.resources.plan_passes`, on a fork of
    the random stream): one transition of the chains, its leapfrog steps and their gradients, on a few
    data points; a plain VAE's chunks fit the default budget and are kept.
    """
    from ..resources import plan_passes  # resources imports inference: imported when first used

    chains = max(settings.num_chains, settings.pilot_chains)
    betas = annealing_schedule(2, kind="linear")  # one transition (at β = 1/2), then the last weight

    def one_transition(xs: torch.Tensor, num_chains: int) -> torch.Tensor:
        path = AnnealingPath(pair, xs, num_chains=num_chains, start=settings.start, fast=fast)
        return anneal(path, path.draw_start(), betas, settings=settings, step_sizes=None)[0]

    sizes = plan_passes(
        one_transition,
        x,
        num_samples=chains,
        chunk_size=chains,
        data_chunk_size=chunk_rows(settings, data_chunk_size),
        max_memory=max_memory,
        held_bytes_per_sample=4 * 8,  # log w, and the chains' rows and momenta, float64 at most
        split_particles=False,
        what=f"annealed importance sampling with {chains} chains",
        advice="lower --num-chains (or --pilot-chains)",
    )
    return sizes.data


def fuse_kernels(settings: AnnealingSettings, x: torch.Tensor, num_data: int, *, passes: int = 1) -> bool:
    """Whether to compile the likelihood's elementwise log-density when ``compile=None``.

    As importance sampling does, for runs of at least ``AUTO_ROWS`` (datum, chain) rows over all
    the model evaluations (``passes`` directions of ``num_chains`` chains, the pilot's, each step's
    leapfrog + 1 evaluations), but on the CPU only: on a GPU the elementwise kernels are a small
    part of a pass, and Triton's compilation would cost tens of seconds of a short run.
    """
    chains = passes * settings.num_chains + settings.pilot_chains
    rows = num_data * chains * max(settings.num_steps - 1, 1) * (settings.leapfrog_steps + 1)
    return x.device.type == "cpu" and rows >= AUTO_ROWS


@contextlib.contextmanager
def parameters_frozen(*fns: Any) -> Iterator[None]:
    """The model's parameters without ``requires_grad`` inside the block, as they were after it.

    The chains move the latents, never the model: HMC wants the gradient of the energy in u alone.
    Autograd skips what no output needs, but a layer with a hand-written backward
    (:class:`~pyro_vae.components.Linear`) is told only which inputs require a gradient, and would
    otherwise form dL/dW at every leapfrog step. The parameters are those of Pyro's param store and
    of the modules whose methods ``fns`` are.
    """
    tensors = {id(t): t for _, t in pyro.get_param_store().named_parameters()}
    for fn in fns:
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, torch.nn.Module):
            tensors.update((id(t), t) for t in owner.parameters())
    frozen = [t for t in tensors.values() if t.requires_grad and t.is_leaf]
    for tensor in frozen:
        tensor.requires_grad_(False)
    try:
        with warnings.catch_warnings():
            # pyro.module skips (and warns about) a parameter without requires_grad; the store has it already.
            warnings.filterwarnings(
                "ignore", message=".*not registered in the param store because requires_grad"
            )
            yield
    finally:
        for tensor in frozen:
            tensor.requires_grad_(True)


def ais(
    model: Any,
    guide: Any,
    x: torch.Tensor,
    *,
    settings: AnnealingSettings = AnnealingSettings(),
    data_chunk_size: int | None = None,
    progress: bool | None = None,
    fast: bool = True,
    compile: bool | None = None,
    max_memory: int | None = MAX_MEMORY,
) -> AISResult:
    """log p̂(x_i) by annealed importance sampling for every point of ``x`` [N, ...], with diagnostics.

    ``model(x)`` and ``guide(x)`` are a pair of the contract (validated first; global latents
    at the guide's plug-in value, as for importance sampling). Refuses models with discrete
    latents. Randomness comes from torch's global generator: the same seed, settings and
    chunk size give the same numbers. ``fast=False`` traces the model and the guide at every
    leapfrog position (the plain path, for checking; see :meth:`AnnealingPath.terms`), which
    gives the same numbers to rounding. ``compile`` runs the likelihood's elementwise
    log-density as one fused kernel (:mod:`pyro_vae.components.kernels`), forward and
    backward; ``None`` does so on the CPU for runs of at least ``AUTO_ROWS`` (datum, chain)
    model evaluations (:func:`fuse_kernels`). ``max_memory`` (bytes, default 2 GiB) bounds what a
    chunk's transitions add: fewer data points per chunk where they would not fit
    (:func:`budgeted_chunk_rows`); ``None``: no budget.
    """
    _check_data(x, data_chunk_size)
    pair = per_datum_pair(model, guide, x)
    check_continuous(pair, x, method="annealed importance sampling")
    betas = annealing_schedule(settings.num_steps, kind=settings.schedule)
    size = budgeted_chunk_rows(pair, x, settings, data_chunk_size, fast=fast, max_memory=max_memory)
    chunks = x.split(size)
    passes = 2 if settings.pilot_chains else 1
    fuse = fuse_kernels(settings, x, x.shape[0]) if compile is None else compile
    parts = []
    with (
        pyro.validation_enabled(False),
        poutine.block(),
        compiled_kernels(fuse),
        parameters_frozen(model, guide),
        ChunkProgress(
            desc="AIS",
            num_data=x.shape[0],
            total_steps=len(chunks) * passes * max(settings.num_steps - 1, 0),
            show=progress,
        ) as bar,
    ):
        for xs in chunks:
            step_sizes = pilot_step_sizes(pair, xs, betas, settings=settings, progress=bar, fast=fast)
            path = AnnealingPath(pair, xs, num_chains=settings.num_chains, start=settings.start, fast=fast)
            log_w, accept_rate, _ = anneal(
                path, path.draw_start(), betas, settings=settings, step_sizes=step_sizes, progress=bar
            )
            log_px, stderr, ess = weights_summary(log_w)
            parts.append(
                AISResult(
                    log_px=log_px.cpu(),
                    log_px_stderr=stderr.cpu(),
                    ess=ess.cpu(),
                    accept_rate=accept_rate.cpu(),
                    log_weights=log_w.cpu(),
                    num_chains=settings.num_chains,
                    num_steps=settings.num_steps,
                    conditional_on=pair.conditional_on,
                )
            )
            bar.chunk_done(xs.shape[0], f"mean log p(x) {float(log_px.mean()):.3f}")
    return AISResult.concatenate(parts)
