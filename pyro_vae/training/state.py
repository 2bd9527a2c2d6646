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
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import PyroVAEError
from ..files import write_atomic

__all__ = ["FORMAT", "capture_rng", "load_checkpoint", "restore_rng", "save_checkpoint"]

FORMAT = "pyro_vae.checkpoint/1"


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
