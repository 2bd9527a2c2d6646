"""Argument types of the command line, and flags generated from a config dataclass's fields."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import PyroVAEError

__all__ = [
    "add_dataclass_arguments",
    "dataclass_from_args",
    "device_option",
    "flag",
    "index_list",
    "int_list",
    "json_option",
    "layer_int_lists",
    "non_negative_int",
    "number_option",
    "positive",
    "registry_choice",
    "seed_option",
]


def flag(name: str) -> str:
    """The command-line flag of a field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 400,200, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return values


def layer_int_lists(text: str) -> tuple[tuple[int, ...], ...]:
    """``100,100/50``: the hidden widths between each pair of latent layers, z1-z2 first."""
    return tuple(int_list(part) for part in text.split("/"))


def positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value

    return parse


def _key_value(text: str, example: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as {example}, got {text!r}")
    return key, value


def number_option(text: str) -> tuple[str, float]:
    """``KEY=NUMBER`` (an option of a built-in component): an int where the text is one, else a float."""
    key, value = _key_value(text, "rank=4")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the value of {key} must be a number, got {value!r}") from None
    return key, int(number) if number.is_integer() and "." not in value else number


def json_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (an option of a user's model): the value as JSON where it parses (16, 0.5, true, [8, 8]), else the text."""
    key, value = _key_value(text, "hidden=16")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def index_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated data indices like 0,5,9, got {text!r}"
        ) from None


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def device_option(text: str) -> str:
    """``--device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, for every command.

    Only the spelling is checked here (a command line written for a GPU machine
    parses anywhere); whether the device exists is checked when it is used
    (:func:`~pyro_vae.training.loop.resolve_device`).
    """
    kind, sep, index = text.partition(":")
    if text in ("auto", "cpu", "cuda", "mps") or (kind == "cuda" and sep and index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")


# numpy seeds its generator (pyro.set_rng_seed seeds all three) with a 32-bit unsigned integer.
MAX_SEED = 2**32 - 1


def seed_option(text: str) -> int:
    """``--seed``: a whole number from 0 to 2**32 - 1."""
    value = non_negative_int(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SEED} (2**32 - 1), got {text}")
    return value


def registry_choice(registry: Any) -> Callable[[str], str]:
    # Checked here rather than with argparse `choices` so the message lists names the registry's way.
    def parse(text: str) -> str:
        try:
            registry.get(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text

    return parse


def _scalar(annotation: Any) -> Callable[[str], Any]:
    """The argparse type of a field annotation: ``int``, ``float``, ``str``, or ``X | None`` as X."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar(inner)
    if annotation in (int, float, str):
        return annotation  # type: ignore[no-any-return]
    raise TypeError(f"no command-line type for a field of type {annotation!r}")


# Fields whose flag every command spells the same way.
_FIELD_TYPES: dict[str, Callable[[str], Any]] = {"device": device_option}


def add_dataclass_arguments(
    group: argparse._ArgumentGroup,
    cls: type,
    *,
    types_by_name: Mapping[str, Callable[[str], Any]] | None = None,
) -> None:
    """One flag per field of the dataclass ``cls``: ``--field-name``, its default, and ``metadata["help"]``.

    A ``bool`` field gets ``--name/--no-name``; a ``Literal`` field its values as choices; a ``device`` field
    :func:`device_option`; any other its annotation's type (``X | None`` as
    X), unless ``types_by_name`` gives a parser for it (a registry's names). Values are checked by ``cls`` itself when
    :func:`dataclass_from_args` builds it, so every rule is written once, there.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        options: dict[str, Any] = {"default": f.default, "help": f.metadata.get("help")}
        if "metavar" in f.metadata:
            options["metavar"] = f.metadata["metavar"]
        if hints[f.name] is bool:
            group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **options)
        elif typing.get_origin(hints[f.name]) is typing.Literal:
            group.add_argument(flag(f.name), choices=typing.get_args(hints[f.name]), **options)
        else:
            parse = (types_by_name or {}).get(f.name) or _FIELD_TYPES.get(f.name) or _scalar(hints[f.name])
            group.add_argument(flag(f.name), type=parse, **options)


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """``cls`` built from the parsed flags of :func:`add_dataclass_arguments` (and ``overrides``).

    Its refusals name the flags: ``TrainConfig.epochs must be ...`` reads ``--epochs must be ...``.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    values = {name: getattr(args, name) for name in names} | overrides
    try:
        return cls(**values)
    except PyroVAEError as error:
        message = str(error)
        for name in names:
            message = message.replace(f"{cls.__name__}.{name} ", f"{flag(name)} ")
        raise PyroVAEError(message) from None
