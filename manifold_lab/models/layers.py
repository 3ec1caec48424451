"""Building blocks shared by MobileNetV1 and MobileNetV2: the conv + BatchNorm + activation unit,
global pooling, dropout and the classifier, and the initialisers.

All tensors are NHWC; convolution kernels are HWIO ``nnx.Param`` named ``kernel``; BatchNorm is
``nnx.BatchNorm`` (``scale``/``bias`` Params, ``mean``/``var`` BatchStats). Parameters and
BatchNorm statistics are float32; activations run in the model's compute dtype. How a layer's
convolution and BatchNorm are computed is its :class:`~manifold_lab.models.backend.KernelBackend`'s
business, resolved once per network.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from manifold_lab.models.activations import activation
from manifold_lab.models.backend import DeferredBN, KernelBackend, backend_for
from manifold_lab.models.geometry import output_size, pad_amounts

__all__ = ["Classifier", "ConvBN", "activation", "check_call", "he_normal", "normal", "output_size",
           "pad_amounts"]

Array = jax.Array


def normal(key: Array, shape: tuple[int, ...], std: float) -> Array:
    """float32 normal(0, std) draw of ``shape``.

    Drawn as a flat vector whose length is rounded up to a power of two, then cut and reshaped:
    eager construction then compiles the random-number kernel for a handful of lengths instead
    of once per parameter shape."""
    n = math.prod(shape)
    length = 1 << max(n - 1, 0).bit_length()
    return jax.random.normal(key, (length,), jnp.float32)[:n].reshape(shape) * std


def he_normal(key: Array, shape: tuple[int, ...], fan: int) -> Array:
    """He (Kaiming) normal: std sqrt(2 / fan)."""
    return normal(key, shape, math.sqrt(2.0 / fan))


class ConvBN(nnx.Module):
    """A dense (ungrouped) convolution without bias, BatchNorm, then an activation, computed by
    ``backend`` (default: ``backend_for("auto")``)."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 1, stride: int = 1,
                 padding: str = "same", act: str = "relu6", bn_epsilon: float = 1e-3,
                 bn_decay: float = 0.997, dtype: jnp.dtype = jnp.float32, backend: KernelBackend | None = None,
                 rngs: nnx.Rngs) -> None:
        self.kernel_size = kernel_size
        self.backend = backend if backend is not None else backend_for("auto")
        self.stride = stride
        self.padding = padding
        self.act = act
        self.dtype = jnp.dtype(dtype)
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        # torchvision's kaiming-normal fan-out initialisation
        self.kernel = nnx.Param(he_normal(rngs.params(), shape, fan=kernel_size * kernel_size * out_channels))
        self.bn = nnx.BatchNorm(out_channels, momentum=bn_decay, epsilon=bn_epsilon,
                                dtype=self.dtype, rngs=rngs)

    def conv(self, x: Array) -> Array:
        """The convolution alone (no BatchNorm, no activation)."""
        return self.backend.conv(x, self.kernel[...].astype(self.dtype), stride=self.stride, padding=self.padding)

    def preactivation(self, x: Array, train: bool) -> Array:
        """``bn(conv(x))``: the layer without its activation."""
        return self.backend.bn_act(self.bn, self.conv(x), train, "linear")

    def __call__(self, x: Array, train: bool, *, foldable: bool = False) -> Array | DeferredBN:
        """``act(bn(conv(x)))``. ``foldable``: only a depthwise layer reads the result, so the backend
        may leave BatchNorm and the activation to that layer's kernel (see
        :meth:`~manifold_lab.models.backend.KernelBackend.bn_act`)."""
        return self.backend.bn_act(self.bn, self.conv(x), train, self.act, foldable=foldable)


class Classifier(nnx.Module):
    """Global average pool, dropout (``rate`` = drop probability), dense layer; float32 logits."""

    def __init__(self, in_features: int, num_classes: int, *, dropout_rate: float, rngs: nnx.Rngs) -> None:
        self.dropout_rate = dropout_rate
        self.dense = nnx.Linear(in_features, num_classes,
                                kernel_init=lambda key, shape, dtype: normal(key, shape, 0.01), rngs=rngs)

    def pool(self, x: Array) -> Array:
        """Global average over the spatial axes, in float32."""
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

    def __call__(self, pooled: Array, train: bool, dropout_key: Array | None) -> Array:
        """Logits of the pooled features; in training, dropout first (with ``dropout_key``)."""
        if train and self.dropout_rate > 0.0:
            keep = jax.random.bernoulli(dropout_key, 1.0 - self.dropout_rate, pooled.shape)
            pooled = jnp.where(keep, pooled / (1.0 - self.dropout_rate), 0.0)
        return self.dense(pooled)


def check_call(x: Array, in_channels: int, train: bool, dropout_rate: float,
               dropout_key: Array | None) -> None:
    """Reject inputs that are not NHWC with the configured channel count, and training calls that
    need dropout but have no key (before any work is done)."""
    if x.ndim != 4 or x.shape[-1] != in_channels:
        raise ValueError(f"expected NHWC input with {in_channels} channels, got shape {tuple(x.shape)}")
    if train and dropout_rate > 0.0 and dropout_key is None:
        raise ValueError("train=True with dropout needs a dropout_key")
