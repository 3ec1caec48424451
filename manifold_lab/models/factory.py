"""Model construction by name, and the bookkeeping the training code needs: parameter counts and
the weight-decay mask."""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx

from manifold_lab.models.config import MobileNetV1Config, MobileNetV2Config
from manifold_lab.models.mobilenet_v1 import MobileNetV1
from manifold_lab.models.mobilenet_v2 import MobileNetV2

ModelConfig = MobileNetV1Config | MobileNetV2Config

#: Model names accepted by :func:`model_config`.
MODELS: dict[str, type] = {"mobilenet_v2": MobileNetV2Config, "mobilenet_v1": MobileNetV1Config}


def model_config(name: str, **fields: Any) -> ModelConfig:
    """The config dataclass of model ``name`` (``mobilenet_v2`` or ``mobilenet_v1``) with ``fields``
    overriding its defaults. Unknown names, fields or choices raise ``ValueError``."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None
    try:
        return cls(**fields)
    except TypeError as exc:
        raise ValueError(f"{name}: {exc}") from None


def build_model(config: ModelConfig, *, rngs: nnx.Rngs) -> MobileNetV1 | MobileNetV2:
    """Instantiate the network described by ``config`` (the class is chosen by the config type)."""
    if isinstance(config, MobileNetV2Config):
        return MobileNetV2(config, rngs=rngs)
    if isinstance(config, MobileNetV1Config):
        return MobileNetV1(config, rngs=rngs)
    raise TypeError(f"not a model config: {type(config).__name__}")


def count_params(model: nnx.Module) -> dict[str, int]:
    """Trainable parameters (``nnx.Param``) and BatchNorm running statistics (mean + var).

    Works on abstract models from ``nnx.eval_shape`` too, so counting costs no memory."""
    def total(kind: type) -> int:
        return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, kind)))
    return {"params": total(nnx.Param), "bn_statistics": total(nnx.BatchStat)}


def _path_names(path: tuple) -> list[str]:
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
    return names


def weight_decay_mask(state: Any) -> Any:
    """Same-structure pytree of bools: True for convolution and dense kernels, False for depthwise
    kernels (as in the authors' code), BatchNorm scales/biases/statistics and biases.

    ``state`` is any pytree whose paths carry the attribute names: an ``nnx.State`` (e.g. the
    ``nnx.Param`` part of ``nnx.split``) or its pure-dict form."""
    def decays(path: tuple, _leaf: Any) -> bool:
        names = _path_names(path)
        return "kernel" in names and "depthwise" not in names
    return jax.tree_util.tree_map_with_path(decays, state)
