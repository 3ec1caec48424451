"""What a training run records as it goes: ``metrics.jsonl`` lines, the console, and the environment.

``metrics.jsonl`` holds one JSON object per logging step: ``step``, ``epoch``, ``loss`` (mean
training loss since the previous line), ``train_accuracy`` (likewise), ``learning_rate`` (of the last
step), ``images_per_second`` (training images of this run per second over the interval; with k
vmapped seeds, per seed), ``elapsed_s`` (wall time so far, across resumes), and at evaluations
``test_loss``/``test_accuracy`` (the reported BatchNorm protocol, ``eval_bn``) with each measured
protocol's ``test_loss_<protocol>``/``test_accuracy_<protocol>``. Each line is appended with a single
``write``. With ``--tensorboard`` the same records go to TensorBoard event files in the run
directory's ``tensorboard/`` (:class:`TensorBoardWriter`). The run directory's other files belong to
:mod:`manifold_lab.train.run_dir`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import jax
import rich.console
import rich.progress
import rich.table

from manifold_lab.atomic import atomic_write_text
from manifold_lab.cli import UsageError
from manifold_lab.cpu_threads import intra_op_threads
from manifold_lab.train.run_dir import read_metrics

TIMING_KEYS = ("images_per_second", "elapsed_s")
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "grain")


def git_commit() -> str | None:
    """The source tree's commit (``+dirty`` with local changes), or None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def environment_info(devices: list[Any]) -> dict[str, Any]:
    """Package versions, Python, platform, git commit, the devices used and XLA:CPU's intra-op
    thread count."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "devices": [f"{d.platform}:{d.id} {getattr(d, 'device_kind', '')}".strip() for d in devices],
        "process_count": jax.process_count(),
        "xla_cpu_threads": intra_op_threads(),  # decides a CPU run's rounding (manifold_lab.cpu_threads)
    }


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (and, given ``tensorboard``, to TensorBoard event files in
    that directory); on resume, keeps exactly the records up to the restored step (later ones are
    replayed by the resumed run; TensorBoard is told to purge its later events likewise)."""

    def __init__(self, path: Path, *, resume_step: int | None, enabled: bool = True,
                 tensorboard: Path | None = None) -> None:
        self.path = path
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        if resume_step is not None:
            self.records = [r for r in read_metrics(path, drop_partial_tail=True) if r["step"] <= resume_step]
        if enabled:
            atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records))
        self.tensorboard = TensorBoardWriter(tensorboard, resume_step) if enabled and tensorboard else None

    def append(self, record: dict[str, Any]) -> None:
        """Add one record (one ``write`` call of one complete line)."""
        self.records.append(record)
        if not self.enabled:
            return
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def close(self) -> None:
        """Flush and close the TensorBoard writer (``metrics.jsonl`` needs nothing)."""
        if self.tensorboard is not None:
            self.tensorboard.close()


#: TensorBoard tag of each metrics field written every log line.
TENSORBOARD_TAGS = {"loss": "train/loss", "train_accuracy": "train/accuracy",
                    "learning_rate": "train/learning_rate", "images_per_second": "train/images_per_second"}


class TensorBoardWriter:
    """The metrics records as TensorBoard scalars (tensorboardX): ``train/loss``, ``train/accuracy``,
    ``train/learning_rate``, ``train/images_per_second`` and, at evaluations, ``test/accuracy`` and
    ``test/loss`` (the reported BatchNorm protocol) with ``test/accuracy_<protocol>`` and
    ``test/loss_<protocol>`` per measured protocol. TensorBoard is optional (the ``tensorboard``
    extra): a missing tensorboardX is a UsageError."""

    def __init__(self, directory: Path, resume_step: int | None) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise UsageError("--tensorboard needs tensorboardX: pip install 'manifold-lab[tensorboard]'") from None
        # purge_step: TensorBoard drops the events a previous attempt wrote after the resumed step
        self._writer = SummaryWriter(str(directory), purge_step=None if resume_step is None else resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        """Write one metrics record's scalars at its step."""
        step = int(record["step"])
        for key, tag in TENSORBOARD_TAGS.items():
            if key in record:
                self._writer.add_scalar(tag, float(record[key]), step)
        for key, value in record.items():
            if key.startswith(("test_loss", "test_accuracy")):
                self._writer.add_scalar("test/" + key[len("test_"):], float(value), step)
        if "test_accuracy" in record:
            self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def clock(seconds: float) -> str:
    """``H:MM:SS`` (``M:SS`` under an hour) of a duration."""
    total = int(max(seconds, 0.0) + 0.5)
    hours, rest = divmod(total, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class _Board:
    """One live ``rich`` display per output stream, shared by the progress bars of the seeds that
    one program trains (rich allows one live display per console); stopped when its last bar closes."""

    _open: dict[int, _Board] = {}

    def __init__(self, stream: TextIO) -> None:
        self.console = rich.console.Console(file=stream, force_terminal=True, highlight=False)
        self.display = rich.progress.Progress(
            rich.progress.TextColumn("{task.description}", markup=False), rich.progress.BarColumn(bar_width=20),
            rich.progress.TextColumn("{task.completed}/{task.total} {task.fields[elapsed]} "
                                     "{task.fields[speed]} step/s {task.fields[left]} left"),
            rich.progress.TextColumn("{task.fields[text]}", table_column=rich.table.Column(
                no_wrap=True, overflow="ellipsis")),
            console=self.console, auto_refresh=False)
        self.display.start()
        self.users = 0

    @classmethod
    def of(cls, stream: TextIO) -> _Board:
        """The stream's display (started on first use)."""
        board = cls._open.get(id(stream))
        if board is None:
            board = cls._open[id(stream)] = cls(stream)
        board.users += 1
        return board

    def release(self, stream: TextIO) -> None:
        """One bar fewer; the last one stops the display."""
        self.users -= 1
        if self.users <= 0:
            self.display.stop()
            self._open.pop(id(stream), None)


class Progress:
    """Console output. On a terminal, a ``rich`` progress bar per seed: steps done, elapsed time
    (across resumes), rate (steps per second since the first line of this process, so compilation
    does not count), time left at that rate, loss and img/s; evaluation lines and messages print
    above the bars and stay on screen. Otherwise one plain line per log step ending in ``elapsed``
    and ``eta``. Only process 0 prints; :meth:`close` ends the bar."""

    def __init__(self, total_steps: int, *, label: str = "", stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.total = total_steps
        self.label = f"{label} " if label else ""
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self._board: _Board | None = None
        self._task: Any = None
        self._first: tuple[int, float] | None = None

    def timing(self, step: int) -> tuple[float | None, float | None]:
        """``(steps per second since the first line shown, seconds left at that rate)``; None
        before a rate can be measured."""
        now = time.perf_counter()
        if self._first is None:
            self._first = (step, now)
        done, seconds = step - self._first[0], now - self._first[1]
        if done <= 0 or seconds <= 0:
            return None, None
        rate = done / seconds
        return rate, (self.total - step) / rate

    def update(self, record: dict[str, Any]) -> None:
        """Show one metrics record."""
        if not self.enabled:
            return
        test = ""
        if "test_accuracy" in record:
            test = f" test_acc {record['test_accuracy']:.4f} test_loss {record['test_loss']:.4f}"
        rate, left = self.timing(record["step"])
        eta = "?" if left is None else clock(left)
        text = (f"step {record['step']}/{self.total} epoch {record['epoch']:.2f} "
                f"loss {record['loss']:.4f} acc {record['train_accuracy']:.4f} "
                f"lr {record['learning_rate']:.3g} {record['images_per_second']:.0f} img/s")
        elapsed = clock(record.get("elapsed_s", 0.0))
        if not self.tty:
            self.stream.write(f"{self.label}{text}{test} elapsed {elapsed} eta {eta}\n")
            self.stream.flush()
            return
        board = self._bar()
        if test:  # evaluation lines stay on screen above the bars
            board.console.print(f"{self.label}{text}{test}", markup=False, soft_wrap=True)
        board.display.update(self._task, completed=record["step"], elapsed=elapsed, left=eta,
                             speed="?" if rate is None else f"{rate:.2f}",
                             text=f"loss {record['loss']:.4f} acc {record['train_accuracy']:.4f} "
                                  f"{record['images_per_second']:.0f} img/s")
        board.display.refresh()

    def _bar(self) -> _Board:
        if self._board is None:
            self._board = _Board.of(self.stream)
            self._task = self._board.display.add_task(self.label.strip(), total=self.total, elapsed="0:00",
                                                      speed="?", left="?", text="")
        return self._board

    def message(self, text: str) -> None:
        """A line of its own (above the bars on a terminal)."""
        if not self.enabled:
            return
        if self.tty:
            self._bar().console.print(f"{self.label}{text}", markup=False, soft_wrap=True)
            return
        self.stream.write(f"{self.label}{text}\n")
        self.stream.flush()

    def close(self) -> None:
        """End this bar (the display stops with the last one); safe to call twice."""
        if self._board is not None:
            self._board.release(self.stream)
            self._board = None
