"""How the training data reach the step, chosen once per run: one process, or shards.

A feeder answers everything the loop would otherwise ask with ``if shards is
None`` on every line: which minibatches an epoch has, what a step is given,
how big the step's minibatch was and what its loss is, whether to stop, and
the per-epoch test ELBO.

- :class:`SingleProcess` (no ``shards``): one process draws the data order
  (a fresh ``randperm`` every epoch) and all noise from torch's global
  generator, as the package always has, so a seed gives the numbers it gave
  before and a checkpoint carries that generator's state. With dynamic
  binarization each minibatch is drawn x ~ Bernoulli(grey values) at its step.
- :class:`Sharded` (``shards=S``): every minibatch cut into S shards with
  random streams of their own, computed by the W processes of the group (see
  :mod:`pyro_vae.training.distributed`); its draws follow from (seed, step),
  so a checkpoint needs no random state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from pyro.infer.elbo import ELBO

from .._typing import VAEModel
from ..config import TrainConfig
from .distributed import DataParallel, Shard, ShardedELBO, Stream, derive_seed
from .elbo import mean_elbo, negative_elbo_sum
from .state import TrainingState, capture_rng

__all__ = ["Feeder", "Sharded", "SingleProcess", "make_feeder"]


class Feeder(Protocol):
    """The way a run's data are fed; see the module docstring for the two there are."""

    # Whether this process is the one that writes files and shows progress.
    is_main: bool
    # Installed as AsyncSVI.reduce_grads: where the gradients of all processes are combined, if anywhere.
    reduce_grads: Callable[[list[torch.Tensor]], None] | None

    @property
    def samples_per_epoch(self) -> int:
        """The data points one epoch visits."""
        ...

    def objective(self, loss: ELBO) -> ELBO:
        """The loss the step differentiates, built on ``loss``."""
        ...

    def start(self, model: VAEModel) -> None:
        """Before the first step: make every process agree on the settings and start from equal weights."""
        ...

    def epoch(self, state: TrainingState) -> Sequence[Any]:
        """The minibatches of ``state.epoch``, in order (drawn at its start; kept in ``state`` if needed)."""
        ...

    def feed(self, minibatch: Any, *, step: int) -> Any:
        """The argument of the step on ``minibatch`` at ``step`` (0-based)."""
        ...

    def step_loss(self, loss: torch.Tensor, fed: Any) -> tuple[torch.Tensor, int]:
        """The step's full-data loss estimate (a device scalar) and the number of points it was computed on."""
        ...

    def request_stop(self) -> None:
        """Tell the other processes, with the next step, that this one was asked to stop."""
        ...

    def stop_requested(self, here: bool, *, at_sync: bool) -> bool:
        """Whether to stop after this step, given whether this process was asked to (``here``)."""
        ...

    def barrier(self) -> None:
        """Wait until every process gets here."""
        ...

    def rng_state(self) -> dict[str, Any] | None:
        """The random state a checkpoint must carry to continue exactly (None: it follows from the step)."""
        ...

    def test_elbo(self, model: VAEModel, x: torch.Tensor, *, epoch: int) -> float:
        """The ELBO per data point of ``x`` after ``epoch``, in nats."""
        ...


class SingleProcess:
    """One process, every draw from torch's global generator: the package's numbers since its first release."""

    is_main: bool = True
    reduce_grads: Callable[[list[torch.Tensor]], None] | None = None  # nothing to combine

    def __init__(self, train: torch.Tensor, config: TrainConfig, *, dynamic_binarization: bool) -> None:
        self.train = train  # [N, D], on the training device
        self.config = config
        self.binarize = dynamic_binarization

    @property
    def samples_per_epoch(self) -> int:
        return self.train.shape[0]

    def objective(self, loss: ELBO) -> ELBO:
        return loss

    def start(self, model: VAEModel) -> None:
        return None

    def epoch(self, state: TrainingState) -> Sequence[torch.Tensor]:
        if state.order is None:
            # A fresh permutation every epoch, from the global generator (restored on resume).
            state.order = torch.randperm(self.train.shape[0], device=self.train.device)
        return state.order.split(self.config.batch_size)

    def feed(self, minibatch: torch.Tensor, *, step: int) -> torch.Tensor:
        x = self.train[minibatch]  # [M, D]; the last minibatch may be smaller, and N/M keeps it unbiased
        return torch.bernoulli(x) if self.binarize else x

    def step_loss(self, loss: torch.Tensor, fed: torch.Tensor) -> tuple[torch.Tensor, int]:
        return loss, fed.shape[0]

    def request_stop(self) -> None:
        return None  # no one else to tell

    def stop_requested(self, here: bool, *, at_sync: bool) -> bool:
        return here

    def barrier(self) -> None:
        return None

    def rng_state(self) -> dict[str, Any] | None:
        return capture_rng()

    def test_elbo(self, model: VAEModel, x: torch.Tensor, *, epoch: int) -> float:
        return mean_elbo(model, x, num_particles=self.config.num_particles)


class Sharded:
    """S shards of every minibatch, each with random streams of its own, over the processes of the group.

    Shard s of step t draws from the stream (seed, TRAIN, t, s) and takes its
    part of the epoch's permutation drawn from ``seed + epoch``
    (``DistributedSampler``); the step loss is the mean of the S shard
    losses, summed over all processes, the same in each. The test ELBO is
    computed slice by slice, slice s under the stream (seed, TEST_ELBO, epoch, s).
    """

    def __init__(
        self, train: torch.Tensor, config: TrainConfig, *, dynamic_binarization: bool, device: torch.device
    ) -> None:
        assert config.shards is not None, "a sharded feeder needs config.shards"
        self.train = train  # [N, D], on the training device
        self.config = config
        self.parallel = DataParallel(shards=config.shards, seed=config.seed, device=device)
        self.is_main = self.parallel.is_main
        self.binarize = dynamic_binarization
        self.sharded: ShardedELBO | None = None
        self.reduce_grads: Callable[[list[torch.Tensor]], None] | None = None

    @property
    def samples_per_epoch(self) -> int:
        return self.parallel.samples_per_epoch(self.train.shape[0])

    def objective(self, loss: ELBO) -> ELBO:
        self.sharded = ShardedELBO(
            loss, parallel=self.parallel, preprocess=torch.bernoulli if self.binarize else None
        )
        self.reduce_grads = self.sharded.reduce_grads
        return self.sharded

    def start(self, model: VAEModel) -> None:
        # Everything but the device (cuda:LOCAL_RANK differs by process) must agree, or the sums are garbage.
        settings = {k: v for k, v in self.config.to_dict().items() if k != "device"}
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}  # type: ignore[attr-defined]
        self.parallel.check_same((settings, self.train.shape[0], shapes), what="the settings, data or model")
        self.parallel.broadcast_module(model)  # type: ignore[arg-type]

    def epoch(self, state: TrainingState) -> Sequence[list[tuple[int, torch.Tensor]]]:
        # Each shard's indices from DistributedSampler, drawn from (seed, epoch): nothing to store.
        return self.parallel.minibatches(
            self.train.shape[0], batch_size=self.config.batch_size, epoch=state.epoch
        )

    def feed(self, minibatch: list[tuple[int, torch.Tensor]], *, step: int) -> list[Shard]:
        return [
            Shard(s, derive_seed(self.config.seed, Stream.TRAIN, step, s), self.train[i])
            for s, i in minibatch
        ]

    def _loss(self) -> ShardedELBO:
        assert self.sharded is not None, "objective() builds the sharded loss before the first step"
        return self.sharded

    def step_loss(self, loss: torch.Tensor, fed: list[Shard]) -> tuple[torch.Tensor, int]:
        # The mean of the S shard losses, summed over all processes: the same in each.
        return self._loss().global_loss, self.parallel.shards * fed[0].x.shape[0]

    def request_stop(self) -> None:
        self._loss().request_stop()  # travels with this step's gradients to every process

    def stop_requested(self, here: bool, *, at_sync: bool) -> bool:
        # The flag all processes summed, read back (a host sync) at the same steps in each.
        return at_sync and self._loss().stop_requested

    def barrier(self) -> None:
        self.parallel.barrier()

    def rng_state(self) -> dict[str, Any] | None:
        return None

    def test_elbo(self, model: VAEModel, x: torch.Tensor, *, epoch: int) -> float:
        """:func:`mean_elbo` of ``x`` cut into the run's S slices, slice s drawn from (seed, TEST_ELBO, epoch, s)."""
        totals = self.parallel.map_shards(
            x,
            lambda xs: float(negative_elbo_sum(model, xs, num_particles=self.config.num_particles)),
            keys=(Stream.TEST_ELBO, epoch),
        )
        return -math.fsum(t for t in totals if t is not None) / x.shape[0]  # fsum: exact, in any order


def make_feeder(
    train: torch.Tensor, config: TrainConfig, *, dynamic_binarization: bool, device: torch.device
) -> Feeder:
    """:class:`Sharded` when ``config.shards`` is set, else :class:`SingleProcess`."""
    if config.shards is None:
        return SingleProcess(train, config, dynamic_binarization=dynamic_binarization)
    return Sharded(train, config, dynamic_binarization=dynamic_binarization, device=device)
