"""The package's version, in a module of its own so that any part can read it without importing the whole."""

__all__ = ["__version__"]

__version__ = "0.1.0"
