"""The 3x3 depthwise convolution in three equivalent forms, and its conv + BatchNorm + ReLU6 unit.

- ``xla``: ``lax.conv_general_dilated`` with ``feature_group_count = channels``.
- ``shift``: pad once, then nine shifted (strided) slices of the padded input, each times its
  per-channel tap, summed. On CPU XLA's grouped convolution is several times slower than this form,
  forward and backward (see ``benchmarks/README.md``, "Depthwise convolution").
- ``native``: C++ kernels called through XLA's FFI (:mod:`manifold_lab.native`, built on first
  use), forward and backward (input and tap gradients in one call); padding by bounds, so no
  padded copy and no materialised tap windows. XLA:CPU only, float32 only: other dtypes take the
  ``shift`` form.
- ``auto``: on the CPU backend ``native`` where it can be built (a C++ compiler is installed),
  else ``shift``; ``xla`` on GPU/TPU. Decided from ``jax.default_backend()`` when the model is
  traced.

All forms share the padding geometry of :func:`manifold_lab.models.layers.pad_amounts`
(``same``: TF 'SAME'; ``symmetric``: (1, 1)). Kernels are stored HWIO as ``(3, 3, 1, C)``, the
layout of a grouped convolution.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from manifold_lab import native
from manifold_lab.models.layers import (batch_norm_act, bn_input_grad, bn_stats, he_normal, native_conv_attrs,
                                        native_conv_output, pad_amounts, update_running_stats, uses_native)

Array = jax.Array

DEPTHWISE_FORMS: tuple[str, ...] = ("xla", "shift", "native")


def resolve_impl(impl: str) -> str:
    """``auto`` -> ``native`` on CPU (``shift`` where it cannot be built), ``xla`` elsewhere; the
    explicit forms unchanged (``native`` raises where it cannot be built or off the CPU)."""
    if impl == "auto":
        if jax.default_backend() != "cpu":
            return "xla"
        return "native" if native.load("depthwise") is not None else "shift"
    if impl not in DEPTHWISE_FORMS:
        raise ValueError(f"depthwise_impl must be auto, xla, shift or native; got {impl!r}")
    if impl == "native":
        if jax.default_backend() != "cpu":
            raise ValueError("depthwise_impl='native' runs on the CPU backend only; use auto or xla")
        if native.load("depthwise") is None:
            raise ValueError(f"depthwise_impl='native' is unavailable: {native.reason('depthwise')}")
    return impl


def depthwise_conv(x: Array, kernel: Array, *, stride: int = 1, padding: str = "same",
                   impl: str = "auto") -> Array:
    """Depthwise convolution of NHWC ``x`` with an HWIO kernel of shape ``(k, k, 1, C)``."""
    k = kernel.shape[0]
    channels = x.shape[-1]
    if kernel.shape != (k, k, 1, channels):
        raise ValueError(f"depthwise kernel must be ({k}, {k}, 1, {channels}), got {kernel.shape}")
    pads = tuple(pad_amounts(n, k, stride, padding) for n in x.shape[1:3])
    form = resolve_impl(impl)
    if form == "xla":
        return jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=channels)
    if form == "native" and x.dtype == jnp.float32 and kernel.dtype == jnp.float32:
        return _native_depthwise(x, kernel[:, :, 0, :], stride, pads)
    return _shift_depthwise(x, kernel[:, :, 0, :], stride, pads)


def _tap_window(xp: Array, i: int, j: int, stride: int, out_h: int, out_w: int) -> Array:
    """The strided slice of the padded input that tap (i, j) multiplies."""
    n, _, _, c = xp.shape
    return jax.lax.slice(xp, (0, i, j, 0),
                         (n, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, c),
                         (1, stride, stride, 1))


def _taps_sum(xp: Array, taps: Array, stride: int, out_h: int, out_w: int) -> Array:
    """sum over taps (i, j) of window(i, j) * taps[i, j] (per channel)."""
    k = taps.shape[0]
    out = None
    for i in range(k):
        for j in range(k):
            term = _tap_window(xp, i, j, stride, out_h, out_w) * taps[i, j]
            out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shift_depthwise(x: Array, taps: Array, stride: int, pads: tuple[tuple[int, int], ...]) -> Array:
    """Depthwise conv of NHWC ``x`` with ``taps`` (k, k, C): one pad, then k*k shifted multiply-adds."""
    k = taps.shape[0]
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out_h, out_w = (xp.shape[1] - k) // stride + 1, (xp.shape[2] - k) // stride + 1
    return _taps_sum(xp, taps, stride, out_h, out_w)


def _shift_depthwise_fwd(x, taps, stride, pads):
    return _shift_depthwise(x, taps, stride, pads), (x, taps)


def _shift_depthwise_bwd(stride, pads, residuals, g):
    """Hand-written gradients (autodiff of the slices is far slower on CPU).

    Input gradient: the transposed convolution, itself a stride-1 shift form over the output
    gradient dilated by the stride (``lax.pad`` interior padding) and padded by k-1-lo / the rest,
    with the taps flipped. Kernel gradient: for each tap, the window times the output gradient,
    summed over batch and space; the nine reductions run in a ``lax.scan`` so that XLA does not
    materialise all nine windows at once (which made them several times slower).
    """
    x, taps = residuals
    k = taps.shape[0]
    n, h, w, c = x.shape
    out_h, out_w = g.shape[1:3]
    config = [(0, 0, 0)]
    for (lo, _hi), size, out in zip(pads, (h, w), (out_h, out_w)):
        config.append((k - 1 - lo, size + lo - (out - 1) * stride - 1, stride - 1))
    config.append((0, 0, 0))
    g_dilated = jax.lax.pad(g, jnp.zeros((), g.dtype), config)
    grad_x = _taps_sum(g_dilated, taps[::-1, ::-1], 1, h, w)

    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
    offsets = jnp.array([(i, j) for i in range(k) for j in range(k)], jnp.int32)

    def tap_grad(_, offset):
        window = jax.lax.dynamic_slice(xp, (0, offset[0], offset[1], 0), (n, span_h, span_w, c))
        window = window[:, ::stride, ::stride]
        return None, jnp.sum(window * g, axis=(0, 1, 2), dtype=jnp.float32)

    _, grad_taps = jax.lax.scan(tap_grad, None, offsets)
    return grad_x, grad_taps.reshape(k, k, c).astype(taps.dtype)


_shift_depthwise.defvjp(_shift_depthwise_fwd, _shift_depthwise_bwd)



@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _native_depthwise(x: Array, taps: Array, stride: int, pads: tuple[tuple[int, int], ...]) -> Array:
    """Depthwise conv of NHWC float32 ``x`` with ``taps`` (k, k, C) by the native kernel."""
    # vmap (multi-seed training) runs the kernel once per mapped element
    call = jax.ffi.ffi_call("manifold_dw_fwd", native_conv_output(x, taps.shape[0], stride, pads, x.shape[-1]),
                            vmap_method="sequential")
    return call(x, taps, **native_conv_attrs(stride, pads))


def _native_depthwise_fwd(x, taps, stride, pads):
    return _native_depthwise(x, taps, stride, pads), (x, taps)


def _native_depthwise_bwd(stride, pads, residuals, g):
    x, taps = residuals
    call = jax.ffi.ffi_call("manifold_dw_bwd", (jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                jax.ShapeDtypeStruct(taps.shape, taps.dtype)),
                            vmap_method="sequential")
    return tuple(call(x, taps, g.astype(x.dtype), **native_conv_attrs(stride, pads)))


_native_depthwise.defvjp(_native_depthwise_fwd, _native_depthwise_bwd)

#: (lo, hi) clamp of each activation, as the fused kernel applies it
ACTIVATION_BOUNDS: dict[str, tuple[float, float]] = {
    "linear": (-np.inf, np.inf), "relu": (0.0, np.inf), "relu6": (0.0, 6.0)}


def folded_batch_norm(bn: nnx.BatchNorm) -> tuple[Array, Array]:
    """(scale, bias) with ``bn(x) = x * scale + bias`` under the running statistics."""
    scale = bn.scale[...] * jax.lax.rsqrt(bn.var[...] + bn.epsilon)
    return scale, bn.bias[...] - bn.mean[...] * scale


def fused_inference_depthwise(x: Array, kernel: Array, *, stride: int, padding: str,
                              out_bn: nnx.BatchNorm, out_act: str,
                              in_bn: nnx.BatchNorm | None = None, in_act: str = "linear") -> Array:
    """Inference ``out_act(out_bn(depthwise(in_act(in_bn(x)))))`` in one native kernel call, with
    both BatchNorms under their running statistics; without ``in_bn``, ``x`` is the depthwise
    input itself. Neither the depthwise input nor its raw output is written out. Needs the
    native form (see :func:`resolve_impl`) and float32."""
    k = kernel.shape[0]
    pads = tuple(pad_amounts(n, k, stride, padding) for n in x.shape[1:3])
    out_scale, out_bias = folded_batch_norm(out_bn)
    # without in_bn the kernel ignores in_scale / in_bias (fuse_input=0): any C-vectors do
    in_scale, in_bias = folded_batch_norm(in_bn) if in_bn is not None else (out_scale, out_bias)
    bounds = [np.float32(b) for b in (*ACTIVATION_BOUNDS[in_act], *ACTIVATION_BOUNDS[out_act])]
    call = jax.ffi.ffi_call("manifold_dw_fwd_fused", native_conv_output(x, k, stride, pads, x.shape[-1]),
                            vmap_method="sequential")
    return call(x, kernel[:, :, 0, :], in_scale, in_bias, out_scale, out_bias, **native_conv_attrs(stride, pads),
                fuse_input=np.int64(in_bn is not None), in_lo=bounds[0], in_hi=bounds[1], out_lo=bounds[2],
                out_hi=bounds[3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _bn_act_depthwise_train(x: Array, taps: Array, scale: Array, bias: Array, epsilon: float, act: str,
                            stride: int, pads: tuple[tuple[int, int], ...]) -> tuple[Array, Array, Array]:
    """Training: ``(depthwise(act(bn(x))), mean, var)`` for float32 ``x`` (the previous
    convolution's raw output), BatchNorm from the batch statistics ``(mean, var)`` of ``x``, in
    native kernel calls that never write the activation out. The backward call returns the
    masked gradient and its channel sums with the tap gradients, so BatchNorm's backward pass
    adds one full-size pass (:func:`bn_input_grad`)."""
    return _bn_act_depthwise_fwd(x, taps, scale, bias, epsilon, act, stride, pads)[0]


def _input_map(scale, bias, mean, var, epsilon):
    rstd = jax.lax.rsqrt(var + epsilon)
    a = scale * rstd
    return a, bias - a * mean, rstd


def _bn_act_depthwise_fwd(x, taps, scale, bias, epsilon, act, stride, pads):
    mean, var = bn_stats(x, uses_native("native", x, "batchnorm"))
    a, shift, _ = _input_map(scale, bias, mean, var, epsilon)
    lo, hi = (np.float32(b) for b in ACTIVATION_BOUNDS[act])
    ones, zeros = jnp.ones_like(a), jnp.zeros_like(a)
    call = jax.ffi.ffi_call("manifold_dw_fwd_fused", native_conv_output(x, taps.shape[0], stride, pads, x.shape[-1]),
                            vmap_method="sequential")
    y = call(x, taps, a, shift, ones, zeros, **native_conv_attrs(stride, pads), fuse_input=np.int64(1),
             in_lo=lo, in_hi=hi, out_lo=np.float32(-np.inf), out_hi=np.float32(np.inf))
    return (y, mean, var), (x, taps, scale, bias, mean, var)


def _bn_act_depthwise_bwd(epsilon, act, stride, pads, residuals, cotangents):
    x, taps, scale, bias, mean, var = residuals
    a, shift, rstd = _input_map(scale, bias, mean, var, epsilon)
    lo, hi = (np.float32(b) for b in ACTIVATION_BOUNDS[act])
    c = x.shape[-1]
    call = jax.ffi.ffi_call("manifold_dw_bwd_fused", (jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                      jax.ShapeDtypeStruct(taps.shape, taps.dtype),
                                                      jax.ShapeDtypeStruct((2, c), jnp.float32)),
                            vmap_method="sequential")
    gz, grad_taps, sums = call(x, taps, cotangents[0], a, shift, **native_conv_attrs(stride, pads), in_lo=lo, in_hi=hi)
    grad_x, grad_scale = bn_input_grad(x, gz, a, rstd, mean, sums[0], sums[1])
    return grad_x, grad_taps, grad_scale, sums[0]


_bn_act_depthwise_train.defvjp(_bn_act_depthwise_fwd, _bn_act_depthwise_bwd)


class DepthwiseBN(nnx.Module):
    """3x3 depthwise convolution without bias, BatchNorm, then an activation (ReLU6 by default)."""

    def __init__(self, channels: int, *, stride: int = 1, padding: str = "same", impl: str = "auto",
                 act: str = "relu6", bn_epsilon: float = 1e-3, bn_momentum: float = 0.997,
                 dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs) -> None:
        self.stride = stride
        self.padding = padding
        self.impl = impl
        self.act = act
        self.dtype = jnp.dtype(dtype)
        # He normal with the per-channel fan (9 taps) of a depthwise filter.
        self.kernel = nnx.Param(he_normal(rngs.params(), (3, 3, 1, channels), fan=9))
        self.bn = nnx.BatchNorm(channels, momentum=bn_momentum, epsilon=bn_epsilon,
                                dtype=self.dtype, rngs=rngs)

    def fuses_input(self) -> bool:
        """Whether this layer runs through the native kernels with the previous layer's BatchNorm
        and activation folded in (``input_bn`` of ``__call__``), and in inference also its own."""
        return resolve_impl(self.impl) == "native" and self.dtype == jnp.float32

    def __call__(self, x: Array, train: bool, input_bn: tuple[nnx.BatchNorm, str] | None = None) -> Array:
        """``act(bn(depthwise(x)))``. ``input_bn`` (with :meth:`fuses_input` only): ``x`` is the
        previous convolution's raw output and ``(bn, act)`` its BatchNorm and activation, applied
        inside the kernel (in training from the batch statistics of ``x``, whose running averages
        are updated as by :func:`batch_norm_act`)."""
        if input_bn is not None and not self.fuses_input():
            raise ValueError("input_bn needs the native float32 depthwise form")
        if not train and self.fuses_input():
            in_bn, in_act = input_bn if input_bn is not None else (None, "linear")
            return fused_inference_depthwise(x, self.kernel[...], stride=self.stride, padding=self.padding,
                                             out_bn=self.bn, out_act=self.act, in_bn=in_bn, in_act=in_act)
        if input_bn is not None:
            in_bn, in_act = input_bn
            pads = tuple(pad_amounts(n, 3, self.stride, self.padding) for n in x.shape[1:3])
            y, mean, var = _bn_act_depthwise_train(x, self.kernel[...][:, :, 0, :], in_bn.scale[...],
                                                   in_bn.bias[...], in_bn.epsilon, in_act, self.stride, pads)
            update_running_stats(in_bn, mean, var)
        else:
            y = depthwise_conv(x, self.kernel[...].astype(self.dtype), stride=self.stride,
                               padding=self.padding, impl=self.impl)
        return batch_norm_act(self.bn, y, train, self.act, self.impl)
