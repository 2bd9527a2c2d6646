"""Encoder/decoder networks: shapes with leading dimensions, the decoder's block layout, and a conv VAE that learns."""

from __future__ import annotations

import math

import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_vae import ModelConfig, build_vae
from pyro_vae.components.nets import NETWORKS, ConvDecoder, ConvEncoder, conv_networks

LATENT_DIM = 3


def networks(name: str, image_shape, *, outputs_per_dim: int = 2, hidden_dims=(16,)):
    data_dim = math.prod(image_shape)
    return NETWORKS.get(name)(
        data_dim=data_dim,
        latent_dim=LATENT_DIM,
        hidden_dims=hidden_dims,
        decoder_out_dim=outputs_per_dim * data_dim,
        image_shape=image_shape,
    )


@pytest.mark.parametrize("name", NETWORKS.names())
@pytest.mark.parametrize("image_shape", [(8, 8), (28, 28), (7, 5), (1, 1), (2, 6, 6)])
@pytest.mark.parametrize("leading", [(), (4,), (3, 4)])
def test_shapes_with_leading_dims(name, image_shape, leading):
    encoder, decoder = networks(name, image_shape, hidden_dims=(16, 8))
    data_dim = math.prod(image_shape)
    features = encoder(torch.rand(*leading, data_dim))
    assert encoder.out_dim == 8 and features.shape == (*leading, 8)
    assert decoder(torch.randn(*leading, LATENT_DIM)).shape == (*leading, 2 * data_dim)


def test_conv_leading_dims_are_independent_data_points():
    encoder, decoder = networks("conv", (8, 8))
    x = torch.rand(3, 4, 64)
    assert torch.allclose(encoder(x)[1, 2], encoder(x[1, 2]), atol=1e-6)
    z = torch.randn(3, 4, LATENT_DIM)
    assert torch.allclose(decoder(z)[2, 0], decoder(z[2, 0]), atol=1e-6)


def test_conv_decoder_blocks_are_parameters_of_every_pixel():
    """decoder_out_dim = 2 D: block j is output channel j of the last transposed conv, in the data's order."""
    height, width = 6, 10
    _, decoder = networks("conv", (height, width))
    maps = []
    decoder.deconv.register_forward_hook(lambda module, inputs, output: maps.append(output))
    out = decoder(torch.randn(5, LATENT_DIM))  # [5, 2 * 60]
    image = maps[0]
    assert image.shape == (5, 2, height, width)
    for j in range(2):
        assert torch.equal(out[:, j * 60 : (j + 1) * 60].reshape(5, height, width), image[:, j])
    # Only a channel's own bias moves its own block.
    last = decoder.deconv[-1]
    with torch.no_grad():
        last.bias.copy_(torch.tensor([0.0, 100.0]))
    out = decoder(torch.randn(5, LATENT_DIM))
    assert out[:, :60].abs().max() < 50 and out[:, 60:].min() > 50


def test_conv_encoder_folds_flat_data_row_major():
    """The pixel at flat index i * W + j is image row i, column j: it moves only nearby first-layer outputs."""
    height, width = 6, 10
    encoder, _ = networks("conv", (height, width))
    first = encoder.conv[0]
    i, j = 5, 1
    x = torch.zeros(1, height * width)
    bumped = x.clone()
    bumped[0, i * width + j] = 1.0
    moved = (
        (first(bumped.reshape(1, 1, height, width)) - first(x.reshape(1, 1, height, width))).abs().sum(1)[0]
    )
    rows, cols = torch.nonzero(moved > 0, as_tuple=True)
    # A kernel-3, stride-2, padding-1 output (p, q) sees input rows 2p-1..2p+1 and columns 2q-1..2q+1.
    assert len(rows) > 0 and ((2 * rows - i).abs() <= 1).all() and ((2 * cols - j).abs() <= 1).all()
    # ...and the encoder's own fold agrees with that reshape.
    captured = []
    first.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    encoder(bumped)
    assert captured[0][0, 0, i, j] == 1.0 and captured[0].sum() == 1.0


def test_conv_vae_learns_tiny_binary_images():
    torch.manual_seed(0)
    stripes = torch.zeros(4, 8, 8)
    stripes[0, :, :4] = stripes[1, :, 4:] = stripes[2, :4] = stripes[3, 4:] = 1.0
    x = stripes[torch.arange(16) % 4].reshape(16, 64)
    vae = build_vae(
        ModelConfig(data_dim=64, latent_dims=(2,), hidden_dims=(16,), image_shape=(8, 8), network="conv")
    )
    evaluate = Trace_ELBO(num_particles=32, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        before = evaluate.loss(vae.model, vae.guide, x)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(60):
        svi.step(x)
    with torch.no_grad():
        after = evaluate.loss(vae.model, vae.guide, x)
    assert after < 0.7 * before, (before, after)


def test_conv_needs_an_image_shape():
    with pytest.raises(ValueError, match=r"conv network needs image data.*--encoder mlp"):
        conv_networks(data_dim=64, latent_dim=2, hidden_dims=(16,), decoder_out_dim=64, image_shape=None)
    with pytest.raises(ValueError, match="conv network needs image data"):
        build_vae(ModelConfig(data_dim=64, latent_dims=(2,), hidden_dims=(16,), network="conv"))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"image_shape": (8, 4)}, r"holds 32 values, not data_dim=64"),
        ({"image_shape": (2, 2, 4, 4)}, r"must be \(H, W\) or \(C, H, W\)"),
        ({"decoder_out_dim": 100}, "whole number of blocks"),
    ],
)
def test_conv_rejects_inconsistent_sizes(kwargs, message):
    arguments = {
        "data_dim": 64,
        "latent_dim": 2,
        "hidden_dims": (16,),
        "decoder_out_dim": 128,
        "image_shape": (8, 8),
    }
    with pytest.raises(ValueError, match=message):
        conv_networks(**{**arguments, **kwargs})


def test_conv_channels_option():
    encoder = ConvEncoder((28, 28), (10,), channels=(4, 8, 16))
    decoder = ConvDecoder(LATENT_DIM, (28, 28), (10,), 1, channels=(4, 8, 16))
    assert encoder(torch.rand(2, 784)).shape == (2, 10)
    assert decoder(torch.randn(2, LATENT_DIM)).shape == (2, 784)
    assert [m.out_channels for m in encoder.conv if isinstance(m, torch.nn.Conv2d)] == [4, 8, 16]
