"""Orbax checkpoints of the train state, checked on the way back.

The state is saved in its own nested layout (``{"step", "params", "batch_stats", "opt_state", "ema",
"sums"}``), so plain Orbax restores a checkpoint into the train state or into a pytree of the same
structure (``ocp.StandardCheckpointer().restore(run/"checkpoints"/"<step>"/"default", target)``).
Checkpoints written in the earlier flat layout (one dict keyed by dotted paths such as
``params.blocks.0.bn.bias``) are still read: :meth:`Checkpointer.restore` recognises them by their
keys. Either layout reports a mismatch with the current model by path name.

Orbax writes each step into a temporary directory and renames it when complete, so a killed run
never leaves a half-written checkpoint behind (leftover temporaries are removed on the next open).
Saving is asynchronous on accelerators (the arrays are copied to host memory before ``save``
returns, so the training step can reuse its buffers; the file writes overlap the next steps) and
synchronous on the CPU, where the writes would compete with the step for the same cores.
Only finite states are ever saved (the loop checks every array first, :func:`finite_parts`).

Integrity: once Orbax has finished a step (after the background writes, on accelerators), the
SHA-256 of each of its files goes to ``<step>/sha256sums.json`` (atomically). Restoring verifies
them, so a truncated or overwritten file is found before its numbers are used; a step without the
file (older runs, or a process killed before writing it) is checked by reading it in full. On
resume, :func:`newest_intact_step` sets a damaged newest step aside (renamed ``<step>.corrupt``,
never deleted, never read again) with one line on stderr and continues from the newest intact one.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from manifold_lab.atomic import atomic_write_json
from manifold_lab.cli import UsageError
from manifold_lab.train.run_dir import CHECKPOINT_DIR
from manifold_lab.train.step import all_finite

#: Checkpoints kept per run directory unless the caller says otherwise (``--keep``).
DEFAULT_KEEP = 2
#: The checksums of a step's files, inside the step's directory: ``{"sha256": {path: hex digest}}``
#: with paths relative to that directory.
MANIFEST_FILE = "sha256sums.json"
#: Suffix of a damaged step directory set aside (``<step>.corrupt``, then ``.corrupt.1``, ...).
CORRUPT_SUFFIX = ".corrupt"
#: The parts of the train state a checkpoint must hold finite (the logging sums are not state).
STATE_PARTS: tuple[str, ...] = ("params", "batch_stats", "opt_state", "ema")


class CheckpointDamaged(UsageError):
    """A checkpoint whose files differ from their checksums, or that Orbax cannot read."""


def _first_line(exc: BaseException) -> str:
    """The first line of the root cause of ``exc`` (TensorStore's own message, under Orbax's)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


#: Seconds that the reads a failed restore abandoned get to finish (they take milliseconds).
_SETTLE_S = 0.5


@contextlib.contextmanager
def _orbax_read(prefix: str) -> Iterator[None]:
    """Run an Orbax read; its failure becomes one :class:`UsageError` line, ``prefix`` + the cause.
    Orbax stops at the first unreadable array and abandons the others, whose reads then fail in
    TensorStore's threads and print tracebacks of their own: those are silenced until the abandoned
    reads have settled."""
    hooks = sys.excepthook, sys.unraisablehook, threading.excepthook
    sys.excepthook = sys.unraisablehook = threading.excepthook = lambda *args: None
    try:
        yield
    except UsageError:
        raise
    except Exception as exc:  # Orbax and TensorStore raise bare Exceptions for unreadable data
        time.sleep(_SETTLE_S)
        gc.collect()
        raise UsageError(prefix + _first_line(exc)) from None
    finally:
        sys.excepthook, sys.unraisablehook, threading.excepthook = hooks


def _path_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flatten_state(state: Any) -> dict[str, Any]:
    """``{dotted path: leaf}`` of a pytree."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {".".join(_path_name(e) for e in path): leaf for path, leaf in leaves}


def unflatten_state(flat: dict[str, Any], template: Any) -> Any:
    """Inverse of :func:`flatten_state` given a pytree of the same structure."""
    paths = list(flatten_state(template))
    missing, extra = sorted(set(paths) - set(flat)), sorted(set(flat) - set(paths))
    if missing or extra:
        raise UsageError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    return jax.tree.unflatten(jax.tree.structure(template), [flat[p] for p in paths])


def is_flat_layout(keys: Any) -> bool:
    """Whether a checkpoint's top-level keys are the dotted paths of the flat layout."""
    return any("." in str(k) for k in keys)


def _abstract(template: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves with the template's shardings (first device by default)."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=getattr(x, "sharding", None) or default), template)


def _metadata_tree(metadata: Any) -> Any:
    """A checkpoint's tree metadata (``ArrayMetadata`` leaves: shape and dtype)."""
    return getattr(metadata, "tree", metadata)


def _metadata_keys(metadata: Any) -> list[str]:
    """Top-level keys of a checkpoint's tree metadata."""
    tree = _metadata_tree(metadata)
    return list(tree.keys()) if tree is not None else []


# ----------------------------------------------------------------------------- finite states

@functools.partial(jax.jit, static_argnames=("parts", "batched"))
def _finite_flags(state: Any, parts: tuple[str, ...], batched: bool) -> jax.Array:
    finite = jax.vmap(all_finite) if batched else all_finite
    return jax.numpy.stack([finite(state[p]) for p in parts], axis=-1)


def finite_parts(state: Any, batched: bool = False) -> tuple[tuple[str, ...], np.ndarray]:
    """Whether each part of :data:`STATE_PARTS` of ``state`` holds only finite numbers, in one
    jitted reduction: ``(part names, bool array [parts] or [seeds, parts] with batched)``. A state
    is worth saving only when all are, not merely its loss and weights: an infinite BatchNorm variance
    or optimiser moment poisons every step after a resume."""
    parts = tuple(p for p in STATE_PARTS
                  if any(jax.numpy.issubdtype(x.dtype, jax.numpy.floating) for x in jax.tree.leaves(state[p])))
    if not parts:
        return parts, np.ones((0,), bool)
    return parts, np.asarray(jax.device_get(_finite_flags(state, parts, batched)))


# ----------------------------------------------------------------------------- checksums

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under ``directory`` (the manifest aside), by relative POSIX path."""
    return {p.relative_to(directory).as_posix(): _sha256(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST_FILE}


def checksum_problem(directory: Path) -> str | None:
    """What is wrong with the files of a step ``directory`` against its manifest (one phrase), or
    None when every recorded file is present with its recorded SHA-256."""
    try:
        recorded = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))["sha256"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return f"unreadable {MANIFEST_FILE}"
    if not isinstance(recorded, dict) or not recorded:
        return f"unreadable {MANIFEST_FILE}"
    for name, digest in sorted(recorded.items()):
        try:
            actual = _sha256(directory / str(name))
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as exc:
            return f"{name} cannot be read ({exc.strerror or type(exc).__name__})"
        if actual != digest:
            return f"{name} does not match its SHA-256 checksum"
    return None


class Checkpointer:
    """Saves and restores train states under ``run_dir/checkpoints/<step>``; keeps the newest
    ``max_to_keep``. ``asynchronous``: write in the background (default: on accelerators only).
    Each finished step gets its checksums; restoring verifies them (:class:`CheckpointDamaged`)."""

    def __init__(self, run_dir: str | os.PathLike[str], max_to_keep: int = DEFAULT_KEEP, *,
                 asynchronous: bool | None = None) -> None:
        if max_to_keep < 1:
            raise UsageError(f"--keep must be at least 1, got {max_to_keep}")
        if asynchronous is None:
            asynchronous = jax.default_backend() != "cpu"
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=asynchronous,
                                               cleanup_tmp_directories=True)
        self.directory = os.path.join(os.fspath(run_dir), CHECKPOINT_DIR)
        self._manager = ocp.CheckpointManager(os.path.abspath(self.directory), options=options,
                                              item_handlers=ocp.StandardCheckpointHandler())
        self._asynchronous = asynchronous
        self._unsealed: list[int] = []  # saved by this object, checksums not yet written
        self._intact: set[int] = set()  # verified (or sealed) by this object

    def steps(self) -> list[int]:
        """Saved steps, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def step_dir(self, step: int) -> Path:
        """The directory of checkpoint ``step``."""
        return Path(self.directory) / str(step)

    def save(self, step: int, state: Any) -> None:
        """Save ``state`` as ``step`` in its nested layout (overwrites nothing: an existing step is
        kept). Returns once the arrays are on the host; :meth:`wait` for the files."""
        if step in self._manager.all_steps():
            return
        self._seal()  # Orbax waits for the previous save here anyway
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._unsealed.append(step)
        if not self._asynchronous:
            self._seal()

    def _seal(self) -> None:
        """Wait for pending saves, then write the checksums of the steps they finished."""
        self._manager.wait_until_finished()
        for step in self._unsealed:
            directory = self.step_dir(step)
            if directory.is_dir() and jax.process_index() == 0:
                atomic_write_json(directory / MANIFEST_FILE, {"sha256": file_digests(directory)})
                self._intact.add(step)
        self._unsealed = []

    def wait(self) -> None:
        """Block until every save has reached the disk with its checksums."""
        self._seal()

    def damage(self, step: int) -> str | None:
        """Why checkpoint ``step`` cannot be used (one phrase), or None when it is intact: its files
        against their checksums or, for a step saved without them, a full read by Orbax."""
        self.wait()
        if step in self._intact:
            return None
        if (self.step_dir(step) / MANIFEST_FILE).is_file():
            problem = checksum_problem(self.step_dir(step))
        else:
            problem = self._read_problem(step)
        if problem is None:
            self._intact.add(step)
        return problem

    def _read_problem(self, step: int) -> str | None:
        """What stops Orbax from reading ``step`` in full (onto the first device, whatever devices
        wrote it), or None."""
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        try:
            with _orbax_read(""):
                tree = _metadata_tree(self._manager.item_metadata(step))
                abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=default), tree)
                self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except UsageError as exc:
            return f"unreadable: {exc}"
        return None

    def _verify(self, step: int) -> None:
        """Raise :class:`CheckpointDamaged` when ``step`` has checksums its files do not match."""
        self.wait()
        if step in self._intact or not (self.step_dir(step) / MANIFEST_FILE).is_file():
            return
        problem = checksum_problem(self.step_dir(step))
        if problem is not None:
            raise CheckpointDamaged(f"checkpoint {step} in {self.directory} is damaged: {problem}")
        self._intact.add(step)

    def set_aside(self, step: int) -> Path:
        """Rename the damaged checkpoint ``step`` to ``<step>.corrupt`` (or ``.corrupt.<n>`` when
        taken), out of Orbax's sight; returns the new path."""
        source = self.step_dir(step)
        target, n = source.with_name(f"{step}{CORRUPT_SUFFIX}"), 0
        while target.exists():
            n += 1
            target = source.with_name(f"{step}{CORRUPT_SUFFIX}.{n}")
        source.rename(target)
        self._manager.reload()
        self._intact.discard(step)
        return target

    def restore(self, step: int, template: Any) -> Any:
        """Restore ``step`` into the structure, dtypes and shardings of ``template`` (a state with
        arrays or ``jax.ShapeDtypeStruct`` leaves; leaves without a sharding go to the first device).
        Reads the nested and the flat layout; damaged files raise :class:`CheckpointDamaged`."""
        self._verify(step)
        with _orbax_read(f"cannot restore checkpoint {step} in {self.directory}: "):
            if is_flat_layout(_metadata_keys(self._manager.item_metadata(step))):
                flat = self._manager.restore(step, args=ocp.args.StandardRestore(
                    flatten_state(_abstract(template))))
                return unflatten_state(dict(flat), template)
            return self._manager.restore(step, args=ocp.args.StandardRestore(_abstract(template)))

    def restore_flat(self, step: int) -> dict[str, Any]:
        """Checkpoint ``step`` as ``{dotted path: array}`` with the saved shapes and dtypes (either
        layout; no template needed, e.g. to take the weights of another run)."""
        self._verify(step)
        with _orbax_read(f"cannot restore checkpoint {step} in {self.directory}: "):
            raw = self._manager.restore(step, args=ocp.args.StandardRestore())
        return dict(raw) if is_flat_layout(raw.keys()) else flatten_state(raw)

    def close(self) -> None:
        """Finish pending saves (with their checksums) and release Orbax resources."""
        self._seal()
        self._manager.close()


def newest_intact_step(ckpts: Sequence[Checkpointer]) -> int | None:
    """The newest step kept intact in every one of ``ckpts`` (None when they share no step).

    Damaged newer steps are set aside (:meth:`Checkpointer.set_aside`) with one line on stderr, so
    that a run goes on from its newest intact state; when every shared step is damaged, nothing is
    moved and :class:`CheckpointDamaged` says so."""
    shared = sorted(set.intersection(*(set(c.steps()) for c in ckpts)), reverse=True) if ckpts else []
    damaged: list[tuple[Checkpointer, int, str]] = []
    for step in shared:
        found = [(c, step, problem) for c in ckpts if (problem := c.damage(step)) is not None]
        if not found:
            _set_aside(damaged, step)
            return step
        damaged += found
    if damaged:
        c, step, problem = damaged[0]
        raise CheckpointDamaged(f"checkpoint {step} in {c.directory} is damaged ({problem}) and no older "
                                f"one is intact: move {Path(c.directory).parent} aside and start again")
    return None


def _set_aside(damaged: list[tuple[Checkpointer, int, str]], intact: int) -> None:
    """Rename the ``damaged`` steps and say so in one line on stderr (process 0 only)."""
    if not damaged or jax.process_index() != 0:
        return
    moved = [f"{c.step_dir(step)} ({problem}) to {c.set_aside(step).name}" for c, step, problem in damaged]
    print(f"damaged checkpoint set aside: {'; '.join(moved)}; using step {intact}", file=sys.stderr, flush=True)
