"""Neural-network building blocks for encoders and decoders.

``NETWORKS`` maps an architecture name (``--encoder`` on the command line) to a
function that builds the (encoder, decoder) pair: the encoder maps data
``[..., D]`` to features ``[..., H]`` (``encoder.out_dim``) that a guide head
turns into q(z|x); the decoder maps latents ``[..., d]`` to the
``outputs_per_dim * D`` numbers a likelihood turns into p(x|z), laid out as
``outputs_per_dim`` consecutive blocks of D (block j holds the j-th parameter of
every data dimension). Data are flat ``[..., D]`` everywhere; ``image_shape``
tells image networks how to fold them. Leading dimensions (particles, data)
pass through.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .registry import Registry

__all__ = ["MLP", "NETWORKS", "mlp_networks"]

NETWORKS: Registry = Registry("network")


class MLP(nn.Sequential):
    """A fully connected network: Linear, activation, ..., Linear.

    With ``out_dim=None`` the network ends with the activation of its last
    hidden layer, so its output is a feature vector of width ``hidden_dims[-1]``.
    Leading dimensions pass through untouched: an input ``[S, N, in_dim]``
    (particles x data) gives ``[S, N, out_dim]``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int],
        out_dim: int | None = None,
        *,
        activation: type[nn.Module] = nn.Softplus,
    ) -> None:
        if in_dim < 1 or any(h < 1 for h in hidden_dims) or (out_dim is not None and out_dim < 1):
            raise ValueError(
                f"layer widths must be positive integers, got in_dim={in_dim}, hidden_dims={list(hidden_dims)}, "
                f"out_dim={out_dim}"
            )
        if out_dim is None and not hidden_dims:
            raise ValueError("an MLP without out_dim needs at least one hidden layer to produce features")
        layers: list[nn.Module] = []
        width = in_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), activation()]
            width = hidden
        if out_dim is not None:
            layers.append(nn.Linear(width, out_dim))
        super().__init__(*layers)
        self.in_dim = in_dim
        self.out_dim = out_dim if out_dim is not None else width


@NETWORKS.register("mlp")
def mlp_networks(
    *,
    data_dim: int,
    latent_dim: int,
    hidden_dims: Sequence[int],
    decoder_out_dim: int,
    image_shape: Sequence[int] | None = None,
) -> tuple[MLP, MLP]:
    """Fully connected encoder and decoder; the decoder mirrors the encoder's hidden widths.

    Softplus activations as in Kingma & Welling (2014), appendix C, and Pyro's VAE example.
    """
    encoder = MLP(data_dim, hidden_dims)
    decoder = MLP(latent_dim, list(reversed(hidden_dims)), decoder_out_dim)
    return encoder, decoder
