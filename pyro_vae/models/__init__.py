"""Models: the data plate every model uses, the VAE, the hierarchical VAE, the Gaussian-mixture VAE and
the semi-supervised M2 model with an enumerated discrete site, building one from a config or a
user's class (:class:`ModelSpec`), and the optional abilities every consumer asks of a model (:mod:`.abilities`)."""

from . import abilities
from .abilities import AbilityMissing
from .build import build_vae
from .hierarchical import GaussianLayer, HierarchicalVAE
from .initialization import init_output_bias
from .mixture import GMVAE, MixtureVAE, build_mixture_vae
from .plate import data_plate
from .semisupervised import SemiSupervisedVAE
from .spec import ModelSpec
from .vae import VAE

__all__ = [
    "GMVAE",
    "VAE",
    "AbilityMissing",
    "GaussianLayer",
    "HierarchicalVAE",
    "MixtureVAE",
    "ModelSpec",
    "SemiSupervisedVAE",
    "abilities",
    "build_mixture_vae",
    "build_vae",
    "data_plate",
    "init_output_bias",
]
