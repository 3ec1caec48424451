"""What a training run records as it goes: ``metrics.jsonl`` lines, the console, and the environment.

``metrics.jsonl`` holds one JSON object per logging step: ``step``, ``epoch``, ``loss`` (mean
training loss since the previous line), ``train_accuracy`` (likewise), ``learning_rate`` (of the last
step), ``images_per_second`` (training images of this run per second over the interval; with k
vmapped seeds, per seed), ``elapsed_s`` (wall time so far, across resumes), and at evaluations
``test_loss``/``test_accuracy`` (the reported BatchNorm protocol, ``eval_bn``) with each measured
protocol's ``test_loss_<protocol>``/``test_accuracy_<protocol>``. Each line is appended with a single
``write``. The run directory's other files belong to :mod:`manifold_lab.train.run_dir`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import jax

from manifold_lab.atomic import atomic_write_text
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
    """Package versions, Python, platform, git commit and the devices used."""
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
    }


class MetricsLog:
    """Appends records to ``metrics.jsonl``; on resume, keeps exactly the records up to the restored
    step (later ones are replayed by the resumed run)."""

    def __init__(self, path: Path, *, resume_step: int | None, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        if resume_step is not None:
            self.records = [r for r in read_metrics(path, drop_partial_tail=True) if r["step"] <= resume_step]
        if enabled:
            atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records))

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


class Progress:
    """Console output: a one-line progress bar with loss and img/s on a terminal, plain log lines
    otherwise. Only process 0 prints."""

    def __init__(self, total_steps: int, *, label: str = "", stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.total = total_steps
        self.label = f"{label} " if label else ""
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self._open_bar = False

    def update(self, record: dict[str, Any]) -> None:
        """Show one metrics record."""
        if not self.enabled:
            return
        test = ""
        if "test_accuracy" in record:
            test = f" test_acc {record['test_accuracy']:.4f} test_loss {record['test_loss']:.4f}"
        text = (f"{self.label}step {record['step']}/{self.total} epoch {record['epoch']:.2f} "
                f"loss {record['loss']:.4f} acc {record['train_accuracy']:.4f} "
                f"lr {record['learning_rate']:.3g} {record['images_per_second']:.0f} img/s{test}")
        if self.tty:
            done = int(30 * record["step"] / max(self.total, 1))
            bar = "#" * done + "." * (30 - done)
            self.stream.write(f"\r[{bar}] {text}\033[K")
            self._open_bar = True
            if test:  # keep evaluation lines on screen
                self.stream.write("\n")
                self._open_bar = False
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (ends an open progress bar first)."""
        if not self.enabled:
            return
        if self._open_bar:
            self.stream.write("\n")
            self._open_bar = False
        self.stream.write(f"{self.label}{text}\n")
        self.stream.flush()
