"""Progress of a chunked evaluation: a bar on a terminal, one log line per chunk otherwise."""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from tqdm.auto import tqdm

__all__ = ["ChunkProgress"]

LOGGER = logging.getLogger("pyro_vae.inference")


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
        elapsed = time.perf_counter() - self.start
        LOGGER.info(
            "%s: %d of %d data points done (%.1f s)%s",
            self.desc,
            self.done_data,
            self.num_data,
            elapsed,
            f"; {note}" if note else "",
        )

    def __enter__(self) -> ChunkProgress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.bar.close()
