"""Restoring a run directory's trained network: its saved config rebuilt into the model, and a
checkpoint's weights and BatchNorm statistics loaded into it (:meth:`RunDir.restore_model`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from manifold_lab.cli import UsageError
from manifold_lab.train.checkpoint import Checkpointer
from manifold_lab.train.network import abstract_model, model_config_for, model_init_fn
from manifold_lab.train.optim import make_optimizer
from manifold_lab.train.run_dir import RunDir
from manifold_lab.train.step import init_state


def restore_model(run: RunDir, *, use_ema: bool | None = None, step: int | None = None) -> nnx.Module:
    """The model of ``run`` with checkpoint ``step``'s (default: the newest) weights and statistics;
    ``use_ema`` as in :meth:`RunDir.restore_model`."""
    cfg = run.train_config().resolved()
    resolved = run.resolved()
    try:
        num_classes, shape = int(resolved["num_classes"]), resolved["image_shape"]
        spe, total = int(resolved["steps_per_epoch"]), int(resolved["total_steps"])
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"corrupt run config {run.config_path}: incomplete 'resolved'") from None
    mcfg = model_config_for(cfg, num_classes, int(shape[-1]))
    graphdef = abstract_model(mcfg)[0]
    tx, _ = make_optimizer(cfg, spe, total)
    template = jax.eval_shape(lambda: init_state(*model_init_fn(mcfg)(jnp.uint32(0)), tx,
                                                 cfg.ema_decay is not None))
    checkpointer = Checkpointer(run.path)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None or step not in checkpointer.steps():
            raise UsageError(f"no checkpoint {'' if step is None else step} in {checkpointer.directory}")
        state = checkpointer.restore(step, template)
    finally:
        checkpointer.close()
    if use_ema and state["ema"] is None:
        raise UsageError(f"{run.path} kept no weight EMA")
    use_ema = state["ema"] is not None if use_ema is None else use_ema
    averaged = state["ema"] if use_ema else state
    return nnx.merge(graphdef, averaged["params"], averaged["batch_stats"])
