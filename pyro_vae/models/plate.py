"""The plate over data points, shared by every model and guide of the package and by users' own."""

from __future__ import annotations

import pyro
import torch

from ..errors import PyroVAEError

__all__ = ["data_plate"]


def data_plate(x: torch.Tensor | None, num_data: int | None) -> pyro.plate:
    """The plate over data points: a minibatch of ``M = len(x)`` out of ``num_data``.

    Inside it every log-density is scaled by ``num_data / M``, so a minibatch
    loss is an unbiased estimate of the full-data negative ELBO. The minibatch
    itself is passed in, so the plate's indices are never used: giving them as
    ``arange(M)`` yields the same scaling as ``subsample_size=M`` without the
    random permutation of N indices that the latter draws at every call (work
    on the hot path, and a draw from the random stream that would make the
    latent samples depend on N).

    With ``x=None`` a model generates: the plate holds ``num_data`` new data
    points and the observed site (``obs=None``) is drawn from p(x | z), which
    is what ``pyro.infer.Predictive`` needs for prior- and posterior-predictive draws.
    """
    if x is None:
        if num_data is None:
            raise PyroVAEError(
                "without data x the model generates, and needs num_data: the number of data points to draw"
            )
        return pyro.plate("data", num_data)
    batch_size = x.shape[0]
    num_data = batch_size if num_data is None else num_data
    # Under torch.jit.trace the size is a traced value and a Python comparison of it would be frozen into
    # the graph (with a TracerWarning); the eager call that every trace is keyed on has checked it.
    if not torch.jit.is_tracing() and num_data < batch_size:
        raise PyroVAEError(
            f"num_data ({num_data}) cannot be smaller than the minibatch ({batch_size} data points)"
        )
    return pyro.plate("data", num_data, subsample=torch.arange(batch_size, device=x.device))
