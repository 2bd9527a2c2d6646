"""Type aliases and the protocols each pluggable role satisfies.

A prior, a likelihood and a guide are ``torch.nn.Module`` objects (so their
parameters move with ``.to(device)`` and are saved in a state dict) whose
``forward`` returns a :class:`pyro.distributions.Distribution`. The protocols
below say exactly what the VAE model asks of each role.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol, runtime_checkable

import pyro.distributions as dist
import torch

__all__ = [
    "Binarize",
    "DeviceLike",
    "GuideHead",
    "Likelihood",
    "ModelFn",
    "Prior",
]

DeviceLike = str | torch.device
Binarize = Literal["none", "static", "dynamic"]
# A Pyro model or guide: a function whose body calls pyro.sample.
ModelFn = Callable[..., Any]


@runtime_checkable
class Prior(Protocol):
    """p(z): returns a distribution with ``event_shape == [latent_dim]`` and empty batch shape."""

    latent_dim: int

    def __call__(self) -> dist.Distribution: ...


@runtime_checkable
class Likelihood(Protocol):
    """p(x | z): maps decoder output ``[..., outputs_per_dim * D]`` to a distribution with event shape ``[D]``."""

    outputs_per_dim: int

    def __call__(self, decoder_output: torch.Tensor) -> dist.Distribution: ...

    def check_data(self, x: torch.Tensor) -> None: ...


@runtime_checkable
class GuideHead(Protocol):
    """q(z | x): maps encoder features ``[..., feature_dim]`` to a distribution with event shape ``[latent_dim]``."""

    latent_dim: int

    def __call__(self, features: torch.Tensor) -> dist.Distribution: ...
