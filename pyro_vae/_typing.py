"""Type aliases, the model contract, and the protocols of its optional abilities.

**The model contract** (:class:`VAEModel`): a model is an ``nn.Module`` with
two Pyro functions, ``model(x, *, num_data=None)`` for p(x, latents) and
``guide(x, *, num_data=None)`` for q(latents | x), whose per-datum sample
sites sit inside ``pyro_vae.data_plate(x, num_data)`` (a
``pyro.plate("data", ...)`` that scales a minibatch of M points by N / M).
Sites outside that plate are global latents. Nothing else is required: every
consumer (``fit``, the evaluators, the per-layer report, pictures, run folders,
export, the command line) uses only these two functions, and a model and
guide are checked against each other (:func:`pyro_vae.inference.validate_pair`)
before any number is computed.

**Optional abilities** are found on the object and never required; each has a
Protocol below. Where a model lacks one, :mod:`pyro_vae.models.abilities`
derives it from the two functions by tracing when that is exact, and a
consumer that cannot do without it says so in one line and carries on.

The pluggable parts (priors, likelihoods, guide heads) are the base classes of
:mod:`pyro_vae.components`: ``nn.Module`` objects whose ``forward`` returns a
:class:`pyro.distributions.Distribution`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
    "ChecksData",
    "Decodes",
    "DeviceLike",
    "ModelFn",
    "NamesLatents",
    "PosteriorMeans",
    "SamplesLatents",
    "VAEModel",
]

DeviceLike = str | torch.device
# A Pyro model or guide: a function whose body calls pyro.sample.
ModelFn = Callable[..., Any]


@runtime_checkable
class VAEModel(Protocol):
    """The model contract: a Pyro model and guide over a minibatch ``x`` [M, ...] of ``num_data`` points.

    Both are methods of an ``nn.Module`` (so ``pyro.module`` registers its
    networks and ``.to(device)`` moves them); every per-datum site sits in
    ``data_plate(x, num_data)``. ``num_data=None`` means the minibatch is the
    whole data set.
    """

    def model(self, x: torch.Tensor, *, num_data: int | None = None) -> Any: ...

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> Any: ...


@runtime_checkable
class NamesLatents(Protocol):
    """Ability: the latent site names, lowest layer (next to x) first, e.g. ``("z1", "z2")``."""

    latent_sites: Sequence[str]


@runtime_checkable
class PosteriorMeans(Protocol):
    """Ability: E_q[z | x] for every latent site, ``{site: [N, d]}`` (closed form where the guide has one)."""

    def posterior_means(self, x: torch.Tensor) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class Decodes(Protocol):
    """Ability: the mean of p(x | latents) [N, D] for given latent values ``{site: [N, d]}``.

    Sites left out are set to the mean of their conditional prior given the
    sites above them (so a top-layer value alone decodes through the layers below).
    """

    def decode(self, latents: Mapping[str, torch.Tensor]) -> torch.Tensor: ...


@runtime_checkable
class SamplesLatents(Protocol):
    """Ability: ``num`` draws of the latents from the prior, ``{site: [num, d]}``."""

    def sample_latents(self, num: int) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class ChecksData(Protocol):
    """Ability: raise a :class:`~pyro_vae.errors.PyroVAEError` when ``x`` [N, D] is not data the model can score."""

    def check_data(self, x: torch.Tensor) -> None: ...
