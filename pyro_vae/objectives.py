r"""Training objectives: Pyro ELBO classes chosen by name (``--loss``), and the beta weight.

``LOSSES`` maps a name to a factory ``(*, num_particles) -> pyro.infer.ELBO``.
All of them treat the model's ``"data"`` plate as the only plate
(``max_plate_nesting=1``), draw their particles in one vectorized pass, and
return the loss as a tensor on the model's device (no host synchronisation).

- ``elbo``: E_q[log p(x, z) - log q(z | x)] by Monte Carlo (Trace_ELBO).
- ``mean-field``: the same bound with KL(q(z|x) || p(z)) in closed form where
  the guide and prior have one (TraceMeanField_ELBO); other latent sites fall
  back to Monte Carlo, with a warning naming them.
- ``iwae``: the importance-weighted bound of Burda et al. (2016),
  sum_i log (1/K) sum_k w_ik, per data point.

``make_loss(name, jit=True)`` wraps any of them in :class:`JitELBO`, which
compiles the loss with Pyro's ``pyro.ops.jit.trace`` (TorchScript): the
model and guide run in Python once per input shape, and every later step
replays the recorded graph of tensor operations without Pyro's messenger
bookkeeping.

:func:`scale_latents` multiplies every latent site's log-density by beta, in
the model and the guide alike, so any of these objectives becomes
E_q[log p(x|z)] - beta KL(q(z|x) || p(z)) (Higgins et al., 2017).

References:
    Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
    Higgins et al., "beta-VAE: Learning Basic Visual Concepts with a Constrained
    Variational Framework", ICLR 2017.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pyro.ops.jit
import torch
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger
from torch.distributions import kl_divergence

from .evaluation import _dry_traces, traced_log_weights
from .registry import Registry

__all__ = [
    "IWAE_ELBO",
    "LOSSES",
    "DeviceTrace_ELBO",
    "JitELBO",
    "LatentWeight",
    "MeanField_ELBO",
    "make_loss",
    "scale_latents",
]

LOSSES: Registry = Registry("loss")


class _TensorLoss:
    """``loss_and_grads`` that backpropagates ``differentiable_loss`` and returns it as a device tensor."""

    def loss_and_grads(self, model, guide, *args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        loss = self.differentiable_loss(model, guide, *args, **kwargs)  # type: ignore[attr-defined]
        if loss.requires_grad:
            loss.backward()
        return loss.detach()

    def _particle_term(self, particle_loss: Any, surrogate: Any) -> torch.Tensor:
        """One particle's share of the loss: its value, with the gradient of its surrogate (score terms)."""
        surrogate = torch.as_tensor(surrogate)
        return (particle_loss + (surrogate - surrogate.detach())) / self.num_particles  # type: ignore[attr-defined]


class DeviceTrace_ELBO(_TensorLoss, Trace_ELBO):
    """Pyro's Trace_ELBO, with the loss kept as a tensor on the model's device.

    Trace_ELBO converts each site's log-probability sum to a Python float while it
    assembles the loss: one host-device synchronisation per site per step, which
    stalls a GPU. When every latent site of the guide is reparameterized (as in
    every guide of this package) the surrogate loss *is* the loss,
    -(sum of model log-probs - sum of guide log-probs) / num_particles, so it is
    built from tensors alone. Guides with non-reparameterized sites get
    Trace_ELBO's score-function surrogate unchanged.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        loss: torch.Tensor | float = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            latent_sites = [
                s for s in guide_trace.nodes.values() if s["type"] == "sample" and not s["is_observed"]
            ]
            if all(site["fn"].has_rsample for site in latent_sites):
                elbo = sum(s["log_prob_sum"] for s in model_trace.nodes.values() if s["type"] == "sample")
                elbo = elbo - sum(site["log_prob"].sum() for site in latent_sites)
                loss = loss - elbo / self.num_particles
            else:
                loss = loss + self._particle_term(
                    *self._differentiable_loss_particle(model_trace, guide_trace)
                )
        return torch.as_tensor(loss)


class MeanField_ELBO(_TensorLoss, TraceMeanField_ELBO):
    """Pyro's TraceMeanField_ELBO: closed-form KL terms, with a warning for sites that have none.

    Pyro silently estimates a site's KL by Monte Carlo when torch has no
    closed form for the pair (a mixture or flow prior, a low-rank or flow
    guide). The first call checks each latent site and warns once, naming
    the distributions, so nobody believes an estimate is analytic when it is not.
    It also refuses a guide that draws the latents in another order than the
    model (a bottom-up hierarchical guide): each closed-form KL would then be
    taken at parent samples drawn after, and dependent on, its own site.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._checked = False

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        if not self._checked:
            # On a copy of the random state, so the check does not shift the draws of the loss itself.
            with _random_state_kept(args):
                self._check_guide(model, guide, args, kwargs)
            self._checked = True
        # TraceMeanField_ELBO returns loss + (surrogate - surrogate.item()): a host sync every step, and a
        # constant that a traced (jit) loss would keep from its first call. The detached tensor does neither.
        loss: torch.Tensor | float = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss = loss + self._particle_term(*self._differentiable_loss_particle(model_trace, guide_trace))
        return torch.as_tensor(loss)

    @staticmethod
    def _check_guide(model, guide, args, kwargs) -> None:  # type: ignore[no-untyped-def]
        with torch.no_grad():
            guide_trace, model_trace = _dry_traces(model, guide, args, kwargs)
        # KL(q(z_l | ...) || p(z_l | z_parents)) is taken at the guide's parent samples; that is the ELBO only
        # when the guide draws the latents in the model's order. A bottom-up guide draws z1 before z2, so
        # the closed-form KL of z1 would condition on a z2 that itself depends on z1: a biased loss.
        model_order = [
            n for n, s in model_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]
        ]
        guide_order = [
            n for n, s in guide_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]
        ]
        if model_order != guide_order:
            raise ValueError(
                f"the mean-field loss needs the guide to draw the latents in the model's order ({', '.join(model_order)}), "
                f"but it draws {', '.join(guide_order)}; use --loss elbo, or --inference ladder for stacked layers"
            )
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            q, p = guide_trace.nodes[name]["fn"], site["fn"]
            try:
                kl_divergence(q, p)
            except NotImplementedError:
                warnings.warn(
                    f"mean-field loss: torch has no closed-form KL({type(_base(q)).__name__} || "
                    f"{type(_base(p)).__name__}) for site {name!r}; that term is estimated by Monte Carlo, "
                    "exactly as with --loss elbo",
                    stacklevel=4,
                )


def _random_state_kept(args: tuple) -> Any:
    """A context that restores the CPU generator, and those of the CUDA devices ``args`` live on, on exit."""
    cuda = sorted({a.device.index or 0 for a in args if isinstance(a, torch.Tensor) and a.is_cuda})
    return torch.random.fork_rng(devices=cuda)


def _base(fn: Any) -> Any:
    # Unwrap Independent / expanded wrappers for a readable name.
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


class IWAE_ELBO(_TensorLoss, Trace_ELBO):
    r"""The importance-weighted bound of Burda et al. (2016), per data point and vectorized.

    For a minibatch of M out of N data points and K samples z_k ~ q(z | x_i)::

        L_K = (N / M) sum_i [ log sum_k exp(log p(x_i, z_ik) - log q(z_ik | x_i)) - log K ]

    L_1 is the ELBO and L_K increases to log p(x) with K. The log-weights come
    from the same traces as the evaluator's (:func:`traced_log_weights`), so
    its value on given samples equals the evaluator's IWAE-K. The N / M
    scale multiplies the per-datum bounds, never the log-weights inside the
    log-sum-exp (scaling inside, as pyro's RenyiELBO does with subsampling,
    changes the bound).
    """

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        log_w, scale = traced_log_weights(
            model,
            guide,
            *args,
            num_samples=self.num_particles,
            max_plate_nesting=self.max_plate_nesting,
            **kwargs,
        )  # [K, M] float64
        bound = torch.logsumexp(log_w, 0) - math.log(self.num_particles)  # [M]
        return -(scale * bound.sum()).float()

    def loss(self, model, guide, *args, **kwargs) -> float:  # type: ignore[no-untyped-def]
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))


@LOSSES.register("elbo")
def trace_elbo(*, num_particles: int = 1) -> ELBO:
    """The ELBO, E_q[log p(x, z) - log q(z|x)], by Monte Carlo with reparameterized samples (Trace_ELBO)."""
    return DeviceTrace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)


@LOSSES.register("mean-field")
def mean_field_elbo(*, num_particles: int = 1) -> ELBO:
    """The ELBO with KL(q || p) in closed form where it exists (TraceMeanField_ELBO), Monte Carlo elsewhere."""
    return MeanField_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)


@LOSSES.register("iwae")
def iwae(*, num_particles: int = 1) -> ELBO:
    """The importance-weighted bound with K = --num-particles samples per datum (Burda et al., 2016)."""
    return IWAE_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)


def make_loss(name: str, *, num_particles: int = 1, jit: bool = False) -> ELBO:
    """The registered objective ``name`` with ``num_particles`` samples per data point, compiled with ``jit``."""
    if num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles}")
    loss = LOSSES.get(name)(num_particles=num_particles)
    return JitELBO(loss) if jit else loss


class JitELBO(_TensorLoss, ELBO):
    """``loss`` compiled by tracing: one TorchScript graph per model, guide and input shapes.

    The first call with new shapes runs ``loss.differentiable_loss`` under
    ``torch.jit.trace`` (through ``pyro.ops.jit.trace``, which passes the
    param store's tensors in as inputs); later calls run the recorded graph
    (Pyro's :class:`~pyro.infer.JitTrace_ELBO` does the same for Trace_ELBO).
    What a trace records is fixed, so this is right only for models whose
    structure and constants do not change between calls: anything the model
    reads from Python state (a KL weight that warms up, say) is frozen at its
    value on the first call. The minibatch size is part of the key, so the
    smaller last minibatch of an epoch gets its own graph with its own N / M.

    Compiling runs the model and guide three times, then once more eagerly
    and once through the graph on the same random numbers: if the two values
    differ (a model that branches in Python replays wrongly; so does, at
    present, torch's low-rank Gaussian), a warning says so and that loss runs
    eagerly. All of this happens on a copy of the random-number state, so a
    compiled loss draws exactly the random numbers the plain one draws, and
    gives the same value for the same seed.
    """

    def __init__(self, loss: ELBO) -> None:
        super().__init__(
            num_particles=loss.num_particles,
            max_plate_nesting=loss.max_plate_nesting,
            vectorize_particles=loss.vectorize_particles,
        )
        self.inner = loss
        self._compiled: dict[tuple[int, int], Callable[..., torch.Tensor]] = {}
        self._seen: set[tuple] = set()
        self._eager: set[tuple] = set()  # keys whose trace disagreed with the eager loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        compiled = self._compiled.get((id(model), id(guide)))
        if compiled is None:
            inner = self.inner

            @pyro.ops.jit.trace(ignore_warnings=True)
            def compiled(*args, **kwargs):  # type: ignore[no-untyped-def]
                kwargs.pop("_signature")  # only there to key the graph on the input shapes
                return inner.differentiable_loss(model, guide, *args, **kwargs)

            self._compiled[(id(model), id(guide))] = compiled
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        signature = tuple((tuple(a.shape), a.dtype, str(a.device)) for a in tensors)
        key = (id(model), id(guide), signature, tuple(sorted(kwargs.items())))
        if key not in self._seen:
            self._compile_and_check(compiled, key, model, guide, args, {"_signature": signature, **kwargs})
        if key in self._eager:
            return self.inner.differentiable_loss(model, guide, *args, **kwargs)
        return compiled(*args, _signature=signature, **kwargs)

    def _compile_and_check(self, compiled, key, model, guide, args, kwargs) -> None:  # type: ignore[no-untyped-def]
        """Trace the loss, then check the graph against the eager loss on the same random numbers."""
        with _random_state_kept(args), warnings.catch_warnings():
            # torch marks jit.trace deprecated in favour of torch.compile, which cannot trace Pyro's
            # messengers (dynamo stops at their TypedDict messages); the trace is what works today.
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*jit.trace.*")
            compiled(*args, **kwargs)
        eager_kwargs = {k: v for k, v in kwargs.items() if k != "_signature"}
        with torch.no_grad():
            with _random_state_kept(args):
                expected = self.inner.differentiable_loss(model, guide, *args, **eager_kwargs)
            with _random_state_kept(args):
                got = compiled(*args, **kwargs)
        self._seen.add(key)
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-3):
            # A trace records one run; a model that branches in Python, or a distribution whose tensor
            # arithmetic depends on Python-side state, replays wrongly. Such a model runs eagerly.
            self._eager.add(key)
            warnings.warn(
                f"the jit-compiled loss gave {float(got):.6g} where the plain loss gives {float(expected):.6g} "
                "on the same random numbers; this model is not traceable, so its loss runs without --jit",
                stacklevel=4,
            )

    def loss(self, model, guide, *args, **kwargs) -> float:  # type: ignore[no-untyped-def]
        with torch.no_grad():
            return float(self.inner.differentiable_loss(model, guide, *args, **kwargs))

    def _get_trace(self, model, guide, args, kwargs):  # type: ignore[no-untyped-def]
        return self.inner._get_trace(model, guide, args, kwargs)


class LatentWeight(Messenger):
    """Multiplies the log-density of every latent (unobserved) sample site by ``beta``."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def _process_message(self, msg: dict) -> None:  # type: ignore[override]
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.beta


def scale_latents(fn: Callable[..., Any], weight: LatentWeight) -> Callable[..., Any]:
    """``fn`` with every latent site's log-density multiplied by ``weight.beta``.

    Applied to both model and guide, log p(z) - log q(z|x) is scaled and
    log p(x|z) is not: the ELBO becomes E_q[log p(x|z)] - beta KL(q || p). The
    weight object is shared and mutable, so a warm-up can change beta between
    steps without rebuilding anything.
    """

    def scaled(*args: Any, **kwargs: Any) -> Any:
        with weight:
            return fn(*args, **kwargs)

    return scaled
