"""The ``pyro-vae`` command line: the parser of every command, and what an error looks like.

    pyro-vae train [--dataset digits] [--likelihood bernoulli] ... [--out RUN_DIR]
    pyro-vae train --model FILE.py:Class [--model-option KEY=VALUE ...] ...   (your own model)
    torchrun --nproc-per-node N -m pyro_vae train --distributed ...   (data-parallel over N processes)
    pyro-vae evaluate RUN_DIR --num-samples 5000 [--split test] [--json FILE]
    pyro-vae evaluate RUN_DIR --method ais|bdmc|gaps [--num-chains C --num-steps T ...]
    pyro-vae plot RUN_DIR [--out DIR]
    pyro-vae sample RUN_DIR --num 64 --out FILE.png
    pyro-vae export RUN_DIR --out FILE.nc
    pyro-vae list
    pyro-vae COMMAND --config FILE.json|FILE.toml ...   (the command's defaults from a file)

One module per command (:mod:`~pyro_vae.cli.train`, :mod:`~pyro_vae.cli.evaluate`,
:mod:`~pyro_vae.cli.plot`, :mod:`~pyro_vae.cli.sample`, :mod:`~pyro_vae.cli.export`,
:mod:`~pyro_vae.cli.listing`), each adding its parser and the function that runs it.

Errors in what the user gave (a :class:`~pyro_vae.errors.PyroVAEError`:
unknown names, bad sizes, missing files, a model whose guide does not match
it; a bad flag, which prints its one ``error:`` line and where the help is,
without argparse's usage block) print one line and exit with status 2. So
does a file the system refuses (an ``OSError``: a path under a file, a
read-only folder), naming the path and the problem; a full disk is one line
and status 1, the run's last checkpoint named and intact. ``--debug`` shows
the traceback instead. SIGINT (Ctrl-C) and SIGTERM during ``train`` save a
checkpoint at the step and exit with 128 + the signal's number (130, 143),
as a shell reports a process the signal ended. Anything else is a bug, in the
package or in a user's model: it keeps its traceback and exits with status 1.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ..errors import PyroVAEError
from ..version import __version__
from . import evaluate, export, listing, plot, sample, train
from .evaluate import format_report
from .options import config_file_defaults

__all__ = ["format_report", "main", "parser"]


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line and a pointer to the help instead of the whole usage block.

    Its help shows every option's default (``ArgumentDefaultsHelpFormatter``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}; see {self.prog} --help\n")


def parser() -> argparse.ArgumentParser:
    """The parser of every command; each sets ``run``, the function that carries it out."""
    # Every command's parser is a _Parser too: add_subparsers makes them of the top parser's class.
    top = _Parser(prog="pyro-vae", description="Variational autoencoders as Pyro models.")
    top.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    loudness = top.add_mutually_exclusive_group()
    loudness.add_argument(
        "--quiet", action="store_true", help="no progress lines (a line per epoch or chunk when piped)"
    )
    loudness.add_argument(
        "--verbose", action="store_true", help="progress lines even on a terminal, with the bar"
    )
    commands = top.add_subparsers(dest="command", required=True)
    for command in (train, evaluate, export, plot, sample, listing):
        command.add_parser(commands)
    for name, sub in commands.choices.items():
        if name != "list":
            sub.add_argument(
                "--config",
                default=None,
                metavar="FILE",
                help=f"defaults for the options of {name} from a JSON or TOML (.toml) file, keys the option "
                "names (batch-size or batch_size); flags given here override them",
            )
    return top


def _subcommands(top: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (commands,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The parsed command line; with ``--config FILE`` the file's values are the command's defaults."""
    top = parser()
    args = top.parse_args(argv)
    if getattr(args, "config", None) is None:
        return args
    subcommands = _subcommands(top)
    sub = subcommands[args.command]
    sub.set_defaults(**config_file_defaults(args.config, sub, command=args.command, commands=subcommands))
    return top.parse_args(argv)


def _configure_logging(args: argparse.Namespace) -> None:
    """The package logs under ``pyro_vae``; here its progress lines go to stderr, one a line.

    On a terminal the bars show progress and the lines stay hidden unless ``--verbose``; piped, there is no
    bar and the lines (a line per epoch, a line per evaluation chunk) are what shows; ``--quiet`` hides them.
    """
    logger = logging.getLogger("pyro_vae")
    if args.quiet:
        level = logging.WARNING
    elif args.verbose or not sys.stderr.isatty():
        level = logging.INFO
    else:
        level = logging.WARNING
    logger.setLevel(level)
    if not any(getattr(h, "_pyro_vae_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._pyro_vae_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parse(argv)
    except PyroVAEError as error:  # a --config file that cannot give the defaults
        print(f"pyro-vae: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    _configure_logging(args)
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
    except OSError as error:
        if args.debug:
            raise
        print(f"{name}: error: {_os_problem(error)}", file=sys.stderr)
        # A full disk is no mistake in the input: the command may well succeed once there is room.
        return 1 if error.errno in (errno.ENOSPC, errno.EDQUOT) else 2
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
        return 128 + getattr(error, "signum", signal.SIGINT)


def _os_problem(error: OSError) -> str:
    """An OSError as the path and what the system said of it: ``/runs/r/model.pt: Read-only file system``."""
    problem = error.strerror or type(error).__name__
    if error.filename is None:
        return problem
    paths = str(error.filename) + (f" -> {error.filename2}" if error.filename2 is not None else "")
    return f"{paths}: {problem}"


if __name__ == "__main__":
    sys.exit(main())
