"""A run folder: everything needed to rebuild, score and compare a trained model.

    RUN_DIR/config.json   model, training and data configs (rebuilds the model; see
                          pyro_vae.models.spec for the "model" entry)
    RUN_DIR/model_source.py  a copy of the model's source file, for a user's model from a file
    RUN_DIR/model.pt      the model's state dict
    RUN_DIR/metrics.csv   one row per epoch: epoch, train_elbo, test_elbo, seconds (and valid_elbo)
    RUN_DIR/best.pt       the weights of the best epoch on the validation split (--eval-every)
    RUN_DIR/evaluation.json  the last importance-sampled evaluation, when one was made: its summary
                          (K, the points evaluated of how many) and, under "per_datum", the test
                          index, log p̂(x) and PSIS k̂ of every point it evaluated (read_evaluation)

Files are written to a temporary name and renamed, so a run folder never
holds a half-written file. A trainer holds the folder's lock (``RUN_DIR/.lock``,
:mod:`pyro_vae.io.lock`) while it writes; ``--overwrite`` sets the old run's
files aside in ``RUN_DIR/.replaced`` until the new run has its first
checkpoint (:func:`set_aside_run`, :func:`settle_replacement`).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._typing import DeviceLike, VAEModel
from ..config import DataConfig, ModelConfig, TrainConfig
from ..errors import PyroVAEError
from ..files import write_text_atomic
from ..models.abilities import needs_binary_data
from ..models.spec import SOURCE_FILE, ModelSpec
from ..training.state import EpochRecord, load_weights, save_weights
from .binarization import prepare_split, resolve_binarize
from .data import Dataset, hold_out, load_dataset

__all__ = [
    "FORMAT",
    "RUN_FILES",
    "Run",
    "is_run_dir",
    "load_run",
    "read_data_config",
    "read_evaluation",
    "read_layer_choices",
    "save_config",
    "save_evaluation",
    "save_run",
    "set_aside_run",
    "settle_replacement",
]

FORMAT = "pyro_vae.run/1"
_FILES = ("config.json", "model.pt", "metrics.csv")
# Every file a run consists of: --overwrite replaces these and leaves anything else in the folder (pictures,
# a user's notes) where it is.
RUN_FILES = (
    "checkpoint.pt",
    "config.json",
    "model.pt",
    "best.pt",  # the best-scoring weights on the validation split (training.validation)
    "metrics.csv",
    "evaluation.json",
    SOURCE_FILE,
)


@dataclass
class Run:
    """A trained model with its configs and history, as stored in a run folder."""

    path: Path
    model_spec: ModelSpec
    train_config: TrainConfig
    data_config: DataConfig
    vae: VAEModel
    history: list[EpochRecord] = field(default_factory=list)

    @property
    def model_config(self) -> ModelConfig:
        """The architecture of a built-in model (a user's model has its :attr:`model_spec` instead)."""
        if self.model_spec.config is None:
            raise PyroVAEError(
                f"the model of {self.path} is a user's class ({self.model_spec.name}), which has no ModelConfig; "
                "use run.model_spec"
            )
        return self.model_spec.config

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        """The shape of one data point as an image, for pictures (None: the data are not images)."""
        return self.model_spec.data_image_shape

    @cached_property
    def dataset(self) -> Dataset:
        """The run's data set; a user's file must still have the bytes it was trained on (if the run kept their hash)."""
        config = self.data_config
        dataset = load_dataset(config.dataset, data_dir=config.data_dir, sha256=config.sha256)
        # The validation points held out of the training split when the run was trained, if any.
        return dataset if config.validation is None else hold_out(dataset, config.validation)

    @cached_property
    def binarize(self) -> str:
        """The binarization of the run's data: the stored one, with ``auto`` resolved against the model."""
        if self.data_config.binarize != "auto":
            return self.data_config.binarize
        binary = needs_binary_data(self.vae, self.dataset.split("train")[:2].to(_device(self.vae)))
        return resolve_binarize("auto", dataset=self.dataset, likelihood_binary=binary)

    def data(self, split: str = "test") -> torch.Tensor:
        """The ``split`` of the run's data set, binarized as it was for training and evaluation."""
        return prepare_split(self.dataset, split, mode=self.binarize)

    def labels(self, split: str = "test") -> torch.Tensor | None:
        """The int64 labels [N] of ``split``, or None when the data set has none."""
        return self.dataset.labels(split)


def _device(model: VAEModel) -> torch.device:
    parameter = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    return torch.device("cpu") if parameter is None else parameter.device


def _spec(model_config: ModelConfig | None, model_spec: ModelSpec | None) -> ModelSpec:
    if (model_config is None) == (model_spec is None):
        raise PyroVAEError("pass the model's model_config (a built-in model) or its model_spec, exactly one")
    return model_spec if model_spec is not None else ModelSpec.builtin(model_config)  # type: ignore[arg-type]


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / "config.json").is_file()


def save_config(
    path: str | os.PathLike[str],
    *,
    model_config: ModelConfig | None = None,
    model_spec: ModelSpec | None = None,
    train_config: TrainConfig,
    data_config: DataConfig,
) -> Path:
    """Write ``config.json`` (and a file model's source): everything needed to rebuild the model and redo its training.

    The model is a built-in's ``model_config`` or any model's ``model_spec`` (exactly one).
    """
    path = Path(path)
    spec = _spec(model_config, model_spec)
    if spec.source is not None:
        write_text_atomic(path / SOURCE_FILE, spec.source)
    config = {
        "format": FORMAT,
        "model": spec.to_dict(),
        "train": train_config.to_dict(),
        "data": data_config.to_dict(),
    }
    write_text_atomic(path / "config.json", json.dumps(config, indent=2) + "\n")
    return path


def save_run(
    path: str | os.PathLike[str],
    *,
    vae: VAEModel,
    model_config: ModelConfig | None = None,
    model_spec: ModelSpec | None = None,
    train_config: TrainConfig,
    data_config: DataConfig,
    history: list[EpochRecord],
) -> Path:
    """Write the run's files into ``path`` (created if missing); the model as in :func:`save_config`."""
    path = save_config(
        path,
        model_config=model_config,
        model_spec=model_spec,
        train_config=train_config,
        data_config=data_config,
    )
    if not isinstance(vae, nn.Module):
        raise PyroVAEError(
            f"a run folder saves the model's weights, so it must be an nn.Module, got {type(vae).__name__}"
        )
    state = {name: tensor.detach().cpu() for name, tensor in vae.state_dict().items()}
    save_weights(path / "model.pt", state)  # sealed with its SHA-256 (see pyro_vae.training.state)
    # A valid_elbo column only for a run scored on a validation split: other tables stay as they were.
    scored = any(r.valid_elbo is not None for r in history)
    rows = ["epoch,train_elbo,test_elbo,seconds" + (",valid_elbo" if scored else "")]
    for r in history:
        test = "" if r.test_elbo is None else repr(r.test_elbo)
        valid = ("," + ("" if r.valid_elbo is None else repr(r.valid_elbo))) if scored else ""
        rows.append(f"{r.epoch},{r.train_elbo!r},{test},{r.seconds:.6f}{valid}")
    write_text_atomic(path / "metrics.csv", "\n".join(rows) + "\n")
    return path


def read_data_config(path: str | os.PathLike[str]) -> DataConfig:
    """The data config of the run in ``path`` (its ``config.json``), without building its model."""
    path = Path(path)
    try:
        return DataConfig.from_dict(json.loads((path / "config.json").read_text())["data"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, RecursionError) as error:
        raise PyroVAEError(
            f"{path / 'config.json'} is not a valid run config ({type(error).__name__}: {error}); "
            "train afresh with --overwrite"
        ) from None


def read_layer_choices(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The inference and KL warm-up the run in ``path`` was trained with: {"inference": ..., "warmup_epochs": ...}.

    Only what its ``config.json`` holds (a user's model has no inference); {} for a folder without a readable
    one, which ``--resume`` then refuses on its own terms.
    """
    try:
        config = json.loads((Path(path) / "config.json").read_text())
        model, train = config.get("model", {}), config.get("train", {})
        options = model.get("options", {}) if model.get("kind") == "builtin" else {}
    except (OSError, json.JSONDecodeError, AttributeError, TypeError, RecursionError):
        return {}
    choices = {"inference": options.get("inference"), "warmup_epochs": train.get("warmup_epochs")}
    return {key: value for key, value in choices.items() if value is not None}


# How --overwrite replaces a run so that a SIGKILL at any moment loses neither the old run nor, once it has
# a checkpoint, the new one. The old run's files are renamed into RUN_DIR/.replaced.tmp one by one (the new
# run has written nothing yet), then that folder is renamed to RUN_DIR/.replaced in one step; only then does
# the new run write its files, into RUN_DIR itself (so every path, the lock's and the checkpoint's, stays
# what it is). Which of two folders exists says how far a killed process got:
#   .replaced.tmp  RUN_DIR holds nothing but old files: move the rest back.
#   .replaced      the old run is complete in it, RUN_DIR holds only the new run's files. A checkpoint.pt
#                  in RUN_DIR is therefore the new run's first: keep the new run, delete .replaced. Without
#                  one, delete the new files, rename .replaced back to .replaced.tmp, and move back as above.
# Every step can be redone after a kill in the middle of it. The settling happens at the end of the command,
# and else at the next one that takes the folder's lock (settle_replacement).
_SETTING_ASIDE = ".replaced.tmp"
_SET_ASIDE = ".replaced"


def set_aside_run(path: str | os.PathLike[str]) -> bool:
    """Move the run files in ``path`` into ``path/.replaced``; False if there were none to move.

    Hold the folder's lock exclusively, and :func:`settle_replacement` first.
    """
    path = Path(path)
    present = [name for name in RUN_FILES if (path / name).exists()]
    if not present:
        return False
    staging = path / _SETTING_ASIDE
    staging.mkdir()
    for name in present:
        os.replace(path / name, staging / name)
    os.replace(staging, path / _SET_ASIDE)
    return True


def settle_replacement(path: str | os.PathLike[str]) -> str | None:
    """Finish an overwrite of the run in ``path``: keep the new run if it has a checkpoint, else the old.

    Returns a sentence when the old run was brought back, None otherwise
    (nothing was being replaced, or the new run had its checkpoint). Hold the
    folder's lock exclusively.
    """
    path = Path(path)
    staging, aside = path / _SETTING_ASIDE, path / _SET_ASIDE
    if aside.is_dir():
        if (path / "checkpoint.pt").exists():
            shutil.rmtree(aside)
            return None
        for name in RUN_FILES:
            (path / name).unlink(missing_ok=True)
        os.replace(aside, staging)
    if not staging.is_dir():
        return None
    for name in RUN_FILES:
        if (staging / name).exists():
            os.replace(staging / name, path / name)
    staging.rmdir()
    return f"the run in {path} is kept: the run meant to replace it stopped before its first checkpoint"


def save_evaluation(path: str | os.PathLike[str], summary: dict[str, Any]) -> None:
    """Write ``summary`` as JSON in one atomic step; its ``per_datum`` lists (if any) one line each.

    The summary stays readable (two-space indents) while a per-datum list of 10,000 numbers takes one line
    instead of 10,000. NaN and infinite k̂ are written as JSON's ``NaN`` / ``Infinity`` (Python's reading).
    """
    per_datum = summary.get("per_datum")
    rest = {key: value for key, value in summary.items() if key != "per_datum"}
    text = json.dumps(rest, indent=2)
    if per_datum is not None:
        rows = ",\n".join(f"    {json.dumps(key)}: {json.dumps(value)}" for key, value in per_datum.items())
        head = text[: text.rindex("}")].rstrip() + ("," if rest else "")
        text = head + '\n  "per_datum": {\n' + rows + "\n  }\n}"
    write_text_atomic(Path(path), text + "\n")


def read_evaluation(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``evaluation.json`` of the run in ``path``, or None when the run has none.

    A file that is not such a JSON object is refused with a sentence (never read as no evaluation).
    """
    file = Path(path) / "evaluation.json"
    if not file.is_file():
        return None
    try:
        summary = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, RecursionError) as error:
        raise PyroVAEError(
            f"{file} is not a pyro_vae evaluation ({type(error).__name__}: {error}); delete it or train again"
        ) from None
    if not isinstance(summary, dict):
        raise PyroVAEError(
            f"{file} is not a pyro_vae evaluation (not a JSON object); delete it or train again"
        )
    return summary


def load_run(path: str | os.PathLike[str], *, device: DeviceLike = "cpu") -> Run:
    """Rebuild the model of the run in ``path`` with its trained weights, on ``device``.

    The model is built again through its :class:`~pyro_vae.models.spec.ModelSpec`: a
    built-in's config, or a user's class from the run folder's copy of its
    source file (from any working directory) or from its installed module.
    """
    path = Path(path)
    missing = [name for name in _FILES if not (path / name).is_file()]
    if missing:
        raise PyroVAEError(
            f"{path} is not a pyro_vae run folder: it lacks {', '.join(missing)}; pass the --out folder of "
            "a finished pyro-vae train"
        )
    try:
        config = json.loads((path / "config.json").read_text())
        model_spec = ModelSpec.from_dict(config["model"], folder=path)
        train_config = TrainConfig.from_dict(config["train"])
        data_config = DataConfig.from_dict(config["data"])
    except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as error:
        raise PyroVAEError(
            f"{path / 'config.json'} is not a valid run config ({type(error).__name__}: {error}); retrain the run"
        ) from None
    vae = model_spec.build()
    if not isinstance(vae, nn.Module):
        raise PyroVAEError(
            f"{model_spec.name} builds a {type(vae).__name__}, not an nn.Module with weights to load"
        )
    state = load_weights(path / "model.pt")  # its checksum verified, every weight finite
    try:
        vae.load_state_dict(state)
    except Exception as error:  # names or shapes of another model
        raise PyroVAEError(
            f"{path / 'model.pt'} cannot be loaded into the configured model ({error})"
        ) from None
    vae.to(device)
    with open(path / "metrics.csv", newline="") as handle:
        try:
            history = [
                EpochRecord(
                    epoch=int(row["epoch"]),
                    train_elbo=float(row["train_elbo"]),
                    test_elbo=float(row["test_elbo"]) if row["test_elbo"] else None,
                    seconds=float(row["seconds"]),
                    valid_elbo=float(row["valid_elbo"]) if row.get("valid_elbo") else None,
                )
                for row in csv.DictReader(handle)
            ]
        except (KeyError, ValueError, TypeError) as error:  # another header, a cell that is not a number
            raise PyroVAEError(
                f"{path / 'metrics.csv'} is not pyro_vae's table of epochs (header epoch,train_elbo,test_elbo,"
                f"seconds; {type(error).__name__}: {error}); restore it or retrain the run"
            ) from None
    return Run(path, model_spec, train_config, data_config, vae, history)
