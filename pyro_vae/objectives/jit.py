"""Any registered loss compiled by tracing (``pyro.ops.jit.trace``), checked against the eager loss."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pyro.ops.jit
import torch
from pyro.infer import ELBO

from .base import _TensorLoss, pair_key, random_state_kept

__all__ = ["JitELBO"]


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
    gives the same value for the same seed. The inner loss checks the pair
    (:class:`~pyro_vae.objectives.base._ChecksPair`) before the first trace,
    eagerly, so that no graph records the check.
    """

    def __init__(self, loss: ELBO) -> None:
        super().__init__(
            num_particles=loss.num_particles,
            max_plate_nesting=loss.max_plate_nesting,
            vectorize_particles=loss.vectorize_particles,
        )
        self.inner = loss
        self._compiled: dict[tuple, Callable[..., torch.Tensor]] = {}
        self._seen: set[tuple] = set()
        self._eager: set[tuple] = set()  # keys whose trace disagreed with the eager loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        check_pair = getattr(self.inner, "check_pair", None)
        if check_pair is not None:
            # Here, eagerly, not inside the trace: the trace would record the check's dry run.
            check_pair(model, guide, args, kwargs)
        pair = pair_key(
            model, guide
        )  # the compiled function keeps model and guide alive: the key stays theirs
        compiled = self._compiled.get(pair)
        if compiled is None:
            inner = self.inner

            @pyro.ops.jit.trace(ignore_warnings=True)
            def compiled(*args, **kwargs):  # type: ignore[no-untyped-def]
                kwargs.pop("_signature")  # only there to key the graph on the input shapes
                return inner.differentiable_loss(model, guide, *args, **kwargs)

            self._compiled[pair] = compiled
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        signature = tuple((tuple(a.shape), a.dtype, str(a.device)) for a in tensors)
        key = (pair, signature, tuple(sorted(kwargs.items())))
        if key not in self._seen:
            self._compile_and_check(compiled, key, model, guide, args, {"_signature": signature, **kwargs})
        if key in self._eager:
            return self.inner.differentiable_loss(model, guide, *args, **kwargs)
        return compiled(*args, _signature=signature, **kwargs)

    def _compile_and_check(self, compiled, key, model, guide, args, kwargs) -> None:  # type: ignore[no-untyped-def]
        """Trace the loss, then check the graph against the eager loss on the same random numbers."""
        with random_state_kept(args), warnings.catch_warnings():
            # torch marks jit.trace deprecated in favour of torch.compile, which cannot trace Pyro's
            # messengers (dynamo stops at their TypedDict messages); the trace is what works today.
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*jit.trace.*")
            compiled(*args, **kwargs)
        eager_kwargs = {k: v for k, v in kwargs.items() if k != "_signature"}
        with torch.no_grad():
            with random_state_kept(args):
                expected = self.inner.differentiable_loss(model, guide, *args, **eager_kwargs)
            with random_state_kept(args):
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
