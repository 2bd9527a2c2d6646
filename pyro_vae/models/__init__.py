"""Models: the data plate every model uses, the VAE, the hierarchical VAE, building one from a config or a
user's class (:class:`ModelSpec`), and the optional abilities every consumer asks of a model (:mod:`.abilities`)."""

from . import abilities
from .abilities import AbilityMissing
from .build import build_vae
from .hierarchical import GaussianLayer, HierarchicalVAE
from .initialization import init_output_bias
from .plate import data_plate
from .spec import ModelSpec
from .vae import VAE

__all__ = [
    "VAE",
    "AbilityMissing",
    "GaussianLayer",
    "HierarchicalVAE",
    "ModelSpec",
    "abilities",
    "build_vae",
    "data_plate",
    "init_output_bias",
]
