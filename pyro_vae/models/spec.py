"""How to build a model again: the package's own from a :class:`ModelConfig`, or a user's class with its options.

A :class:`ModelSpec` is what a run folder's ``config.json`` keeps under
``"model"``, so that the folder alone rebuilds the model, from any working
directory::

    {"kind": "builtin", "options": {ModelConfig fields}}
    {"kind": "file", "class": "SkipVAE", "source": "model_source.py", "sha256": "...",
     "origin": "/home/me/skip.py", "data_dim": 64, "image_shape": [8, 8], "options": {"hidden": 16}}
    {"kind": "module", "class": "SkipVAE", "module": "mypkg.models", "distribution": "mypkg",
     "version": "0.3.1", "data_dim": 64, "image_shape": [8, 8], "options": {"hidden": 16}}

A ``file`` model's source is copied into the run folder (``source``) and
imported from there under a private module name; a ``module`` model is
imported by its path, and the installed version of its distribution is kept
to say so when it has changed. A user's class is built as
``Class(data_dim=D, image_shape=S, **options)``, ``image_shape`` only when its
constructor takes it. The configs of older run folders (``"model"`` holding
the ModelConfig fields themselves) load as ``builtin``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from .._typing import VAEModel
from ..config import ModelConfig
from ..errors import PyroVAEError
from .build import build_vae

__all__ = ["PACKAGE_MODELS", "SOURCE_FILE", "ModelSpec", "parse_model_target"]

# The package's models built like a user's class, by name: ``--model gmvae`` is
# ``--model pyro_vae.models.mixture:GMVAE`` (and is kept in a run folder as that module and class).
PACKAGE_MODELS = {"gmvae": "pyro_vae.models.mixture:GMVAE"}

# The name of the copy of a model's source file inside a run folder.
SOURCE_FILE = "model_source.py"
# Keywords the data give a user's constructor; an option may not set them.
_FROM_DATA = ("data_dim", "image_shape")

Kind = Literal["builtin", "file", "module"]


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a model again; see the module docstring for the JSON layout."""

    kind: Kind
    # builtin: the whole architecture.
    config: ModelConfig | None = None
    # file and module: the class, what the data fix, and the constructor's other keyword options.
    class_name: str | None = None
    data_dim: int | None = None
    image_shape: tuple[int, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    # file: the source text (written to the run folder as SOURCE_FILE) and where it was read from.
    source: str | None = None
    origin: str | None = None
    # module: the import path, and the distribution that installed it with its version (None: not installed).
    module: str | None = None
    distribution: str | None = None
    version: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", dict(self.options))
        if self.image_shape is not None:
            object.__setattr__(self, "image_shape", tuple(self.image_shape))
        if self.kind == "builtin":
            if self.config is None:
                raise PyroVAEError("a builtin model spec needs its ModelConfig")
            return
        if self.kind not in ("file", "module"):
            raise PyroVAEError(f"a model's kind is builtin, file or module, got {self.kind!r}")
        if not self.class_name or self.data_dim is None:
            raise PyroVAEError(f"a {self.kind} model spec needs its class name and data_dim")
        if (self.kind == "file") != (self.source is not None) or (self.kind == "module") != bool(self.module):
            raise PyroVAEError(
                "a file model spec needs its source text, and a module model spec its module path"
            )
        if self.image_shape is not None and math.prod(self.image_shape) != self.data_dim:
            raise PyroVAEError(
                f"image_shape {self.image_shape} holds {math.prod(self.image_shape)} values, but data_dim is "
                f"{self.data_dim}"
            )
        clash = sorted(set(self.options) & set(_FROM_DATA))
        if clash:
            raise PyroVAEError(
                f"--model-option {', '.join(clash)} is set by the data; drop it (the model is built with "
                f"data_dim={self.data_dim} and, when it takes one, image_shape={self.image_shape})"
            )
        try:
            json.dumps(self.options)
        except TypeError:
            raise PyroVAEError(
                f"model options must be JSON values (numbers, strings, lists), got {self.options}"
            ) from None

    @classmethod
    def builtin(cls, config: ModelConfig) -> ModelSpec:
        return cls(kind="builtin", config=config)

    @classmethod
    def from_target(
        cls,
        target: str,
        *,
        data_dim: int,
        image_shape: tuple[int, ...] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> ModelSpec:
        """The spec of ``FILE.py:Class`` or ``package.module:Class`` (what ``--model`` takes)."""
        where, class_name = parse_model_target(target)
        common: dict[str, Any] = {
            "class_name": class_name,
            "data_dim": data_dim,
            "image_shape": image_shape,
            "options": options or {},
        }
        if where.endswith(".py") or "/" in where or "\\" in where:
            path = Path(where).expanduser()
            if not path.is_file():
                raise PyroVAEError(
                    f"--model {target}: there is no file {path}; pass FILE.py:Class of an existing file"
                )
            source = path.read_text()
            return cls(kind="file", source=source, origin=str(path.resolve()), **common)
        distribution, version = _installed_version(where)
        return cls(kind="module", module=where, distribution=distribution, version=version, **common)

    @property
    def name(self) -> str:
        """How the model is named in messages: ``SkipVAE (skip.py)``, ``mypkg.models:SkipVAE``, or the built-in's class."""
        if self.kind == "builtin":
            assert self.config is not None
            return "VAE" if len(self.config.latent_dims) == 1 else "HierarchicalVAE"
        if self.kind == "file":
            return f"{self.class_name} ({Path(self.origin or SOURCE_FILE).name})"
        return f"{self.module}:{self.class_name}"

    @property
    def input_dim(self) -> int:
        """D, the number of values in one data point."""
        return self.config.data_dim if self.config is not None else int(self.data_dim or 0)

    @property
    def data_image_shape(self) -> tuple[int, ...] | None:
        """The shape of one data point as an image, for pictures (None: not images)."""
        return self.config.image_shape if self.config is not None else self.image_shape

    def build(self) -> VAEModel:
        """A fresh model with newly initialized weights (drawn from torch's global generator)."""
        if self.config is not None:
            return build_vae(self.config)
        return _construct(self._load_class(), self)

    def _load_class(self) -> type:
        if self.kind == "file":
            assert self.source is not None
            module = _import_source(self.source, origin=self.origin or SOURCE_FILE)
        else:
            assert self.module is not None
            module = _import_module(self.module)
            _, installed = _installed_version(self.module)
            if self.version is not None and installed != self.version:
                warnings.warn(
                    f"the run was trained with {self.distribution} {self.version}, and {installed or 'no version'} "
                    f"is installed now; {self.module}:{self.class_name} may build a different model",
                    stacklevel=3,
                )
        cls = getattr(module, str(self.class_name), None)
        if cls is None:
            found = sorted(
                n for n, v in vars(module).items() if inspect.isclass(v) and issubclass(v, nn.Module)
            )
            raise PyroVAEError(
                f"{self._where()} has no class {self.class_name}; its nn.Module classes are: "
                f"{', '.join(found) or 'none'}"
            )
        _check_contract(cls, self._where())
        return cls

    def _where(self) -> str:
        return str(self.origin) if self.kind == "file" else str(self.module)

    def to_dict(self) -> dict[str, Any]:
        """The JSON entry of ``config.json``; a file model's source itself goes into :data:`SOURCE_FILE`."""
        if self.config is not None:
            return {"kind": "builtin", "options": self.config.to_dict()}
        entry: dict[str, Any] = {"kind": self.kind, "class": self.class_name}
        if self.kind == "file":
            assert self.source is not None
            entry.update(source=SOURCE_FILE, sha256=_sha256(self.source), origin=self.origin)
        else:
            entry.update(module=self.module, distribution=self.distribution, version=self.version)
        entry.update(
            data_dim=self.data_dim,
            image_shape=None if self.image_shape is None else list(self.image_shape),
            options=dict(self.options),
        )
        return entry

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any], *, folder: Path) -> ModelSpec:
        """The spec of a ``config.json`` entry; ``folder`` holds a file model's source copy."""
        if "kind" not in entry:  # a run folder from before user models: the ModelConfig fields themselves
            return cls.builtin(ModelConfig.from_dict(entry))
        kind = entry["kind"]
        if kind == "builtin":
            return cls.builtin(ModelConfig.from_dict(entry["options"]))
        common: dict[str, Any] = {
            "class_name": entry["class"],
            "data_dim": entry["data_dim"],
            "image_shape": entry.get("image_shape"),
            "options": entry.get("options", {}),
        }
        if kind == "file":
            copy = folder / entry["source"]
            if not copy.is_file():
                raise PyroVAEError(
                    f"{folder} lacks {entry['source']}, the model's source; the run folder is incomplete"
                )
            source = copy.read_text()
            if entry.get("sha256") not in (None, _sha256(source)):
                raise PyroVAEError(
                    f"{copy} is not the source the run was trained with (its sha256 differs from config.json); "
                    "restore it or retrain the run"
                )
            return cls(kind="file", source=source, origin=entry.get("origin"), **common)
        if kind == "module":
            return cls(
                kind="module",
                module=entry["module"],
                distribution=entry.get("distribution"),
                version=entry.get("version"),
                **common,
            )
        raise PyroVAEError(f"the model kind {kind!r} in config.json is not builtin, file or module")


def parse_model_target(target: str) -> tuple[str, str]:
    """``FILE.py:Class``, ``package.module:Class`` or a name of :data:`PACKAGE_MODELS` as (file or module, class)."""
    target = PACKAGE_MODELS.get(target, target)
    where, sep, class_name = target.rpartition(":")
    if not sep or not where or not class_name.isidentifier():
        raise PyroVAEError(
            f"--model takes FILE.py:Class or package.module:Class, got {target!r}; name the class after a colon "
            f"(or name one of the package's models: {', '.join(PACKAGE_MODELS)})"
        )
    return where, class_name


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _import_source(source: str, *, origin: str) -> Any:
    """The module of ``source``, imported once per text under a private name (so two runs never clash)."""
    name = f"_pyro_vae_user_model_{_sha256(source)[:16]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_loader(name, loader=None, origin=origin)
    assert module_spec is not None
    module = importlib.util.module_from_spec(module_spec)
    module.__file__ = origin
    try:
        code = compile(source, origin, "exec")
    except SyntaxError as error:
        raise PyroVAEError(f"{origin}, line {error.lineno}: {error.msg}; fix the model file") from None
    # Registered before it runs, as the import system does, so classes and dataclasses find their module.
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except ImportError as error:
        del sys.modules[name]
        raise PyroVAEError(
            f"{origin} imports what is not installed ({error}); a model file may import only installed packages, "
            "because the run folder keeps that one file"
        ) from None
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import_module(path: str) -> Any:
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as error:
        if error.name is not None and (path == error.name or path.startswith(error.name + ".")):
            raise PyroVAEError(
                f"there is no module {path} to import ({error}); install its package, or pass FILE.py:Class"
            ) from None
        raise


def _installed_version(module: str) -> tuple[str | None, str | None]:
    """The distribution that installs ``module``'s top-level package, and its version (None, None: not installed)."""
    top = module.partition(".")[0]
    for distribution in importlib.metadata.packages_distributions().get(top, []):
        try:
            return distribution, importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None, None


def _check_contract(cls: Any, where: str) -> None:
    """Refuse a class that is not a model of the contract (:class:`~pyro_vae._typing.VAEModel`)."""
    name = getattr(cls, "__name__", repr(cls))
    if not inspect.isclass(cls):
        raise PyroVAEError(f"{name} in {where} is not a class; --model names an nn.Module class")
    if not issubclass(cls, nn.Module):
        raise PyroVAEError(
            f"{name} in {where} is not a torch.nn.Module, so its weights cannot be saved; subclass nn.Module"
        )
    if not issubclass(cls, VAEModel):
        missing = [m for m in ("model", "guide") if not callable(getattr(cls, m, None))]
        raise PyroVAEError(
            f"{name} in {where} has no {' or '.join(missing)} method; a model has model(x, *, num_data=None) and "
            "guide(x, *, num_data=None) (see pyro_vae.VAEModel)"
        )
    for method in ("model", "guide"):
        parameters = inspect.signature(getattr(cls, method)).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        if "num_data" not in parameters and not takes_any:
            raise PyroVAEError(
                f"{name}.{method} takes no num_data keyword; write it as {method}(self, x, *, num_data=None) and "
                "put its per-datum sites in pyro_vae.data_plate(x, num_data)"
            )


def _construct(cls: type, spec: ModelSpec) -> VAEModel:
    """``cls(data_dim=..., [image_shape=...,] **options)``, refusing options its constructor does not take."""
    signature = inspect.signature(cls)
    parameters = signature.parameters
    accepted = [
        f"{p.name}" if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
        for p in parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name not in _FROM_DATA
    ]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if "data_dim" not in parameters and not takes_any:
        raise PyroVAEError(
            f"{cls.__name__}'s constructor takes no data_dim; add a data_dim keyword (the data's dimension D, "
            "which the command line passes)"
        )
    kwargs: dict[str, Any] = {"data_dim": spec.data_dim, **spec.options}
    if "image_shape" in parameters:
        kwargs["image_shape"] = spec.image_shape
    try:
        signature.bind(**kwargs)
    except TypeError as error:
        raise PyroVAEError(
            f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) is refused: {error}; "
            f"its options are: {', '.join(accepted) or 'none'} (pass them as --model-option KEY=VALUE)"
        ) from None
    model = cls(**kwargs)
    return model  # type: ignore[no-any-return]
