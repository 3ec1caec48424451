"""One trainer per run directory: an exclusive lock on ``RUN_DIR/.lock``.

Two processes training one folder would both append to ``metrics.jsonl`` and both write checkpoints
and a summary, so whoever trains a run directory holds its lock (the training engine, and a sweep
from the moment it looks at a run's status until it is done with it). The lock is ``flock`` on the
lock file, which the kernel releases when its process ends, however it ends; the file records the
holder (``{"host": ..., "pid": ..., "since": ...}``) so that a refusal can name it. A clean release
removes the file; one left behind by a killed process names a holder that no longer holds it, and
the next trainer takes the lock over and says so in one line.

Within one process the lock is re-entrant (a sweep holds a run's lock while the engine it calls
takes it again). Importing this module does not import JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from manifold_lab.cli import UsageError
from manifold_lab.train.run_dir import LOCK_FILE

Log = Callable[[str], None]

#: How long a busy lock is retried before it counts as held: another process may hold it for the
#: instant of :func:`locked_by`'s look, or be between taking it and writing its name.
CONTENDED_S = 0.25
_RETRY_S = 0.02


@dataclasses.dataclass(frozen=True)
class Holder:
    """The process named in a lock file."""

    host: str
    pid: int

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}"


class RunLocked(UsageError):
    """The run directory is locked by another process (exit code 2 on the command line)."""

    def __init__(self, path: Path, holder: Holder | None) -> None:
        self.path = path
        self.holder = holder
        super().__init__(f"{path} is locked by {holder or 'another process'}, which is training it")


@dataclasses.dataclass
class _Held:
    fd: int
    count: int


#: Locks held by this process, by the (device, inode) of their lock file.
_HELD: dict[tuple[int, int], _Held] = {}


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def _read_holder(fd: int) -> Holder | None:
    """The holder a lock file names (None when it is empty or unreadable)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode())
        return Holder(str(data["host"]), int(data["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class RunLock:
    """The lock of one run directory (created if needed), as a context manager. ``log`` gets the
    one line said when a lock left behind by a killed process is taken over (default: stderr)."""

    def __init__(self, run_dir: str | os.PathLike[str], log: Log | None = None) -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_FILE
        self.log = log or _stderr
        self._key: tuple[int, int] | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock; :class:`RunLocked` naming the holder when another process has it."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = self._take(time.monotonic() + CONTENDED_S)
        except OSError as exc:
            raise UsageError(f"cannot lock {self.dir}: {exc.strerror or exc}") from None
        if fd is None:  # already held by this process
            return
        previous = _read_holder(fd)
        if previous is not None:
            self.log(f"{self.dir}: taking over the lock left by {previous}, which has stopped")
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError as exc:
            self.release()
            raise UsageError(f"cannot lock {self.dir}: {exc.strerror or exc}") from None

    def _take(self, deadline: float) -> int | None:
        """``flock`` the lock file: its descriptor, or None when this process holds it already."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            key = _identity(os.fstat(fd))
            if key in _HELD:
                os.close(fd)
                _HELD[key].count += 1
                self._key = key
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise RunLocked(self.dir, holder) from None
                time.sleep(_RETRY_S)
                continue
            if _same_file(fd, self.path):  # else released and removed since we opened it: again
                _HELD[key] = _Held(fd, 1)
                self._key = key
                return fd
            os.close(fd)

    def release(self) -> None:
        """Give the lock up (the last release of this process removes the lock file)."""
        if self._key is None:
            return
        key, self._key = self._key, None
        held = _HELD[key]
        held.count -= 1
        if held.count:
            return
        del _HELD[key]
        try:
            if _same_file(held.fd, self.path):  # not when the folder was moved away meanwhile
                self.path.unlink()
        finally:
            os.close(held.fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return _identity(os.stat(path)) == _identity(os.fstat(fd))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def lock_runs(run_dirs: Sequence[str | os.PathLike[str]], enabled: bool = True,
              log: Log | None = None) -> Iterator[None]:
    """Hold the locks of ``run_dirs`` (all or none: :class:`RunLocked` for the first one held
    elsewhere). ``enabled`` False holds nothing (the non-main processes of a multi-host run)."""
    with contextlib.ExitStack() as stack:
        for run_dir in run_dirs if enabled else ():
            stack.enter_context(RunLock(run_dir, log))
        yield


def locked_by(run_dir: str | os.PathLike[str]) -> str | None:
    """Who else holds the lock of ``run_dir`` (``pid P on HOST``, or ``another process`` when the
    file does not say yet), or None when it is free or held by this process. Only looks."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file: nobody holds it
        return None
    try:
        if _identity(os.fstat(fd)) in _HELD:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return str(_read_holder(fd) or "another process")
        return None
    finally:
        os.close(fd)
