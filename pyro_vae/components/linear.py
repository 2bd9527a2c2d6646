r"""``nn.Linear`` with its products by oneDNN on the CPU: the bias inside the matmul, and faster kernels.

``F.linear`` sends float32 CPU matmuls to the BLAS torch is built with (MKL
in the official wheels) and adds the bias by first copying it into every row
of the output, one more pass over a tensor as large as the layer's output.
oneDNN, which ships inside the same wheels, adds the bias inside the matmul's
own loop, and its kernels dispatch on the instruction set rather than the
vendor. On the AMD EPYC (AVX-512) of benchmarks/README.md, where MKL takes a
slower path, a [8000, 400] x [400, 784] layer takes 10.7 ms against MKL's
24.6 ms, and a training step's products (forward, dL/dx = g W, dL/dW = g^T x)
at batch 32 about 100 us each against 200. On an Intel CPU both libraries are
near the machine's peak, and the gain is the bias pass alone.

It is the same product to float32 rounding (relative error 5e-5 against a
float64 product, MKL's 4e-5). The oneDNN path is taken only where it is
defined, checked and worth it: float32 on the CPU, not inside ``torch.compile``,
a product of at least ``ONEDNN_MIN_MACS`` multiply-adds, and
after a first call that agreed with ``F.linear`` on a small product (otherwise
``F.linear`` is used from then on, with a warning). With gradients the
backward pass is written out (:class:`_OneDNNLinear`), in oneDNN's products
too, or in differentiable torch operations when a second derivative is asked
for. Under ``torch.jit.trace`` (``--jit``) the same product runs as the operator
``torch.ops.pyro_vae.linear``, which the tracer records.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ONEDNN_MIN_MACS", "Linear", "onednn_linear_available"]

_checked: list[bool] = []  # [whether oneDNN's linear agreed with F.linear], once per process


def _onednn_op():
    return getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's fused linear and it agrees with ``F.linear`` (checked once)."""
    if not _checked:
        _checked.append(_self_check())
    return _checked[0]


def _self_check() -> bool:
    op = _onednn_op()
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((3, 5, 17), (11, 17), (11,)))
    try:
        with torch.no_grad():
            got = op(x, weight, bias, "none", [], "")
    except Exception as error:  # a build without the op's CPU kernel raises one of several types
        warnings.warn(f"oneDNN's linear failed ({type(error).__name__}); using F.linear", stacklevel=3)
        return False
    expected = F.linear(x.double(), weight.double(), bias.double())
    if got.shape != expected.shape or not torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5):
        warnings.warn(
            "oneDNN's linear disagreed with F.linear on a test product; using F.linear", stacklevel=3
        )
        return False
    return True


def _backward(
    x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, needs: tuple[bool, bool, bool], has_bias: bool
) -> tuple[torch.Tensor | None, ...]:
    """dL/dx = g W, dL/dW = g^T x and dL/db = sum g (g = dL/dy), as far as ``needs`` asks.

    Flattened to matrices over the leading dimensions; oneDNN takes the transposed views as they are,
    so no copy is made. With ``create_graph`` (a second derivative) the same products are written in
    differentiable torch operations instead.
    """
    g = grad.reshape(-1, grad.shape[-1])  # [rows, out]
    rows = x.reshape(-1, x.shape[-1])  # [rows, in]
    if torch.is_grad_enabled():
        grad_x = (g @ weight).reshape(x.shape) if needs[0] else None
        grad_weight = g.t() @ rows if needs[1] else None
    else:
        op = _onednn_op()
        grad_x = op(g, weight.t(), None, "none", [], "").reshape(x.shape) if needs[0] else None
        grad_weight = op(g.t(), rows.t(), None, "none", [], "") if needs[1] else None
    grad_bias = g.sum(0) if has_bias and needs[2] else None
    return grad_x, grad_weight, grad_bias


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with the three products of its forward and backward passes by oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_op()(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        return _backward(x, weight, grad, tuple(ctx.needs_input_grad), ctx.has_bias)  # type: ignore[arg-type]


# The same product as an operator of torch's dispatcher, for torch.jit.trace (Pyro's JitELBO, --jit): the
# tracer records it as one node, where it cannot record oneDNN's own op (whose arguments include a list of
# optional scalars) or look inside an autograd Function. Eager calls take the Function, whose Python
# overhead is smaller. torch.library.custom_op is torch >= 2.4's; before it a trace runs F.linear.
def _register_traced_linear() -> Callable[..., torch.Tensor] | None:
    custom_op = getattr(torch.library, "custom_op", None)
    if custom_op is None:
        return None

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _onednn_op()(x, weight, bias, "none", [], "")

    def fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    def setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        return _backward(x, weight, grad, tuple(ctx.needs_input_grad), ctx.has_bias)  # type: ignore[arg-type]

    op = custom_op(
        "pyro_vae::linear", mutates_args=(), schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor"
    )(linear)
    op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup)
    return op


_traced_linear = _register_traced_linear()
# torch.compiler.is_compiling is torch >= 2.3's; before it nothing of this package compiles a Linear.
_is_compiling: Callable[[], bool] = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


# Products of fewer multiply-adds than this go to F.linear: there the Python of the autograd Function
# costs more than oneDNN saves (fwd + bwd at [32, 400] -> 50, 0.64M: 86 us by F.linear, 127 by oneDNN;
# at [128, 400] -> 50, 2.6M: 225 against 178; at [32, 784] -> 400, 10M: 743 against 429; one thread).
ONEDNN_MIN_MACS = 1 << 20


class Linear(nn.Linear):
    """y = x W^T + b, as ``nn.Linear`` (same parameters and state dict), by oneDNN where that is checked.

    Shapes: ``x`` [..., in_features] -> [..., out_features].
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (
            x.dtype == torch.float32
            and x.device.type == "cpu"
            and self.weight.dtype == torch.float32
            and not _is_compiling()
            and x.shape.numel() * self.out_features >= ONEDNN_MIN_MACS  # rows x in x out multiply-adds
            and onednn_linear_available()
        ):
            return F.linear(x, self.weight, self.bias)
        x = x.contiguous()
        if torch.jit.is_tracing():
            if _traced_linear is None:
                return F.linear(x, self.weight, self.bias)
            return _traced_linear(x, self.weight, self.bias)
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, self.weight, self.bias)
        ):
            return _OneDNNLinear.apply(x, self.weight, self.bias)
        return _onednn_op()(x, self.weight, self.bias, "none", [], "")
