"""The XLA FFI bindings of the native kernels: one thin function per FFI target, each taking and
returning JAX arrays (no gradients here; the custom VJPs that use them are in
:mod:`manifold_lab.native.ops` and :mod:`manifold_lab.models.batchnorm`).

Each binding loads (builds on first use) its library before tracing the call, so that a binding
never emits a call to a target XLA does not know. All kernels take float32 NHWC tensors; the
convolutions take the stride and leading pads as attributes and find the trailing pads from the
output shape. Under ``vmap`` (multi-seed training) every kernel runs once per mapped element.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from manifold_lab import native

Array = jax.Array
Pads = tuple[tuple[int, int], ...]


def _call(library: str, target: str, result_shapes):
    """``jax.ffi.ffi_call`` of ``target`` in ``library``, which is loaded first (or the failure raised)."""
    if native.load(library) is None:
        raise RuntimeError(f"native {library} kernels unavailable: {native.reason(library)}")
    return jax.ffi.ffi_call(target, result_shapes, vmap_method="sequential")


def conv_attrs(stride: int, pads: Pads) -> dict[str, np.int64]:
    """The stride and leading pads as the native convolution kernels take them."""
    return dict(stride=np.int64(stride), pad_top=np.int64(pads[0][0]), pad_left=np.int64(pads[1][0]))


def conv_output(x: Array, k: int, stride: int, pads: Pads, channels: int) -> jax.ShapeDtypeStruct:
    """The NHWC output of a k x k convolution of ``x`` with this stride and ``(lo, hi)`` pads."""
    n, h, w, _ = x.shape
    out_h, out_w = ((size + lo + hi - k) // stride + 1 for size, (lo, hi) in zip((h, w), pads))
    return jax.ShapeDtypeStruct((n, out_h, out_w, channels), x.dtype)


def _vectors(c: int, count: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    return (jax.ShapeDtypeStruct((c,), jnp.float32),) * count


def bn_moments(x: Array) -> tuple[Array, Array]:
    """Training BatchNorm's float32 (mean, var) over all axes but the last, in one read of ``x``."""
    return tuple(_call("batchnorm", "manifold_bn_moments", _vectors(x.shape[-1], 2))(x))


def bn_grad_sums(x: Array, g: Array, a: Array, b: Array, interval: tuple[float, float] | None
                 ) -> tuple[Array, Array]:
    """(sum gz, sum gz * x) over all axes but the last, gz = g where ``a * x + b`` lies in the open
    ``interval`` (everywhere for None), the mask applied on the fly in one read of ``x`` and ``g``."""
    lo, hi = interval if interval is not None else (0.0, 0.0)
    sums = _call("batchnorm", "manifold_bn_grad_sums", _vectors(x.shape[-1], 2))
    return tuple(sums(x, g, a, b, masked=np.int64(interval is not None), lo=np.float32(lo), hi=np.float32(hi)))


def conv_forward(x: Array, kernel: Array, stride: int, pads: Pads) -> Array:
    """A dense k x k convolution (HWIO ``kernel``) that reads the image in place (no im2col copy)."""
    out = conv_output(x, kernel.shape[0], stride, pads, kernel.shape[-1])
    return _call("conv", "manifold_conv_fwd", out)(x, kernel, **conv_attrs(stride, pads))


def conv_weight_grad(x: Array, g: Array, kernel: Array, stride: int, pads: Pads) -> Array:
    """The gradient of :func:`conv_forward`'s ``kernel`` for the output gradient ``g``."""
    wgrad = _call("conv", "manifold_conv_wgrad", jax.ShapeDtypeStruct(kernel.shape, kernel.dtype))
    return wgrad(x, g.astype(x.dtype), **conv_attrs(stride, pads))


def depthwise_forward(x: Array, taps: Array, stride: int, pads: Pads) -> Array:
    """Depthwise convolution of ``x`` with ``taps`` (k, k, C), padding by bounds."""
    out = conv_output(x, taps.shape[0], stride, pads, x.shape[-1])
    return _call("depthwise", "manifold_dw_fwd", out)(x, taps, **conv_attrs(stride, pads))


def depthwise_backward(x: Array, taps: Array, g: Array, stride: int, pads: Pads) -> tuple[Array, Array]:
    """(input gradient, tap gradient) of :func:`depthwise_forward` in one call."""
    shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(taps.shape, taps.dtype))
    return tuple(_call("depthwise", "manifold_dw_bwd", shapes)(x, taps, g.astype(x.dtype), **conv_attrs(stride, pads)))


def depthwise_forward_fused(x: Array, taps: Array, in_map: tuple[Array, Array] | None,
                            out_map: tuple[Array, Array], in_bounds: tuple[float, float],
                            out_bounds: tuple[float, float], stride: int, pads: Pads) -> Array:
    """``clamp(depthwise(clamp(x * in_scale + in_bias)) * out_scale + out_bias)``: the per-channel
    ``(scale, bias)`` maps with their clamp bounds; without ``in_map`` ``x`` is read as it is."""
    out = conv_output(x, taps.shape[0], stride, pads, x.shape[-1])
    # without in_map the kernel ignores in_scale / in_bias (fuse_input=0): any C-vectors do
    in_scale, in_bias = in_map if in_map is not None else out_map
    bounds = [np.float32(b) for b in (*in_bounds, *out_bounds)]
    call = _call("depthwise", "manifold_dw_fwd_fused", out)
    return call(x, taps, in_scale, in_bias, *out_map, **conv_attrs(stride, pads),
                fuse_input=np.int64(in_map is not None), in_lo=bounds[0], in_hi=bounds[1], out_lo=bounds[2],
                out_hi=bounds[3])


def depthwise_backward_fused(x: Array, taps: Array, g: Array, in_scale: Array, in_bias: Array,
                             in_bounds: tuple[float, float], stride: int, pads: Pads
                             ) -> tuple[Array, Array, Array]:
    """Backward of :func:`depthwise_forward_fused` with an input map and no output map:
    (gradient of the pre-clamp input map value, tap gradient, its channel sums ``[2, C]``:
    sum dz and sum dz * x)."""
    shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(taps.shape, taps.dtype),
              jax.ShapeDtypeStruct((2, x.shape[-1]), jnp.float32))
    lo, hi = (np.float32(b) for b in in_bounds)
    call = _call("depthwise", "manifold_dw_bwd_fused", shapes)
    return tuple(call(x, taps, g, in_scale, in_bias, **conv_attrs(stride, pads), in_lo=lo, in_hi=hi))


def fused_block_forward(x: Array, expand: tuple[Array, Array, Array], depthwise: tuple[Array, Array, Array],
                        project: tuple[Array, Array, Array], bounds: tuple[tuple[float, float], ...], stride: int,
                        pads: Pads, expand_mode: int, residual: int) -> Array:
    """A whole inverted-residual block in inference (``fused_block.cc``): ``expand``,
    ``depthwise`` and ``project`` are (weights, BatchNorm scale, BatchNorm bias) with the running
    statistics (expanded width a multiple of 16), ``bounds`` the three clamps; ``expand_mode`` 0:
    1x1 expansion, 1: the per-channel map alone (weights unused); ``residual`` 0: none, 1: block
    input added, 2: expanded tensor added to the depthwise output."""
    out = conv_output(x, 3, stride, pads, project[0].shape[-1])
    clamps = {f"{name}_{side}": np.float32(value) for name, pair in zip("edp", bounds)
              for side, value in zip(("lo", "hi"), pair)}
    call = _call("fused_block", "manifold_fused_block_fwd", out)
    return call(x, *expand, *depthwise, *project, **conv_attrs(stride, pads), expand_mode=np.int64(expand_mode),
                residual=np.int64(residual), **clamps)


def _train_attrs(stride: int, pads: Pads, residual: int, bounds: tuple[tuple[float, float], ...]) -> dict:
    clamps = {f"{name}_{side}": np.float32(value) for name, pair in zip("ed", bounds)
              for side, value in zip(("lo", "hi"), pair)}
    return dict(**conv_attrs(stride, pads), residual=np.int64(residual), **clamps)


def fused_block_train_stats(x: Array, expand: tuple[Array, Array, Array], taps: Array,
                            out_hw: tuple[int, int], e_bounds: tuple[float, float], stride: int, pads: Pads
                            ) -> Array:
    """``[2, E]``: the batch mean and variance of the raw depthwise sums of a block in training
    (``fused_block_train.cc``), from ``x``, the expansion's (weights, batch scale, batch bias) and
    ``taps`` ``[3, 3, E]``; the block's depthwise output is ``out_hw`` pixels."""
    call = _call("fused_block_train", "manifold_fused_block_train_stats", _matrix(2, taps.shape[-1]))
    return call(x, *expand, taps, out_h=np.int64(out_hw[0]), out_w=np.int64(out_hw[1]),
                **conv_attrs(stride, pads), e_lo=np.float32(e_bounds[0]), e_hi=np.float32(e_bounds[1]))


def fused_block_train_bwd_sums(x: Array, expand: tuple[Array, Array, Array], depthwise: tuple[Array, Array, Array],
                               project_t: Array, gp: Array, bounds: tuple[tuple[float, float], ...], stride: int,
                               pads: Pads, residual: int) -> tuple[Array, Array]:
    """(projection weight gradient ``[E, C]``, ``[2, E]``: the depthwise BatchNorm's sums of ``u``
    and ``u * r``) for the gradient ``gp`` of the raw projection; ``project_t`` is ``W_p^T``."""
    e, c = project_t.shape[1], project_t.shape[0]
    call = _call("fused_block_train", "manifold_fused_block_train_bwd_sums", (_matrix(e, c), _matrix(2, e)))
    return tuple(call(x, *expand, *depthwise, project_t, gp, **_train_attrs(stride, pads, residual, bounds)))


def fused_block_train_bwd(x: Array, expand: tuple[Array, Array, Array], depthwise: tuple[Array, Array, Array],
                          project_t: Array, gp: Array, coef: Array, bounds: tuple[tuple[float, float], ...],
                          stride: int, pads: Pads, residual: int) -> tuple[Array, Array, Array]:
    """(``G`` shaped like ``x``, ``[(C_in + 9) * E]``: the expansion weight gradient's ``x^T (s_e * v)``
    then the tap gradient, ``[2, E]``: the expansion BatchNorm's sums of ``v`` and ``v * z``), with
    ``coef`` ``[3, E]`` the depthwise BatchNorm backward's (alpha, beta, gamma)."""
    e, cin = expand[0].shape[1], x.shape[-1]
    shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(((cin + 9) * e,), jnp.float32),
              _matrix(2, e))
    call = _call("fused_block_train", "manifold_fused_block_train_bwd", shapes)
    return tuple(call(x, expand[0], expand[0].T, *expand[1:], *depthwise, project_t, gp, coef,
                      **_train_attrs(stride, pads, residual, bounds)))


def _matrix(rows: int, cols: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((rows, cols), jnp.float32)
