"""Orbax checkpoints of the train state.

The state pytree is saved as a flat dict keyed by dotted paths (``params.blocks.0.bn.bias``),
so checkpoints are self-describing and a mismatch with the current model is reported by name.
Orbax writes each step into a temporary directory and renames it when complete, so a killed run
never leaves a half-written checkpoint behind (leftover temporaries are removed on the next open).
Only finite states are ever saved (the loop checks), so the latest checkpoint is the last good one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from manifold_lab.cli import UsageError
from manifold_lab.train.run_dir import CHECKPOINT_DIR


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


class Checkpointer:
    """Saves and restores train states under ``run_dir/checkpoints/<step>``; keeps the newest
    ``max_to_keep``."""

    def __init__(self, run_dir: str | os.PathLike[str], max_to_keep: int = 2) -> None:
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self.directory = os.path.join(os.fspath(run_dir), CHECKPOINT_DIR)
        self._manager = ocp.CheckpointManager(os.path.abspath(self.directory), options=options)

    def steps(self) -> list[int]:
        """Saved steps, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        """Save ``state`` as ``step`` (blocking; overwrites nothing: an existing step is kept)."""
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.StandardSave(flatten_state(state)), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, template: Any) -> Any:
        """Restore ``step`` into the structure, dtypes and shardings of ``template`` (a state with
        arrays or ``jax.ShapeDtypeStruct`` leaves; leaves without a sharding go to the first device)."""
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

        def abstract(x: Any) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or default)
        target = {k: abstract(v) for k, v in flatten_state(template).items()}
        try:
            flat = self._manager.restore(step, args=ocp.args.StandardRestore(target))
        except (ValueError, KeyError, FileNotFoundError) as exc:
            raise UsageError(f"cannot restore checkpoint {step} in {self.directory}: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        return unflatten_state(dict(flat), template)

    def close(self) -> None:
        """Release Orbax resources."""
        self._manager.close()
