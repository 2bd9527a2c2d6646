"""pyro_vae: variational autoencoders written as Pyro models and guides.

A VAE here is a prior p(z), a likelihood p(x|z), an encoder-amortized guide
q(z|x) and two networks, composed into the Pyro functions ``VAE.model`` and
``VAE.guide``; ``fit`` trains them with SVI, and ``evaluate_bounds`` /
``log_marginal`` judge them by importance-sampled log p(x).
"""

from .binarization import prepare_split, resolve_binarize
from .config import DataConfig, ModelConfig, TrainConfig
from .data import DATASETS, DataError, Dataset, load_dataset
from .evaluation import Bounds, evaluate_bounds, log_marginal, log_weights
from .guides import GUIDES, DiagonalNormal, GuideHead
from .likelihoods import LIKELIHOODS, Bernoulli, Gaussian, GaussianLearnedScale, Likelihood
from .model import VAE, build_vae, data_plate
from .nets import MLP, NETWORKS
from .objectives import LOSSES, DeviceTrace_ELBO, make_loss
from .priors import PRIORS, Prior, StandardNormal
from .registry import Registry
from .run import Run, load_run, save_run
from .train import EpochRecord, FitResult, fit, mean_elbo

__version__ = "0.1.0"

__all__ = [
    "DATASETS",
    "GUIDES",
    "LIKELIHOODS",
    "LOSSES",
    "MLP",
    "NETWORKS",
    "PRIORS",
    "VAE",
    "Bernoulli",
    "Bounds",
    "DataConfig",
    "DataError",
    "Dataset",
    "DeviceTrace_ELBO",
    "DiagonalNormal",
    "EpochRecord",
    "FitResult",
    "Gaussian",
    "GaussianLearnedScale",
    "GuideHead",
    "Likelihood",
    "ModelConfig",
    "Prior",
    "Registry",
    "Run",
    "StandardNormal",
    "TrainConfig",
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
]
