"""What a configuration will cost, estimated before anything is allocated, and refusals of what cannot fit or finish.

A size typed with three zeros too many (``--hidden-dims 100000000000``,
``--num-particles 1000000000000``) would otherwise die deep in the allocator
with ``RuntimeError: can't allocate memory``, or, worse, start and run for
ever. Each estimate here is a lower bound on what the work needs, so a
refusal is never a false alarm:

- **parameters**: the model built on PyTorch's ``meta`` device (shapes, no
  storage), counted; training keeps four float32 copies of each (the weight,
  its gradient, Adam's two moments).
- **a training step**: its B x P rows (minibatch x particles) each keep every
  layer's output for the backward pass, and its gradient.
- **an importance-sampling evaluation**: the K log-weights of one data chunk
  in float64, and four arrays as large in the reduction (the weights, their
  softmax, PSIS's sort), as :func:`~pyro_vae.inference.evaluate_bounds` holds them.
- **time**: after the first epoch, the epochs left times its wall time.

The memory compared against is the device's: the machine's physical memory
(``SC_PHYS_PAGES x SC_PAGE_SIZE``) on the CPU, the GPU's on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from .errors import PyroVAEError
from .inference.traces import ROWS_PER_PASS

__all__ = [
    "MAX_TRAINING_SECONDS",
    "check_finishes",
    "check_fits",
    "device_memory",
    "evaluation_bytes",
    "meta_size",
    "training_bytes",
]

FLOAT32, FLOAT64 = 4, 8
# A run estimated to need longer than this is refused: no machine, allocation or job stays up that long.
MAX_TRAINING_SECONDS = 365 * 24 * 3600


def device_memory(device: torch.device) -> int | None:
    """The bytes of memory ``device`` has: the GPU's on CUDA, the machine's physical memory otherwise (None: unknown)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return None


def meta_size(build: Callable[[], nn.Module]) -> tuple[int, int]:
    """(parameters, widths) of the module ``build()`` makes, built on the meta device: no memory, no random draws.

    ``widths`` is the sum of the output sizes of its linear layers: the floats
    one row of data leaves behind in a forward pass (a lower bound: other
    layers and intermediate values add to it).
    """
    with torch.device("meta"):
        module = build()
    parameters = sum(p.numel() for p in module.parameters())
    widths = sum(m.out_features for m in module.modules() if isinstance(m, nn.Linear))
    return parameters, widths


def training_bytes(
    *, parameters: int, widths: int, data_dim: int, batch_size: int, num_particles: int
) -> int:
    """A lower bound on the memory of training: 4 float32 copies of each parameter, a step's activations and gradients."""
    rows = batch_size * num_particles  # every datum of the minibatch, once per particle
    return FLOAT32 * (4 * parameters + 2 * rows * (widths + data_dim))


def evaluation_bytes(*, num_samples: int, num_data: int, chunk_size: int, data_chunk_size: int | None) -> int:
    """A lower bound on the memory of importance sampling: K float64 log-weights per datum of a chunk, five times over."""
    chunk = min(chunk_size, num_samples)
    data_chunk = max(1, ROWS_PER_PASS // chunk) if data_chunk_size is None else data_chunk_size
    return FLOAT64 * 5 * num_samples * min(data_chunk, num_data)


def _size(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def check_fits(need: int, *, device: torch.device, what: str, advice: str) -> None:
    """Refuse, with the estimate and the device's memory, work that needs more memory than ``device`` has."""
    have = device_memory(device)
    if have is not None and need > have:
        where = "the GPU" if device.type == "cuda" else "this machine"
        raise PyroVAEError(
            f"{what} needs at least {_size(need)} of memory, more than the {_size(have)} of {where}; {advice}"
        )


def _duration(seconds: float) -> str:
    for unit, length in (("years", 365 * 86400), ("days", 86400), ("hours", 3600)):
        if seconds >= length:
            return f"{seconds / length:,.0f} {unit}"
    return f"{seconds:,.0f} seconds"


def check_finishes(*, epoch_seconds: float, epochs_left: int, epochs: int) -> None:
    """Refuse a run whose remaining epochs, at the wall time of the one just done, would outlast any machine."""
    estimate = epoch_seconds * epochs_left
    if estimate > MAX_TRAINING_SECONDS:
        raise PyroVAEError(
            f"--epochs {epochs} cannot finish: at {epoch_seconds:.3g} s an epoch, the {epochs_left:,} epochs left "
            f"would take about {_duration(estimate)}; rerun with --resume and a smaller --epochs (the checkpoint "
            "keeps the epochs done)"
        )


def check_model_fits(build: Callable[[], nn.Module], *, device: torch.device) -> None:
    """Refuse, before it is built, a model whose training state (4 float32 copies of each parameter) cannot fit."""
    parameters, _ = meta_size(build)
    check_fits(
        FLOAT32 * 4 * parameters,
        device=device,
        what=f"training a model of {parameters:,} parameters (weights, gradients and Adam's two moments)",
        advice="lower --hidden-dims, --latent-dims or --prior-components",
    )


def check_evaluation_fits(
    *, num_samples: int, num_data: int, device: torch.device, chunk_size: int = 1000
) -> None:
    """Refuse, before training, a final evaluation with K = ``num_samples`` whose log-weights cannot fit."""
    need = evaluation_bytes(
        num_samples=num_samples, num_data=num_data, chunk_size=chunk_size, data_chunk_size=None
    )
    check_fits(
        need, device=device, what=f"the evaluation with K={num_samples}", advice="lower --eval-samples"
    )
