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
with non-finite weights. Every checkpoint and every ``model.pt`` is *sealed*:
the file holds ``{"format": SEALED, "sha256": ..., "payload": uint8 tensor}``,
the payload being the bytes ``torch.save`` wrote of the state, and every load checks
the SHA-256 of the payload before reading it, so one flipped bit anywhere in
the state (a tensor record, the pickle) is refused instead of resumed.
:func:`load_weights` and :func:`load_checkpoint` also refuse weights that are
NaN or infinite, so a damaged file is never called "the last good" one.

:class:`TrainingState` is where the loop stands (epoch, step, the epoch's data
order and running sums, the history); it writes itself into the checkpoint
dict and reads itself back. :func:`check_resumable` refuses a checkpoint made
with other settings, another model or other data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
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
    "SEALED",
    "EpochRecord",
    "TrainingState",
    "capture_rng",
    "check_resumable",
    "describe_model",
    "load_checkpoint",
    "load_weights",
    "restore_rng",
    "save_checkpoint",
    "save_weights",
]

FORMAT = "pyro_vae.checkpoint/1"
# The envelope of a file whose payload carries its own SHA-256 (checkpoint.pt, model.pt).
SEALED = "pyro_vae.sealed/1"


@dataclass(frozen=True)
class EpochRecord:
    """Per-datum ELBOs in nats after one epoch, and its wall time.

    ``valid_elbo`` is the validation score of the epochs where one was computed (``TrainConfig.eval_every``):
    the ELBO, or the IWAE_K bound with ``valid_samples`` K > 1; None otherwise.
    """

    epoch: int
    train_elbo: float
    test_elbo: float | None
    seconds: float
    valid_elbo: float | None = None


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
    is computed). A checkpoint that lacks what a resume reads, or whose
    position in the epoch contradicts its data order, is refused as damaged.
    """
    _check_complete(saved)
    # A checkpoint from before an option existed was trained with its default.
    ours, theirs = config.to_dict(), {**_TRAIN_DEFAULTS, **saved["train_config"]}
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
    started = saved["train_config"].get("epochs")
    if config.lr_schedule == "cosine" and config.epochs != started:
        raise PyroVAEError(
            f"the cosine schedule spans the run's --epochs, {started} when it was started; resume with "
            f"--epochs {started} (other epochs would change the rates of the epochs already trained)"
        )


# Every TrainConfig field and its default: what a checkpoint from before the field existed was trained with.
_TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _check_complete(saved: Mapping[str, Any]) -> None:
    """Refuse a checkpoint without the entries a resume reads, or whose epoch position contradicts itself."""
    missing = [k for k in ("train_config", "model_config", "num_data", "optim", "rng") if k not in saved]
    if missing:
        raise PyroVAEError(
            f"the checkpoint lacks {', '.join(missing)} (it was damaged or not written by pyro_vae's training); "
            "it cannot be resumed: train afresh with --overwrite"
        )
    if (
        not isinstance(saved["train_config"], Mapping)
        or not isinstance(saved["train_config"].get("batch_size"), int)
        or not isinstance(saved["optim"], Mapping)
    ):
        raise PyroVAEError(
            "the checkpoint's train_config or optim entry is not a mapping; train afresh with --overwrite"
        )
    problem = None
    sharded = saved["train_config"].get("shards") is not None
    order, done = saved["order"], saved["done"]
    if saved["rng"] is None and not sharded:
        problem = "no random state, which only a sharded run goes without"
    elif saved["rng"] is not None and not (
        isinstance(saved["rng"], Mapping) and set(saved["rng"]) >= _RNG_KEYS
    ):
        problem = "a random state that is not one capture_rng wrote"
    elif len(saved["history"]) != saved["epoch"] - 1:
        problem = f"epoch {saved['epoch']} in progress but {len(saved['history'])} epochs recorded"
    elif not sharded and order is None and done > 0:
        problem = f"{done} minibatches of the epoch done but no data order"
    elif order is not None and order.numel() != saved["num_data"]:
        problem = f"a data order of {order.numel()} points for {saved['num_data']} training points"
    elif order is not None and done > (
        steps := math.ceil(order.numel() / saved["train_config"]["batch_size"])
    ):
        problem = f"{done} minibatches done of an epoch that has {steps}"
    if problem:
        raise PyroVAEError(
            f"the checkpoint is inconsistent ({problem}); it cannot be resumed: train afresh with --overwrite"
        )


_RNG_KEYS = frozenset({"torch", "cuda", "numpy", "python"})


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


def _non_finite(weights: Mapping[str, Any]) -> list[str]:
    """The names of the floating-point tensors in ``weights`` that hold a NaN or an infinity."""
    return [
        name
        for name, tensor in weights.items()
        if isinstance(tensor, torch.Tensor)
        and tensor.is_floating_point()
        and not torch.isfinite(tensor).all()
    ]


def _seal(value: object) -> bytes:
    """``value`` as ``torch.save`` writes it, inside an envelope that holds the SHA-256 of those bytes."""
    payload = io.BytesIO()
    torch.save(value, payload)
    data = payload.getvalue()
    # The payload as a uint8 tensor: stored as one raw record (pickle protocol 2 would re-encode bytes).
    payload_tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    sealed = io.BytesIO()
    torch.save(
        {"format": SEALED, "sha256": hashlib.sha256(data).hexdigest(), "payload": payload_tensor}, sealed
    )
    return sealed.getvalue()


def _write_sealed(path: Path, value: object) -> None:
    # Serialized in memory first, so the file is written by one plain write: a full disk is an OSError
    # (ENOSPC) naming the file, not a RuntimeError from deep inside torch's zip writer.
    data = _seal(value)
    write_atomic(path, lambda handle: handle.write(data))


def _read_sealed(path: Path, *, what: str, advice: str) -> Any:
    """The value :func:`_seal` wrote to ``path``, its checksum verified; ``what`` and ``advice`` word the refusals.

    A file without the envelope was written before checkpoints were sealed; it
    is read unchecked (it can only have been checked by the fields and shapes
    that follow), so that runs trained before are not stranded: refusing them
    would leave their owners nothing to do but train again.
    """
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "missing"
        raise PyroVAEError(f"{what} {path} is {kind}, not a file; {advice}")
    try:
        data = path.read_bytes()  # read first, so that only the system's refusals are OSErrors
    except OSError as error:
        raise PyroVAEError(f"cannot read {what} {path}: {error.strerror or error}") from None
    try:
        stored = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # truncation and corruption surface as many exception types
        raise PyroVAEError(
            f"{what} {path} cannot be loaded: it is truncated or corrupted ({type(error).__name__}); {advice}"
        ) from None
    if not (isinstance(stored, dict) and stored.get("format") == SEALED):
        return stored  # unsealed: written before checksums (see above)
    payload, digest = stored.get("payload"), stored.get("sha256")
    if isinstance(payload, torch.Tensor) and payload.dtype == torch.uint8 and payload.dim() == 1:
        payload = payload.numpy().tobytes()
    if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != digest:
        raise PyroVAEError(
            f"{what} {path} fails its SHA-256 check: it was damaged after it was written; {advice}"
        )
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as error:  # the checksum matched, so this is a payload torch cannot read
        raise PyroVAEError(
            f"{what} {path} cannot be read ({type(error).__name__}: {error}); {advice}"
        ) from None


def save_weights(path: str | Path, weights: Mapping[str, torch.Tensor]) -> None:
    """Write a state dict to ``path`` (``model.pt``) atomically and sealed with its SHA-256."""
    _write_sealed(Path(path), {name: tensor.detach().cpu() for name, tensor in weights.items()})


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict :func:`save_weights` wrote, its checksum verified; damaged or non-finite weights are refused."""
    path = Path(path)
    advice = "train the run again (or, if its checkpoint.pt is intact, rerun its train command with --resume)"
    weights = _read_sealed(path, what="the weights file", advice=advice)
    if not isinstance(weights, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise PyroVAEError(f"{path} is not a state dict of named tensors; {advice}")
    bad = _non_finite(weights)
    if bad:
        raise PyroVAEError(f"{path} holds NaN or infinite weights ({', '.join(bad[:3])}); {advice}")
    return dict(weights)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically and sealed; refuses weights that are NaN or infinite."""
    bad = _non_finite(state["model"])
    if bad:
        raise FloatingPointError(
            f"refusing to write a checkpoint with non-finite weights ({', '.join(bad[:3])})"
        )
    _write_sealed(Path(path), {"format": FORMAT, **state})


# The entries TrainingState.to_checkpoint writes, and the Python types each must have.
_STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "epoch": (int,),
    "done": (int,),
    "step": (int,),
    "seen": (int,),
    "epoch_loss": (float, int),
    "history": (list,),
}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint: its checksum, weights and fields checked; a damaged file raises PyroVAEError naming it."""
    path = Path(path)
    if not path.exists():
        raise PyroVAEError(f"there is no checkpoint at {path} to resume from; train without --resume")
    advice = "it cannot be resumed: train afresh with --overwrite"
    state = _read_sealed(path, what="the checkpoint", advice=advice)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise PyroVAEError(f"{path} is not a pyro_vae checkpoint (format {FORMAT}); {advice}")
    weights = state.get("model")
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise PyroVAEError(f"the checkpoint {path} holds no model weights; {advice}")
    bad = _non_finite(weights)
    if bad:
        raise PyroVAEError(
            f"the checkpoint {path} holds NaN or infinite weights ({', '.join(bad[:3])}); {advice}"
        )
    problem = _state_problem(state)
    if problem:
        raise PyroVAEError(f"the checkpoint {path} is inconsistent ({problem}); {advice}")
    return state


def _state_problem(state: Mapping[str, Any]) -> str | None:
    """What is wrong with the training-state entries of a checkpoint, or None."""
    for name, types in _STATE_FIELDS.items():
        value = state.get(name)
        if name not in state or isinstance(value, bool) or not isinstance(value, types):
            return f"its {name!r} entry is missing or not a number" if name != "history" else "no history"
    if state["epoch"] < 1 or min(state["done"], state["step"], state["seen"]) < 0:
        return "a negative count or an epoch before the first"
    if not math.isfinite(state["epoch_loss"]):
        return "a non-finite running loss"
    if state["done"] > state["step"]:
        return f"{state['done']} minibatches done in the epoch but only {state['step']} steps in all"
    order = state.get("order")
    if order is not None:
        if not isinstance(order, torch.Tensor) or order.dim() != 1 or order.dtype != torch.long:
            return "its data order is not a vector of indices"
        if not torch.equal(order.sort().values, torch.arange(order.numel())):
            return "its data order is not a permutation of the data"
    try:
        [EpochRecord(**record) for record in state["history"]]
    except TypeError:
        return "its history is not a list of epoch records"
    return None
