"""Training-mode BatchNorm + activation with a hand-written gradient, and the BatchNorm arithmetic
that the fused native kernels share with it.

The statistics are Flax's (float32, one pass: ``var = max(0, E[x^2] - E[x]^2)``), over all axes
but the last; the running averages move by the module's momentum, as ``nnx.BatchNorm`` moves them.
``use_native`` (static): the channel reductions of the forward and backward passes by the native
kernels (:mod:`manifold_lab.native.ffi`), one read of the inputs for both sums, where XLA:CPU
reduces each sum separately and first writes the masked gradient out.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from manifold_lab.models.activations import activation_spec
from manifold_lab.native import ffi

Array = jax.Array


def bn_stats(x: Array, use_native: bool) -> tuple[Array, Array]:
    """Training-mode BatchNorm's float32 (mean, var) of ``x`` over all axes but the last."""
    if use_native:
        return ffi.bn_moments(x)
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axes)
    var = jnp.maximum(0.0, jnp.mean(xf * xf, axes) - mean * mean)
    return mean, var


def input_map(scale: Array, bias: Array, mean: Array, var: Array, epsilon: float) -> tuple[Array, Array, Array]:
    """``(a, b, rstd)`` with BatchNorm from the statistics ``(mean, var)`` written as ``a * x + b``."""
    rstd = jax.lax.rsqrt(var + epsilon)
    a = scale * rstd
    return a, bias - a * mean, rstd


def folded_batch_norm(bn: nnx.BatchNorm) -> tuple[Array, Array]:
    """(scale, bias) with ``bn(x) = x * scale + bias`` under the running statistics."""
    scale = bn.scale[...] * jax.lax.rsqrt(bn.var[...] + bn.epsilon)
    return scale, bn.bias[...] - bn.mean[...] * scale


def update_running_stats(bn: nnx.BatchNorm, mean: Array, var: Array) -> None:
    """``bn``'s running averages, moved towards a batch's statistics by its momentum."""
    m = bn.momentum
    bn.mean[...] = jax.lax.stop_gradient(m * bn.mean[...] + (1 - m) * mean)
    bn.var[...] = jax.lax.stop_gradient(m * bn.var[...] + (1 - m) * var)


def bn_input_grad(x: Array, gz: Array, a: Array, rstd: Array, mean: Array, sum_gz: Array,
                  sum_gx: Array) -> tuple[Array, Array]:
    """(grad x, grad scale) of training-mode BatchNorm, from its float32 input ``x``, the gradient
    ``gz`` of its output (through the activation's mask), ``a = scale * rstd``, the batch
    ``mean`` and the channel sums of ``gz`` (also grad bias) and ``gz * x``. One full-size pass."""
    count = x.size // x.shape[-1]
    grad_scale = rstd * (sum_gx - mean * sum_gz)  # = sum(gz * xhat)
    c = a * rstd * grad_scale / count
    return a * gz - c * x + (c * mean - a * sum_gz / count), grad_scale


def _masked(g: Array, z: Array, interval: tuple[float, float] | None) -> Array:
    """g where z lies in the open ``interval`` (JAX's convention at the kinks: 0), else 0."""
    if interval is None:
        return g
    lo, hi = interval
    inside = z > lo if hi == float("inf") else (z > lo) & (z < hi)
    return jnp.where(inside, g, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bn_act_train(x: Array, scale: Array, bias: Array, epsilon: float, act: str, use_native: bool
                  ) -> tuple[Array, Array, Array]:
    """Training-mode BatchNorm over all axes but the last, then ``act``: ``(y, mean, var)``.

    The hand-written VJP needs only ``x`` and the per-channel statistics: one pass for the two
    channel sums of the backward pass and one for the input gradient, where autodiff of the
    composite materialises several full-size intermediates (slower on CPU)."""
    return _bn_act_fwd(x, scale, bias, epsilon, act, use_native)[0]


def _bn_act_fwd(x, scale, bias, epsilon, act, use_native):
    mean, var = bn_stats(x, use_native)
    mul = jax.lax.rsqrt(var + epsilon) * scale
    y = activation_spec(act).fn((x.astype(jnp.float32) - mean) * mul + bias).astype(x.dtype)
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
    interval = activation_spec(act).gradient_interval
    gz = _masked(g, xf * a + shift, interval)
    if use_native:  # from g in one read, the mask applied on the fly
        grad_bias, sum_gx = ffi.bn_grad_sums(xf, g, a, shift, interval)
    else:
        axes = tuple(range(x.ndim - 1))
        grad_bias, sum_gx = jnp.sum(gz, axes), jnp.sum(gz * xf, axes)
    grad_x, grad_scale = bn_input_grad(xf, gz, a, rstd, mean, grad_bias, sum_gx)
    return grad_x.astype(x.dtype), grad_scale.astype(scale.dtype), grad_bias.astype(bias.dtype)


_bn_act_train.defvjp(_bn_act_fwd, _bn_act_bwd)


def batch_norm_act(bn: nnx.BatchNorm, x: Array, train: bool, act: str, use_native: bool = False) -> Array:
    """``act(bn(x))`` for an ``nnx.BatchNorm`` over the last axis. Inference: the module itself.
    Training: the same batch statistics, running-average update and result as the module (up to
    float32 rounding), through :func:`_bn_act_train`'s hand-written gradient."""
    if not train:
        return activation_spec(act).fn(bn(x, use_running_average=True))
    y, mean, var = _bn_act_train(x, bn.scale[...], bn.bias[...], bn.epsilon, act, use_native)
    update_running_stats(bn, mean, var)
    return y
