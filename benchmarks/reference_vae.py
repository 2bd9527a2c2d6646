"""The MLP VAE of the training benchmark written directly in PyTorch: the cost floor pyro_vae is held to.

The same network as ``build_vae(ModelConfig(data_dim=784, latent_dims=(50,), hidden_dims=(400,)))``
(softplus MLPs, a diagonal Gaussian guide with softplus scales, a Bernoulli
likelihood on logits) and the same single-sample Monte-Carlo ELBO that
Trace_ELBO estimates, with torch.optim.Adam over all parameters at once.

``ReferenceVAE(log1p_free=True)`` computes the softplus activations and the
Bernoulli log-density with pyro_vae's own kernels
(:mod:`pyro_vae.components.softplus`: no ``log1p``, hand-written backward
passes), which pyro_vae's default MLP and Bernoulli likelihood use; with the
default ``False`` it uses torch's ``nn.Softplus`` and
``binary_cross_entropy_with_logits``, as a VAE written by hand usually does.
``ReferenceVAE(log1p_free=True, onednn=True)`` also takes pyro_vae's
``Linear`` (:mod:`pyro_vae.components.linear`: the products by oneDNN), so it
does pyro_vae's arithmetic exactly and differs from it only by Pyro's
bookkeeping. All compute the same numbers to float rounding.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from pyro_vae.components.linear import Linear
from pyro_vae.components.softplus import Softplus, bernoulli_logits_log_prob

_LOG_2PI = math.log(2 * math.pi)


class ReferenceVAE(nn.Module):
    def __init__(
        self,
        data_dim: int = 784,
        hidden: int = 400,
        latent: int = 50,
        *,
        log1p_free: bool = False,
        onednn: bool = False,
    ) -> None:
        super().__init__()
        self.log1p_free = log1p_free
        activation = Softplus if log1p_free else nn.Softplus
        linear = Linear if onednn else nn.Linear
        self.encoder = nn.Sequential(linear(data_dim, hidden), activation())
        self.loc = linear(hidden, latent)
        self.raw_scale = linear(hidden, latent)
        self.decoder = nn.Sequential(linear(latent, hidden), activation(), linear(hidden, data_dim))

    def copy_from(self, vae: nn.Module) -> ReferenceVAE:
        """Take the weights of a pyro_vae ``VAE`` of the same shape."""
        with torch.no_grad():
            self.encoder[0].load_state_dict(vae.encoder[0].state_dict())
            self.loc.load_state_dict(vae.guide_head.loc.state_dict())
            self.raw_scale.load_state_dict(vae.guide_head.raw_scale.state_dict())
            self.decoder[0].load_state_dict(vae.decoder[0].state_dict())
            self.decoder[2].load_state_dict(vae.decoder[2].state_dict())
        return self

    def loss(self, x: torch.Tensor, num_data: int) -> torch.Tensor:
        """-(N / M) sum_i [log p(x_i | z_i) + log p(z_i) - log q(z_i | x_i)], z_i = mu + sigma * eps."""
        h = self.encoder(x)
        loc, scale = self.loc(h), F.softplus(self.raw_scale(h)) + 1e-5
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        logits = self.decoder(z)
        if self.log1p_free:
            log_lik = bernoulli_logits_log_prob(logits, x).sum()  # [M] per datum, then summed
        else:
            log_lik = -F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        log_prior = -0.5 * (z.pow(2).sum() + z.numel() * _LOG_2PI)
        log_q = -0.5 * (eps.pow(2).sum() + z.numel() * _LOG_2PI) - scale.log().sum()
        return -(num_data / x.shape[0]) * (log_lik + log_prior - log_q)
