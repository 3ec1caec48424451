"""A run directory: the one place that knows its files, its status, its config and its model.

* ``config.json``: the TrainConfig fields at the top level (so ``TrainConfig.from_dict`` reads it back,
  older field names included) plus ``resolved`` (learning rate, steps per epoch, total steps, dataset
  sizes, image shape, ...), ``model_config`` and ``environment`` (package versions, git commit,
  devices).
* ``metrics.jsonl``: one JSON object per logging step (see :mod:`manifold_lab.train.records`).
  ``init_from`` records the run whose weights started this one, when it was started that way.
* ``checkpoints/``: Orbax checkpoints by step (:mod:`manifold_lab.train.checkpoint`), each with the
  SHA-256 of its files; a damaged one found on resume is set aside as ``<step>.corrupt``.
* ``tensorboard/``: TensorBoard event files, when the run was started with ``--tensorboard``.
* ``summary.json``: written last and atomically; its presence marks a finished run.
* ``.lock``: held by the process training the run (:mod:`manifold_lab.train.lock`); removed when it
  stops, left behind only by a process that was killed.

A run is ``done`` (complete and consistent), ``partial`` (resumable: config, a checkpoint, no
summary), ``missing`` (absent or empty) or ``corrupt`` (anything else). Importing this module does
not import JAX: reports read finished runs on any machine; restoring a model imports it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from manifold_lab.atomic import atomic_write_json
from manifold_lab.cli import UsageError
from manifold_lab.train.config import RENAMED_FIELDS, RESERVED_KEYS, TrainConfig, identity_fields

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
#: TensorBoard event files of the run (written with ``--tensorboard``).
TENSORBOARD_DIR = "tensorboard"
#: Lock file of the process training the run (:mod:`manifold_lab.train.lock`); not part of the run.
LOCK_FILE = ".lock"
#: ``config.json`` key recording the run whose weights started this one (``--init-from``):
#: ``{"run": absolute path, "step": checkpoint step}``; absent for runs started from scratch.
INIT_FROM_KEY = "init_from"
SUMMARY_KEYS = ("final_test_accuracy", "final_test_loss", "steps", "epochs", "wall_time_s",
                "train_images_per_second", "params")
DONE, MISSING, PARTIAL, CORRUPT = "done", "missing", "partial", "corrupt"


def config_digest(train_fields: Mapping[str, Any]) -> str:
    """The identity of a run: SHA-256 of the canonical JSON of its
    :func:`~manifold_lab.train.config.identity_fields` (the same run reads its data from wherever it
    lies); ties summary.json to config.json."""
    return _sha256_json(identity_fields(train_fields))


def digest_matches(digest: Any, train_fields: Mapping[str, Any]) -> bool:
    """Whether ``digest`` (a summary's ``config_sha256``) is the run identity of ``train_fields``,
    or the digest of every field, location included, that runs finished before recorded."""
    return digest in (config_digest(train_fields), _sha256_json(dict(train_fields)))


def _sha256_json(obj: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


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


class RunDir:
    """The files of one run directory, read and written through one object."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.config_path = self.path / CONFIG_FILE
        self.metrics_path = self.path / METRICS_FILE
        self.summary_path = self.path / SUMMARY_FILE
        self.checkpoint_dir = self.path / CHECKPOINT_DIR

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- reading

    def holds_run(self) -> bool:
        """True when a run has started here (a config or a checkpoint folder)."""
        return self.config_path.exists() or self.checkpoint_dir.exists()

    def has_checkpoint(self) -> bool:
        return self.checkpoint_dir.is_dir() and any(self.checkpoint_dir.iterdir())

    def config_json(self) -> dict[str, Any]:
        """``config.json`` as written (UsageError when missing or corrupt)."""
        return read_json(self.config_path, "run config")

    def train_config(self) -> TrainConfig:
        """The run's resolved TrainConfig (older field names read as the new ones)."""
        return TrainConfig.from_dict(self.config_json())

    def resolved(self) -> dict[str, Any]:
        """The numbers the trainer derived from config and data (``config.json``'s ``resolved``)."""
        resolved = self.config_json().get("resolved")
        if not isinstance(resolved, dict):
            raise UsageError(f"corrupt run config {self.config_path}: no 'resolved'")
        return resolved

    def metrics(self, *, drop_partial_tail: bool = False) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path, drop_partial_tail=drop_partial_tail)

    def summary(self) -> dict[str, Any]:
        return read_json(self.summary_path, "run summary")

    def load(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """``(config.json as a dict, metrics records)``; UsageError when missing or corrupt."""
        return self.config_json(), self.metrics()

    def is_complete(self) -> bool:
        """True when ``summary.json`` exists, is valid, and matches ``config.json`` (same config
        digest and the planned number of steps)."""
        try:
            config, summary = self.config_json(), self.summary()
        except UsageError:
            return False
        if any(key not in summary for key in SUMMARY_KEYS):
            return False
        fields = {k: v for k, v in config.items() if k not in RESERVED_KEYS}
        resolved = config.get("resolved")
        return (digest_matches(summary.get("config_sha256"), fields) and isinstance(resolved, dict)
                and summary["steps"] == resolved.get("total_steps"))

    def status(self, expected: Mapping[str, Any] | None = None) -> tuple[str, str]:
        """``(status, reason)``: done, partial, missing or corrupt. ``expected``: TrainConfig fields
        (JSON values) the saved config must hold; a difference makes the run corrupt."""
        if not self.path.exists() or (self.path.is_dir() and all(p.name == LOCK_FILE for p in self.path.iterdir())):
            return MISSING, "no run directory"
        if not self.path.is_dir():
            return CORRUPT, "not a directory"
        if not self.config_path.is_file():
            return CORRUPT, f"no {CONFIG_FILE}"
        try:
            saved = self.config_json()
            TrainConfig.from_dict(saved)
        except UsageError as exc:
            return CORRUPT, f"unreadable {CONFIG_FILE} ({str(exc).splitlines()[0]})"
        saved = {RENAMED_FIELDS.get(k, k): v for k, v in saved.items()}  # a field missing differs
        diff = sorted(k for k, v in (expected or {}).items() if k not in saved or saved[k] != v)
        if diff:
            return CORRUPT, "config mismatch: " + ", ".join(diff)
        if not self.summary_path.exists():
            if self.has_checkpoint():
                return PARTIAL, f"no {SUMMARY_FILE}; checkpoint present"
            return CORRUPT, f"no {SUMMARY_FILE} and no checkpoint"
        if not self.is_complete():
            return CORRUPT, f"{SUMMARY_FILE} invalid or inconsistent with {CONFIG_FILE}"
        try:
            metrics = self.metrics()
        except UsageError as exc:
            return CORRUPT, f"unreadable metrics ({str(exc).splitlines()[0]})"
        if not any("test_accuracy" in m for m in metrics):
            return CORRUPT, f"{METRICS_FILE} has no evaluation"
        return DONE, "complete"

    # -- writing

    def write_config(self, train_fields: Mapping[str, Any], resolved: Mapping[str, Any],
                     model_config: Mapping[str, Any], environment: Mapping[str, Any], *,
                     extra: Mapping[str, Any] | None = None) -> None:
        """Write ``config.json`` atomically; ``extra``: further reserved keys (``init_from``)."""
        atomic_write_json(self.config_path, {**train_fields, "resolved": resolved, "model_config": model_config,
                                             "environment": environment, **(extra or {})})

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write ``summary.json`` atomically (the last file of a run)."""
        atomic_write_json(self.summary_path, summary)

    # -- the trained network

    def restore_model(self, *, use_ema: bool | None = None, require_complete: bool = True,
                      step: int | None = None) -> Any:
        """The run's model (an ``nnx.Module``) with a checkpoint's weights and BatchNorm statistics,
        ready for ``model(x, train=False)``. ``use_ema``: the EMA of the weights and statistics
        instead of the raw ones (default: whenever the run kept one, as its evaluations did).
        ``require_complete``: refuse unfinished runs (UsageError); without it the newest checkpoint
        of an unfinished run is used. ``step``: a specific kept checkpoint instead of the newest."""
        from manifold_lab.train.restore import restore_model
        if require_complete and not self.is_complete():
            raise UsageError(f"{self.path} is not a complete run")
        return restore_model(self, use_ema=use_ema, step=step)


def is_complete(run_dir: str | os.PathLike[str]) -> bool:
    """:meth:`RunDir.is_complete` of ``run_dir``."""
    return RunDir(run_dir).is_complete()


def load_run(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """:meth:`RunDir.load` of ``run_dir``: ``(config.json as a dict, metrics records)``."""
    return RunDir(run_dir).load()


def restore_model(run_dir: str | os.PathLike[str], **kwargs: Any) -> Any:
    """:meth:`RunDir.restore_model` of ``run_dir``."""
    return RunDir(run_dir).restore_model(**kwargs)
