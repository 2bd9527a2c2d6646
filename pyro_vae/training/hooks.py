"""What the training loop does around its steps, as hooks (Lightning's callbacks): progress, checkpoints,
the NaN guard, Ctrl-C and SIGTERM, and a refusal of runs that cannot finish.

The loop calls every hook, in the order given, at each event:

    on_fit_start                   before the first step (after any resume)
      on_epoch_start               the epoch's minibatches not drawn yet
        on_step_start              before each step
        on_step_end(loss)          after it, the state counted (``loop.state.step`` is the steps done)
      on_epoch_steps_end           the epoch's steps done, its figures not computed yet
      on_epoch_scores(scores)      a hook may add figures of the epoch to ``scores`` (``valid_elbo``)
      on_epoch_end(record)         the epoch recorded; the state stands at the next epoch
    on_fit_end                     always, also after an exception

and ``on_save`` right before a checkpoint is written (a hook may refuse by
raising). A hook reads the loop (:class:`Loop`: its state, config, feeder and
device) and may ask it to ``save()``. A hook that needs the loss on the host
reads it only where ``loop.at_sync`` says a host-device synchronisation is
cheap (every step on the CPU; every ``REFRESH_EVERY`` steps on a GPU), so GPU
steps keep queuing behind each other.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..resources import check_finishes
from .distributed import run_on_main
from .feeding import Feeder
from .state import EpochRecord, TrainingState

__all__ = [
    "REFRESH_EVERY",
    "Checkpoints",
    "EpochLog",
    "Hook",
    "Interrupted",
    "Loop",
    "NaNGuard",
    "ProgressBar",
    "RefuseEndless",
    "StopOnInterrupt",
]

LOGGER = logging.getLogger("pyro_vae.training")

# How often (in steps) the progress bar, and on a GPU the NaN guard, read values back from the device.
REFRESH_EVERY = 25


class Loop(Protocol):
    """What a hook sees of the training loop."""

    state: TrainingState
    config: TrainConfig
    feeder: Feeder
    device: torch.device
    steps_per_epoch: int
    checkpoint: Path | None
    # The step at which this fit last wrote the checkpoint or resumed from it (None: neither, so far).
    saved_at: int | None

    @property
    def optimizer(self) -> Any:
        """The step's optimizer (a JointAdam, or Pyro's per-parameter Adam)."""
        ...

    @property
    def model(self) -> Any:
        """The model being trained."""
        ...

    @property
    def at_sync(self) -> bool:
        """Whether this step is one where reading a value back from the device is allowed."""
        ...

    def save(self) -> None:
        """Write the checkpoint (if there is one) after every hook's ``on_save``."""
        ...


class Hook:
    """A training callback; every event does nothing unless a subclass says otherwise."""

    def on_fit_start(self, loop: Loop) -> None:
        pass

    def on_epoch_start(self, loop: Loop) -> None:
        pass

    def on_step_start(self, loop: Loop) -> None:
        pass

    def on_step_end(self, loop: Loop, loss: torch.Tensor) -> None:
        pass

    def on_epoch_steps_end(self, loop: Loop) -> None:
        pass

    def on_epoch_scores(self, loop: Loop, scores: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, loop: Loop, record: EpochRecord) -> None:
        pass

    def on_save(self, loop: Loop) -> None:
        pass

    def on_fit_end(self, loop: Loop) -> None:
        pass


class NaNGuard(Hook):
    """Stop with FloatingPointError at the first step whose loss is NaN or infinite, naming it.

    The first bad step is kept on the device (``torch.where``, no host sync)
    and read back at sync steps, at the end of each epoch and before every
    checkpoint, so no checkpoint is written after a bad step.
    """

    def __init__(self) -> None:
        self.first_bad: torch.Tensor | None = None  # 0-based index of the first non-finite step, -1: none

    def on_fit_start(self, loop: Loop) -> None:
        self.first_bad = torch.full((), -1, dtype=torch.long, device=loop.device)

    def on_step_end(self, loop: Loop, loss: torch.Tensor) -> None:
        assert self.first_bad is not None
        step = loop.state.step - 1  # the step just taken
        self.first_bad = torch.where(
            (self.first_bad < 0) & ~torch.isfinite(loss),
            torch.full_like(self.first_bad, step),
            self.first_bad,
        )
        if loop.at_sync:
            self.check(loop)  # free on the CPU; on a GPU only as often as the bar refreshes

    def on_epoch_steps_end(self, loop: Loop) -> None:
        self.check(loop)

    def on_save(self, loop: Loop) -> None:
        self.check(loop)

    def check(self, loop: Loop) -> None:
        bad = -1 if self.first_bad is None else int(self.first_bad)
        if bad >= 0:
            # Only a checkpoint this fit wrote or verified on resume is known good: not any file at that path.
            last = (
                f"the last good checkpoint is {loop.checkpoint} (step {loop.saved_at})"
                if loop.checkpoint is not None and loop.saved_at is not None
                else "no checkpoint was written"
            )
            raise FloatingPointError(
                f"the loss became NaN or infinite at step {bad + 1} (epoch {loop.state.epoch}); {last}; "
                "lower --lr or set --clip-norm"
            )


class ProgressBar(Hook):
    """A tqdm bar on stderr over all steps, with the running ELBO per datum every ``REFRESH_EVERY`` steps."""

    def __init__(self, *, show: bool) -> None:
        self.show = show
        self.bar: Any = None

    def on_fit_start(self, loop: Loop) -> None:
        self.bar = tqdm(
            total=loop.config.epochs * loop.steps_per_epoch,
            initial=loop.state.step,
            disable=not self.show,
            file=sys.stderr,
            unit="step",
            dynamic_ncols=True,
        )

    def on_epoch_start(self, loop: Loop) -> None:
        self.bar.set_description(f"epoch {loop.state.epoch}/{loop.config.epochs}")

    def on_step_end(self, loop: Loop, loss: torch.Tensor) -> None:
        self.bar.update()
        state = loop.state
        if self.show and state.step % REFRESH_EVERY == 0:
            self.bar.set_postfix(elbo=f"{-float(state.epoch_loss) / state.seen:.2f}")

    def on_epoch_end(self, loop: Loop, record: EpochRecord) -> None:
        test = f"{record.test_elbo:.2f}" if record.test_elbo is not None else "-"
        self.bar.set_postfix(elbo=f"{record.train_elbo:.2f}", test=test)

    def on_fit_end(self, loop: Loop) -> None:
        if self.bar is not None:
            self.bar.close()


class EpochLog(Hook):
    """One line per epoch on the ``pyro_vae.training`` logger: epoch, ELBOs, seconds and the time left.

    The line is logged at INFO; the command line shows it when there is no bar (output piped to a file or
    a pipe), so a long run in the background says where it is, as Pyro's own VAE example prints it.
    Nothing is shown from Python unless logging is configured for ``pyro_vae``.
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_epoch_end(self, loop: Loop, record: EpochRecord) -> None:
        self.seconds.append(record.seconds)
        left = (loop.config.epochs - record.epoch) * sum(self.seconds) / len(self.seconds)
        test = "-" if record.test_elbo is None else f"{record.test_elbo:.3f}"
        valid = (
            ""
            if record.valid_elbo is None
            else f", valid {'ELBO' if loop.config.valid_samples == 1 else f'IWAE_{loop.config.valid_samples}'}"
            f" {record.valid_elbo:.3f}"
        )
        LOGGER.info(
            "epoch %d/%d: train ELBO %.3f, test ELBO %s%s nats per datum; %.2f s, about %.0f s left",
            record.epoch,
            loop.config.epochs,
            record.train_elbo,
            test,
            valid,
            record.seconds,
            left,
        )


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM (``signum``), after writing the checkpoint where there is one."""

    def __init__(self, message: str = "", *, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum


# Ctrl-C, and what clusters (Slurm, Kubernetes) send some seconds before they kill a job.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnInterrupt(Hook):
    """The first SIGINT (Ctrl-C) or SIGTERM stops after the current step: checkpoint, then :class:`Interrupted`.

    The signal only sets a flag (a second one stops at once, without saving).
    With shards the flag travels with the next step's gradients, so every
    process stops after the same step, and they wait for the save before leaving.
    """

    def __init__(self) -> None:
        self.requested: int | None = None  # the signal received, if any
        self._previous: dict[int, Any] = {}

    def on_fit_start(self, loop: Loop) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested is not None:
            raise Interrupted(signum=signum)
        self.requested = signum

    def on_step_start(self, loop: Loop) -> None:
        if self.requested is not None:
            loop.feeder.request_stop()

    def on_step_end(self, loop: Loop, loss: torch.Tensor) -> None:
        if loop.feeder.stop_requested(self.requested is not None, at_sync=loop.at_sync):
            loop.save()
            loop.feeder.barrier()  # torchrun stops everyone at the first exit: after the save
            resumes = f"; the checkpoint {loop.checkpoint} resumes it" if loop.checkpoint is not None else ""
            # Another process of the group may have had the signal: this one stops as if by SIGINT.
            raise Interrupted(
                f"stopped at step {loop.state.step}{resumes}", signum=self.requested or signal.SIGINT
            )

    def on_fit_end(self, loop: Loop) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


class RefuseEndless(Hook):
    """After the first epoch of a fit, refuse (PyroVAEError) a run whose epochs left would outlast any machine.

    The first epoch's wall time times the epochs left is the estimate (see
    :func:`~pyro_vae.resources.check_finishes`); it runs after the epoch's
    checkpoint is written, so the refusal loses nothing and ``--resume`` with
    a smaller ``--epochs`` continues. Rank 0 decides for the whole group.
    """

    def __init__(self) -> None:
        self.checked = False

    def on_epoch_end(self, loop: Loop, record: EpochRecord) -> None:
        if self.checked:
            return
        self.checked = True
        epochs_left = loop.config.epochs - record.epoch
        run_on_main(
            lambda: check_finishes(
                epoch_seconds=record.seconds, epochs_left=epochs_left, epochs=loop.config.epochs
            )
        )


class Checkpoints(Hook):
    """Save at the end of every epoch and every ``every`` steps inside an epoch (None: epochs only)."""

    def __init__(self, *, every: int | None) -> None:
        self.every = every

    def on_step_end(self, loop: Loop, loss: torch.Tensor) -> None:
        state = loop.state
        if self.every and state.step % self.every == 0 and state.done < loop.steps_per_epoch:
            loop.save()

    def on_epoch_end(self, loop: Loop, record: EpochRecord) -> None:
        loop.save()
