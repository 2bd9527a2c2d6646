"""What every objective of the package shares: the loss as a device tensor, the pair checked, small helpers."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .._typing import ModelFn
from ..inference.validation import validate_pair

__all__ = ["base_distribution", "pair_key", "random_state_kept"]


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


def _identity(fn: ModelFn) -> tuple[int, ...]:
    # ``vae.model`` is a new bound-method object at every access: it is the same function of the same object.
    if inspect.ismethod(fn):
        return (id(fn.__self__), id(fn.__func__))
    return (id(fn),)


def pair_key(model: ModelFn, guide: ModelFn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A key for a model and guide, the same for every access to ``vae.model`` / ``vae.guide``.

    Ids are unique only among live objects: whoever keys on this keeps the pair
    itself alive alongside, so that no later object can take the same key.
    """
    return (_identity(model), _identity(guide))


class _ChecksPair:
    """Checks a model and guide against each other (:func:`validate_pair`) the first time the loss sees them.

    ``validates_as`` is the objective's name, so that one which cannot handle
    a site (a discrete guide site under ``iwae``) refuses the pair with a
    sentence before any gradient is taken. The check runs on a copy of the
    random state, so a checked loss draws exactly the numbers an unchecked one
    would; it runs once per pair (a compiled loss calls :meth:`check_pair`
    before tracing, so no trace records it). Calls outside the model contract
    (other than ``loss(model, guide, x)`` with an optional ``num_data=``) are
    not checked.
    """

    validates_as: str | None = None

    def check_pair(self, model: ModelFn, guide: ModelFn, args: tuple, kwargs: dict) -> None:
        # The pairs checked, kept alive so that their keys stay theirs.
        checked: dict[tuple, tuple[ModelFn, ModelFn]] = self.__dict__.setdefault("_checked_pairs", {})
        key = pair_key(model, guide)
        if key in checked:
            return
        if len(args) == 1 and isinstance(args[0], torch.Tensor) and set(kwargs) <= {"num_data"}:
            with random_state_kept(args):
                self._check(model, guide, args[0], num_data=kwargs.get("num_data"))
        checked[key] = (model, guide)

    def _check(self, model: ModelFn, guide: ModelFn, x: torch.Tensor, *, num_data: int | None) -> None:
        validate_pair(model, guide, x, loss=self.validates_as, num_data=num_data)


def random_state_kept(args: tuple) -> Any:
    """A context that restores the CPU generator, and those of the CUDA devices ``args`` live on, on exit."""
    cuda = sorted({a.device.index or 0 for a in args if isinstance(a, torch.Tensor) and a.is_cuda})
    return torch.random.fork_rng(devices=cuda)


def base_distribution(fn: Any) -> Any:
    # Unwrap Independent / expanded wrappers for a readable name.
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn
