"""Data in and results out: data sets, binarization, run folders and the ArviZ export."""

from .binarization import prepare_split, resolve_binarize
from .data import DATASETS, DataError, Dataset, load_dataset
from .run import Run, load_run, save_run

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "Run",
    "load_dataset",
    "load_run",
    "prepare_split",
    "resolve_binarize",
    "save_run",
]
