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
- **an evaluation pass, measured**: :func:`plan_passes` runs the pass once on a
  few (datum, particle) rows, counts the bytes of every tensor it allocates
  while they live (:func:`peak_bytes`), and sizes the passes so that their rows
  times that cost stay under a memory budget (``max_memory``, default
  :data:`~pyro_vae.inference.traces.MAX_MEMORY`).
- **time**: after the first epoch, the epochs left times its wall time.

The memory compared against is the device's: the machine's physical memory
(``SC_PHYS_PAGES x SC_PAGE_SIZE``) on the CPU, the GPU's on CUDA.
"""

from __future__ import annotations

import collections
import math
import os
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode  # torch's documented home of the class
from torch.utils._pytree import tree_flatten

from .components.kernels import compiled_kernels
from .errors import PyroVAEError
from .inference.traces import MAX_MEMORY, MIN_ROWS_PER_PASS, data_per_pass

__all__ = [
    "HELD_BYTES_PER_SAMPLE",
    "MAX_TRAINING_SECONDS",
    "PassSizes",
    "check_finishes",
    "check_fits",
    "check_memory_budget",
    "device_memory",
    "evaluation_bytes",
    "format_bytes",
    "memory_size",
    "meta_size",
    "peak_bytes",
    "plan_passes",
    "structure_key",
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
    """A lower bound on the memory of importance sampling: K float64 log-weights per datum of a chunk, five times over.

    The chunk is the default for the narrowest data (``MIN_ROWS_PER_PASS`` rows, the fewest
    :func:`~pyro_vae.inference.traces.rows_per_pass` gives), so the bound holds for any data and device.
    """
    chunk = min(chunk_size, num_samples)
    data_chunk = max(1, MIN_ROWS_PER_PASS // chunk) if data_chunk_size is None else data_chunk_size
    return FLOAT64 * 5 * num_samples * min(data_chunk, num_data)


def format_bytes(count: float) -> str:
    """``count`` bytes as people read them: 512 bytes, 1.5 KiB, 2.0 GiB."""
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
            f"{what} needs at least {format_bytes(need)} of memory, more than the {format_bytes(have)} of {where}; {advice}"
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
    *,
    num_samples: int,
    num_data: int,
    device: torch.device,
    chunk_size: int = 1000,
    max_memory: int | None = None,
) -> None:
    """Refuse, before training, a final evaluation with K = ``num_samples`` whose log-weights cannot fit.

    In the device's memory, and, with a budget ``max_memory`` (bytes), in what the budget leaves for the
    passes (:func:`plan_passes`: the K log-weights of one datum must fit beside at least one row).
    """
    need = evaluation_bytes(
        num_samples=num_samples, num_data=num_data, chunk_size=chunk_size, data_chunk_size=None
    )
    check_fits(
        need, device=device, what=f"the evaluation with K={num_samples}", advice="lower --eval-samples"
    )
    check_memory_budget(max_memory)
    if max_memory is not None:
        held = HELD_BYTES_PER_SAMPLE * num_samples
        usable = HEADROOM * max_memory - ALLOCATOR_SLACK
        if held >= usable:
            raise PyroVAEError(
                f"the evaluation with K={num_samples} holds {format_bytes(held)} of log-weights for each datum, "
                f"more than the {format_bytes(max(usable, 0))} its passes may use of the memory budget of "
                f"{format_bytes(max_memory)}; raise --eval-max-memory or lower --eval-samples"
            )


# ---------------------------------------------------------------------------
# The memory budget of an evaluation pass, measured on the model itself

# Bytes per importance sample that a datum keeps across its passes: its log-weight and ELBO term in float64
# ([K, n] each, and again when the passes are concatenated) and five arrays as large in the reduction
# (IWAE groups, w / max w, the softmax, PSIS's sorted copy): 9 float64.
HELD_BYTES_PER_SAMPLE = 9 * FLOAT64
# The passes are planned to this fraction of the budget, less ALLOCATOR_SLACK: what the count of tensors
# does not see stays in the rest. That is the scratch space of a kernel inside one op and the allocator's
# rounding (one large pass: resident memory 2-4 % above the count), and the free blocks the C allocator
# keeps instead of returning them. glibc serves blocks under its dynamic mmap threshold (which rises to
# 32 MiB) from its heap and gives the heap back only past the trim threshold (twice that), so passes whose
# tensors are a few MiB to 32 MiB leave up to about 60 MiB more resident than they hold (measured: a
# VampPrior pass of 66 MiB counted, [400, 500, 40] float32 tensors of 32 MB each, 124 MiB resident; with a
# fixed MALLOC_MMAP_THRESHOLD_ the excess vanished). Larger tensors are mapped and returned at once.
HEADROOM = 0.8
ALLOCATOR_SLACK = 64 * 1024**2
# (datum, particle) rows of the measuring pass: enough that the per-row tensors outweigh the fixed ones
# (the VampPrior's pass of its K pseudo-inputs through the encoder), few enough to cost milliseconds.
PROBE_ROWS = 256

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def memory_size(text: str | int) -> int:
    """Bytes from ``2GiB``, ``512MiB``, ``1.5GB``, ``4e9`` or ``1073741824``: KiB, MiB, GiB, TiB are powers of
    1024, kB, MB, GB, TB powers of 1000 (case and a space before the unit do not matter)."""
    if isinstance(text, bool):
        raise PyroVAEError(f"a memory size must be a number of bytes or a size like 2GiB, got {text!r}")
    if isinstance(text, int):
        value: float = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise PyroVAEError(
                f"a memory size must be a number of bytes or a number with a unit (KiB, MiB, GiB, TiB, kB, MB, "
                f"GB, TB), like 2GiB or 512MiB; got {text!r}"
            )
        value = float(match.group(1)) * _UNITS[unit]
    if not (math.isfinite(value) and value >= 1):
        raise PyroVAEError(f"a memory size must be at least 1 byte, got {text!r}")
    return int(value)


def check_memory_budget(max_memory: int | None) -> None:
    """Refuse a budget that is not a whole number of bytes, at least 1 (None: no budget)."""
    if max_memory is not None and (
        isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 1
    ):
        raise PyroVAEError(
            f"max_memory must be a whole number of bytes (pyro_vae.resources.memory_size('2GiB') gives one) "
            f"or None for no budget, got {max_memory!r}"
        )


def _storage(tensor: object) -> torch.UntypedStorage | None:
    if not isinstance(tensor, torch.Tensor):
        return None
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return None


class _LiveBytes(TorchDispatchMode):
    """Counts every storage that an op dispatched inside the block creates, while it lives; keeps the peak.

    Views and in-place results share a storage already counted; tensors made before the block (weights,
    data) are not counted: the peak is what the block adds. A storage is uncounted when torch frees it
    (its Python object lives exactly as long as the storage).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._finalizers: list[weakref.finalize] = []

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs: set[int] | None = None
        for tensor in tree_flatten(out)[0]:
            storage = _storage(tensor)
            if storage is None or storage._cdata in self._sizes:
                continue
            if inputs is None:
                inputs = {s._cdata for s in map(_storage, tree_flatten((args, kwargs))[0]) if s is not None}
            key = storage._cdata
            if key in inputs:  # a view or alias of an input: of x's storage, say, allocated before the block
                continue
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            finalizer = weakref.finalize(storage, self._free, key)
            finalizer.atexit = False
            self._finalizers.append(finalizer)
        self.peak = max(self.peak, self.live)
        return out

    def __exit__(self, *exc: Any) -> Any:
        result = super().__exit__(*exc)
        for finalizer in self._finalizers:  # storages still alive (a cache) no longer report to this count
            finalizer.detach()
        self._finalizers.clear()
        return result


def peak_bytes(fn: Callable[[], object]) -> int:
    """The peak of the bytes of the tensors ``fn()`` allocates, counted while they live (its result included).

    Every op's new storages are counted through a ``TorchDispatchMode``, on any device; what existed
    before (parameters, data) is not. Memory inside one kernel that no tensor holds is not seen, hence
    the headroom of :func:`plan_passes`.
    """
    with _LiveBytes() as counter:
        result = fn()
        del result
    return counter.peak


@dataclass(frozen=True)
class PassSizes:
    """How an evaluation's vectorized passes are sized, and what they were measured to cost."""

    particles: int  # samples per vectorized pass (chunk_size)
    data: int  # data points per chunk (data_chunk_size)
    row_bytes: float  # peak bytes a pass adds per (datum, particle) row, measured (nan: no budget)
    held_bytes: int  # bytes a datum keeps across its passes (its K log-weights and their reduction)
    max_memory: int | None  # the budget they were planned to

    @property
    def rows(self) -> int:
        """(datum, particle) rows of one pass."""
        return self.particles * self.data

    @property
    def bytes(self) -> float:
        """What one pass and its chunk's held log-weights are estimated to add: rows x row cost + held."""
        return self.rows * self.row_bytes + self.data * self.held_bytes


# Measured pass costs by (key, input shape, dtype, device, particles): the row cost of a pass depends on the
# shapes of the model's tensors, never on their values, so an evaluation of the same model on data of the
# same shape (every epoch's validation, a loop of log p(x) calls) need not measure it again. The entries
# keep what the key names alive (ids are unique only among live objects), so the cache is small.
_MEASURED: collections.OrderedDict[tuple, tuple[int, tuple]] = collections.OrderedDict()
MEASURED_ENTRIES = 16


def structure_key(*modules: object) -> tuple:
    """A key for ``plan_passes(cache_key=)`` naming ``modules`` (models, guides: bound methods of an
    ``nn.Module`` stand for the module) by identity and the shapes, dtypes and devices of their parameters
    and buffers, and of the tensors in Pyro's param store (a model function's ``pyro.param`` sites), so
    that a module rebuilt or resized in place is measured afresh.
    """
    parts = []
    for item in modules:
        owner = getattr(item, "__self__", item)
        tensors = ()
        if isinstance(owner, nn.Module):
            tensors = tuple(
                (name, tuple(t.shape), t.dtype, str(t.device))
                for name, t in [*owner.named_parameters(), *owner.named_buffers()]
            )
        parts.append((id(owner), getattr(getattr(item, "__func__", None), "__qualname__", None), tensors))
    store = tuple(
        (name, tuple(t.shape), t.dtype, str(t.device)) for name, t in pyro.get_param_store().items()
    )
    return (tuple(parts), store), modules


def _measure_cached(
    one_pass: Callable[[torch.Tensor, int], object], xs: torch.Tensor, k: int, cache_key: tuple | None
) -> int:
    if cache_key is None:
        return _measure(one_pass, xs, k)
    (identity, keep) = cache_key
    key = (identity, tuple(xs.shape), xs.dtype, str(xs.device), k)
    if key in _MEASURED:
        _MEASURED.move_to_end(key)
        return _MEASURED[key][0]
    measured = _measure(one_pass, xs, k)
    _MEASURED[key] = (measured, keep)
    while len(_MEASURED) > MEASURED_ENTRIES:
        _MEASURED.popitem(last=False)
    return measured


def _measure(one_pass: Callable[[torch.Tensor, int], object], xs: torch.Tensor, k: int) -> int:
    # Hidden from outer handlers, eager (a fused kernel would not be counted op by op), no gradients, and on a
    # fork of the random stream: the evaluation's draws are the same as without the measurement.
    devices = [xs.device] if xs.device.type == "cuda" else []
    with (
        torch.random.fork_rng(devices=devices),
        torch.no_grad(),
        pyro.validation_enabled(False),
        poutine.block(),
        compiled_kernels(False),
    ):
        return peak_bytes(lambda: one_pass(xs, k))


def plan_passes(
    one_pass: Callable[[torch.Tensor, int], object],
    x: torch.Tensor,
    *,
    num_samples: int,
    chunk_size: int,
    data_chunk_size: int | None = None,
    max_memory: int | None = MAX_MEMORY,
    held_bytes_per_sample: int = HELD_BYTES_PER_SAMPLE,
    split_particles: bool = True,
    split_data: bool = True,
    what: str = "the evaluation",
    advice: str = "lower the samples K",
    cache_key: tuple | None = None,
) -> PassSizes:
    """Particles per pass and data points per chunk that keep a pass of ``one_pass(xs, k)`` under ``max_memory``.

    Without a budget (``max_memory=None``) they are the defaults: ``min(chunk_size, K)`` particles, and
    ``data_chunk_size`` or as many data points as make ``rows_per_pass(x)`` rows. With one, ``one_pass`` is
    run once on about ``PROBE_ROWS`` rows (a fork of the random stream, nothing drawn from it) and its
    peak :func:`peak_bytes` divided by its rows gives c, the bytes of a row; a datum also keeps ``h =
    held_bytes_per_sample x K`` bytes across its passes. The sizes are then the largest, at most the
    defaults above (``chunk_size`` and ``data_chunk_size`` are upper bounds, never raised), with

        data x (particles x c + h) <= HEADROOM x max_memory - ALLOCATOR_SLACK,

    fewer particles per pass first when one datum's pass does not fit (unless ``split_particles`` is
    False), fewer data points otherwise (unless ``split_data`` is False: then every pass, the measuring
    one too, takes all of ``x``). A pass of fewer rows than the measured one is measured itself,
    and shrunk until it fits (its fixed tensors then weigh more per row). When not even one row fits,
    :class:`PyroVAEError` says so, with the budget and how to raise it.

    The peak of a pass of R >= measured rows is at most R c when every tensor alive at any moment of
    the pass is either of fixed size or proportional to the rows (a max of lines with non-negative
    intercepts is at most its value at r, scaled by R / r); tests/test_memory_budget.py checks the
    resident memory of real evaluations against the budget.

    ``cache_key`` (:func:`structure_key` of the model and guide ``one_pass`` runs) keeps each measurement
    for later calls with the same model structure and data shape, which then measure nothing.
    """
    check_memory_budget(max_memory)
    num_data = x.shape[0]
    particles = min(chunk_size, num_samples)
    data = min(num_data, data_chunk_size or data_per_pass(x, particles))
    if max_memory is None:
        return PassSizes(particles, data, math.nan, 0, None)
    usable = HEADROOM * max_memory - ALLOCATOR_SLACK
    if usable <= 0:
        raise PyroVAEError(
            f"a memory budget of {format_bytes(max_memory)} leaves nothing for {what}'s passes: "
            f"{format_bytes(ALLOCATOR_SLACK)} of it are kept for the allocator's free blocks and "
            f"{1 - HEADROOM:.0%} for what cannot be counted; give at least "
            f"{format_bytes(ALLOCATOR_SLACK / HEADROOM + 1024**2)} (max_memory=, --max-memory)"
        )
    held = held_bytes_per_sample * num_samples
    if split_data:
        probe_k = min(particles, PROBE_ROWS)
        probe_n = min(num_data, max(1, PROBE_ROWS // probe_k))
    else:  # a pass that cannot take a subset of x (per-datum parameters of x's shape): all of x, always
        data = probe_n = num_data
        probe_k = min(particles, max(1, PROBE_ROWS // num_data))
    measured = max(1, _measure_cached(one_pass, x[:probe_n], probe_k, cache_key))  # at least a byte
    row_bytes = measured / (probe_n * probe_k)
    fewest_data = 1 if split_data else num_data
    smallest = (
        f"{'one datum' if split_data else f'all {num_data} data points'}, "
        f"{'one particle' if split_particles else f'all {particles} particles'}"
    )

    def refuse(need: float) -> PyroVAEError:
        return PyroVAEError(
            f"{what} does not fit in the memory budget of {format_bytes(max_memory)}: one pass of the "
            f"smallest size ({smallest}) with the K={num_samples} log-weights of a datum needs about "
            f"{format_bytes(need)} (measured on {probe_n * probe_k} rows, {format_bytes(row_bytes)} a row; "
            f"the passes may use {format_bytes(usable)} of the budget); raise the budget (max_memory=, "
            f"--max-memory on the command line, e.g. --max-memory 8GiB) or {advice}"
        )

    if fewest_data * (held + particles * row_bytes) > usable:
        if not split_particles:
            raise refuse(fewest_data * (held + particles * row_bytes))
        particles = math.floor((usable / fewest_data - held) / row_bytes)
        if particles < 1:
            raise refuse(fewest_data * (held + row_bytes))
        data = fewest_data
    if split_data:
        data = max(1, min(data, math.floor(usable / (held + particles * row_bytes))))
    if particles * data < probe_n * probe_k:
        # Fewer rows than measured: the fixed tensors count more per row. Measure this pass, shrink till it fits.
        while True:
            measured = _measure_cached(one_pass, x[:data], particles, cache_key)
            if measured + data * held <= usable:
                row_bytes = max(1, measured) / (particles * data)
                break
            if data > fewest_data:
                data //= 2
            elif particles > 1 and split_particles:
                particles //= 2
            else:
                raise refuse(measured + data * held)
    return PassSizes(particles, data, row_bytes, held, max_memory)
