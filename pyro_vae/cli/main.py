"""The ``pyro-vae`` command line: the parser of every command, and what an error looks like.

    pyro-vae train [--dataset digits] [--likelihood bernoulli] ... [--out RUN_DIR]
    pyro-vae train --model FILE.py:Class [--model-option KEY=VALUE ...] ...   (your own model)
    torchrun --nproc-per-node N -m pyro_vae train --distributed ...   (data-parallel over N processes)
    pyro-vae evaluate RUN_DIR --num-samples 5000 [--split test] [--json FILE]
    pyro-vae plot RUN_DIR [--out DIR]
    pyro-vae sample RUN_DIR --num 64 --out FILE.png
    pyro-vae export RUN_DIR --out FILE.nc
    pyro-vae list

One module per command (:mod:`~pyro_vae.cli.train`, :mod:`~pyro_vae.cli.evaluate`,
:mod:`~pyro_vae.cli.plot`, :mod:`~pyro_vae.cli.sample`, :mod:`~pyro_vae.cli.export`,
:mod:`~pyro_vae.cli.listing`), each adding its parser and the function that runs it.

Errors in what the user gave (a :class:`~pyro_vae.errors.PyroVAEError`:
unknown names, bad sizes, missing files, a model whose guide does not match
it) print one line and exit with status 2, as argparse does for a bad flag;
``--debug`` shows the traceback instead. Anything else is a bug, in the
package or in a user's model: it keeps its traceback and exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..errors import PyroVAEError
from . import evaluate, export, listing, plot, sample, train
from .evaluate import format_report

__all__ = ["format_report", "main", "parser"]


def parser() -> argparse.ArgumentParser:
    """The parser of every command; each sets ``run``, the function that carries it out."""
    top = argparse.ArgumentParser(prog="pyro-vae", description="Variational autoencoders as Pyro models.")
    top.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = top.add_subparsers(dest="command", required=True)
    for command in (train, evaluate, export, plot, sample, listing):
        command.add_parser(commands)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Under torchrun every process would say the same: the others name their rank, and stay silent where
    # all of them stop together (a NaN loss, Ctrl-C: decided with the gradients of the same step).
    rank = int(os.environ.get("RANK", "0")) if getattr(args, "distributed", False) else 0
    name = "pyro-vae" if rank == 0 else f"pyro-vae (rank {rank})"
    try:
        return int(args.run(args))
    except PyroVAEError as error:
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{name}: error: {message}", file=sys.stderr)
        return 2
    except FloatingPointError as error:
        if args.debug:
            raise
        if rank == 0:
            print(f"pyro-vae: training stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:
        if rank == 0:
            print(f"pyro-vae: interrupted{': ' + str(error) if str(error) else ''}", file=sys.stderr)
            if args.command == "train":
                print("pyro-vae: run the same command with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
