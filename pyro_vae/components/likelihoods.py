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

from ..errors import PyroVAEError
from ..registry import Registry
from . import distributions as vae_dist

__all__ = [
    "LIKELIHOODS",
    "Bernoulli",
    "ContinuousBernoulli",
    "DiscretizedLogistic",
    "Gaussian",
    "GaussianLearnedScale",
    "Laplace",
    "Likelihood",
    "StudentT",
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
            raise PyroVAEError(f"data_dim must be a positive integer, got {data_dim}")
        self.data_dim = data_dim

    def forward(self, decoder_output: torch.Tensor) -> dist.Distribution:
        raise NotImplementedError

    def check_data(self, x: torch.Tensor) -> None:
        """Raise ValueError when ``x`` [N, D] lies outside this likelihood's support."""
        if x.shape[-1] != self.data_dim:
            raise PyroVAEError(
                f"the {self.registered_name} likelihood was built for {self.data_dim} values per data point, "
                f"but the data have {x.shape[-1]}; rebuild the model for this data"
            )
        bad = ~torch.isfinite(x)
        if bad.any():
            raise PyroVAEError(
                f"the data hold {int(bad.sum())} NaN or infinite values; clean or drop those data points"
            )
        if self.binary_data:
            nonbinary = x[(x != 0) & (x != 1)]
            if nonbinary.numel():
                raise PyroVAEError(
                    f"the {self.registered_name} likelihood needs binary data (each value 0 or 1), but "
                    f"{nonbinary.numel()} values are not ({_examples(nonbinary)}); pass --binarize dynamic "
                    "or --binarize static, or choose a likelihood for grey values such as gaussian"
                )


@LIKELIHOODS.register("bernoulli")
class Bernoulli(Likelihood):
    """Independent Bernoulli pixels with logits from the decoder, for binary data."""

    binary_data = True

    def forward(self, decoder_output: torch.Tensor) -> dist.Distribution:
        return vae_dist.IndependentBernoulli(decoder_output)


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
            raise PyroVAEError(f"the gaussian likelihood's scale must be positive, got {scale}")
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, decoder_output: torch.Tensor) -> dist.Distribution:
        return dist.Normal(decoder_output, self.scale).to_event(1)


class _LearnedScale(Likelihood):
    """A location and a per-pixel scale = softplus(raw) + min_scale from the decoder.

    The decoder output [..., 2D] is [location block | raw-scale block].
    """

    outputs_per_dim = 2

    def __init__(self, *, data_dim: int, min_scale: float = 1e-3) -> None:
        super().__init__(data_dim=data_dim)
        if not min_scale > 0:
            raise PyroVAEError(
                f"the {self.registered_name} likelihood's min_scale must be positive, got {min_scale}"
            )
        self.min_scale = float(min_scale)

    def loc_and_scale(self, decoder_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw_scale = decoder_output.split(self.data_dim, dim=-1)  # each [..., D]
        return loc, F.softplus(raw_scale) + self.min_scale


@LIKELIHOODS.register("gaussian-learned-scale")
class GaussianLearnedScale(_LearnedScale):
    """Gaussian whose per-pixel mean and scale sigma_x(z) both come from the decoder.

    scale = softplus(raw) + min_scale. The floor keeps the density bounded: with a
    free variance the Gaussian VAE likelihood is unbounded and training can
    collapse a scale onto one pixel (Mattei & Frellsen, 2018, "Leveraging the
    exact likelihood of deep latent variable models").
    """

    def forward(self, decoder_output: torch.Tensor) -> dist.Distribution:
        return dist.Normal(*self.loc_and_scale(decoder_output)).to_event(1)


@LIKELIHOODS.register("laplace")
class Laplace(_LearnedScale):
    """Laplace with per-pixel location and scale from the decoder, for real data (an L1 loss).

    log p(x|z) = -sum_d [|x_d - mu_d(z)| / b_d(z) + log(2 b_d(z))], with
    b = softplus(raw) + min_scale; the floor keeps the density bounded, as for
    gaussian-learned-scale. Heavier tails than the Gaussian make the
    reconstruction term an L1 loss, less swayed by a few badly fit pixels.
    """

    def forward(self, decoder_output: torch.Tensor) -> dist.Distribution:
        return dist.Laplace(*self.loc_and_scale(decoder_output)).to_event(1)


@LIKELIHOODS.register("student-t")
class StudentT(_LearnedScale):
    """Student-t with per-pixel location and scale from the decoder and a fixed df, robust to outliers.

    x_d ~ StudentT(df, mu_d(z), sigma_d(z)), sigma = softplus(raw) + min_scale.
    The polynomial tails bound the pull of any single outlying pixel on the
    decoder, and, unlike a learned-scale Gaussian, the likelihood stays well
    behaved when a scale shrinks (Takahashi et al., 2018). df is fixed: small df
    (the default 3) gives heavy tails, df -> infinity recovers the Gaussian.
    df must exceed 1 so that the mean, used for reconstructions and samples,
    exists.

    References:
        Takahashi, Iwata, Yamanaka, Yamada & Yagi, "Student-t Variational
        Autoencoder for Robust Density Estimation", IJCAI 2018.
    """

    def __init__(self, *, data_dim: int, df: float = 3.0, min_scale: float = 1e-3) -> None:
        super().__init__(data_dim=data_dim, min_scale=min_scale)
        if not df > 1:
            raise PyroVAEError(
                f"the student-t likelihood's df must exceed 1 (its mean, used for reconstructions, is "
                f"undefined otherwise), got {df}"
            )
        self.register_buffer("df", torch.tensor(float(df)))

    def forward(self, decoder_output: torch.Tensor) -> dist.Distribution:
        loc, scale = self.loc_and_scale(decoder_output)
        return dist.StudentT(self.df, loc, scale).to_event(1)


@LIKELIHOODS.register("continuous-bernoulli")
class ContinuousBernoulli(Likelihood):
    """Continuous Bernoulli with logits from the decoder: a normalized density for grey values in [0, 1].

    p(x | lambda) = C(lambda) lambda^x (1 - lambda)^(1 - x) on [0, 1], lambda = sigmoid(eta(z)),
    with C(lambda) = 2 atanh(1 - 2 lambda) / (1 - 2 lambda) (C = 2 at lambda = 1/2).
    Without C this is the Bernoulli "cross-entropy" often applied to grey
    images, which is not a density on [0, 1] (Loaiza-Ganem & Cunningham, 2019).
    Its mean is not lambda: it is pulled towards 1/2, so reconstructions use the
    distribution's mean. log C is computed from the logits in a stable form
    (:class:`pyro_vae.distributions.ContinuousBernoulli`).

    References:
        Loaiza-Ganem & Cunningham, "The continuous Bernoulli: fixing a pervasive
        error in variational autoencoders", NeurIPS 2019.
    """

    def forward(self, decoder_output: torch.Tensor) -> dist.Distribution:
        return vae_dist.ContinuousBernoulli(logits=decoder_output).to_event(1)

    def check_data(self, x: torch.Tensor) -> None:
        super().check_data(x)
        outside = x[(x < 0) | (x > 1)]
        if outside.numel():
            raise PyroVAEError(
                f"the {self.registered_name} likelihood needs values in [0, 1], but {outside.numel()} values "
                f"are outside ({_examples(outside)}); rescale the data to [0, 1] or choose a likelihood "
                "for real values such as gaussian-learned-scale"
            )


@LIKELIHOODS.register("discretized-logistic")
class DiscretizedLogistic(Likelihood):
    """Discretized logistic over the 256 levels of 8-bit images scaled to [0, 1] (PixelCNN++).

    p(x | z) = F(x + 1/510) - F(x - 1/510) with F the logistic CDF of location
    mu(z) and scale s(z) = exp(max(raw, min_log_scale)); level 0 takes all mass
    below its bin and level 255 all above
    (:class:`pyro_vae.distributions.DiscretizedLogistic`). The floor on the log
    scale (PixelCNN++'s -7) stops a bin's mass from reaching 1 and the gradient
    from vanishing on a near-deterministic pixel. Because p is a probability
    mass over the 256 levels, -log p(x) / (D ln 2) is the bits per dimension
    that the image-modelling literature reports on the 0..255 scale, with no
    dequantization correction.

    References:
        Salimans, Karpathy, Chen & Kingma, "PixelCNN++: Improving the PixelCNN with
        discretized logistic mixture likelihood and other modifications", ICLR 2017.
        Kingma et al., "Improved Variational Inference with Inverse Autoregressive
        Flow", NeurIPS 2016 (the single-component discretized logistic).
    """

    outputs_per_dim = 2

    def __init__(self, *, data_dim: int, min_log_scale: float = -7.0) -> None:
        super().__init__(data_dim=data_dim)
        if not -20 <= min_log_scale <= 5:
            raise PyroVAEError(
                f"the discretized-logistic likelihood's min_log_scale is a natural log of a scale on [0, 1] "
                f"and should lie in [-20, 5], got {min_log_scale}"
            )
        self.min_log_scale = float(min_log_scale)

    def forward(self, decoder_output: torch.Tensor) -> dist.Distribution:
        loc, raw_log_scale = decoder_output.split(self.data_dim, dim=-1)  # each [..., D]
        scale = raw_log_scale.clamp(min=self.min_log_scale).exp()
        return vae_dist.DiscretizedLogistic(loc, scale).to_event(1)

    def check_data(self, x: torch.Tensor) -> None:
        super().check_data(x)
        off_grid = x[~vae_dist.eight_bit.check(x)]
        if off_grid.numel():
            raise PyroVAEError(
                f"the {self.registered_name} likelihood needs 8-bit images scaled by /255 (each value k/255 "
                f"for an integer k in 0..255), but {off_grid.numel()} values are not ({_examples(off_grid)}); "
                "load the raw 8-bit pixels and divide by 255, or choose a likelihood for continuous values "
                "such as continuous-bernoulli"
            )
