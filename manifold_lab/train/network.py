"""From a training config to the network it trains: its model config, an abstract model (shapes
only) and a pure initialisation function. The training loop, the run directories (restoring a
trained model) and the sweep's measurements all build networks through this module, so that a
saved config always rebuilds the network it trained."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from manifold_lab.cli import UsageError
from manifold_lab.models.backend import backend_for
from manifold_lab.models.factory import ModelConfig, build_model, model_config
from manifold_lab.train.config import TrainConfig
from manifold_lab.train.step import split_state


def model_config_for(cfg: TrainConfig, num_classes: int, in_channels: int) -> ModelConfig:
    """The model config of a resolved TrainConfig for data with these classes and channels; a
    kernel choice this machine cannot run (``depthwise_impl``, ``block_impl``) is a UsageError
    here, before any work."""
    try:
        mcfg = model_config(cfg.model, **cfg.network_fields(), num_classes=num_classes,
                            in_channels=in_channels)
        backend_for(cfg.depthwise_impl, block_impl=cfg.block_impl)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return mcfg


@functools.lru_cache(maxsize=16)
def abstract_model(mcfg: ModelConfig) -> tuple[nnx.GraphDef, dict[str, Any], dict[str, Any]]:
    """``(graphdef, params, batch_stats)`` of the model without allocating it (shapes only; the
    states as pure dicts, :func:`~manifold_lab.train.step.split_state`)."""
    return split_state(nnx.eval_shape(lambda: build_model(mcfg, rngs=nnx.Rngs(0))))


def model_init_fn(mcfg: ModelConfig) -> Callable[[jax.Array], tuple[dict[str, Any], dict[str, Any]]]:
    """Pure ``seed -> (params, batch_stats)``: the model initialised from ``nnx.Rngs(seed)``
    (jit it: one program instead of one small compile per initialiser), as pure dicts
    (:func:`~manifold_lab.train.step.split_state`)."""
    def init(seed: jax.Array) -> tuple[dict[str, Any], dict[str, Any]]:
        _, params, batch_stats = split_state(build_model(mcfg, rngs=nnx.Rngs(jax.random.key(seed))))
        return params, batch_stats
    return init
