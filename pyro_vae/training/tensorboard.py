"""Experiment tracking in TensorBoard: the per-epoch numbers of a fit and, at its end, its pictures.

``pyro-vae train --tensorboard DIR`` (or ``fit(..., hooks=[TensorBoardLog(DIR, vae=vae, test=x)])``)
writes, through :class:`torch.utils.tensorboard.SummaryWriter`, with the epoch as the step:

    elbo/train, elbo/test   the epoch's per-datum ELBO in nats (the rows of metrics.csv, which stays)
    kl/<site>               each latent layer's share of KL(q(z|x) || p(z)) per datum, in nats, on the
                            first ``kl_points`` test points with ``kl_samples`` guide draws each
                            (:func:`~pyro_vae.inference.importance.latent_layers_within`); for models with latent sites
    time/epoch_seconds      the epoch's wall time

and, once the last epoch is done, two image grids: ``images/reconstructions`` (test images, each row
above the means of p(x | z) at their posterior means E_q[z | x]) and ``images/samples`` (means of
p(x | z) for z ~ p(z)). TensorBoard is an optional dependency (``pip install 'pyro_vae[tensorboard]'``):
:func:`require_tensorboard` says so in one sentence when it is missing, before anything is written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .._typing import VAEModel
from ..errors import PyroVAEError
from ..models import abilities
from ..models.abilities import AbilityMissing
from .hooks import Hook, Loop
from .state import EpochRecord

__all__ = ["TensorBoardLog", "require_tensorboard"]


def require_tensorboard() -> type:
    """``torch.utils.tensorboard.SummaryWriter``, or a :class:`PyroVAEError` saying how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when the tensorboard package is not installed
        raise PyroVAEError(
            "--tensorboard needs the tensorboard package, which is not installed: "
            "pip install 'pyro_vae[tensorboard]' (or pip install tensorboard)"
        ) from None
    return SummaryWriter  # type: ignore[no-any-return]


class TensorBoardLog(Hook):
    """Writes the scalars of every epoch and, at the end of a finished fit, the image grids, into ``log_dir``.

    ``vae`` and ``test`` (the test split [N, D], as the model sees it) give the per-layer KL and the
    pictures; without them only the ELBOs and seconds are written. ``image_shape`` ((H, W) or (C, H, W))
    draws rows as images; None draws no pictures. What the hook computes draws from a fork of torch's
    generators seeded with ``seed``, so training with it gives the same parameters as without it.
    Only the main process writes (one event file per fit; a resumed fit drops the old events from its
    first epoch on, so the curves do not double).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        vae: VAEModel | None = None,
        test: torch.Tensor | None = None,
        image_shape: tuple[int, ...] | None = None,
        kl_points: int = 500,
        kl_samples: int = 10,
        num_images: int = 32,
        seed: int = 0,
    ) -> None:
        if kl_points < 1 or kl_samples < 1 or num_images < 1:
            raise PyroVAEError(
                f"kl_points, kl_samples and num_images must be positive, got {kl_points}, {kl_samples}, "
                f"{num_images}"
            )
        self.writer_class = require_tensorboard()
        self.log_dir = Path(log_dir)
        self.vae = vae
        self.test = test
        self.image_shape = image_shape
        self.kl_points = kl_points
        self.kl_samples = kl_samples
        self.num_images = num_images
        self.seed = seed
        self.writer: Any = None
        self.kl_missing = False  # the model has no per-layer KL to give: stop asking

    def on_fit_start(self, loop: Loop) -> None:
        if not loop.feeder.is_main:
            return
        # On resume, events of this epoch and later from the interrupted fit are dropped.
        purge = loop.state.epoch if loop.state.epoch > 1 else None
        self.writer = self.writer_class(log_dir=str(self.log_dir), purge_step=purge)

    def on_epoch_end(self, loop: Loop, record: EpochRecord) -> None:
        if self.writer is None:
            return
        step = record.epoch
        self.writer.add_scalar("elbo/train", record.train_elbo, step)
        if record.test_elbo is not None:
            self.writer.add_scalar("elbo/test", record.test_elbo, step)
        self.writer.add_scalar("time/epoch_seconds", record.seconds, step)
        for site, kl in self.layer_kl(loop.device).items():
            self.writer.add_scalar(f"kl/{site}", kl, step)
        self.writer.flush()

    def on_fit_end(self, loop: Loop) -> None:
        if self.writer is None:
            return
        try:
            # Only a finished fit: on_fit_end also runs after an error or Ctrl-C.
            if len(loop.state.history) >= loop.config.epochs:
                self.add_images(loop.device, step=loop.config.epochs)
        finally:
            self.writer.close()
            self.writer = None

    def layer_kl(self, device: torch.device) -> dict[str, float]:
        """{site: KL share per datum in nats} on the first ``kl_points`` test points; {} when it cannot be had."""
        if self.vae is None or self.test is None or self.kl_missing:
            return {}
        # inference imports training's siblings: at first use. Its passes are planned to the default memory budget.
        from ..inference.importance import latent_layers_within

        x = self.test[: self.kl_points].to(device)
        try:
            with _forked(device, self.seed):
                layers = latent_layers_within(self.vae.model, self.vae.guide, x, num_samples=self.kl_samples)
        except (PyroVAEError, AbilityMissing, NotImplementedError):
            self.kl_missing = True  # e.g. a user's model whose sites cannot be paired: ELBOs only
            return {}
        return {layer["site"]: layer["kl"] for layer in layers}

    def add_images(self, device: torch.device, *, step: int) -> None:
        """The reconstruction and sample grids, as ``images/reconstructions`` and ``images/samples``."""
        if self.vae is None or self.test is None or self.image_shape is None:
            return
        from torchvision.utils import make_grid

        vae, x = self.vae, self.test[: self.num_images].to(device)
        shape = self.image_shape if len(self.image_shape) == 3 else (1, *self.image_shape)
        nrow = min(len(x), 16)
        try:
            with _forked(device, self.seed):
                means = abilities.posterior_means(vae, x)
                decoded = abilities.decode(vae, means, like=x)
                samples = abilities.prior_samples(vae, len(x), like=x)
        except AbilityMissing:
            return
        # Data rows above their reconstructions, in rows of nrow images: [2 * rows * nrow, C, H, W].
        pairs = []
        for start in range(0, len(x), nrow):
            pairs += [x[start : start + nrow], decoded[start : start + nrow]]
        for tag, rows in (("reconstructions", torch.cat(pairs)), ("samples", samples)):
            images = rows.detach().float().cpu().reshape(-1, *shape)
            # Pixel values in [0, 1] are drawn on that scale, others (a Gaussian's means) on their own range.
            scaled = bool(images.min() < 0 or images.max() > 1)
            columns = nrow if tag == "reconstructions" else math.ceil(math.sqrt(len(rows)))
            grid = make_grid(images, nrow=columns, normalize=scaled)
            self.writer.add_image(f"images/{tag}", grid, step)
        self.writer.flush()


@contextmanager
def _forked(device: torch.device, seed: int) -> Iterator[None]:
    """A seeded fork of torch's generators (and the device's): what the hook draws leaves training's alone."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        yield
