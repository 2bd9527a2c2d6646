"""A run folder: everything needed to rebuild, score and compare a trained model.

    RUN_DIR/config.json   model, training and data configs (rebuilds the model)
    RUN_DIR/model.pt      the model's state dict
    RUN_DIR/metrics.csv   one row per epoch: epoch, train_elbo, test_elbo, seconds
    RUN_DIR/evaluation.json  the last importance-sampled evaluation, when one was made

Files are written to a temporary name and renamed, so a run folder never
holds a half-written file.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._typing import DeviceLike
from ..config import DataConfig, ModelConfig, TrainConfig
from ..errors import PyroVAEError
from ..files import write_atomic, write_text_atomic
from ..models.build import build_vae
from ..models.vae import VAE
from ..training.loop import EpochRecord
from .binarization import prepare_split
from .data import load_dataset

__all__ = ["FORMAT", "Run", "is_run_dir", "load_run", "save_config", "save_evaluation", "save_run"]

FORMAT = "pyro_vae.run/1"
_FILES = ("config.json", "model.pt", "metrics.csv")


@dataclass
class Run:
    """A trained model with its configs and history, as stored in a run folder."""

    path: Path
    model_config: ModelConfig
    train_config: TrainConfig
    data_config: DataConfig
    vae: VAE
    history: list[EpochRecord] = field(default_factory=list)

    def data(self, split: str = "test") -> torch.Tensor:
        """The ``split`` of the run's data set, binarized as it was for training and evaluation."""
        dataset = load_dataset(self.data_config.dataset, data_dir=self.data_config.data_dir)
        return prepare_split(dataset, split, mode=self.data_config.binarize)


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / "config.json").is_file()


def save_config(
    path: str | os.PathLike[str],
    *,
    model_config: ModelConfig,
    train_config: TrainConfig,
    data_config: DataConfig,
) -> Path:
    """Write ``config.json``: everything needed to rebuild the model and redo its training."""
    path = Path(path)
    config = {
        "format": FORMAT,
        "model": model_config.to_dict(),
        "train": train_config.to_dict(),
        "data": data_config.to_dict(),
    }
    write_text_atomic(path / "config.json", json.dumps(config, indent=2) + "\n")
    return path


def save_run(
    path: str | os.PathLike[str],
    *,
    vae: VAE,
    model_config: ModelConfig,
    train_config: TrainConfig,
    data_config: DataConfig,
    history: list[EpochRecord],
) -> Path:
    """Write the run's three files into ``path`` (created if missing)."""
    path = save_config(path, model_config=model_config, train_config=train_config, data_config=data_config)
    state = {name: tensor.detach().cpu() for name, tensor in vae.state_dict().items()}
    write_atomic(path / "model.pt", lambda handle: torch.save(state, handle))
    rows = ["epoch,train_elbo,test_elbo,seconds"]
    for r in history:
        test = "" if r.test_elbo is None else repr(r.test_elbo)
        rows.append(f"{r.epoch},{r.train_elbo!r},{test},{r.seconds:.6f}")
    write_text_atomic(path / "metrics.csv", "\n".join(rows) + "\n")
    return path


def save_evaluation(path: str | os.PathLike[str], summary: dict[str, Any]) -> None:
    write_text_atomic(Path(path), json.dumps(summary, indent=2) + "\n")


def load_run(path: str | os.PathLike[str], *, device: DeviceLike = "cpu") -> Run:
    """Rebuild the model of the run in ``path`` with its trained weights, on ``device``."""
    path = Path(path)
    missing = [name for name in _FILES if not (path / name).is_file()]
    if missing:
        raise PyroVAEError(
            f"{path} is not a pyro_vae run folder: it lacks {', '.join(missing)}; pass the --out folder of "
            "a finished pyro-vae train"
        )
    try:
        config = json.loads((path / "config.json").read_text())
        model_config = ModelConfig.from_dict(config["model"])
        train_config = TrainConfig.from_dict(config["train"])
        data_config = DataConfig.from_dict(config["data"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise PyroVAEError(
            f"{path / 'config.json'} is not a valid run config ({error}); retrain the run"
        ) from None
    vae = build_vae(model_config)
    try:
        state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
        vae.load_state_dict(state)
    except Exception as error:  # a truncated file raises anything from EOFError to RuntimeError
        raise PyroVAEError(
            f"{path / 'model.pt'} cannot be loaded into the configured model ({error})"
        ) from None
    vae.to(device)
    with open(path / "metrics.csv", newline="") as handle:
        history = [
            EpochRecord(
                epoch=int(row["epoch"]),
                train_elbo=float(row["train_elbo"]),
                test_elbo=float(row["test_elbo"]) if row["test_elbo"] else None,
                seconds=float(row["seconds"]),
            )
            for row in csv.DictReader(handle)
        ]
    return Run(path, model_config, train_config, data_config, vae, history)
