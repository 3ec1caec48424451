"""Flax NNX MobileNetV2 (with the paper's ablation switches) and MobileNetV1.

Contract (see ``design.md``)::

    cfg = model_config("mobilenet_v2", width=0.5, layout="small", num_classes=10, in_channels=1)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    logits = model(x, train=False)                   # x NHWC; float32 logits [N, classes]
    logits = model(x, train=True, dropout_key=key)   # batch statistics + running averages, dropout
    logits, acts = model(x, capture=True)            # ordered dict of named intermediates

The configs (:mod:`manifold_lab.models.config`) and the padding geometry
(:mod:`manifold_lab.models.geometry`) are pure Python; every name that needs JAX is imported on
first access (PEP 562), so that importing a submodule such as ``manifold_lab.models.config``
(which runs this file first) does not import JAX, Flax or the native kernels.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from manifold_lab.models.config import (
    BlockSpec,
    MobileNetV1Config,
    MobileNetV2Config,
    make_divisible,
)
from manifold_lab.models.geometry import output_size, pad_amounts

if TYPE_CHECKING:
    from manifold_lab.models.backend import KernelBackend, backend_for
    from manifold_lab.models.depthwise import depthwise_conv, resolve_impl
    from manifold_lab.models.factory import MODELS, build_model, count_params, model_config, weight_decay_mask
    from manifold_lab.models.mobilenet_v1 import MobileNetV1
    from manifold_lab.models.mobilenet_v2 import InvertedResidual, MobileNetV2

#: The names imported on first access, by the submodule that defines them.
_LAZY: dict[str, str] = {
    "KernelBackend": "backend",
    "backend_for": "backend",
    "depthwise_conv": "depthwise",
    "resolve_impl": "depthwise",
    "MODELS": "factory",
    "build_model": "factory",
    "count_params": "factory",
    "model_config": "factory",
    "weight_decay_mask": "factory",
    "MobileNetV1": "mobilenet_v1",
    "InvertedResidual": "mobilenet_v2",
    "MobileNetV2": "mobilenet_v2",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "MODELS",
    "BlockSpec",
    "InvertedResidual",
    "KernelBackend",
    "MobileNetV1",
    "MobileNetV1Config",
    "MobileNetV2",
    "MobileNetV2Config",
    "backend_for",
    "build_model",
    "count_params",
    "depthwise_conv",
    "make_divisible",
    "model_config",
    "output_size",
    "pad_amounts",
    "resolve_impl",
    "weight_decay_mask",
]
