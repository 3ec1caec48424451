"""Analytic cost model: per-layer shapes, parameters and multiply-adds from a decoded config.

Counting follows the paper (and the authors' ``mobilenet_v2.py`` comments): multiply-adds are
those of the convolutions and the classifier; BatchNorm, activations, pooling and bias additions
are not counted. A k x k convolution on an ``H x W`` output counts ``H * W * k * k * C_in * C_out /
groups`` multiply-adds whatever the padding (the padded taps are counted too). Parameters are
trainable weights: convolution kernels (no bias: every convolution is followed by BatchNorm),
BatchNorm scale and offset, classifier kernel and bias. BatchNorm statistics (running mean and
variance) are counted separately.

Spatial sizes are ``ceil(size / stride)``: TF 'SAME' geometry, and also what the symmetric
(torchvision) padding of a 3x3 kernel gives, so the counts do not depend on the padding mode.
``madds_unpadded`` leaves out the taps that fall on zero padding: that is what XLA's cost
analysis counts for a convolution (2 flops per multiply-add over the real input taps only), and
it does depend on the padding mode.
"""

from __future__ import annotations

import dataclasses
import math

from manifold_lab.models.config import MobileNetV1Config, MobileNetV2Config
from manifold_lab.models.geometry import pad_amounts

Shape = tuple[int, int, int]  # (height, width, channels)


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One counted layer: a convolution (+ its BatchNorm) or the classifier."""

    name: str
    kind: str  # "conv", "depthwise" or "dense"
    kernel: int  # spatial kernel size (1 for 1x1 convolutions and the classifier)
    stride: int
    input_shape: Shape
    output_shape: Shape
    weights: int  # kernel (+ bias for the classifier)
    bn_params: int  # BatchNorm scale + offset (0 for the classifier)
    bn_statistics: int  # running mean + variance (0 for the classifier)
    madds: int
    madds_unpadded: int  # taps on zero padding left out (XLA's count)

    @property
    def params(self) -> int:
        """Trainable parameters of the layer: weights and BatchNorm scale/offset."""
        return self.weights + self.bn_params

    def as_dict(self) -> dict:
        row = dataclasses.asdict(self)
        row["input_shape"] = list(self.input_shape)
        row["output_shape"] = list(self.output_shape)
        row["params"] = self.params
        return row


@dataclasses.dataclass(frozen=True)
class ModelCosts:
    """Per-layer rows and totals for one network at one input resolution."""

    model: str
    width: float
    resolution: int
    num_classes: int
    layout: str
    layers: tuple[LayerCost, ...]

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def params_without_bn(self) -> int:
        """Parameters as the authors' checkpoint table counts them (no BatchNorm)."""
        return sum(layer.weights for layer in self.layers)

    @property
    def bn_statistics(self) -> int:
        return sum(layer.bn_statistics for layer in self.layers)

    @property
    def madds(self) -> int:
        return sum(layer.madds for layer in self.layers)

    @property
    def conv_madds(self) -> int:
        return sum(layer.madds for layer in self.layers if layer.kind != "dense")

    @property
    def classifier_madds(self) -> int:
        return sum(layer.madds for layer in self.layers if layer.kind == "dense")

    @property
    def madds_unpadded(self) -> int:
        return sum(layer.madds_unpadded for layer in self.layers)

    def as_dict(self) -> dict:
        """JSON-ready summary with totals and the per-layer rows."""
        return {
            "model": self.model,
            "width": self.width,
            "resolution": self.resolution,
            "num_classes": self.num_classes,
            "layout": self.layout,
            "params": self.params,
            "params_without_bn": self.params_without_bn,
            "bn_statistics": self.bn_statistics,
            "madds": self.madds,
            "conv_madds": self.conv_madds,
            "classifier_madds": self.classifier_madds,
            "madds_unpadded": self.madds_unpadded,
            "layers": [layer.as_dict() for layer in self.layers],
        }


def conv_output_size(size: int, stride: int) -> int:
    """Spatial output size of a 'SAME'-padded (or symmetric 3x3) convolution."""
    return math.ceil(size / stride)


def input_taps(size: int, kernel: int, stride: int, padding: str) -> int:
    """Number of (output position, kernel offset) pairs of one spatial axis that read a real
    input pixel rather than padding."""
    low, _ = pad_amounts(size, kernel, stride, padding)
    return sum(1 for o in range(conv_output_size(size, stride)) for k in range(kernel)
               if 0 <= o * stride + k - low < size)


def conv_layer(name: str, shape: Shape, out_channels: int, kernel: int, stride: int,
               padding: str) -> LayerCost:
    """A dense k x k convolution without bias, followed by BatchNorm."""
    h, w, c = shape
    oh, ow = conv_output_size(h, stride), conv_output_size(w, stride)
    weights = kernel * kernel * c * out_channels
    unpadded = input_taps(h, kernel, stride, padding) * input_taps(w, kernel, stride, padding)
    return LayerCost(name, "conv", kernel, stride, shape, (oh, ow, out_channels), weights,
                     2 * out_channels, 2 * out_channels, oh * ow * weights,
                     unpadded * c * out_channels)


def depthwise_layer(name: str, shape: Shape, kernel: int, stride: int, padding: str) -> LayerCost:
    """A k x k depthwise convolution (one filter per channel) without bias, followed by BatchNorm."""
    h, w, c = shape
    oh, ow = conv_output_size(h, stride), conv_output_size(w, stride)
    weights = kernel * kernel * c
    unpadded = input_taps(h, kernel, stride, padding) * input_taps(w, kernel, stride, padding)
    return LayerCost(name, "depthwise", kernel, stride, shape, (oh, ow, c), weights,
                     2 * c, 2 * c, oh * ow * weights, unpadded * c)


def dense_layer(name: str, features: int, num_classes: int) -> LayerCost:
    """The classifier on the pooled features: kernel and bias; the bias add is not a multiply-add."""
    return LayerCost(name, "dense", 1, 1, (1, 1, features), (1, 1, num_classes),
                     features * num_classes + num_classes, 0, 0, features * num_classes,
                     features * num_classes)


def mobilenet_v2_layers(config: MobileNetV2Config, resolution: int) -> tuple[LayerCost, ...]:
    """Counted layers of MobileNetV2: stem, every bottleneck's convolutions, head conv, classifier.

    The ``residual`` placements (all of ``RESIDUAL_PLACEMENTS``: each only moves identity adds) and
    the ``bottleneck_activation`` switch add no counted layer and no parameter: shortcuts are
    additions and activations are not multiply-adds, so all variants count the same.
    """
    pad = config.padding
    layers = [conv_layer("stem", (resolution, resolution, config.in_channels), config.stem_out,
                         3, config.stem_stride, pad)]
    shape = layers[-1].output_shape
    for spec in config.blocks():
        prefix = f"block{spec.index:02d}"
        if spec.has_expansion:
            layers.append(conv_layer(f"{prefix}/expansion", shape, spec.expanded_channels, 1, 1, pad))
            shape = layers[-1].output_shape
        layers.append(depthwise_layer(f"{prefix}/depthwise", shape, 3, spec.stride, pad))
        layers.append(conv_layer(f"{prefix}/projection", layers[-1].output_shape,
                                 spec.out_channels, 1, 1, pad))
        shape = layers[-1].output_shape
    layers.append(conv_layer("head", shape, config.head_channels, 1, 1, pad))
    layers.append(dense_layer("classifier", config.head_channels, config.num_classes))
    return tuple(layers)


def mobilenet_v1_layers(config: MobileNetV1Config, resolution: int) -> tuple[LayerCost, ...]:
    """Counted layers of MobileNetV1: stem, 13 depthwise-separable layers, classifier."""
    pad = config.padding
    layers = [conv_layer("stem", (resolution, resolution, config.in_channels), config.stem_out,
                         3, config.stem_stride, pad)]
    for i, (layer, stride) in enumerate(zip(config.layers, config.layer_strides()), start=1):
        layers.append(depthwise_layer(f"layer{i:02d}/depthwise", layers[-1].output_shape, 3,
                                      stride, pad))
        layers.append(conv_layer(f"layer{i:02d}/pointwise", layers[-1].output_shape,
                                 config.depth(layer.channels), 1, 1, pad))
    features = layers[-1].output_shape[2]
    layers.append(dense_layer("classifier", features, config.num_classes))
    return tuple(layers)


def model_costs(config: MobileNetV2Config | MobileNetV1Config, resolution: int) -> ModelCosts:
    """Per-layer costs and totals of ``config`` at a square ``resolution`` x ``resolution`` input."""
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if isinstance(config, MobileNetV2Config):
        name, layers = "mobilenet_v2", mobilenet_v2_layers(config, resolution)
    elif isinstance(config, MobileNetV1Config):
        name, layers = "mobilenet_v1", mobilenet_v1_layers(config, resolution)
    else:
        raise TypeError(f"unsupported config type {type(config).__name__}")
    return ModelCosts(name, config.width, resolution, config.num_classes, config.layout, layers)
