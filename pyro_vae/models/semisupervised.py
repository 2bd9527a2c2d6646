r"""The semi-supervised M2 model of Kingma et al. (2014): the class y observed where labelled, enumerated elsewhere.

Trained on two kinds of minibatch: labelled ones, ``svi.step(x, y)``, on which
the ELBO L(x, y) has no discrete latent; and unlabelled ones, ``svi.step(x)``,
on which y is summed out exactly, U(x) = sum_y q(y | x) (L(x, y) - log q(y | x))
(``make_loss("elbo")`` picks TraceEnum_ELBO at the first unlabelled call). The
classifier q(y | x) gets labelled gradient only through the extra term
alpha log q(y | x) of :meth:`SemiSupervisedVAE.classifier_model` (Kingma et
al., 2014, eq. 9), trained with an empty guide.

Called as the model contract asks, ``model(x, *, num_data=None)``, every point
is unlabelled: ``fit``, the evaluators (log p(x) = log sum_y p(y) ∫ p(z) p(x | y, z) dz),
pictures and export treat it as a mixture over y.
"""

from __future__ import annotations

from collections.abc import Mapping

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..components.guides import GuideHead
from ..components.likelihoods import Likelihood
from ..components.linear import Linear
from ..errors import PyroVAEError
from .abilities import AbilityMissing
from .mixture import mixed_guide_means, with_component
from .plate import data_plate

__all__ = ["SemiSupervisedVAE"]


class SemiSupervisedVAE(nn.Module):
    r"""M2: a VAE whose decoder also sees the class y, observed for labelled points and enumerated otherwise.

    Generative story, for each data point n::

        y_n ~ Categorical(1/K)               observed when labelled, summed out otherwise
        z_n ~ N(0, I)                        the style
        x_n ~ p(x | decoder([z_n, onehot(y_n)]))

    Guide::

        y_n ~ q(y | x_n) = Categorical(softmax(classifier(encoder(x_n))))   unlabelled points only
        z_n ~ q(z | x_n, y_n) = head([encoder(x_n), onehot(y_n)])

    ``alpha`` weighs the classification term alpha * sum_labelled log q(y | x);
    Kingma et al. (2014) take alpha = 0.1 N (N the number of data points).

    References:
        Kingma, Rezende, Mohamed & Welling, "Semi-Supervised Learning with Deep
        Generative Models", NeurIPS 2014.
    """

    latent_sites = ("z",)
    discrete_sites = ("y",)

    def __init__(
        self,
        *,
        num_classes: int,
        latent_dim: int,
        likelihood: Likelihood,
        encoder: nn.Module,
        guide_head: GuideHead,
        decoder: nn.Module,
        alpha: float = 1.0,
    ) -> None:
        super().__init__()
        feature_dim = getattr(encoder, "out_dim", guide_head.feature_dim - num_classes)
        if num_classes < 2 or guide_head.feature_dim != feature_dim + num_classes:
            raise PyroVAEError(
                f"M2 needs at least 2 classes and a guide head over the encoder's {feature_dim} features and a "
                f"one-hot y of {num_classes}; build the head with feature_dim={feature_dim + num_classes}"
            )
        if guide_head.latent_dim != latent_dim or alpha < 0:
            raise PyroVAEError(
                f"the guide head is over {guide_head.latent_dim} latent dimensions (latent_dim is {latent_dim}) "
                f"and alpha must be non-negative (got {alpha})"
            )
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.alpha = alpha
        self.likelihood = likelihood
        self.encoder = encoder
        self.classifier = Linear(feature_dim, num_classes)
        self.guide_head = guide_head
        self.decoder = decoder  # [..., latent_dim + num_classes] -> the likelihood's parameters

    def class_prior(self) -> dist.Categorical:
        """p(y): uniform over the K classes."""
        return dist.Categorical(logits=self.classifier.weight.new_zeros(self.num_classes))

    def model(
        self, x: torch.Tensor | None, y: torch.Tensor | None = None, *, num_data: int | None = None
    ) -> None:
        """p(x, y, z) for a minibatch ``x`` [M, D], labelled by ``y`` [M] or not (``None``: y summed out)."""
        pyro.module("decoder", self.decoder)
        pyro.module("likelihood", self.likelihood)
        with data_plate(x, num_data):
            y = pyro.sample(
                "y", self.class_prior(), obs=y, infer={"enumerate": "parallel"}
            )  # [M] or [K, 1, 1]
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([self.latent_dim]).to_event(1))  # [..., M, d]
            pyro.sample("x", self.likelihood(self.decoder(with_component(z, y, self.num_classes))), obs=x)

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None, *, num_data: int | None = None) -> None:
        """q(y | x) (unlabelled points) and q(z | x, y) for the same minibatch."""
        pyro.module("encoder", self.encoder)
        pyro.module("classifier", self.classifier)
        pyro.module("guide_head", self.guide_head)
        with data_plate(x, num_data):
            h = self.encoder(x)  # [M, H]
            if y is None:
                y = pyro.sample("y", self.assignment(h), infer={"enumerate": "parallel"})  # [M] or [K, 1, 1]
            pyro.sample("z", self.guide_head(with_component(h, y, self.num_classes)))  # [..., M, d]

    def classifier_model(self, x: torch.Tensor, y: torch.Tensor, *, num_data: int | None = None) -> None:
        """alpha * log q(y | x) of labelled points as a Pyro model (train it with :meth:`no_guide`)."""
        pyro.module("encoder", self.encoder)
        pyro.module("classifier", self.classifier)
        with data_plate(x, num_data), pyro.poutine.scale(scale=self.alpha):
            pyro.sample("y_aux", self.assignment(self.encoder(x)), obs=y)

    def no_guide(self, x: torch.Tensor, y: torch.Tensor, *, num_data: int | None = None) -> None:
        """The guide of :meth:`classifier_model`: it has no latent site."""

    def assignment(self, features: torch.Tensor) -> dist.Categorical:
        """q(y | x) from encoder features [..., H]: batch shape [...]."""
        return dist.Categorical(logits=self.classifier(features))

    @torch.no_grad()
    def component_probs(self, x: torch.Tensor) -> torch.Tensor:
        """q(y | x) [N, K]."""
        return self.assignment(self.encoder(x)).probs

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """argmax_y q(y | x) [N]: the classifier's labels."""
        return self.component_probs(x).argmax(-1)

    @torch.no_grad()
    def posterior_means(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """E_q[z | x] = sum_y q(y | x) E_q[z | x, y]: ``{"z": [N, d]}``."""
        h = self.encoder(x)  # [N, H]: once, for q(y | x) and q(z | x, y)
        return {"z": mixed_guide_means(self.guide_head, h, self.assignment(h), self.num_classes)}

    @torch.no_grad()
    def decode(self, latents: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The mean of p(x | y, z) [N, D] for ``{"z": [N, d], "y": [N] class indices}``."""
        if set(latents) != {"y", "z"}:
            raise AbilityMissing(
                "M2 decodes a style z together with a class y; give both, {'z': [N, d], 'y': [N]}"
            )
        z, y = latents["z"], latents["y"].long().reshape(-1)
        return self.likelihood(self.decoder(with_component(z, y, self.num_classes))).mean

    def check_data(self, x: torch.Tensor) -> None:
        """Refuse data outside the likelihood's support or of the wrong size (a PyroVAEError)."""
        self.likelihood.check_data(x)
