"""Scoring a validation split during training, and keeping the weights that scored best.

Two hooks (:mod:`.hooks`), added by ``fit`` when ``TrainConfig.eval_every``
is set:

- :class:`Validation` scores the validation data after every ``eval_every``-th
  epoch and after the last: the ELBO per datum (``valid_samples`` = 1), or the
  importance-weighted bound IWAE_K = E[log (1/K) sum_k p(x, z_k) / q(z_k | x)]
  <= log p(x) (Burda et al., 2016) with K = ``valid_samples``. Its draws come
  from a stream of their own, seeded by (seed, epoch) and forked off torch's
  generator, so a run trains on exactly the noise it would draw without
  validation, and every process of a group gets the same score. The score
  goes into the epoch's record (``valid_elbo``), the training log and
  ``metrics.csv``.
- :class:`BestCheckpoint` writes the weights of the best-scoring epoch so far
  to ``best.pt`` beside the checkpoint (atomically and sealed with its
  SHA-256, as ``model.pt``), before that epoch's checkpoint is written: a run
  killed in between repeats the epoch on resume and writes the same file
  again. On resume the best score so far is read from the history.

References:
    Burda, Grosse, Salakhutdinov (2016). Importance weighted autoencoders. ICLR.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from .._typing import VAEModel
from ..config import TrainConfig
from ..inference.importance import evaluate_bounds
from .distributed import Stream, derive_seed, seeded
from .elbo import mean_elbo
from .hooks import Hook, Loop
from .state import EpochRecord, save_weights

__all__ = ["BEST_FILE", "BestCheckpoint", "Validation", "is_validation_epoch", "validation_score"]

# The file of the best weights, beside the checkpoint (in a run folder, beside model.pt).
BEST_FILE = "best.pt"


def is_validation_epoch(config: TrainConfig, epoch: int) -> bool:
    """Whether epoch ``epoch`` (from 1) is scored: every ``eval_every``-th, and the last."""
    every = config.eval_every
    return every is not None and (epoch % every == 0 or epoch == config.epochs)


def validation_score(vae: VAEModel, x: torch.Tensor, *, num_samples: int) -> float:
    """The validation score per datum of ``x`` [N, D], in nats: the ELBO (K = 1) or the IWAE_K bound."""
    if num_samples == 1:
        return mean_elbo(vae, x, num_particles=1)
    # The evaluator logs a line per data chunk; the training log has its own line per validation.
    chunks = logging.getLogger("pyro_vae.inference")
    level = chunks.level
    chunks.setLevel(logging.WARNING)
    try:
        bounds = evaluate_bounds(
            vae.model, vae.guide, x, num_samples=num_samples, diagnostics=False, progress=False
        )
    finally:
        chunks.setLevel(level)
    return float(bounds.log_px.mean())


class Validation(Hook):
    """Score ``valid`` [N, D] (on the training device) after the epochs :func:`is_validation_epoch` picks."""

    def __init__(self, valid: torch.Tensor) -> None:
        self.valid = valid

    def on_epoch_scores(self, loop: Loop, scores: dict[str, float]) -> None:
        config, epoch = loop.config, loop.state.epoch
        if not is_validation_epoch(config, epoch):
            return
        with seeded(derive_seed(config.seed, Stream.VALIDATION, epoch), device=loop.device):
            scores["valid_elbo"] = validation_score(loop.model, self.valid, num_samples=config.valid_samples)


class BestCheckpoint(Hook):
    """Write the weights of the epoch with the highest ``valid_elbo`` so far to ``path`` (``best.pt``).

    Add it before :class:`~pyro_vae.training.hooks.Checkpoints`, so the best
    weights are on disk before the checkpoint whose history names their epoch.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.best = -math.inf
        self.best_epoch: int | None = None

    def on_fit_start(self, loop: Loop) -> None:
        # A resumed run: the best score of the epochs already trained (their weights are in best.pt).
        for record in loop.state.history:
            self._consider(record)

    def _consider(self, record: EpochRecord) -> bool:
        score = record.valid_elbo
        if score is None or not math.isfinite(score) or score <= self.best:
            return False
        self.best, self.best_epoch = score, record.epoch
        return True

    def on_epoch_end(self, loop: Loop, record: EpochRecord) -> None:
        if self._consider(record) and loop.feeder.is_main:
            weights = {k: v.detach().cpu() for k, v in loop.model.state_dict().items()}
            save_weights(self.path, weights)
