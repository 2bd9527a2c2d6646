"""Elementwise log-densities fused into one kernel by ``torch.compile``, where that is switched on.

A Bernoulli log-likelihood over 784 pixels, -sum_d BCE(l_d, x_d), costs eager
PyTorch four or five passes over the [rows, 784] logits (log-sigmoid,
products, differences, the sum), each writing a tensor as large as the
decoder's output: on a CPU that is as much time as the decoder's matmuls. The
same formula compiled by TorchInductor reads the logits once and writes one
number per row (about 7x faster on the 2-core CPU of benchmarks/README.md).

Compiling costs seconds to tens of seconds once per process (less with
Inductor's on-disk cache), so it pays only on large jobs: the evaluator turns it
on by itself for evaluations of at least :data:`AUTO_ROWS` (datum, sample)
rows. Inside ``with compiled_kernels():`` every :func:`fusable` function runs
compiled; outside it, and while Pyro's jit traces a loss, the eager function
runs. If compilation fails (no C++ compiler for a CPU, say), a warning says so
once and the eager function is used from then on.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["AUTO_ROWS", "compiled_kernels", "fusable"]

# Evaluations of at least this many (datum, sample) rows compile their kernels when left to decide.
AUTO_ROWS = 1 << 22

_state = threading.local()
_failed = False


@contextlib.contextmanager
def compiled_kernels(enabled: bool = True) -> Iterator[None]:
    """Run every :func:`fusable` function compiled (``enabled``) or eagerly inside this block."""
    previous = getattr(_state, "enabled", False)
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = previous


def fusable(
    fn: Callable[..., torch.Tensor], *, eager: Callable[..., torch.Tensor] | None = None
) -> Callable[..., torch.Tensor]:
    """``fn`` (pure tensor arithmetic), compiled on first use inside :func:`compiled_kernels`.

    Outside the block ``eager`` runs (``fn`` itself by default): a form of the same function written for
    eager PyTorch (in-place steps, a hand-written backward) that the compiler need not see.
    """
    compiled: list[Callable[..., torch.Tensor]] = []
    plain = fn if eager is None else eager

    @functools.wraps(fn)
    def run(*args: Any) -> torch.Tensor:
        global _failed
        if _failed or not getattr(_state, "enabled", False) or torch.jit.is_tracing():
            return plain(*args)
        if not compiled:
            # dynamic: one kernel for every number of rows (minibatches, chunks of samples).
            compiled.append(torch.compile(fn, dynamic=True))
        try:
            return compiled[0](*args)
        except Exception as error:  # Inductor reports a missing compiler or backend in many types
            _failed = True
            warnings.warn(
                f"torch.compile could not build a fused kernel ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:200] if str(error) else ''}); using eager PyTorch",
                stacklevel=2,
            )
            return plain(*args)

    run.eager = plain  # type: ignore[attr-defined]
    return run
