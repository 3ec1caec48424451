"""Command-line plumbing shared by every entry point: usage errors exit 2 with one line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad flags, missing or corrupt input: reported as one line on stderr, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
             prog: str | None = None) -> int:
    """Run ``main``; a :class:`UsageError` becomes ``prog: error: msg`` and exit code 2,
    Ctrl-C exit code 130, a closed output pipe a quiet exit code 1. Returns the exit code (for
    ``sys.exit``)."""
    prog = prog or Path(sys.argv[0]).name
    try:
        return int(main(argv) or 0)
    except UsageError as exc:
        print(f"{prog}: error: {str(exc).splitlines()[0] if str(exc) else 'usage error'}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``| head``): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush cannot fail
        return 1


def integer(text: str) -> int:
    """argparse type: any integer (range checks are the caller's)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def number(text: str) -> float:
    """argparse type: a float."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` if needed and check it is a writable directory, else raise UsageError."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {str(out)!r}: {exc.strerror}") from None
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {str(out)!r} is not writable")
    return out
