"""Flax NNX MobileNetV2 (with the paper's ablation switches) and MobileNetV1.

Contract (see ``design.md``)::

    cfg = model_config("mobilenet_v2", width=0.5, preset="small", num_classes=10, in_channels=1)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    logits = model(x, train=False)                   # x NHWC; float32 logits [N, classes]
    logits = model(x, train=True, dropout_key=key)   # batch statistics + running averages, dropout
    logits, acts = model(x, capture=True)            # ordered dict of named intermediates
"""

from manifold_lab.models.config import (
    BlockSpec,
    MobileNetV1Config,
    MobileNetV2Config,
    make_divisible,
)
from manifold_lab.models.depthwise import depthwise_conv, resolve_impl
from manifold_lab.models.factory import MODELS, build_model, count_params, model_config, weight_decay_mask
from manifold_lab.models.layers import output_size, pad_amounts
from manifold_lab.models.mobilenet_v1 import MobileNetV1
from manifold_lab.models.mobilenet_v2 import InvertedResidual, MobileNetV2

__all__ = [
    "MODELS",
    "BlockSpec",
    "InvertedResidual",
    "MobileNetV1",
    "MobileNetV1Config",
    "MobileNetV2",
    "MobileNetV2Config",
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
