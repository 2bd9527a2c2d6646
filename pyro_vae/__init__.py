"""pyro_vae: variational autoencoders written as Pyro models and guides.

A VAE here is a prior p(z), a likelihood p(x|z), an encoder-amortized guide
q(z|x) and two networks, composed into the Pyro functions ``VAE.model`` and
``VAE.guide``; ``fit`` trains them with SVI, and ``evaluate_bounds`` /
``log_marginal`` judge them by importance-sampled log p(x).
"""

from .components import (
    GUIDES,
    LIKELIHOODS,
    MLP,
    NETWORKS,
    PRIORS,
    Bernoulli,
    ContinuousBernoulli,
    ConvDecoder,
    ConvEncoder,
    DiagonalNormal,
    DiscretizedLogistic,
    EqualWeightMixture,
    FlowDistribution,
    Gaussian,
    GaussianLearnedScale,
    GuideHead,
    InverseAutoregressiveFlow,
    Laplace,
    LearnedNormal,
    Likelihood,
    LowRankNormal,
    MaskedAutoregressiveFlow,
    Mixture,
    Prior,
    StandardNormal,
    StudentT,
    VampPrior,
)
from .config import DataConfig, ModelConfig, TrainConfig
from .inference import Bounds, evaluate_bounds, log_marginal, log_weights, traced_log_weights
from .io import (
    DATASETS,
    DataError,
    Dataset,
    Run,
    load_dataset,
    load_run,
    prepare_split,
    resolve_binarize,
    save_run,
)
from .models import VAE, build_vae, data_plate
from .objectives import IWAE_ELBO, LOSSES, DeviceTrace_ELBO, MeanField_ELBO, make_loss
from .registry import Registry
from .training import EpochRecord, FitResult, fit, mean_elbo

__version__ = "0.1.0"

__all__ = [
    "DATASETS",
    "GUIDES",
    "IWAE_ELBO",
    "LIKELIHOODS",
    "LOSSES",
    "MLP",
    "NETWORKS",
    "PRIORS",
    "VAE",
    "Bernoulli",
    "Bounds",
    "ContinuousBernoulli",
    "ConvDecoder",
    "ConvEncoder",
    "DataConfig",
    "DataError",
    "Dataset",
    "DeviceTrace_ELBO",
    "DiagonalNormal",
    "DiscretizedLogistic",
    "EpochRecord",
    "EqualWeightMixture",
    "FitResult",
    "FlowDistribution",
    "Gaussian",
    "GaussianLearnedScale",
    "GuideHead",
    "InverseAutoregressiveFlow",
    "Laplace",
    "LearnedNormal",
    "Likelihood",
    "LowRankNormal",
    "MaskedAutoregressiveFlow",
    "MeanField_ELBO",
    "Mixture",
    "ModelConfig",
    "Prior",
    "Registry",
    "Run",
    "StandardNormal",
    "StudentT",
    "TrainConfig",
    "VampPrior",
    "__version__",
    "build_vae",
    "data_plate",
    "evaluate_bounds",
    "fit",
    "load_dataset",
    "load_run",
    "log_marginal",
    "log_weights",
    "make_loss",
    "mean_elbo",
    "prepare_split",
    "resolve_binarize",
    "save_run",
    "traced_log_weights",
]
