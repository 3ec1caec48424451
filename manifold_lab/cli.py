"""Command-line plumbing shared by every entry point: usage errors exit 2 with one line; Ctrl-C
(SIGINT) and SIGTERM stop with one line and exit codes 130 and 143 (128 + the signal's number)."""

from __future__ import annotations

import argparse
import dataclasses
import numbers
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad flags, missing or corrupt input: reported as one line on stderr, exit code 2."""


class Interrupted(KeyboardInterrupt):
    """Stopped by a signal, Ctrl-C (SIGINT) or SIGTERM (what SLURM, Kubernetes and preemptible VMs
    send), after saving what had to be saved (``detail`` says what). A KeyboardInterrupt, so code
    that lets Ctrl-C through lets it through; :func:`run_main` exits with :attr:`exit_code`."""

    def __init__(self, signum: int, detail: str = "") -> None:
        super().__init__(signum, detail)
        self.signum = int(signum)
        self.detail = detail

    @property
    def exit_code(self) -> int:
        """128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as a shell or a scheduler
        reports a process that the signal ended."""
        return 128 + self.signum

    def __str__(self) -> str:
        name = "Ctrl-C" if self.signum == signal.SIGINT else signal.Signals(self.signum).name
        return f"interrupted by {name}" + (f" {self.detail}" if self.detail else "")


#: The signals that stop a program cleanly.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DeferredInterrupt:
    """Turn SIGINT and SIGTERM into :attr:`signum` (the first one received), for a loop to check at
    a safe point (a training step's donated buffers must never be lost mid-update), save and raise
    :class:`Interrupted` (main thread only; elsewhere nothing changes).
    A Ctrl-C after a request stops at once; a repeated SIGTERM is ignored (a scheduler and a sweep
    both sending it to a worker must not cost its checkpoint)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        elif signum == signal.SIGINT:
            raise Interrupted(signum)

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM outside a :class:`DeferredInterrupt`: stop now, as Ctrl-C does (later SIGTERMs are
    ignored: the program is stopping)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)


#: The console command; ``manifold-lab NAME`` runs the subcommand NAME (:mod:`manifold_lab.command`).
COMMAND = "manifold-lab"


class HelpFormatter(argparse.HelpFormatter):
    """Help that states every default once, as ``(default: X)``: appended to an option's help
    unless the help already says what its default is, or there is none to state (``None``, an
    off switch, a suppressed value)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default == []
                or default is argparse.SUPPRESS or not (action.option_strings or action.nargs == "?")):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting, and shows
    defaults in one style (:class:`HelpFormatter`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def command_name(subcommand: str, module: str) -> str:
    """How the running program is called, for usage lines and errors: ``manifold-lab SUBCOMMAND``
    under the console command, else ``python -m MODULE``."""
    program = Path(sys.argv[0])
    if program.name == COMMAND or (program.name == "__main__.py" and program.parent.name == "manifold_lab"):
        return f"{COMMAND} {subcommand}"
    return f"python -m {module}"


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
             prog: str | None = None) -> int:
    """Run ``main``; a :class:`UsageError` becomes ``prog: error: msg`` and exit code 2, Ctrl-C
    and SIGTERM one line (``prog: interrupted by SIGTERM ...``) and exit code 130 or 143
    (:class:`Interrupted`; SIGTERM is raised as one while ``main`` runs, in the main thread), a
    closed output pipe a quiet exit code 1. Returns the exit code (for ``sys.exit``)."""
    prog = prog or Path(sys.argv[0]).name
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return int(main(argv) or 0)
    except UsageError as exc:
        print(f"{prog}: error: {str(exc).splitlines()[0] if str(exc) else 'usage error'}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        stop = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
        print(f"{prog}: {stop}", file=sys.stderr)
        return stop.exit_code
    except BrokenPipeError:  # the reader went away (``| head``): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush cannot fail
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def integer(text: str) -> int:
    """argparse type: any integer (range checks are the caller's)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def number(text: str) -> float:
    """argparse type: a finite float (``inf`` and ``nan`` are no settings)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


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


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The interval a numeric input must lie in: finite, ``[low, high]`` with either end open, and
    integers only when ``integral``. It checks a value (:meth:`problem`, for configs) and, called on
    a flag's text, is the argparse ``type`` of that flag, so that one definition bounds both and
    an out-of-range number stops with one line before any work starts."""

    low: float
    high: float
    integral: bool = False
    open_low: bool = False
    open_high: bool = False

    def __str__(self) -> str:
        shown = str if self.integral else (lambda v: f"{v:g}")
        return (f"{'(' if self.open_low else '['}{shown(self.low)}, {shown(self.high)}"
                f"{')' if self.open_high else ']'}")

    def describe(self) -> str:
        """The interval in words (``a positive integer at most 4096``, ``in [0, 1)``)."""
        if self.integral:
            return f"a positive integer at most {self.high}" if self.low == 1 else f"an integer in {self}"
        if self.low == 0 and self.open_low and not self.open_high:
            return f"positive and at most {self.high:g}"
        return f"in {self}"

    def problem(self, value: Any) -> str | None:
        """``must be ...`` when ``value`` is not a number in the interval, else None."""
        kind = numbers.Integral if self.integral else numbers.Real
        if (isinstance(value, bool) or not isinstance(value, kind)
                or not (self.low < value if self.open_low else self.low <= value)
                or not (value < self.high if self.open_high else value <= self.high)):
            return f"must be {self.describe()}, got {value!r}"
        return None

    def __call__(self, text: str) -> int | float:
        """argparse type: ``text`` as a number in the interval."""
        kind = "an integer" if self.integral else "a number"
        try:
            value: int | float = int(text) if self.integral else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind} in {self}, got {text!r}") from None
        if self.problem(value) is not None:
            raise argparse.ArgumentTypeError(f"expected {kind} in {self}, got {text!r}")
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
