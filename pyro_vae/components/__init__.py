"""The pluggable parts of a model: priors p(z), likelihoods p(x | z), guide heads q(z | x) and networks.

Each part is an ``nn.Module`` whose ``forward`` returns a
``pyro.distributions`` Distribution, registered by name where it is defined.
"""

from .guides import (
    GUIDES,
    DiagonalNormal,
    FlowDistribution,
    GuideHead,
    InverseAutoregressiveFlow,
    LowRankNormal,
)
from .likelihoods import (
    LIKELIHOODS,
    Bernoulli,
    ContinuousBernoulli,
    DiscretizedLogistic,
    Gaussian,
    GaussianLearnedScale,
    Laplace,
    Likelihood,
    StudentT,
)
from .linear import Linear
from .nets import ACTIVATIONS, MLP, NETWORKS, ConvDecoder, ConvEncoder
from .priors import (
    PRIORS,
    EqualWeightMixture,
    LearnedNormal,
    MaskedAutoregressiveFlow,
    Mixture,
    Prior,
    StandardNormal,
    VampPrior,
)
from .softplus import Softplus, bernoulli_logits_log_prob, softplus

__all__ = [
    "ACTIVATIONS",
    "GUIDES",
    "LIKELIHOODS",
    "MLP",
    "NETWORKS",
    "PRIORS",
    "Bernoulli",
    "ContinuousBernoulli",
    "ConvDecoder",
    "ConvEncoder",
    "DiagonalNormal",
    "DiscretizedLogistic",
    "EqualWeightMixture",
    "FlowDistribution",
    "Gaussian",
    "GaussianLearnedScale",
    "GuideHead",
    "InverseAutoregressiveFlow",
    "Laplace",
    "LearnedNormal",
    "Likelihood",
    "Linear",
    "LowRankNormal",
    "MaskedAutoregressiveFlow",
    "Mixture",
    "Prior",
    "Softplus",
    "StandardNormal",
    "StudentT",
    "VampPrior",
    "bernoulli_logits_log_prob",
    "softplus",
]
