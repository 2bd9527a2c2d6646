"""The one family of exceptions for mistakes in what a user gave the package.

Everything the package refuses because of its input (an unknown name, a bad
size, a model whose guide does not match it, a damaged run folder) raises a
:class:`PyroVAEError`, a ``ValueError``, with one sentence that says what is
wrong and what to do. The command line prints that sentence on one line and
exits with status 2. Any other exception is a bug: it keeps its traceback
(and the command line exits with status 1).
"""

from __future__ import annotations

__all__ = ["PyroVAEError", "PyroVAETypeError"]


class PyroVAEError(ValueError):
    """A user's input that the package refuses; the message is one sentence saying what to do instead."""


class PyroVAETypeError(PyroVAEError, TypeError):
    """A user's input of the wrong type (also a ``TypeError``, as Python code expects of one)."""
