"""The plate over data points, shared by every model and guide of the package and by users' own."""

from __future__ import annotations

import pyro
import torch

from ..errors import PyroVAEError

__all__ = ["data_plate"]


def data_plate(x: torch.Tensor, num_data: int | None) -> pyro.plate:
    """The plate over data points: a minibatch of ``M = len(x)`` out of ``num_data``.

    Inside it every log-density is scaled by ``num_data / M``, so a minibatch
    loss is an unbiased estimate of the full-data negative ELBO. The minibatch
    itself is passed in, so the plate's indices are never used: giving them as
    ``arange(M)`` yields the same scaling as ``subsample_size=M`` without the
    random permutation of N indices that the latter draws at every call (work
    on the hot path, and a draw from the random stream that would make the
    latent samples depend on N).
    """
    batch_size = x.shape[0]
    num_data = batch_size if num_data is None else num_data
    if num_data < batch_size:
        raise PyroVAEError(
            f"num_data ({num_data}) cannot be smaller than the minibatch ({batch_size} data points)"
        )
    return pyro.plate("data", num_data, subsample=torch.arange(batch_size, device=x.device))
