"""Turning grey images into the binary data a Bernoulli likelihood needs.

Three protocols from the literature (see the data README in ``shared/``):

- ``none``: the data are used as they are;
- ``static``: every image is binarized once, with a seed fixed per split, so
  every run sees the same binary data set;
- ``dynamic``: a fresh binary image x ~ Bernoulli(grey values) is drawn each
  time a training image is used (a form of data augmentation); the test and
  validation images are binarized once, with the same fixed seeds as
  ``static``, so scores of different runs are comparable.

``auto`` picks ``dynamic`` when the likelihood needs binary data and the data
are grey, and ``none`` otherwise.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..errors import PyroVAEError
from .data import Dataset, binarize_static

__all__ = ["SPLIT_SEEDS", "prepare_split", "resolve_binarize"]

# Fixed seeds, one per split: runs with different training seeds still score the same test images.
SPLIT_SEEDS = {"train": 1, "valid": 2, "test": 3}


def resolve_binarize(
    mode: str, *, dataset: Dataset, likelihood_binary: bool
) -> Literal["none", "static", "dynamic"]:
    """The concrete protocol for ``mode`` ("auto", "none", "static" or "dynamic")."""
    if mode == "auto":
        return "dynamic" if likelihood_binary and not dataset.is_binary else "none"
    if mode not in ("none", "static", "dynamic"):
        raise PyroVAEError(f"binarize must be one of auto, none, static, dynamic; got {mode!r}")
    return mode  # type: ignore[return-value]


def prepare_split(dataset: Dataset, split: str, *, mode: str) -> torch.Tensor:
    """The data of ``split`` as the model sees them under binarization ``mode``.

    For ``dynamic`` the training split stays grey (it is binarized per
    minibatch during training); every other split is binarized once.
    """
    x = dataset.split(split)
    if mode == "none" or (mode == "dynamic" and split == "train"):
        return x
    if mode not in ("static", "dynamic"):
        raise PyroVAEError(f"binarize must be none, static or dynamic here; got {mode!r}")
    if x.min() < 0 or x.max() > 1:
        raise PyroVAEError(
            f"{dataset.name} has values outside [0, 1], so they cannot be binarized as probabilities; "
            "use --binarize none with a likelihood for real values"
        )
    return binarize_static(x, seed=SPLIT_SEEDS.get(split, 0))
