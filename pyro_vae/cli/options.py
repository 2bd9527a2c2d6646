"""Argument types of the command line, and flags generated from a config dataclass's fields."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from ..errors import PyroVAEError

__all__ = [
    "add_dataclass_arguments",
    "config_file_defaults",
    "count_or_all",
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


def count_or_all(text: str) -> int | None:
    """A positive whole number, or ``all`` (None): how many data points to take."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number or all, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number or all, got {text!r}")
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
    options_by_name: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """One flag per field of the dataclass ``cls``: ``--field-name``, its default, and ``metadata["help"]``.

    A ``bool`` field gets ``--name/--no-name``; a ``Literal`` field its values as choices; a ``device`` field
    :func:`device_option`; any other its annotation's type (``X | None`` as
    X), unless ``types_by_name`` gives a parser for it (a registry's names). ``options_by_name`` replaces a
    field's ``default`` or ``help`` for this command (a default the command decides later, say). Values are
    checked by ``cls`` itself when :func:`dataclass_from_args` builds it, so every rule is written once, there.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        options: dict[str, Any] = {"default": f.default, "help": f.metadata.get("help")}
        options.update((options_by_name or {}).get(f.name, {}))
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


# ---------------------------------------------------------------------------
# --config FILE: a command's defaults from a JSON or TOML file


def _read_config_file(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as error:
        raise PyroVAEError(f"--config {path}: {error.strerror or type(error).__name__}") from None
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef,import-not-found,unused-ignore]
            except ImportError:
                raise PyroVAEError(
                    f"--config {path}: reading TOML needs Python >= 3.11 (or pip install tomli); "
                    "write the file as JSON instead"
                ) from None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise PyroVAEError(f"--config {path} is not valid TOML: {error}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise PyroVAEError(
            f"--config {path} is not valid JSON ({error}); a TOML file must end in .toml"
        ) from None


def _as_text(value: Any) -> str:
    """A file's value as it would be typed on the command line: [100, 50] -> 100,50; [[8], [4]] -> 8/4."""
    if isinstance(value, list | tuple):
        if value and all(isinstance(v, list | tuple) for v in value):
            return "/".join(_as_text(v) for v in value)
        return ",".join(str(v) for v in value)
    return str(value)


def _parsed(action: argparse.Action, text: str) -> Any:
    value = action.type(text) if callable(action.type) else text  # type: ignore[misc]
    if action.choices is not None and value not in action.choices:
        raise argparse.ArgumentTypeError(
            f"must be one of {', '.join(map(str, action.choices))}, got {text!r}"
        )
    return value


def _config_value(action: argparse.Action, value: Any) -> Any:
    """``value`` from a config file, parsed and checked as the flag of ``action`` parses its text."""
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # a switch
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"must be true or false, got {value!r}")
        if isinstance(action, argparse._StoreConstAction) and value not in (action.const, action.default):
            raise argparse.ArgumentTypeError(f"can only be {str(action.const).lower()} (the flag's effect)")
        return value
    if value is None:
        if action.default is not None:
            raise argparse.ArgumentTypeError(
                "must have a value (null is only for options whose default is none)"
            )
        return None
    if isinstance(action, argparse._AppendAction):
        # {"rank": 4} or ["rank=4"]: what --guide-option rank=4 (repeated) gives.
        items = (
            [f"{key}={json.dumps(item)}" for key, item in value.items()]
            if isinstance(value, dict)
            else [str(item) for item in (value if isinstance(value, list) else [value])]
        )
        return [_parsed(action, item) for item in items]
    if isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a single value, not a table, got {value!r}")
    return _parsed(action, _as_text(value))


def config_file_defaults(
    path: str | os.PathLike[str],
    parser: argparse.ArgumentParser,
    *,
    command: str,
    commands: Collection[str] = (),
) -> dict[str, Any]:
    """The defaults that the config file ``path`` gives the options of ``parser`` (the command ``command``).

    The file is JSON, or TOML when its name ends in ``.toml``: one object whose keys are the command's
    option names (``batch-size``, with or without the dashes) or their field names (``batch_size``, as in a
    run's config.json), and whose values are what the command line would take (numbers, strings, true /
    false for switches, lists for comma-separated values, a table for a repeatable KEY=VALUE option). A
    table named after a command of ``commands`` (``[train]``) holds that command's keys; other commands'
    tables are skipped.
    Each value is parsed and checked as its flag's is; an unknown key or a bad value is refused with a
    sentence naming the file and the key. Flags given on the command line override these defaults.
    """
    path = Path(path)
    data = _read_config_file(path)
    if not isinstance(data, dict):
        raise PyroVAEError(f"--config {path} must hold one object of option names and values")
    actions = [
        a
        for a in parser._actions
        if any(o.startswith("--") for o in a.option_strings) and a.dest not in ("help", "config")
    ]
    by_key: dict[str, argparse.Action] = {}
    for action in actions:
        by_key[action.dest] = action
        by_key[_long_name(action)] = action
    items = [(key, value) for key, value in data.items() if not (key in commands and isinstance(value, dict))]
    section = data.get(command)
    if isinstance(section, dict):
        items += list(section.items())
    defaults: dict[str, Any] = {}
    for key, value in items:
        found = by_key.get(str(key).removeprefix("--"))
        if found is None:
            known = sorted({_long_name(a) for a in actions})
            raise PyroVAEError(
                f"--config {path}: pyro-vae {command} has no option {key!r}; its options are {', '.join(known)}"
            )
        try:
            defaults[found.dest] = _config_value(found, value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
            raise PyroVAEError(f"--config {path}: {key}: {error}") from None
    return defaults


def _long_name(action: argparse.Action) -> str:
    """``batch-size`` for ``--batch-size`` (``jit`` for ``--jit/--no-jit``): an option's key in a config file."""
    return next(o for o in action.option_strings if o.startswith("--")).removeprefix("--")
