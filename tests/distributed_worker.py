"""One process of a test's ``torchrun`` job: ``pyro-vae`` run from a folder of its own.

    torchrun --nproc-per-node 2 tests/distributed_worker.py DIR [--interrupt-at STEP] train --distributed ...

Each process works in ``DIR/rank<RANK>``, so a relative ``--out`` shows which
process wrote what. ``--interrupt-at STEP`` makes rank 0 send itself SIGINT
(Ctrl-C) during that step, as a user would, for the resume tests.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from pyro_vae import cli
from pyro_vae.training import loop as train


def main(argv: list[str]) -> int:
    folder, argv = Path(argv[0]), argv[1:]
    interrupt_at = None
    if argv[0] == "--interrupt-at":
        interrupt_at, argv = int(argv[1]), argv[2:]
    rank = int(os.environ["RANK"])
    workdir = folder / f"rank{rank}"
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    if interrupt_at is not None and rank == 0:
        step_async, calls = train.AsyncSVI.step_async, [0]

        def interrupted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls[0] += 1
            if calls[0] == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)
            return step_async(self, *args, **kwargs)

        train.AsyncSVI.step_async = interrupted  # type: ignore[method-assign]
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
