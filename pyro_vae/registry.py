"""Name -> component registries, filled where each component is defined.

Each role (prior, likelihood, guide, network, loss, data set) has one
:class:`Registry`. A component joins it with the ``@REGISTRY.register("name")``
decorator on its definition, so the command line, ``pyro-vae list`` and the
contract tests all read the same table and a new component is picked up by all
three without anyone editing a list.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import PyroVAEError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A table from a kebab-case name to a component (a class or a function).

    The one-line description shown by ``pyro-vae list`` is the first line of the
    component's docstring, so the code stays the only place it is written.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that adds the decorated component under ``name``."""
        if not name or name != name.strip().lower() or " " in name:
            raise PyroVAEError(f"{self.kind} names are lower-case kebab-case, got {name!r}")

        def add(component: T) -> T:
            if name in self._entries:
                raise PyroVAEError(f"a {self.kind} named {name!r} is already registered")
            if not inspect.getdoc(component):
                raise PyroVAEError(f"{self.kind} {name!r} needs a docstring: its first line is its description")
            self._entries[name] = component
            # The component knows its own registered name (used in configs and messages).
            component.registered_name = name
            return component

        return add

    def get(self, name: str) -> T:
        """The component called ``name``; a ValueError lists the valid names otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            raise PyroVAEError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return list(self._entries)

    def describe(self) -> dict[str, str]:
        """Name -> the first line of the component's docstring."""
        return {name: (inspect.getdoc(c) or "").splitlines()[0] for name, c in self._entries.items()}

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
