"""A run directory's files: ``config.json``, ``metrics.jsonl``, ``summary.json``, and the console.

* ``config.json``: the TrainConfig fields at the top level (so ``TrainConfig.from_dict`` reads it back)
  plus ``resolved`` (learning rate, steps per epoch, total steps, dataset sizes, ...),
  ``model_config`` and ``environment`` (package versions, git commit, devices).
* ``metrics.jsonl``: one JSON object per logging step: ``step``, ``epoch``, ``loss`` (mean training
  loss since the previous line), ``train_accuracy`` (likewise), ``learning_rate`` (of the last step),
  ``images_per_second`` (training images of this run per second over the interval; with k vmapped
seeds, per seed), ``elapsed_s`` (wall time so far, across resumes), and
  ``test_loss``/``test_accuracy`` at evaluations. Each line is appended with a single ``write``.
* ``summary.json``: written last and atomically; its presence marks a finished run.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import jax

from manifold_lab.atomic import atomic_write_json, atomic_write_text
from manifold_lab.cli import UsageError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
SUMMARY_KEYS = ("final_test_accuracy", "final_test_loss", "steps", "epochs", "wall_time_s",
                "train_images_per_second", "params")
TIMING_KEYS = ("images_per_second", "elapsed_s")
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "grain")


def config_digest(train_fields: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of the TrainConfig fields (ties summary.json to config.json)."""
    return hashlib.sha256(json.dumps(train_fields, sort_keys=True).encode()).hexdigest()


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


def write_config(run_dir: Path, train_fields: dict[str, Any], resolved: dict[str, Any],
                 model_config: dict[str, Any], environment: dict[str, Any]) -> None:
    """Write ``config.json`` atomically."""
    atomic_write_json(run_dir / CONFIG_FILE, {**train_fields, "resolved": resolved,
                                              "model_config": model_config, "environment": environment})


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; UsageError naming ``what`` when missing or corrupt."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"no {what} at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"corrupt {what} {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"corrupt {what} {path}: not a JSON object")
    return data


def read_metrics(path: Path, *, drop_partial_tail: bool = False) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (empty when absent). A corrupt line raises UsageError,
    except an unterminated last line when ``drop_partial_tail`` (a run killed mid-append)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read metrics {path}: {exc}") from None
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline
    if tail and not drop_partial_tail:
        lines.append(tail)
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"corrupt metrics {path}: line {number} is not JSON") from None
        if not isinstance(record, dict) or "step" not in record:
            raise UsageError(f"corrupt metrics {path}: line {number} has no step")
        records.append(record)
    return records


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


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json`` atomically (the last file of a run)."""
    atomic_write_json(run_dir / SUMMARY_FILE, summary)


def is_complete(run_dir: str | os.PathLike[str]) -> bool:
    """True when ``summary.json`` exists, is valid, and matches ``config.json`` (same config digest
    and the planned number of steps)."""
    run_dir = Path(run_dir)
    try:
        config = read_json(run_dir / CONFIG_FILE, "run config")
        summary = read_json(run_dir / SUMMARY_FILE, "run summary")
    except UsageError:
        return False
    if any(key not in summary for key in SUMMARY_KEYS):
        return False
    fields = {k: v for k, v in config.items() if k not in ("resolved", "model_config", "environment")}
    resolved = config.get("resolved")
    return (summary.get("config_sha256") == config_digest(fields) and isinstance(resolved, dict)
            and summary["steps"] == resolved.get("total_steps"))


def load_run(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(config.json as a dict, metrics records)``; UsageError when missing or corrupt."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / CONFIG_FILE, "run config")
    return config, read_metrics(run_dir / METRICS_FILE)


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
