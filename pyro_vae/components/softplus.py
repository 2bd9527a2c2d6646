r"""softplus(x) = log(1 + e^x), and the Bernoulli log-density built on it, computed without ``log1p``.

Both are written as max(x, 0) + log(1 + e^{-|x|}). The argument of the log
lies in (1, 2], where ``log`` is accurate: the only rounding beyond
``log1p``'s is the sum 1 + e^{-|x|} itself, an absolute error under one unit
in the last place of 1 (1.2e-7 in float32, 2.2e-16 in float64), against
values summed over hundreds of pixels. What it buys is speed: in the PyTorch
builds of benchmarks/README.md, ``log1p`` (and with it ``F.softplus`` and
``binary_cross_entropy_with_logits``) runs at about 16 ns per float on a CPU,
against 1.5 ns for ``exp`` and 2.5 ns for ``log``. With the two formulas
below, a [1600, 784] Bernoulli log-density with its backward pass takes about
6 ms against 23 ms, and the softplus activation of a [1600, 400] layer about
2 ms against 11 ms.

The backward passes are written by hand, because autograd's own would store
and revisit every intermediate:

    d/dl  sum_d log Bernoulli(x_d | l_d) = x_d - sigmoid(l_d)
    d/dx  softplus(x)                    = sigmoid(x)

They are made of differentiable torch operations, so second derivatives work
too. ``torch.jit.trace`` (Pyro's ``JitTrace_ELBO``) records each as one Python
operation with its own backward, so the traced loss keeps the fast kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PyroVAEError
from .kernels import fusable

__all__ = ["Softplus", "bernoulli_logits_log_prob", "softplus"]


def _log1p_exp_neg_abs(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^{-|x|}), a new tensor shaped like ``x`` (the in-place steps reuse one buffer)."""
    return x.abs().neg_().exp_().add_(1).log_()


class _Softplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return _softplus_in_place(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return torch.sigmoid(x) * grad


class _BernoulliLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits, value)
        # x l - softplus(l) = x l - max(l, 0) - log(1 + e^{-|l|}), summed over the last dimension: [...].
        return (value * logits).sub_(logits.clamp(min=0)).sub_(_log1p_exp_neg_abs(logits)).sum(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # type: ignore[override]
        logits, value = ctx.saved_tensors
        grad = grad.unsqueeze(-1)  # [..., 1] against the [..., D] inputs
        grad_logits = (value - torch.sigmoid(logits)) * grad if ctx.needs_input_grad[0] else None
        grad_value = logits * grad if ctx.needs_input_grad[1] else None
        return grad_logits, grad_value


def _softplus_formula(x: torch.Tensor) -> torch.Tensor:
    # The form TorchInductor fuses into one kernel: read x once, write the result once.
    return x.clamp(min=0) + torch.log(1 + torch.exp(-x.abs()))


def _softplus_in_place(x: torch.Tensor) -> torch.Tensor:
    return _log1p_exp_neg_abs(x).add_(x.clamp(min=0))


# Without gradients, inside compiled_kernels() (an evaluation's passes): one fused kernel, not five passes.
_softplus_no_grad = fusable(_softplus_formula, eager=_softplus_in_place)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) elementwise, as ``torch.nn.functional.softplus`` (beta 1) computes it, without ``log1p``."""
    if not (torch.is_grad_enabled() and x.requires_grad) and not torch.jit.is_tracing():
        return _softplus_no_grad(x)
    return _Softplus.apply(x)


def bernoulli_logits_log_prob(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """sum_d [x_d l_d - log(1 + e^{l_d})] over the last dimension of ``logits`` and ``value`` [..., D]: [...].

    Both must have the same shape (broadcast them first); ``value`` may be
    any number in [0, 1], not only 0 or 1.
    """
    if not torch.jit.is_tracing() and logits.shape != value.shape:  # traced shapes are fixed already
        # The hand-written backward returns gradients of the inputs' own shapes: broadcasting here would
        # hand autograd a gradient of the wrong shape.
        raise PyroVAEError(
            f"bernoulli_logits_log_prob needs logits and value of one shape, got {tuple(logits.shape)} and "
            f"{tuple(value.shape)}; broadcast them first (torch.broadcast_tensors)"
        )
    return _BernoulliLogProb.apply(logits, value)


class Softplus(nn.Module):
    """The softplus activation, log(1 + e^x), computed by :func:`softplus`; a drop-in for ``nn.Softplus()``.

    It has no parameters, so a state dict saved with ``nn.Softplus`` loads
    into a network built with this one, and the other way round.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softplus(x)
