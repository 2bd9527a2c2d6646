"""The ``pyro-vae`` command line."""

from .main import format_report, main

__all__ = ["format_report", "main"]
