"""Progress of a chunked evaluation: a bar on a terminal, one log line per chunk otherwise."""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from tqdm.auto import tqdm

__all__ = ["ChunkProgress", "log_chunk"]

LOGGER = logging.getLogger("pyro_vae.inference")


def log_chunk(desc: str, *, done: int, total: int, start: float, note: str = "") -> None:
    """One INFO line on ``pyro_vae.inference``: ``DESC: 130 of 359 data points done (1.0 s, about 2 s left)``.

    ``start`` is the ``time.perf_counter()`` of the evaluation's start; the time left is the pace so far
    carried over the points still to do, as the epoch lines of training say it.
    """
    elapsed = time.perf_counter() - start
    left = total - done
    pace = f", about {elapsed * left / done:.0f} s left" if done > 0 and left > 0 else ""
    LOGGER.info(
        "%s: %d of %d data points done (%.1f s%s)%s",
        desc,
        done,
        total,
        elapsed,
        pace,
        f"; {note}" if note else "",
    )


class ChunkProgress:
    """Counts the steps of every data chunk of an evaluation.

    ``show=None`` draws a tqdm bar on stderr when stderr is a terminal; whatever the bar,
    each finished chunk is logged on ``pyro_vae.inference`` at INFO level (the command line
    shows those lines when its output is piped), so a long run in the background says where it is.
    """

    def __init__(self, *, desc: str, num_data: int, total_steps: int, show: bool | None = None) -> None:
        self.desc = desc
        self.num_data = num_data
        self.done_data = 0
        self.start = time.perf_counter()
        show = sys.stderr.isatty() if show is None else show
        self.bar = tqdm(total=total_steps, disable=not show, desc=desc, unit="step", file=sys.stderr)

    def step(self, num: int = 1) -> None:
        self.bar.update(num)

    def chunk_done(self, num_data: int, note: str = "") -> None:
        self.done_data += num_data
        log_chunk(self.desc, done=self.done_data, total=self.num_data, start=self.start, note=note)

    def __enter__(self) -> ChunkProgress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.bar.close()
