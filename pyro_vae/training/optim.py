"""Adam over all of a model's parameters at once, as a Pyro optimizer.

``pyro.optim.Adam`` keeps one ``torch.optim.Adam`` per parameter and steps
them one after the other: ten Python-level optimizer steps per training step
for a two-layer VAE, each a string of separate kernels over its tensor.
:class:`JointAdam` is the same algorithm (Kingma & Ba, 2015) with one
``torch.optim.Adam`` over every parameter SVI hands it, run by torch's fused
kernel (one pass over each tensor) on the devices that have one. The update is
Adam's, element by element, so it follows the per-parameter optimizer up to
floating-point rounding; ``fused=False`` runs torch's plain loop and then the
two agree exactly (``tests/test_optim.py``).

References:
    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyro
import torch
from pyro.optim import PyroOptim

from ..errors import PyroVAEError

__all__ = ["JointAdam", "fused_adam_available"]


def fused_adam_available(device: torch.device) -> bool:
    """Whether torch has a fused Adam kernel for parameters on ``device``."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return device.type in _get_fused_kernels_supported_devices()
    except ImportError:  # a torch without the helper: the kernels exist for these two
        return device.type in ("cpu", "cuda")


class JointAdam(PyroOptim):
    """One ``torch.optim.Adam`` over all the parameters SVI steps, fused where torch can.

    It is built on the first call, from the parameters of that step, in the
    order of their names in the param store (so a saved state maps back by
    name); a parameter first seen later joins as a new group. Its state
    (``get_state``/``set_state``) is torch's optimizer state dict with the
    parameter names, which the training checkpoint stores.
    """

    def __init__(self, *, lr: float, fused: bool = True) -> None:
        # PyroOptim's constructor sets up per-parameter optimizers, which this class does not use.
        if not lr > 0:
            raise PyroVAEError(f"JointAdam needs a positive learning rate, got {lr!r}")
        self.lr = float(lr)
        self.fused = bool(fused)
        self.optimizer: torch.optim.Adam | None = None
        self.names: list[str] = []
        self._ids: set[int] = set()
        self._pending: dict[str, Any] | None = None

    def __call__(self, params: Iterable[torch.Tensor], *args: Any, **kwargs: Any) -> None:
        params = list(params)
        if self.optimizer is None:
            self._build(params)
        else:
            new = [p for p in params if id(p) not in self._ids]
            if new:
                names = self._names(new)
                self.optimizer.add_param_group({"params": [p for _, p in names], "lr": self.lr})
                self.names += [name for name, _ in names]
                self._ids.update(id(p) for p in new)
        self.optimizer.step()  # type: ignore[union-attr]

    def _names(self, params: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        store = pyro.get_param_store()
        return sorted(((store.param_name(p), p) for p in params), key=lambda item: item[0])

    def _build(self, params: list[torch.Tensor]) -> None:
        named = self._names(params)
        self.names = [name for name, _ in named]
        tensors = [p for _, p in named]
        self._ids = {id(p) for p in tensors}  # the parameters stepped so far, to spot new ones cheaply
        fused = self.fused and all(p.is_floating_point() and fused_adam_available(p.device) for p in tensors)
        # foreach=False with fused=False is torch's per-tensor loop: the arithmetic of pyro.optim.Adam.
        self.optimizer = torch.optim.Adam(
            tensors, lr=self.lr, fused=fused or None, foreach=None if fused else False
        )
        if self._pending is not None:
            pending, self._pending = self._pending, None
            if pending["names"] != self.names:
                raise PyroVAEError(
                    "the saved optimizer state is for other parameters "
                    f"({', '.join(pending['names'][:3])}, ...); resume with the model it was saved with"
                )
            self.optimizer.load_state_dict(pending["adam"])
            self.set_lr(self.lr)  # the rate set for this epoch, not the one saved with the state

    def set_lr(self, lr: float) -> None:
        """Step with the learning rate ``lr`` from now on (a schedule's rate of the epoch)."""
        if not lr > 0:
            raise PyroVAEError(f"JointAdam needs a positive learning rate, got {lr!r}")
        self.lr = float(lr)
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr

    def get_state(self) -> dict[str, Any]:
        if self.optimizer is None:
            return self._pending or {"names": [], "adam": None}
        return {"names": list(self.names), "adam": self.optimizer.state_dict()}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != {"names", "adam"}:
            raise PyroVAEError(
                "the optimizer state is not JointAdam's (a checkpoint of the per-parameter optimizer?); "
                "resume with the settings it was saved with"
            )
        if state["adam"] is None:
            return
        if self.optimizer is None:
            self._pending = state
        else:
            if state["names"] != self.names:
                raise PyroVAEError("the saved optimizer state is for other parameters")
            self.optimizer.load_state_dict(state["adam"])
            self.set_lr(self.lr)
