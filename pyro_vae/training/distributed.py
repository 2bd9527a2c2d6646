r"""Data-parallel training: every global minibatch cut into S shards, computed by W processes.

A step of :func:`pyro_vae.fit` takes a global minibatch of M points out
of N. With S shards it is cut into S parts of M / S points; part s is the
strided slice that ``torch.utils.data.DistributedSampler(num_replicas=S,
rank=s)`` gives, so the union of the parts is the same set of points whatever
S is (every epoch's permutation comes from a generator seeded with
``seed + epoch``). Each shard's loss is the full-data estimate from its own
points, the data plate scaling them by N / (M / S)::

    L_s = (N S / M) sum_{i in shard s} l_i,    (1/S) sum_s L_s = (N / M) sum_{i in minibatch} l_i

so the mean over shards of the shard losses, and of their gradients, is the
one-process estimate of the full-data negative ELBO and its gradient. The W
processes (``torchrun``; one GPU each, or gloo on CPUs) each compute S / W of
the shards, sum their gradients with one ``all_reduce`` per step (all the
gradients flattened into one bucket, the step's loss and a stop flag riding
along), divide by S, and step identical optimizers on identical gradients.

Every random draw of a shard (the latent noise z ~ q(z|x), a dynamic
binarization) comes from a generator seeded with (seed, step, s), not from
the global stream: which process computes shard s, and what it computed
before, cannot change its numbers. A run of W processes therefore equals a
single process with ``shards=W`` (gradient accumulation over the same shards
with the same seeds) up to the order of floating-point additions in the
all-reduce (exactly, for W = 2), and a checkpoint needs no random state: the
step and (seed, epoch) imply it. Evaluation is cut the same way, into S
contiguous slices of the test set, slice s under a seed from (seed, purpose,
s), and gathered in slice order.

When N is not a multiple of S, each epoch leaves out the last N mod S points
of its permutation (DistributedSampler's ``drop_last``; different points every
epoch) rather than repeating some, which would count them twice; the N in N / M
stays the true N, so every step is still an unbiased estimate. The global
minibatch M (``--batch-size``) must be a multiple of S, so that the last,
shorter minibatch of an epoch splits evenly too.

References:
    Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel
    Training", VLDB 2020 (gradient all-reduce over flattened buckets, as in DDP).
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from pyro.infer import ELBO
from torch.utils.data import DistributedSampler

from ..errors import PyroVAEError

__all__ = [
    "DataParallel",
    "Shard",
    "ShardedELBO",
    "Stream",
    "derive_seed",
    "process_group",
    "run_on_main",
    "seeded",
    "shard_indices",
    "torchrun_process_group",
]

T = TypeVar("T")

# What torchrun puts in every process's environment; init_process_group reads them.
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class Stream(enum.IntEnum):
    """What a derived random stream is for: the first key of :func:`derive_seed` after the seed."""

    TRAIN = 0  # (step, shard): the draws of one shard's loss at one step
    TEST_ELBO = 1  # (epoch, shard): the per-epoch test ELBO of one test slice
    EVALUATION = 2  # (shard,): the final importance-sampled bounds of one test slice
    LAYERS = 3  # (): the per-layer KL and active units, computed whole by the main process
    VALIDATION = 4  # (epoch,): the validation score after an epoch, the same in every process


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream ``keys`` of a run seeded with ``seed``.

    numpy's SeedSequence hashes the whole key, so nearby keys ((seed, step)
    and (seed, step + 1), or (seed + 1, step)) give unrelated streams.
    """
    state = np.random.SeedSequence([seed, *(int(k) for k in keys)]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


def process_group() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) when torch.distributed is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def torchrun_process_group(*, device: str = "auto") -> Iterator[torch.device]:
    """Join the process group that ``torchrun`` set up; yields this process's device.

    ``device`` is ``auto`` (the GPU of this process's local rank when there is
    one, else the CPU), ``cuda`` or ``cpu``; GPUs talk through NCCL, CPUs
    through gloo. The group is destroyed on exit.
    """
    if not dist.is_available():
        raise PyroVAEError("this build of torch has no torch.distributed; train without --distributed")
    missing = [name for name in _TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise PyroVAEError(
            f"--distributed needs the environment torchrun sets up ({', '.join(missing)} missing); launch with "
            "torchrun --nproc-per-node N -m pyro_vae train --distributed ..., or train without --distributed"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if device not in ("auto", "cuda", "cpu"):
        raise PyroVAEError(
            f"with --distributed every process uses the GPU of its local rank (cuda:LOCAL_RANK), so --device "
            f"{device} cannot be honoured; pass --device auto, cuda or cpu (choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise PyroVAEError(
            "--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto"
        )
    run_device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(run_device)  # NCCL and the object collectives use the current device
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    try:
        yield run_device
        # Leave together: rank 0 still writes and reports after the last collective, and a peer that
        # tears down its connections meanwhile can make gloo abort the process that is still working.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@contextmanager
def seeded(seed: int, *, device: torch.device) -> Iterator[None]:
    """Inside, torch's generators of the CPU and of ``device`` start from ``seed``; outside they are untouched."""
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[cuda[0]].manual_seed(seed)
        yield


def run_on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run by rank 0 alone, its result (or its exception) handed to every process.

    For what must happen once and be agreed on by all: checking and preparing
    the run folder, reading a checkpoint that may exist on rank 0's disk only.
    Without a process group it is ``fn()``.
    """
    rank, world_size = process_group()
    if world_size == 1:
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = (True, fn())
        except Exception as error:  # every process raises it, so none waits forever on the others
            box[0] = (False, error)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def shard_indices(num_data: int, *, shards: int, shard: int, seed: int, epoch: int) -> torch.Tensor:
    """The data indices of ``shard`` (of ``shards``) for ``epoch``, in the order it visits them: [N // S].

    They are ``DistributedSampler``'s, with ``shuffle=True`` and
    ``drop_last=True``: positions s, s + S, s + 2S, ... of the permutation
    drawn from ``seed + epoch``, cut to a multiple of S. Minibatch k of the
    shard, its ``k * m : (k + 1) * m`` slice with m = M / S, is therefore shard
    s's part of positions ``k * M : (k + 1) * M`` of the permutation: the
    global minibatch k of a one-shard run, whatever S is.
    """
    sampler = DistributedSampler(
        range(num_data),  # type: ignore[arg-type]  # only its length is read
        num_replicas=shards,
        rank=shard,
        shuffle=True,
        seed=seed,
        drop_last=True,
    )
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


@dataclass(frozen=True)
class Shard:
    """One shard's part of a step: its index s, the seed of its random draws, and its data [M / S, D]."""

    index: int
    seed: int
    x: torch.Tensor


class DataParallel:
    """S shards of every minibatch spread over the processes of the current group.

    Rank r of W computes shards r, r + W, r + 2W, ...; S must be a multiple of
    W so that all do the same work. Without a process group (W = 1) one
    process computes all S shards: gradient accumulation that reproduces a
    W = S run. ``seed`` seeds the data order and every derived random stream.
    """

    def __init__(self, *, shards: int, seed: int, device: torch.device) -> None:
        self.rank, self.world_size = process_group()
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise PyroVAEError(f"shards must be a positive integer, got {shards!r}")
        if shards % self.world_size:
            raise PyroVAEError(
                f"--shards {shards} cannot be spread evenly over {self.world_size} processes; use a multiple of "
                f"{self.world_size} (each process computes shards / processes of every minibatch)"
            )
        self.shards = shards
        self.seed = seed
        self.device = torch.device(device)
        self.local_shards = range(self.rank, shards, self.world_size)

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0, the one that writes files and shows progress."""
        return self.rank == 0

    def samples_per_epoch(self, num_data: int) -> int:
        """N rounded down to a multiple of S: the points one epoch visits."""
        return num_data - num_data % self.shards

    def minibatches(
        self, num_data: int, *, batch_size: int, epoch: int
    ) -> list[list[tuple[int, torch.Tensor]]]:
        """The steps of ``epoch``: for each, (shard, indices [batch_size / S]) for this process's shards."""
        per_shard = batch_size // self.shards
        splits = {
            s: shard_indices(num_data, shards=self.shards, shard=s, seed=self.seed, epoch=epoch)
            .to(self.device)
            .split(per_shard)
            for s in self.local_shards
        }
        num_steps = len(splits[self.local_shards[0]])
        return [[(s, splits[s][k]) for s in self.local_shards] for k in range(num_steps)]

    def seeded(self, *keys: int) -> contextlib.AbstractContextManager[None]:
        """Draw from the stream ``derive_seed(seed, *keys)`` inside, the global generators untouched outside."""
        return seeded(derive_seed(self.seed, *keys), device=self.device)

    def sum_gradients(self, params: Sequence[torch.Tensor], extras: torch.Tensor) -> torch.Tensor:
        """Set each gradient to (1/S) x its sum over all processes; return (1/S) x the sums of ``extras``.

        The gradients travel in one flat buffer, in the order of ``params``
        (trace order, the same in every process), with ``extras`` (a few
        scalars) at its end. A parameter without a gradient counts as zero, so
        that every process sends the same layout.
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.world_size == 1:
            if self.shards > 1:
                for grad in grads:
                    grad.div_(self.shards)
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad
            return extras / self.shards
        flat = torch.cat([g.reshape(-1) for g in grads] + [extras.reshape(-1).to(grads[0].dtype)])
        dist.all_reduce(flat)  # a sum: DDP's mean would be over processes, not shards
        flat.div_(self.shards)
        offset = 0
        for param in params:
            param.grad = flat[offset : offset + param.numel()].view(param.shape).to(param.dtype)
            offset += param.numel()
        return flat[offset:]

    def map_shards(
        self, x: torch.Tensor, fn: Callable[[torch.Tensor], T], *, keys: Sequence[int]
    ) -> list[T | None]:
        """``fn`` of each of the S contiguous slices of ``x`` [n, ...], in slice order, on every process.

        This process computes its shards' slices, slice s under the stream
        (seed, *keys, s); the results (which must pickle, so keep them on the
        CPU) are gathered from all processes. An empty slice (n < S) gives None.
        """
        slices = x.tensor_split(self.shards)
        mine = {}
        for s in self.local_shards:
            if slices[s].shape[0]:
                with self.seeded(*keys, s):
                    mine[s] = fn(slices[s])
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, mine)
            for part in gathered:
                mine.update(part)
        return [mine.get(s) for s in range(self.shards)]

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Overwrite ``module``'s parameters and buffers with rank 0's, so that all processes start equal."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.world_size > 1:
            dist.barrier()

    def check_same(self, value: object, *, what: str) -> None:
        """Raise (in every process) unless all processes hold an equal ``value``, naming ``what`` differs."""
        if self.world_size == 1:
            return
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        differ = [rank for rank, other in enumerate(values) if other != values[0]]
        if differ:
            raise PyroVAEError(
                f"the processes disagree on {what} (rank {differ[0]} differs from rank 0); launch every process "
                "with the same flags and data"
            )


class ShardedELBO(ELBO):
    """``loss`` summed over this process's shards of a step, each under its own random stream.

    ``loss_and_grads(model, guide, shards, **kwargs)`` takes a list of
    :class:`Shard`; for each it applies ``preprocess`` (e.g. a dynamic
    binarization, ``torch.bernoulli``) to its data and backpropagates
    ``loss`` on it, every draw from the stream seeded by ``shard.seed``, so the
    gradients add up. :meth:`reduce_grads`, installed as
    ``AsyncSVI.reduce_grads``, then makes them the mean over all S shards of
    all processes; after the step ``global_loss`` is the mean of the S shard
    losses (the one-process estimate of the minibatch loss, equal in every
    process) and ``stop_requested`` whether any process asked to stop.
    """

    def __init__(
        self,
        loss: ELBO,
        *,
        parallel: DataParallel,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(
            num_particles=loss.num_particles,
            max_plate_nesting=loss.max_plate_nesting,
            vectorize_particles=False,  # the inner loss vectorizes; keep its nesting as it is
        )
        self.inner = loss
        self.parallel = parallel
        self.preprocess = preprocess
        self.global_loss = torch.zeros((), device=parallel.device)
        self._local_loss = torch.zeros((), device=parallel.device)
        self._stop = torch.zeros((), device=parallel.device)
        self._stop_seen = torch.zeros((), device=parallel.device)

    def _per_shard(self, shards: Sequence[Shard], fn: Callable[[torch.Tensor], Any]) -> torch.Tensor:
        """The sum over ``shards`` of ``fn(x)``, each shard's data prepared and ``fn`` run in its own stream."""
        total = torch.zeros((), device=self.parallel.device)
        for shard in shards:
            with seeded(shard.seed, device=self.parallel.device):
                x = shard.x if self.preprocess is None else self.preprocess(shard.x)
                total = total + torch.as_tensor(fn(x), device=total.device)
        return total

    def loss_and_grads(self, model, guide, shards: Sequence[Shard], **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def, override]
        """The sum of this process's shard losses, their gradients accumulated; see :meth:`reduce_grads`."""
        self._local_loss = self._per_shard(
            shards, lambda x: self.inner.loss_and_grads(model, guide, x, **kwargs)
        )
        return self._local_loss

    def differentiable_loss(self, model, guide, shards: Sequence[Shard], **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def, override]
        """This process's share of the mean over all S shards of their losses (all of it, in one process)."""
        total = self._per_shard(shards, lambda x: self.inner.differentiable_loss(model, guide, x, **kwargs))
        return total / self.parallel.shards

    def loss(self, model, guide, shards: Sequence[Shard], **kwargs) -> float:  # type: ignore[no-untyped-def, override]
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, shards, **kwargs))

    def _get_trace(self, model, guide, args, kwargs):  # type: ignore[no-untyped-def]
        return self.inner._get_trace(model, guide, args, kwargs)

    def request_stop(self) -> None:
        """Ask all processes to stop after the next step (Ctrl-C reached this one)."""
        self._stop.fill_(1.0)

    @property
    def stop_requested(self) -> bool:
        """Whether some process asked to stop by the last step; the same answer in all of them."""
        return bool(self._stop_seen > 0)

    def reduce_grads(self, params: list[torch.Tensor]) -> None:
        extras = torch.stack([self._local_loss.to(self._stop.dtype), self._stop])
        reduced = self.parallel.sum_gradients(params, extras)
        self.global_loss, self._stop_seen = reduced[0], reduced[1]
