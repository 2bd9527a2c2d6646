"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the model's weights, the optimizer's state (JointAdam's,
or Pyro's per-parameter optimizers with ``fused_adam=False``), the
random-number states of torch (CPU and CUDA), numpy and Python (none for a
sharded run, whose draws follow from the seed and the step), the position in
the current epoch (its permutation of the data and the number of minibatches
done), the running sums of the epoch and the history so far. Resuming from it replays the remaining steps with the same
random draws, so on the CPU a run killed at any moment and resumed ends with
exactly the parameters of a run that was never interrupted.

Checkpoints are written atomically (temporary file, fsync, rename) and never
with non-finite weights.

:class:`TrainingState` is where the loop stands (epoch, step, the epoch's data
order and running sums, the history); it writes itself into the checkpoint
dict and reads itself back. :func:`check_resumable` refuses a checkpoint made
with other settings, another model or other data.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import TrainConfig
from ..errors import PyroVAEError, PyroVAETypeError
from ..files import write_atomic

__all__ = [
    "FORMAT",
    "EpochRecord",
    "TrainingState",
    "capture_rng",
    "check_resumable",
    "describe_model",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

FORMAT = "pyro_vae.checkpoint/1"


@dataclass(frozen=True)
class EpochRecord:
    """Per-datum ELBOs in nats after one epoch, and its wall time."""

    epoch: int
    train_elbo: float
    test_elbo: float | None
    seconds: float


@dataclass(kw_only=True)
class TrainingState:
    """Where training stands: the epoch in progress, how far into it, its running sums, and the history.

    ``epoch_loss`` is the sum over the epoch's steps of (step loss) x M / N, a
    float64 device scalar (read back only when shown), so that
    ``-epoch_loss / seen`` is the epoch's mean per-datum objective in nats.
    """

    epoch: int = 1  # the epoch in progress, from 1
    done: int = 0  # minibatches of that epoch already stepped on
    step: int = 0  # steps taken since the start of training
    seen: int = 0  # data points of the epoch stepped on so far
    # The epoch's permutation of the data [N] (one process); None before it is drawn, and always with shards.
    order: torch.Tensor | None = None
    # float64, so thousands of float32 step losses add up without drift: [] on the training device.
    epoch_loss: torch.Tensor
    history: list[EpochRecord] = field(default_factory=list)

    @classmethod
    def start(cls, *, device: torch.device) -> TrainingState:
        """The state before the first step."""
        return cls(epoch_loss=torch.zeros((), dtype=torch.float64, device=device))

    def add_step(self, loss: torch.Tensor, *, size: int, num_data: int) -> None:
        """Count a step on ``size`` points whose loss (a device scalar, the full-data estimate) was ``loss``."""
        self.epoch_loss += loss.double() * (size / num_data)
        self.seen += size
        self.step += 1
        self.done += 1

    def finish_epoch(self, record: EpochRecord) -> None:
        """Record the epoch and stand at the start of the next one (its order not drawn yet)."""
        self.history.append(record)
        self.epoch, self.done, self.order, self.seen = self.epoch + 1, 0, None, 0
        self.epoch_loss = self.epoch_loss.new_zeros(())

    def to_checkpoint(self) -> dict[str, Any]:
        """The state as checkpoint entries (tensors on the CPU, plain numbers, records as dicts)."""
        return {
            "epoch": self.epoch,
            "done": self.done,
            "step": self.step,
            "seen": self.seen,
            "order": None if self.order is None else self.order.cpu(),
            "epoch_loss": float(self.epoch_loss),
            "history": [asdict(record) for record in self.history],
        }

    @classmethod
    def from_checkpoint(cls, saved: Mapping[str, Any], *, device: torch.device) -> TrainingState:
        """The state :meth:`to_checkpoint` wrote, its tensors on ``device``."""
        return cls(
            epoch=saved["epoch"],
            done=saved["done"],
            step=saved["step"],
            seen=saved["seen"],
            order=None if saved["order"] is None else saved["order"].to(device),
            epoch_loss=torch.tensor(saved["epoch_loss"], dtype=torch.float64, device=device),
            history=[EpochRecord(**record) for record in saved["history"]],
        )


def describe_model(model_config: Any) -> dict[str, Any] | None:
    """The JSON-able description a checkpoint keeps of the model: ``to_dict()`` if it has one, else ``dict()``."""
    if model_config is None:
        return None
    to_dict = getattr(model_config, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    if isinstance(model_config, Mapping):
        return dict(model_config)
    raise PyroVAETypeError(
        "model_config must be a ModelConfig (anything with to_dict()) or a JSON-able dict describing the "
        f"model, got {type(model_config).__name__}"
    )


def check_resumable(
    saved: Mapping[str, Any],
    config: TrainConfig,
    *,
    model_config: Mapping[str, Any] | None,
    weights: Mapping[str, torch.Tensor],
    num_data: int,
) -> None:
    """Refuse a checkpoint made with other settings, another model or other data.

    ``model_config`` is :func:`describe_model`'s description of the model and
    ``weights`` its state dict; the number of epochs may grow (train longer),
    and the device and jit may change (they change where and how, not what,
    is computed).
    """
    ours, theirs = config.to_dict(), dict(saved["train_config"])
    then, now = theirs.get("shards"), ours["shards"]
    if then != now:
        # Each shard draws from its own random streams, so the shard count is part of what is computed.
        def shards(count: int | None) -> str:
            return f"--shards {count}" if count else "no shards (one process, without --distributed)"

        raise PyroVAEError(
            f"the checkpoint was trained with {shards(then)} and this run has {shards(now)}; resume with "
            + shards(then)
            + (f" (under torchrun, on a number of processes that divides {then})" if then else "")
        )
    for free in ("epochs", "device", "jit"):
        ours.pop(free), theirs.pop(free, None)
    differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    stored = saved["model_config"]
    if model_config is not None and stored is not None:
        differ += sorted(
            f"model.{k}"
            for k in set(model_config) | set(stored)
            if _plain(model_config.get(k)) != _plain(stored.get(k))
        )
    if saved["num_data"] != num_data:
        differ.append(f"number of training points ({saved['num_data']} then, {num_data} now)")
    expected = {k: tuple(v.shape) for k, v in weights.items()}
    stored_shapes = {k: tuple(v.shape) for k, v in saved["model"].items()}
    if expected != stored_shapes:
        differ.append("model weights (names or shapes)")
    if differ:
        raise PyroVAEError(
            f"the checkpoint was made with another configuration (differs in: {', '.join(differ)}); "
            "resume with the original settings, or train afresh with --overwrite"
        )
    if config.epochs < saved["epoch"] - 1:
        raise PyroVAEError(
            f"the checkpoint has finished {saved['epoch'] - 1} epochs, more than --epochs {config.epochs}"
        )


def _plain(value: object) -> object:
    # JSON turns tuples into lists; compare configs in that form.
    return list(value) if isinstance(value, tuple) else value


def capture_rng() -> dict[str, Any]:
    """The states of every random-number generator training draws from."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # numpy's state holds an ndarray; kept as a tensor so the file loads with weights_only=True.
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_as_tuples(state["python"]))


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically; refuses weights that are NaN or infinite."""
    bad = [
        name
        for name, tensor in state["model"].items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if bad:
        raise FloatingPointError(
            f"refusing to write a checkpoint with non-finite weights ({', '.join(bad[:3])}); "
            "the last good checkpoint is kept"
        )
    payload = {"format": FORMAT, **state}
    write_atomic(Path(path), lambda handle: torch.save(payload, handle))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint; a missing, truncated or foreign file raises ValueError with the path."""
    path = Path(path)
    if not path.is_file():
        raise PyroVAEError(f"there is no checkpoint at {path} to resume from; train without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncation and corruption surface as many exception types
        raise PyroVAEError(
            f"the checkpoint {path} is truncated or corrupted ({type(error).__name__}); "
            "delete it and train again without --resume"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise PyroVAEError(
            f"{path} is not a pyro_vae checkpoint (format {FORMAT}); train again without --resume"
        )
    return state
