"""What the commands print on stdout: lines of at most :data:`COLUMNS` characters, as a terminal shows them."""

from __future__ import annotations

import textwrap

__all__ = ["COLUMNS", "fit_columns"]

# The width every summary line of train and evaluate keeps to (a terminal of 100 columns, a log viewer).
COLUMNS = 100


def fit_columns(text: str, *, width: int = COLUMNS) -> str:
    """``text`` with each line longer than ``width`` wrapped at spaces, its continuations indented 4 more.

    A single word longer than ``width`` (a long path) is kept whole on its own line rather than cut.
    """
    out = []
    for line in text.splitlines():
        if len(line) <= width:
            out.append(line)
            continue
        indent = " " * (len(line) - len(line.lstrip()) + 4)
        out += textwrap.wrap(
            line, width=width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
        )
    return "\n".join(out)
