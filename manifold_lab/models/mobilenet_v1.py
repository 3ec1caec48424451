"""MobileNetV1 (Howard et al. 2017), the baseline of the paper's Tables 3-4 and Fig. 5, in Flax NNX.

3x3 conv (stride ``config.stem_stride``) + BN + ReLU -> 13 depthwise-separable layers
(3x3 depthwise + BN + ReLU, then 1x1 conv + BN + ReLU; channels ``config.depth(c)``, strides
``config.layer_strides()``) -> global average pool -> dropout -> dense classifier. The activation
is the V1 paper's ReLU (TF-Slim and Keras use ReLU6). Convolutions have no bias.

Intermediates (``capture=True``), in forward order: ``stem``, ``layer{i:02d}/depthwise``,
``layer{i:02d}/pointwise`` (i = 0..12), ``pooled`` (float32 global average), ``logits``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from manifold_lab.models.backend import KernelBackend, backend_for
from manifold_lab.models.config import MobileNetV1Config
from manifold_lab.models.depthwise import DepthwiseBN
from manifold_lab.models.layers import Classifier, ConvBN, check_call

Array = jax.Array


class SeparableLayer(nnx.Module):
    """3x3 depthwise + BN + ReLU, then 1x1 pointwise + BN + ReLU, computed by the network's ``backend``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, config: MobileNetV1Config,
                 *, backend: KernelBackend, rngs: nnx.Rngs) -> None:
        common = dict(bn_epsilon=config.bn_epsilon, bn_decay=config.bn_decay,
                      dtype=jnp.dtype(config.compute_dtype), act="relu", backend=backend, rngs=rngs)
        self.depthwise = DepthwiseBN(in_channels, stride=stride, padding=config.padding, **common)
        self.pointwise = ConvBN(in_channels, out_channels, **common)

    def __call__(self, x: Array, train: bool) -> tuple[Array, Array]:
        d = self.depthwise(x, train)
        return d, self.pointwise(d, train)


class MobileNetV1(nnx.Module):
    """MobileNetV1 per :class:`MobileNetV1Config` (see the module docstring)."""

    def __init__(self, config: MobileNetV1Config, *, rngs: nnx.Rngs) -> None:
        self.config = config
        self.backend = backend_for(config.depthwise_impl)
        self.stem = ConvBN(config.in_channels, config.stem_out, kernel_size=3, stride=config.stem_stride,
                           padding=config.padding, act="relu", bn_epsilon=config.bn_epsilon,
                           bn_decay=config.bn_decay, dtype=jnp.dtype(config.compute_dtype),
                           backend=self.backend, rngs=rngs)
        layers = []
        in_ch = config.stem_out
        for spec, stride in zip(config.layers, config.layer_strides()):
            out_ch = config.depth(spec.channels)
            layers.append(SeparableLayer(in_ch, out_ch, stride, config, backend=self.backend, rngs=rngs))
            in_ch = out_ch
        self.layers = nnx.List(layers)
        self.classifier = Classifier(in_ch, config.num_classes, dropout_rate=config.dropout_rate, rngs=rngs)

    def __call__(self, x: Array, train: bool = False, dropout_key: Array | None = None,
                 capture: bool = False) -> Array | tuple[Array, dict[str, Array]]:
        """Float32 logits of NHWC images ``x`` (and the intermediates with ``capture=True``);
        same train/eval semantics as :class:`manifold_lab.models.MobileNetV2`."""
        check_call(x, self.config.in_channels, train, self.config.dropout_rate, dropout_key)
        acts: dict[str, Array] | None = {} if capture else None
        h = self.stem(x.astype(jnp.dtype(self.config.compute_dtype)), train)
        if acts is not None:
            acts["stem"] = h
        for i, layer in enumerate(self.layers):
            d, h = layer(h, train)
            if acts is not None:
                acts[f"layer{i:02d}/depthwise"] = d
                acts[f"layer{i:02d}/pointwise"] = h
        pooled = self.classifier.pool(h)
        logits = self.classifier(pooled, train, dropout_key).astype(jnp.float32)
        if acts is None:
            return logits
        acts["pooled"] = pooled
        acts["logits"] = logits
        return logits, acts
