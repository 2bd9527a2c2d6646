"""What every objective of the package shares: the loss as a device tensor, and small helpers."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["base_distribution", "random_state_kept"]


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


def random_state_kept(args: tuple) -> Any:
    """A context that restores the CPU generator, and those of the CUDA devices ``args`` live on, on exit."""
    cuda = sorted({a.device.index or 0 for a in args if isinstance(a, torch.Tensor) and a.is_cuda})
    return torch.random.fork_rng(devices=cuda)


def base_distribution(fn: Any) -> Any:
    # Unwrap Independent / expanded wrappers for a readable name.
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn
