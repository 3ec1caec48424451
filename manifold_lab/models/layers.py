"""Building blocks shared by MobileNetV1 and MobileNetV2: activations by name, TF/torch padding
geometry, the conv + BatchNorm + activation unit, global pooling, dropout and the classifier.

All tensors are NHWC; convolution kernels are HWIO ``nnx.Param`` named ``kernel``; BatchNorm is
``nnx.BatchNorm`` (``scale``/``bias`` Params, ``mean``/``var`` BatchStats). Parameters and
BatchNorm statistics are float32; activations run in the model's compute dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from manifold_lab import native

Array = jax.Array

#: Activation functions by config name. ``linear`` is the identity (the paper's linear bottleneck).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "linear": lambda x: x,
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation function called ``name`` (``linear``, ``relu`` or ``relu6``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}") from None


def pad_amounts(size: int, kernel: int, stride: int, padding: str) -> tuple[int, int]:
    """(low, high) padding of one spatial axis.

    ``same``: TensorFlow 'SAME' geometry (output ``ceil(size / stride)``, the odd pixel of padding
    at the end, e.g. (0, 1) for a 3x3 stride-2 conv on an even size). ``symmetric``: torchvision
    geometry, ``kernel // 2`` on both sides.
    """
    if padding == "same":
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2
    if padding == "symmetric":
        return kernel // 2, kernel // 2
    raise ValueError(f"padding must be 'same' or 'symmetric', got {padding!r}")


def output_size(size: int, kernel: int, stride: int, padding: str) -> int:
    """Spatial output size of a conv with this geometry."""
    lo, hi = pad_amounts(size, kernel, stride, padding)
    return (size + lo + hi - kernel) // stride + 1


def normal(key: Array, shape: tuple[int, ...], std: float) -> Array:
    """float32 normal(0, std) draw of ``shape``.

    Drawn as a flat vector whose length is rounded up to a power of two, then cut and reshaped:
    eager construction then compiles the random-number kernel for a handful of lengths instead
    of once per parameter shape (which made building a model take tens of seconds on CPU)."""
    n = math.prod(shape)
    length = 1 << max(n - 1, 0).bit_length()
    return jax.random.normal(key, (length,), jnp.float32)[:n].reshape(shape) * std


def he_normal(key: Array, shape: tuple[int, ...], fan: int) -> Array:
    """He (Kaiming) normal: std sqrt(2 / fan)."""
    return normal(key, shape, math.sqrt(2.0 / fan))


def uses_native(impl: str, x: Array, library: str) -> bool:
    """Whether a layer of a network whose depthwise form is ``impl`` runs ``x`` through the native
    kernels of ``library`` (:mod:`manifold_lab.native`): forms ``native`` and ``auto`` (see
    :func:`manifold_lab.models.depthwise.resolve_impl`), float32, the CPU backend, and the library
    built. ``xla`` and ``shift`` keep the whole network in pure JAX. Decided when traced."""
    return (impl in ("auto", "native") and x.dtype == jnp.float32 and jax.default_backend() == "cpu"
            and native.load(library) is not None)


#: (lo, hi) of the open interval where each activation passes gradient (None: everywhere)
GRADIENT_INTERVALS: dict[str, tuple[float, float] | None] = {
    "linear": None, "relu": (0.0, float("inf")), "relu6": (0.0, 6.0)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bn_act_train(x: Array, scale: Array, bias: Array, epsilon: float, act: str, use_native: bool
                  ) -> tuple[Array, Array, Array]:
    """Training-mode BatchNorm over all axes but the last, then ``act``: ``(y, mean, var)``.

    The statistics are Flax's (float32, one pass: ``var = max(0, E[x^2] - E[x]^2)``). The
    hand-written VJP needs only ``x`` and the per-channel statistics: one pass for the two
    channel sums of the backward pass and one for the input gradient, where autodiff of the
    composite materialises several full-size intermediates (slower on CPU). ``use_native``: the
    channel sums of both passes by the native kernels (one read of the inputs for both sums,
    where XLA:CPU reduces each sum separately and first writes the masked gradient out)."""
    return _bn_act_fwd(x, scale, bias, epsilon, act, use_native)[0]


def bn_stats(x: Array, use_native: bool) -> tuple[Array, Array]:
    """Training-mode BatchNorm's float32 (mean, var) of ``x`` over all axes but the last."""
    if use_native:
        c = x.shape[-1]
        moments = jax.ffi.ffi_call("manifold_bn_moments", (jax.ShapeDtypeStruct((c,), jnp.float32),) * 2,
                                   vmap_method="sequential")
        return tuple(moments(x))
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axes)
    var = jnp.maximum(0.0, jnp.mean(xf * xf, axes) - mean * mean)
    return mean, var


def _bn_grad_sums(x: Array, g: Array, gz: Array, a: Array, b: Array, act: str, use_native: bool
                  ) -> tuple[Array, Array]:
    """(sum gz, sum gz * x) over all axes but the last, gz = g where ``act`` passes gradient at
    the pre-activation ``x * a + b``, else 0. Natively from ``g`` in one read (the mask applied on
    the fly); in pure JAX from ``gz`` itself."""
    interval = GRADIENT_INTERVALS[act]
    if use_native:
        c = x.shape[-1]
        lo, hi = interval if interval is not None else (0.0, 0.0)
        sums = jax.ffi.ffi_call("manifold_bn_grad_sums", (jax.ShapeDtypeStruct((c,), jnp.float32),) * 2,
                                vmap_method="sequential")
        return tuple(sums(x, g, a, b, masked=np.int64(interval is not None), lo=np.float32(lo),
                          hi=np.float32(hi)))
    axes = tuple(range(x.ndim - 1))
    return jnp.sum(gz, axes), jnp.sum(gz * x, axes)


def _masked(g: Array, z: Array, interval: tuple[float, float] | None) -> Array:
    """g where z lies in the open ``interval`` (JAX's convention at the kinks: 0), else 0."""
    if interval is None:
        return g
    lo, hi = interval
    inside = z > lo if hi == float("inf") else (z > lo) & (z < hi)
    return jnp.where(inside, g, 0.0)


def _bn_act_fwd(x, scale, bias, epsilon, act, use_native):
    mean, var = bn_stats(x, use_native)
    mul = jax.lax.rsqrt(var + epsilon) * scale
    y = activation(act)((x.astype(jnp.float32) - mean) * mul + bias).astype(x.dtype)
    return (y, mean, var), (x, scale, bias, mean, var)


def _bn_act_bwd(epsilon, act, use_native, residuals, cotangents):
    # Every full-size term is written in x (the convolution output, kept for the backward pass)
    # and per-channel vectors, never in xhat = (x - mean) * rstd: XLA:CPU materialised xhat as
    # a full-size tensor to feed the channel reduction, one extra write and read per BatchNorm.
    x, scale, bias, mean, var = residuals
    g = cotangents[0].astype(jnp.float32)  # the statistics only feed the running averages
    rstd = jax.lax.rsqrt(var + epsilon)
    xf = x.astype(jnp.float32)
    a = scale * rstd  # y_pre = a * x + (bias - a * mean)
    shift = bias - a * mean
    gz = _masked(g, xf * a + shift, GRADIENT_INTERVALS[act])
    grad_bias, sum_gx = _bn_grad_sums(xf, g, gz, a, shift, act, use_native)
    grad_x, grad_scale = bn_input_grad(xf, gz, a, rstd, mean, grad_bias, sum_gx)
    return grad_x.astype(x.dtype), grad_scale.astype(scale.dtype), grad_bias.astype(bias.dtype)


def bn_input_grad(x: Array, gz: Array, a: Array, rstd: Array, mean: Array, sum_gz: Array,
                  sum_gx: Array) -> tuple[Array, Array]:
    """(grad x, grad scale) of training-mode BatchNorm, from its float32 input ``x``, the gradient
    ``gz`` of its output (through the activation's mask), ``a = scale * rstd``, the batch
    ``mean`` and the channel sums of ``gz`` (also grad bias) and ``gz * x``. One full-size pass."""
    count = x.size // x.shape[-1]
    grad_scale = rstd * (sum_gx - mean * sum_gz)  # = sum(gz * xhat)
    c = a * rstd * grad_scale / count
    return a * gz - c * x + (c * mean - a * sum_gz / count), grad_scale


def update_running_stats(bn: nnx.BatchNorm, mean: Array, var: Array) -> None:
    """``bn``'s running averages, moved towards a batch's statistics by its momentum."""
    m = bn.momentum
    bn.mean[...] = jax.lax.stop_gradient(m * bn.mean[...] + (1 - m) * mean)
    bn.var[...] = jax.lax.stop_gradient(m * bn.var[...] + (1 - m) * var)


_bn_act_train.defvjp(_bn_act_fwd, _bn_act_bwd)


def batch_norm_act(bn: nnx.BatchNorm, x: Array, train: bool, act: str, impl: str = "xla") -> Array:
    """``act(bn(x))`` for an ``nnx.BatchNorm`` over the last axis. Inference: the module itself.
    Training: the same batch statistics, running-average update and result as the module (up to
    float32 rounding), through :func:`_bn_act_train`'s hand-written gradient, with the native
    reductions where :func:`uses_native` for the network's depthwise form ``impl``."""
    if not train:
        return activation(act)(bn(x, use_running_average=True))
    y, mean, var = _bn_act_train(x, bn.scale[...], bn.bias[...], bn.epsilon, act,
                                 uses_native(impl, x, "batchnorm"))
    update_running_stats(bn, mean, var)
    return y


#: im2col (one matmul over stacked windows) for convolutions whose k * k * C_in is at most this
IM2COL_MAX_DEPTH = 64


def im2col(x: Array, k: int, stride: int, pads: list[tuple[int, int]]) -> Array:
    """The k * k strided windows of padded NHWC ``x`` stacked on the channel axis, in HWI order
    (tap-major, as an HWIO kernel reshaped to ``(k * k * C_in, C_out)``): ``[N, OH, OW, k*k*C]``."""
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out_h, out_w = (xp.shape[1] - k) // stride + 1, (xp.shape[2] - k) // stride + 1
    windows = [jax.lax.slice(xp, (0, i, j, 0),
                             (xp.shape[0], i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1,
                              xp.shape[3]), (1, stride, stride, 1))
               for i in range(k) for j in range(k)]
    return jnp.concatenate(windows, axis=-1)


def _im2col_conv(x: Array, kernel: Array, stride: int, pads) -> Array:
    """A k x k convolution as one matmul over the stacked windows of :func:`im2col`."""
    k, c_in = kernel.shape[0], kernel.shape[2]
    columns = im2col(x, k, stride, list(pads))
    out = jnp.dot(columns.reshape(-1, k * k * c_in), kernel.reshape(k * k * c_in, -1))
    return out.reshape(*columns.shape[:-1], kernel.shape[-1])


def native_conv_attrs(stride: int, pads: tuple[tuple[int, int], ...]) -> dict[str, np.int64]:
    """The stride and leading pads as the native convolution kernels take them."""
    return dict(stride=np.int64(stride), pad_top=np.int64(pads[0][0]), pad_left=np.int64(pads[1][0]))


def native_conv_output(x: Array, k: int, stride: int, pads: tuple[tuple[int, int], ...],
                       channels: int) -> jax.ShapeDtypeStruct:
    """The NHWC output of a k x k convolution of ``x`` with this stride and ``(lo, hi)`` pads."""
    n, h, w, _ = x.shape
    out_h, out_w = ((size + lo + hi - k) // stride + 1 for size, (lo, hi) in zip((h, w), pads))
    return jax.ShapeDtypeStruct((n, out_h, out_w, channels), x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _native_conv(x: Array, kernel: Array, stride: int, pads: tuple[tuple[int, int], ...]) -> Array:
    """The convolution by the native kernel, which reads the image in place (no im2col copy); the
    kernel's gradient by another native kernel, the input's through :func:`_im2col_conv` (which
    XLA drops when nothing uses it, as for the image fed to the stem)."""
    call = jax.ffi.ffi_call("manifold_conv_fwd",
                            native_conv_output(x, kernel.shape[0], stride, pads, kernel.shape[-1]),
                            vmap_method="sequential")
    return call(x, kernel, **native_conv_attrs(stride, pads))


def _native_conv_fwd(x, kernel, stride, pads):
    return _native_conv(x, kernel, stride, pads), (x, kernel)


def _native_conv_bwd(stride, pads, residuals, g):
    x, kernel = residuals
    wgrad = jax.ffi.ffi_call("manifold_conv_wgrad", jax.ShapeDtypeStruct(kernel.shape, kernel.dtype),
                             vmap_method="sequential")
    grad_kernel = wgrad(x, g.astype(x.dtype), **native_conv_attrs(stride, pads))
    _, input_vjp = jax.vjp(lambda x: _im2col_conv(x, kernel, stride, pads), x)
    return input_vjp(g)[0], grad_kernel


_native_conv.defvjp(_native_conv_fwd, _native_conv_bwd)


class ConvBN(nnx.Module):
    """A dense (ungrouped) convolution without bias, BatchNorm, then an activation.

    1x1 stride-1 convolutions are computed as a matmul over the channel axis, and convolutions with
    few input channels (the stem: k * k * C_in <= ``IM2COL_MAX_DEPTH``) as one matmul over the
    k * k shifted windows stacked on the channel axis (im2col); both are faster than XLA's
    convolution on CPU for these shapes, with the same result up to float32 rounding. ``impl`` is
    the network's depthwise form: where :func:`uses_native` for it, the stem-like convolution's
    forward pass and BatchNorm's training reductions take the native kernels.
    """

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 1, stride: int = 1,
                 padding: str = "same", act: str = "relu6", bn_epsilon: float = 1e-3,
                 bn_momentum: float = 0.997, dtype: jnp.dtype = jnp.float32, impl: str = "auto",
                 rngs: nnx.Rngs) -> None:
        self.kernel_size = kernel_size
        self.impl = impl
        self.stride = stride
        self.padding = padding
        self.act = act
        self.dtype = jnp.dtype(dtype)
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        # torchvision's kaiming-normal fan-out initialisation
        self.kernel = nnx.Param(he_normal(rngs.params(), shape, fan=kernel_size * kernel_size * out_channels))
        self.bn = nnx.BatchNorm(out_channels, momentum=bn_momentum, epsilon=bn_epsilon,
                                dtype=self.dtype, rngs=rngs)

    def conv(self, x: Array) -> Array:
        """The convolution alone (no BatchNorm, no activation)."""
        kernel = self.kernel[...].astype(self.dtype)
        if self.kernel_size == 1 and self.stride == 1:
            # On [pixels, channels]: autodiff's weight gradient then contracts one axis, which XLA:CPU
            # computes without the transposed copies that contracting (batch, H, W) costs.
            pixels = x.reshape(-1, x.shape[-1])
            return jnp.dot(pixels, kernel[0, 0]).reshape(*x.shape[:-1], kernel.shape[-1])
        pads = [pad_amounts(n, self.kernel_size, self.stride, self.padding) for n in x.shape[1:3]]
        k, c_in = self.kernel_size, x.shape[-1]
        if k * k * c_in <= IM2COL_MAX_DEPTH:
            if uses_native(self.impl, x, "conv"):
                return _native_conv(x, kernel, self.stride, tuple(pads))
            return _im2col_conv(x, kernel, self.stride, pads)
        return jax.lax.conv_general_dilated(
            x, kernel, (self.stride, self.stride), pads,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def __call__(self, x: Array, train: bool) -> Array:
        return batch_norm_act(self.bn, self.conv(x), train, self.act, self.impl)


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
