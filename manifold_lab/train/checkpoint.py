"""Orbax checkpoints of the train state.

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
Only finite states are ever saved (the loop checks), so the latest checkpoint is the last good one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from manifold_lab.cli import UsageError
from manifold_lab.train.run_dir import CHECKPOINT_DIR

#: Checkpoints kept per run directory unless the caller says otherwise (``--keep``).
DEFAULT_KEEP = 2


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


def _metadata_keys(metadata: Any) -> list[str]:
    """Top-level keys of a checkpoint's tree metadata."""
    tree = getattr(metadata, "tree", metadata)
    return list(tree.keys()) if tree is not None else []


class Checkpointer:
    """Saves and restores train states under ``run_dir/checkpoints/<step>``; keeps the newest
    ``max_to_keep``. ``asynchronous``: write in the background (default: on accelerators only)."""

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

    def steps(self) -> list[int]:
        """Saved steps, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        """Save ``state`` as ``step`` in its nested layout (overwrites nothing: an existing step is
        kept). Returns once the arrays are on the host; :meth:`wait` for the files."""
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def wait(self) -> None:
        """Block until every save has reached the disk."""
        self._manager.wait_until_finished()

    def restore(self, step: int, template: Any) -> Any:
        """Restore ``step`` into the structure, dtypes and shardings of ``template`` (a state with
        arrays or ``jax.ShapeDtypeStruct`` leaves; leaves without a sharding go to the first device).
        Reads the nested and the flat layout."""
        self.wait()
        try:
            if is_flat_layout(_metadata_keys(self._manager.item_metadata(step))):
                flat = self._manager.restore(step, args=ocp.args.StandardRestore(
                    flatten_state(_abstract(template))))
                return unflatten_state(dict(flat), template)
            return self._manager.restore(step, args=ocp.args.StandardRestore(_abstract(template)))
        except (ValueError, KeyError, FileNotFoundError) as exc:
            raise UsageError(f"cannot restore checkpoint {step} in {self.directory}: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

    def restore_flat(self, step: int) -> dict[str, Any]:
        """Checkpoint ``step`` as ``{dotted path: array}`` with the saved shapes and dtypes (either
        layout; no template needed, e.g. to take the weights of another run)."""
        self.wait()
        try:
            raw = self._manager.restore(step, args=ocp.args.StandardRestore())
        except (ValueError, KeyError, FileNotFoundError) as exc:
            raise UsageError(f"cannot restore checkpoint {step} in {self.directory}: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        return dict(raw) if is_flat_layout(raw.keys()) else flatten_state(raw)

    def close(self) -> None:
        """Finish pending saves and release Orbax resources."""
        self._manager.wait_until_finished()
        self._manager.close()
