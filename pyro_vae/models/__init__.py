"""Models: the data plate every model uses, the VAE, the hierarchical VAE, and building one from a config."""

from .build import build_vae
from .hierarchical import GaussianLayer, HierarchicalVAE
from .plate import data_plate
from .vae import VAE

__all__ = ["VAE", "GaussianLayer", "HierarchicalVAE", "build_vae", "data_plate"]
