"""What every command line shares: exit statuses, argument types, one-line errors and the last-resort guard.

A command's ``main`` parses its arguments and hands its work to
:func:`guarded`, which turns Ctrl-C, a closed pipe and unexpected errors into
one line on stderr and an exit status (never a traceback, unless
``MLX_EVIT_DEBUG=1``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from mlx_evit.errors import one_line

__all__ = [
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "DEBUG_ENV",
    "positive_int",
    "unit_fraction",
    "error_printer",
    "guarded",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEBUG_ENV = "MLX_EVIT_DEBUG"
"""Set to 1: unexpected errors raise with their traceback."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def unit_fraction(text: str) -> float:
    """argparse type: a number in [0, 1] (opacities, thresholds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def error_printer(prog: str) -> Callable[[str], None]:
    """``error(message)``: ``PROG: error: message`` on stderr, flushed."""

    def error(message: str) -> None:
        sys.stderr.write(f"{prog}: error: {message}\n")
        sys.stderr.flush()

    return error


def guarded(body: Callable[[], int], error: Callable[[str], None]) -> int:
    """``body()``'s exit status; Ctrl-C, a closed stdout and unexpected errors become one line and a status."""
    try:
        return body()
    except KeyboardInterrupt:
        error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, without a second error at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as e:
        if os.environ.get(DEBUG_ENV):
            raise
        error(f"unexpected {type(e).__name__}: {one_line(e)} (rerun with {DEBUG_ENV}=1 for the traceback)")
        return EXIT_INTERNAL
