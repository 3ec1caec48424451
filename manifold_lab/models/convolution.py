"""The pure-JAX convolution forms the kernel backends choose from (NHWC inputs, HWIO kernels,
``(lo, hi)`` pads per spatial axis from :func:`manifold_lab.models.geometry.spatial_pads`).

Dense convolutions: a 1x1 stride-1 convolution as a matmul over the channel axis; a convolution
with few input channels (the stem) as one matmul over the stacked k * k windows (im2col); others
by XLA's convolution. Depthwise: XLA's grouped convolution, or the ``shift`` form (one pad, then
k * k shifted multiply-adds, with a hand-written gradient), which XLA:CPU runs several times
faster, forward and backward (see ``benchmarks/README.md``, "Depthwise convolution"). All forms
give XLA's convolution up to float32 rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from manifold_lab.models.geometry import Pads

Array = jax.Array

#: im2col (one matmul over stacked windows) for convolutions whose k * k * C_in is at most this
IM2COL_MAX_DEPTH = 64

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def pointwise_conv(x: Array, kernel: Array) -> Array:
    """A 1x1 stride-1 convolution on ``[pixels, channels]``: autodiff's weight gradient then
    contracts one axis, which XLA:CPU computes without the transposed copies that contracting
    (batch, H, W) costs."""
    pixels = x.reshape(-1, x.shape[-1])
    return jnp.dot(pixels, kernel[0, 0]).reshape(*x.shape[:-1], kernel.shape[-1])


def im2col(x: Array, k: int, stride: int, pads: Pads | list[tuple[int, int]]) -> Array:
    """The k * k strided windows of padded NHWC ``x`` stacked on the channel axis, in HWI order
    (tap-major, as an HWIO kernel reshaped to ``(k * k * C_in, C_out)``): ``[N, OH, OW, k*k*C]``."""
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out_h, out_w = (xp.shape[1] - k) // stride + 1, (xp.shape[2] - k) // stride + 1
    windows = [jax.lax.slice(xp, (0, i, j, 0),
                             (xp.shape[0], i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1,
                              xp.shape[3]), (1, stride, stride, 1))
               for i in range(k) for j in range(k)]
    return jnp.concatenate(windows, axis=-1)


def im2col_conv(x: Array, kernel: Array, stride: int, pads: Pads | list[tuple[int, int]]) -> Array:
    """A k x k convolution as one matmul over the stacked windows of :func:`im2col`."""
    k, c_in = kernel.shape[0], kernel.shape[2]
    columns = im2col(x, k, stride, list(pads))
    out = jnp.dot(columns.reshape(-1, k * k * c_in), kernel.reshape(k * k * c_in, -1))
    return out.reshape(*columns.shape[:-1], kernel.shape[-1])


def xla_conv(x: Array, kernel: Array, stride: int, pads: Pads, groups: int = 1) -> Array:
    """XLA's convolution (grouped with ``groups`` > 1)."""
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pads, dimension_numbers=_DIMENSIONS,
                                        feature_group_count=groups)


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
def shift_depthwise(x: Array, taps: Array, stride: int, pads: Pads) -> Array:
    """Depthwise conv of NHWC ``x`` with ``taps`` (k, k, C): one pad, then k*k shifted multiply-adds."""
    k = taps.shape[0]
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out_h, out_w = (xp.shape[1] - k) // stride + 1, (xp.shape[2] - k) // stride + 1
    return _taps_sum(xp, taps, stride, out_h, out_w)


def _shift_depthwise_fwd(x, taps, stride, pads):
    return shift_depthwise(x, taps, stride, pads), (x, taps)


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


shift_depthwise.defvjp(_shift_depthwise_fwd, _shift_depthwise_bwd)
