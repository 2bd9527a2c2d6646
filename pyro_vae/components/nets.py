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

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import PyroVAEError
from ..registry import Registry
from .linear import Linear
from .softplus import Softplus

__all__ = [
    "ACTIVATIONS",
    "CONV_CHANNELS",
    "MLP",
    "NETWORKS",
    "ConvDecoder",
    "ConvEncoder",
    "activation_class",
    "conv_networks",
    "mlp_networks",
]

NETWORKS: Registry = Registry("network")

# Activation functions by name (``ModelConfig.activation``); softplus is the default (as in Pyro's VAE
# example), tanh the choice of Kingma & Welling (2014, appendix C) and Burda et al. (2016).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "softplus": Softplus,  # nn.Softplus's function without its slow log1p (components/softplus.py)
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
}


def activation_class(name: str) -> type[nn.Module]:
    """The activation called ``name``; a ValueError lists the valid names otherwise."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise PyroVAEError(f"unknown activation {name!r}; choose one of: {', '.join(ACTIVATIONS)}") from None


# Channels of the conv encoder's stride-2 layers (the decoder mirrors them): 28x28 -> 14x14 -> 7x7.
CONV_CHANNELS: tuple[int, ...] = (32, 64)


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
        activation: type[nn.Module] = Softplus,
    ) -> None:
        if in_dim < 1 or any(h < 1 for h in hidden_dims) or (out_dim is not None and out_dim < 1):
            raise PyroVAEError(
                f"layer widths must be positive integers, got in_dim={in_dim}, hidden_dims={list(hidden_dims)}, "
                f"out_dim={out_dim}"
            )
        if out_dim is None and not hidden_dims:
            raise PyroVAEError("an MLP without out_dim needs at least one hidden layer to produce features")
        layers: list[nn.Module] = []
        width = in_dim
        for hidden in hidden_dims:
            layers += [Linear(width, hidden), activation()]
            width = hidden
        if out_dim is not None:
            layers.append(Linear(width, out_dim))
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
    activation: str = "softplus",
) -> tuple[MLP, MLP]:
    """Fully connected encoder and decoder; the decoder mirrors the encoder's hidden widths.

    Softplus activations by default, as in Pyro's VAE example; Kingma & Welling (2014, appendix C)
    used tanh (``activation="tanh"``).
    """
    act = activation_class(activation)
    encoder = MLP(data_dim, hidden_dims, activation=act)
    decoder = MLP(latent_dim, list(reversed(hidden_dims)), decoder_out_dim, activation=act)
    return encoder, decoder


def _image_shape(image_shape: Sequence[int] | None, data_dim: int | None = None) -> tuple[int, int, int]:
    """``image_shape`` as (C, H, W), checked against ``data_dim`` when given."""
    if image_shape is None:
        raise PyroVAEError(
            "the conv network needs image data (image_shape=(H, W)), got image_shape=None; "
            "for flat data use the fully connected network (--encoder mlp)"
        )
    shape = tuple(image_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or any(not isinstance(s, int) or s < 1 for s in shape):
        raise PyroVAEError(f"image_shape must be (H, W) or (C, H, W) of positive integers, got {image_shape}")
    if data_dim is not None and math.prod(shape) != data_dim:
        raise PyroVAEError(
            f"image_shape {tuple(image_shape)} holds {math.prod(shape)} values, not data_dim={data_dim}"
        )
    return shape  # type: ignore[return-value]


def _halved_sizes(size: int, num_layers: int) -> list[int]:
    """Side lengths through ``num_layers`` convolutions of kernel 3, stride 2, padding 1: s -> ceil(s / 2)."""
    sizes = [size]
    for _ in range(num_layers):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


class ConvEncoder(nn.Module):
    """Strided convolutions, then a fully connected layer to the features: [..., C*H*W] -> [..., out_dim].

    Each convolution (kernel 3, stride 2, padding 1, ELU) halves the side
    lengths, rounding up, so any H, W down to 1 works; the flattened feature
    map goes through ``MLP(., hidden_dims)``, whose last width is ``out_dim``.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        hidden_dims: Sequence[int],
        *,
        channels: Sequence[int] = CONV_CHANNELS,
    ) -> None:
        super().__init__()
        self.image_shape = _image_shape(image_shape)
        if not channels or any(c < 1 for c in channels):
            raise PyroVAEError(f"channels must be a non-empty list of positive widths, got {list(channels)}")
        in_channels, height, width = self.image_shape
        layers: list[nn.Module] = []
        for c_in, c_out in zip([in_channels, *channels[:-1]], channels, strict=True):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1), nn.ELU()]
        self.conv = nn.Sequential(*layers)
        flat = (
            channels[-1] * _halved_sizes(height, len(channels))[-1] * _halved_sizes(width, len(channels))[-1]
        )
        self.fc = MLP(flat, hidden_dims, activation=nn.ELU)
        self.in_dim = math.prod(self.image_shape)
        self.out_dim = self.fc.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[:-1]
        h = self.conv(x.reshape(-1, *self.image_shape))  # [B, C_last, H', W']
        return self.fc(h.flatten(1)).reshape(*batch, self.out_dim)  # [..., out_dim]


class ConvDecoder(nn.Module):
    """The mirror of :class:`ConvEncoder`: [..., latent_dim] -> [..., outputs_per_dim * C*H*W].

    A fully connected net (reversed ``hidden_dims``) makes the smallest feature
    map, and transposed convolutions (kernel 3, stride 2, padding 1, ELU between
    them) double its sides back, with ``output_padding`` 1 where the encoder
    rounded an odd side up, so the output is exactly H x W. The last layer has
    ``outputs_per_dim * C`` channels; its output is laid out as
    ``outputs_per_dim`` blocks of C*H*W (block j is the j-th parameter of every
    pixel, in the flat data's (C, H, W) order), the layout likelihoods read.
    """

    def __init__(
        self,
        latent_dim: int,
        image_shape: Sequence[int],
        hidden_dims: Sequence[int],
        outputs_per_dim: int,
        *,
        channels: Sequence[int] = CONV_CHANNELS,
    ) -> None:
        super().__init__()
        self.image_shape = _image_shape(image_shape)
        if not channels or any(c < 1 for c in channels):
            raise PyroVAEError(f"channels must be a non-empty list of positive widths, got {list(channels)}")
        if outputs_per_dim < 1:
            raise PyroVAEError(f"outputs_per_dim must be a positive integer, got {outputs_per_dim}")
        out_channels, height, width = self.image_shape
        heights = _halved_sizes(height, len(channels))
        widths = _halved_sizes(width, len(channels))
        self.outputs_per_dim = outputs_per_dim
        self.map_shape = (channels[-1], heights[-1], widths[-1])
        self.fc = nn.Sequential(
            MLP(latent_dim, list(reversed(hidden_dims)), math.prod(self.map_shape), activation=nn.ELU),
            nn.ELU(),
        )
        widths_out = [*reversed(channels[:-1]), outputs_per_dim * out_channels]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(reversed(channels), widths_out, strict=True)):
            # Layer i maps side s' = ceil(s / 2) to 2 s' - 1 + output_padding = s.
            level = len(channels) - 1 - i
            padding = (heights[level] - 2 * heights[level + 1] + 1, widths[level] - 2 * widths[level + 1] + 1)
            layers.append(
                nn.ConvTranspose2d(c_in, c_out, kernel_size=3, stride=2, padding=1, output_padding=padding)
            )
            if i < len(channels) - 1:
                layers.append(nn.ELU())
        self.deconv = nn.Sequential(*layers)
        self.in_dim = latent_dim
        self.out_dim = outputs_per_dim * math.prod(self.image_shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[:-1]
        h = self.fc(z.reshape(-1, z.shape[-1])).reshape(-1, *self.map_shape)  # [B, C_last, H', W']
        out = self.deconv(h)  # [B, P * C, H, W]; channel p * C + c is parameter p of channel c
        return out.reshape(*batch, self.out_dim)  # [..., P * C*H*W], P blocks in (C, H, W) order


@NETWORKS.register("conv")
def conv_networks(
    *,
    data_dim: int,
    latent_dim: int,
    hidden_dims: Sequence[int],
    decoder_out_dim: int,
    image_shape: Sequence[int] | None = None,
    activation: str = "elu",
) -> tuple[ConvEncoder, ConvDecoder]:
    """Convolutional encoder and mirrored transposed-convolution decoder for images (image_shape needed).

    Two stride-2 convolutions of 32 and 64 channels (``CONV_CHANNELS``), as in
    the convolutional VAEs of e.g. Salimans et al. (2015) and Kingma et al.
    (2016) without their residual blocks, then fully connected layers of
    ``hidden_dims`` to the features; ELU activations (Clevert et al., 2016),
    smooth like the MLP's softplus but cheaper at conv sizes.

    References:
        Clevert, Unterthiner & Hochreiter, "Fast and Accurate Deep Network
        Learning by Exponential Linear Units (ELUs)", ICLR 2016.
    """
    if activation != "elu":
        raise PyroVAEError(f"the conv network uses ELU activations; got activation={activation!r}")
    shape = _image_shape(image_shape, data_dim)
    if decoder_out_dim % data_dim:
        raise PyroVAEError(
            f"decoder_out_dim ({decoder_out_dim}) must be a whole number of blocks of data_dim ({data_dim})"
        )
    encoder = ConvEncoder(shape, hidden_dims)
    decoder = ConvDecoder(latent_dim, shape, hidden_dims, decoder_out_dim // data_dim)
    return encoder, decoder
