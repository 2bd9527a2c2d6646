"""Likelihoods p(x | z): observation models on top of the decoder.

A likelihood is a ``torch.nn.Module`` that maps the decoder's output
``[..., outputs_per_dim * D]`` to a :class:`pyro.distributions.Distribution`
whose event shape is the data shape ``[D]``. ``check_data`` rejects data
outside the distribution's support once, before training, with a sentence that
names the likelihood, the offending values and the fix.
"""

from __future__ import annotations

from typing import ClassVar

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from .registry import Registry

__all__ = [
    "LIKELIHOODS",
    "Bernoulli",
    "Gaussian",
    "GaussianLearnedScale",
    "Likelihood",
]

LIKELIHOODS: Registry = Registry("likelihood")


def _examples(values: torch.Tensor, limit: int = 3) -> str:
    shown = ", ".join(f"{v:g}" for v in values.flatten()[:limit].tolist())
    return shown + (", ..." if values.numel() > limit else "")


class Likelihood(nn.Module):
    """Base class of the registered likelihoods.

    Subclasses set ``outputs_per_dim`` (how many decoder outputs each data
    dimension needs) and ``binary_data`` (whether the support is {0, 1}).
    """

    outputs_per_dim: ClassVar[int] = 1
    binary_data: ClassVar[bool] = False
    registered_name: ClassVar[str]

    def __init__(self, *, data_dim: int) -> None:
        super().__init__()
        if data_dim < 1:
            raise ValueError(f"data_dim must be a positive integer, got {data_dim}")
        self.data_dim = data_dim

    def forward(self, decoder_output: torch.Tensor) -> dist.Distribution:
        raise NotImplementedError

    def check_data(self, x: torch.Tensor) -> None:
        """Raise ValueError when ``x`` [N, D] lies outside this likelihood's support."""
        if x.shape[-1] != self.data_dim:
            raise ValueError(
                f"the {self.registered_name} likelihood was built for {self.data_dim} values per data point, "
                f"but the data have {x.shape[-1]}; rebuild the model for this data"
            )
        bad = ~torch.isfinite(x)
        if bad.any():
            raise ValueError(
                f"the data hold {int(bad.sum())} NaN or infinite values; clean or drop those data points"
            )
        if self.binary_data:
            nonbinary = x[(x != 0) & (x != 1)]
            if nonbinary.numel():
                raise ValueError(
                    f"the {self.registered_name} likelihood needs binary data (each value 0 or 1), but "
                    f"{nonbinary.numel()} values are not ({_examples(nonbinary)}); pass --binarize dynamic "
                    "or --binarize static, or choose a likelihood for grey values such as gaussian"
                )


@LIKELIHOODS.register("bernoulli")
class Bernoulli(Likelihood):
    """Independent Bernoulli pixels with logits from the decoder, for binary data."""

    binary_data = True

    def forward(self, decoder_output: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=decoder_output).to_event(1)


@LIKELIHOODS.register("gaussian")
class Gaussian(Likelihood):
    """Gaussian with the decoder's mean and a fixed scale: squared error, the beta-VAE case.

    log p(x|z) = -||x - mu(z)||^2 / (2 scale^2) - D log(scale sqrt(2 pi)). A smaller
    scale weighs reconstruction more against the KL term: scale^2 plays the role
    of beta / 2 in a squared-error beta-VAE. The default 0.1 suits data in [0, 1];
    scale 1 lets the KL term dominate and collapses the posterior.
    """

    def __init__(self, *, data_dim: int, scale: float = 0.1) -> None:
        super().__init__(data_dim=data_dim)
        if not scale > 0:
            raise ValueError(f"the gaussian likelihood's scale must be positive, got {scale}")
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, decoder_output: torch.Tensor) -> dist.Distribution:
        return dist.Normal(decoder_output, self.scale).to_event(1)


@LIKELIHOODS.register("gaussian-learned-scale")
class GaussianLearnedScale(Likelihood):
    """Gaussian whose per-pixel mean and scale sigma_x(z) both come from the decoder.

    scale = softplus(raw) + min_scale. The floor keeps the density bounded: with a
    free variance the Gaussian VAE likelihood is unbounded and training can
    collapse a scale onto one pixel (Mattei & Frellsen, 2018, "Leveraging the
    exact likelihood of deep latent variable models").
    """

    outputs_per_dim = 2

    def __init__(self, *, data_dim: int, min_scale: float = 1e-3) -> None:
        super().__init__(data_dim=data_dim)
        if not min_scale > 0:
            raise ValueError(f"min_scale must be positive, got {min_scale}")
        self.min_scale = float(min_scale)

    def forward(self, decoder_output: torch.Tensor) -> dist.Distribution:
        loc, raw_scale = decoder_output.split(self.data_dim, dim=-1)  # each [..., D]
        return dist.Normal(loc, F.softplus(raw_scale) + self.min_scale).to_event(1)
