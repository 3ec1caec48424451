"""Reading finished runs back: the trained model of a run directory."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from manifold_lab.cli import UsageError
from manifold_lab.train import records
from manifold_lab.train.checkpoint import Checkpointer
from manifold_lab.train.config import TrainConfig
from manifold_lab.train.loop import abstract_model, model_config_for, model_init_fn
from manifold_lab.train.optim import make_optimizer
from manifold_lab.train.step import init_state


def restore_model(run_dir: str | os.PathLike[str], *, use_ema: bool | None = None,
                  require_complete: bool = True, step: int | None = None) -> nnx.Module:
    """The model of ``run_dir`` with its newest checkpoint's weights and BatchNorm statistics, ready
    for ``model(x, train=False)``. ``use_ema``: the EMA of the weights and statistics instead of
    the raw ones (default: whenever the run kept one, as its evaluations did). ``require_complete``:
    refuse unfinished runs (UsageError); without it the newest checkpoint of an unfinished run is
    used. ``step``: a specific kept checkpoint instead of the newest."""
    run_dir = Path(run_dir)
    if require_complete and not records.is_complete(run_dir):
        raise UsageError(f"{run_dir} is not a complete run")
    config, _ = records.load_run(run_dir)
    cfg = TrainConfig.from_dict(config).resolved()
    resolved = config.get("resolved") or {}
    try:
        num_classes, shape = int(resolved["num_classes"]), resolved["image_shape"]
        spe, total = int(resolved["steps_per_epoch"]), int(resolved["total_steps"])
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"corrupt run config {run_dir / records.CONFIG_FILE}: incomplete 'resolved'") from None
    mcfg = model_config_for(cfg, num_classes, int(shape[-1]))
    graphdef = abstract_model(mcfg)[0]
    tx, _ = make_optimizer(cfg, spe, total)
    template = jax.eval_shape(lambda: init_state(*model_init_fn(mcfg)(jnp.uint32(0)), tx,
                                                 cfg.ema_decay is not None))
    checkpointer = Checkpointer(run_dir)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None or step not in checkpointer.steps():
            raise UsageError(f"no checkpoint {'' if step is None else step} in {checkpointer.directory}")
        state = checkpointer.restore(step, template)
    finally:
        checkpointer.close()
    if use_ema and state["ema"] is None:
        raise UsageError(f"{run_dir} kept no weight EMA")
    use_ema = state["ema"] is not None if use_ema is None else use_ema
    averaged = state["ema"] if use_ema else state
    return nnx.merge(graphdef, averaged["params"], averaged["batch_stats"])
