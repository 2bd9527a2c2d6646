"""Data-dependent initialization: the decoder's output bias at the logit of the mean training pixel.

With the bias b_d = logit(mean_n x_nd), the decoder's first output (its
weights are small) is the independent-pixel model p(x_d) = Bernoulli(mean
pixel), so the first steps learn structure rather than the pixels' average
brightness. Common reproductions of Burda et al. (2016) start this way.
"""

from __future__ import annotations

import torch
from torch import nn

from ..components.likelihoods import Bernoulli
from ..errors import PyroVAEError

__all__ = ["init_output_bias"]

# Mean pixels are clamped to [EPS, 1 - EPS] so that an always-black pixel gets a finite logit.
EPS = 1e-3


@torch.no_grad()
def init_output_bias(model: nn.Module, train_x: torch.Tensor) -> torch.Tensor:
    """Set the bias of ``model.decoder``'s last linear layer to logit(mean pixel of ``train_x`` [N, D]).

    Needs a Bernoulli likelihood (its decoder output is the logits) and a
    decoder whose last module is an ``nn.Linear`` with D outputs (the ``mlp``
    network); refuses anything else with a PyroVAEError. Grey data in [0, 1]
    give the mean probability, which is the mean of their dynamic binarization.
    Returns the bias it set, [D].
    """
    likelihood, decoder = getattr(model, "likelihood", None), getattr(model, "decoder", None)
    if not isinstance(likelihood, Bernoulli):
        raise PyroVAEError(
            "init_output_bias sets logits, so it needs a model with the bernoulli likelihood, got "
            f"{type(likelihood).__name__}; leave the output bias at its default with other likelihoods"
        )
    last = list(decoder.modules())[-1] if isinstance(decoder, nn.Module) else None
    if not isinstance(last, nn.Linear) or last.bias is None or last.out_features != likelihood.data_dim:
        raise PyroVAEError(
            "init_output_bias needs a decoder that ends in a linear layer with one biased output per data "
            f"dimension ({likelihood.data_dim}), as the mlp network's does; got {type(decoder).__name__}"
        )
    if train_x.ndim != 2 or train_x.shape[-1] != likelihood.data_dim:
        raise PyroVAEError(
            f"init_output_bias needs training data of shape [N, {likelihood.data_dim}], got {tuple(train_x.shape)}"
        )
    if train_x.min() < 0 or train_x.max() > 1:
        raise PyroVAEError("init_output_bias needs pixel values in [0, 1]; rescale the data first")
    mean = train_x.double().mean(0).clamp(EPS, 1 - EPS)  # [D]
    last.bias.copy_(torch.logit(mean).to(last.bias))
    return last.bias.detach().clone()
