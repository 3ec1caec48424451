"""The native kernels as differentiable JAX operations (custom VJPs over :mod:`manifold_lab.native.ffi`).

- :func:`native_conv`: a dense convolution with few input channels (the stem), forward and kernel
  gradient natively; the input gradient through the pure-JAX im2col form.
- :func:`native_depthwise`: the depthwise convolution, forward and backward (input and tap
  gradients in one call).
- :func:`bn_act_depthwise_train`: training, the previous layer's BatchNorm (batch statistics) and
  activation folded into the depthwise kernels, so that their output is never written out.
- :func:`fused_inference_depthwise`: inference, both BatchNorms (running statistics) and both
  activations around a depthwise convolution in one call.
- :func:`fused_inference_block`: inference, a whole inverted-residual block (expansion, depthwise,
  projection, their BatchNorms and activations, the shortcut) in one call that never writes the
  expanded tensor out.

Float32 NHWC only, XLA:CPU only; :mod:`manifold_lab.models.backend` decides when these run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from manifold_lab.models.activations import activation_spec
from manifold_lab.models.batchnorm import bn_input_grad, bn_stats, folded_batch_norm, input_map
from manifold_lab.models.convolution import im2col_conv
from manifold_lab.models.geometry import Pads, spatial_pads
from manifold_lab.native import ffi

Array = jax.Array
_UNBOUNDED = activation_spec("linear")


def clamp_bounds(act: str) -> tuple[float, float]:
    spec = activation_spec(act)
    return spec.lo, spec.hi


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def native_conv(x: Array, kernel: Array, stride: int, pads: Pads) -> Array:
    """The convolution by the native kernel, which reads the image in place (no im2col copy); the
    kernel's gradient by another native kernel, the input's through :func:`im2col_conv` (which
    XLA drops when nothing uses it, as for the image fed to the stem)."""
    return ffi.conv_forward(x, kernel, stride, pads)


def _native_conv_fwd(x, kernel, stride, pads):
    return native_conv(x, kernel, stride, pads), (x, kernel)


def _native_conv_bwd(stride, pads, residuals, g):
    x, kernel = residuals
    grad_kernel = ffi.conv_weight_grad(x, g, kernel, stride, pads)
    _, input_vjp = jax.vjp(lambda x: im2col_conv(x, kernel, stride, pads), x)
    return input_vjp(g)[0], grad_kernel


native_conv.defvjp(_native_conv_fwd, _native_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def native_depthwise(x: Array, taps: Array, stride: int, pads: Pads) -> Array:
    """Depthwise conv of NHWC float32 ``x`` with ``taps`` (k, k, C) by the native kernel."""
    return ffi.depthwise_forward(x, taps, stride, pads)


def _native_depthwise_fwd(x, taps, stride, pads):
    return native_depthwise(x, taps, stride, pads), (x, taps)


def _native_depthwise_bwd(stride, pads, residuals, g):
    x, taps = residuals
    return ffi.depthwise_backward(x, taps, g, stride, pads)


native_depthwise.defvjp(_native_depthwise_fwd, _native_depthwise_bwd)


def fused_inference_depthwise(x: Array, kernel: Array, *, stride: int, padding: str,
                              out_bn: nnx.BatchNorm, out_act: str,
                              in_bn: nnx.BatchNorm | None = None, in_act: str = "linear") -> Array:
    """Inference ``out_act(out_bn(depthwise(in_act(in_bn(x)))))`` in one native kernel call, with
    both BatchNorms under their running statistics; without ``in_bn``, ``x`` is the depthwise
    input itself. Neither the depthwise input nor its raw output is written out."""
    pads = spatial_pads(x.shape, kernel.shape[0], stride, padding)
    in_map = folded_batch_norm(in_bn) if in_bn is not None else None
    return ffi.depthwise_forward_fused(x, kernel[:, :, 0, :], in_map, folded_batch_norm(out_bn), clamp_bounds(in_act),
                                       clamp_bounds(out_act), stride, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def bn_act_depthwise_train(x: Array, taps: Array, scale: Array, bias: Array, epsilon: float, act: str,
                           stride: int, pads: Pads) -> tuple[Array, Array, Array]:
    """Training: ``(depthwise(act(bn(x))), mean, var)`` for float32 ``x`` (the previous
    convolution's raw output), BatchNorm from the batch statistics ``(mean, var)`` of ``x``, in
    native kernel calls that never write the activation out. The backward call returns the
    masked gradient and its channel sums with the tap gradients, so BatchNorm's backward pass
    adds one full-size pass (:func:`bn_input_grad`)."""
    return _bn_act_depthwise_fwd(x, taps, scale, bias, epsilon, act, stride, pads)[0]


def _bn_act_depthwise_fwd(x, taps, scale, bias, epsilon, act, stride, pads):
    mean, var = bn_stats(x, True)
    a, shift, _ = input_map(scale, bias, mean, var, epsilon)
    ones, zeros = jnp.ones_like(a), jnp.zeros_like(a)
    y = ffi.depthwise_forward_fused(x, taps, (a, shift), (ones, zeros), clamp_bounds(act),
                                    (_UNBOUNDED.lo, _UNBOUNDED.hi), stride, pads)
    return (y, mean, var), (x, taps, scale, bias, mean, var)


def _bn_act_depthwise_bwd(epsilon, act, stride, pads, residuals, cotangents):
    x, taps, scale, bias, mean, var = residuals
    a, shift, rstd = input_map(scale, bias, mean, var, epsilon)
    gz, grad_taps, sums = ffi.depthwise_backward_fused(x, taps, cotangents[0], a, shift, clamp_bounds(act), stride, pads)
    grad_x, grad_scale = bn_input_grad(x, gz, a, rstd, mean, sums[0], sums[1])
    return grad_x, grad_taps, grad_scale, sums[0]


bn_act_depthwise_train.defvjp(_bn_act_depthwise_fwd, _bn_act_depthwise_bwd)


#: The shortcuts the fused block kernel adds: the block input to its output, or the expanded
#: tensor to the depthwise output (stride 1)
FUSED_SHORTCUTS: dict[str | None, int] = {None: 0, "bottleneck": 1, "inner": 2}


def pad_expanded(a: Array, axis: int, width: int) -> Array:
    """``a`` with zeros appended on ``axis`` up to ``width`` (``a`` itself where it is that wide)."""
    if a.shape[axis] == width:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, width - a.shape[axis])
    return jnp.pad(a, pad)


def fused_inference_block(x: Array, *, expand_kernel: Array | None, expand_bn: nnx.BatchNorm | None,
                          expand_act: str, dw_kernel: Array, dw_bn: nnx.BatchNorm, dw_act: str,
                          project_kernel: Array, project_bn: nnx.BatchNorm, project_act: str, stride: int,
                          padding: str, shortcut: str | None) -> Array:
    """Inference of an inverted-residual block in one native call, every BatchNorm under its running
    statistics: ``project_act(project_bn(d @ W_p)) [+ x]`` with ``d = dw_act(dw_bn(depthwise(e)))
    [+ e]`` and ``e = expand_act(expand_bn(x @ W_e))``; without ``expand_kernel`` (t = 1) ``e =
    expand_act(expand_bn(x))``, the previous layer's deferred BatchNorm (or ``x`` itself without
    ``expand_bn``). ``shortcut``: None, ``"bottleneck"`` (x added) or ``"inner"`` (e added to d).
    The expanded tensor exists only in cache-sized tiles, and the weights are read as they are
    (the BatchNorms are applied to the products, not folded into weight copies)."""
    pads = spatial_pads(x.shape, dw_kernel.shape[0], stride, padding)
    channels = dw_kernel.shape[-1]
    width = -(-channels // 16) * 16  # the kernel's expanded width: a multiple of 16
    if expand_bn is not None:
        expand_map = folded_batch_norm(expand_bn)
    else:
        expand_map = (jnp.ones((channels,), jnp.float32), jnp.zeros((channels,), jnp.float32))
    expand_weights = expand_kernel[0, 0] if expand_kernel is not None else expand_map[0][None]
    expand = (pad_expanded(expand_weights, 1, width), *(pad_expanded(v, 0, width) for v in expand_map))
    depthwise = (pad_expanded(dw_kernel[:, :, 0, :], 2, width),
                 *(pad_expanded(v, 0, width) for v in folded_batch_norm(dw_bn)))
    project = (pad_expanded(project_kernel[0, 0], 0, width), *folded_batch_norm(project_bn))
    bounds = tuple(clamp_bounds(act) for act in (expand_act, dw_act, project_act))
    return ffi.fused_block_forward(x, expand, depthwise, project, bounds, stride, pads,
                                   int(expand_kernel is None), FUSED_SHORTCUTS[shortcut])
