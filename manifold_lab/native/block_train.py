"""Training of a MobileNetV2 inverted-residual block without writing its expanded tensors: a
differentiable operation over the ``fused_block_train`` kernels (:mod:`manifold_lab.native.ffi`).

:func:`fused_train_block` returns the block's raw projection ``p = d @ W_p`` (its BatchNorm, the
bottleneck activation and the bottleneck shortcut are cheap, bottleneck-sized, and stay in JAX)
and the batch statistics of the expansion and depthwise BatchNorms (for their running averages),
with ``d = clamp_d(BN_d(depthwise(e))) [+ e]`` and ``e = clamp_e(BN_e(x @ W_e))``, both
BatchNorms from the batch statistics.

The arithmetic that needs the whole batch at once is done on small matrices here:

- the expansion's statistics come from the block input's mean and covariance (z = x @ W_e is
  linear in x: ``mean_z = mean_x @ W_e``, ``var_z = diag(W_e^T cov_x W_e)``), so no pass over z;
- the kernel's backward pass returns ``G = (s_e * v) @ W_e^T`` and ``x^T (s_e * v)``, where ``v``
  is the gradient of the expansion BatchNorm's output; the rest of BatchNorm's backward pass,
  ``g_z = s_e * v + beta * z + gamma`` per channel, is linear in ``z = x @ W_e``, so its share of
  the input gradient is ``x @ (W_e diag(beta) W_e^T) + W_e @ gamma`` and its share of the weight
  gradient ``(x^T x) @ W_e diag(beta) + sum(x) gamma^T``, all from ``C_in``-sized matrices.

Gradients do not flow through the returned statistics (they only move running averages).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from manifold_lab.models.batchnorm import input_map
from manifold_lab.models.geometry import Pads
from manifold_lab.native import ffi
from manifold_lab.native.ops import clamp_bounds, pad_expanded

Array = jax.Array


def _stats_of_input(x: Array, we: Array) -> tuple[Array, Array, Array, Array]:
    """(mean of z, variance of z, x^T x, sum of x) for z = x @ we over all pixels of ``x``."""
    xf = x.reshape(-1, x.shape[-1])
    sum_x = jnp.sum(xf, 0)
    mean_x = sum_x / xf.shape[0]
    centred = xf - mean_x
    cov = centred.T @ centred / xf.shape[0]
    gram = cov * xf.shape[0] + jnp.outer(sum_x, mean_x)
    return mean_x @ we, jnp.maximum(0.0, jnp.sum(we * (cov @ we), 0)), gram, sum_x


def _padded(width: int, *vectors: Array) -> tuple[Array, ...]:
    return tuple(pad_expanded(v, v.ndim - 1, width) for v in vectors)


def _maps(params, stats, epsilon):
    """The batch maps (a, b, rstd) of both BatchNorms."""
    (scale_e, bias_e, scale_d, bias_d), (mean_z, var_z, mean_r, var_r) = params, stats
    return input_map(scale_e, bias_e, mean_z, var_z, epsilon), input_map(scale_d, bias_d, mean_r, var_r, epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12))
def fused_train_block(x: Array, we: Array, scale_e: Array, bias_e: Array, taps: Array, scale_d: Array,
                      bias_d: Array, wp: Array, epsilon: float, acts: tuple[str, str], stride: int, pads: Pads,
                      inner: bool) -> tuple[Array, tuple[Array, Array], tuple[Array, Array]]:
    """``(p, (mean_z, var_z), (mean_r, var_r))`` of a block in training (see the module
    docstring): ``x`` NHWC float32, ``we`` ``[C_in, E]``, ``taps`` ``[3, 3, E]``, ``wp``
    ``[E, C]``, the two BatchNorms' scale and bias, ``acts`` the expansion's and the depthwise
    layer's activations, ``inner`` the shortcut from e to d (stride 1)."""
    return _forward(x, we, scale_e, bias_e, taps, scale_d, bias_d, wp, epsilon, acts, stride, pads, inner)[0]


def _forward(x, we, scale_e, bias_e, taps, scale_d, bias_d, wp, epsilon, acts, stride, pads, inner):
    width, c = -(-we.shape[1] // 16) * 16, wp.shape[1]
    mean_z, var_z, gram, sum_x = _stats_of_input(x, we)
    a_e, b_e, _ = input_map(scale_e, bias_e, mean_z, var_z, epsilon)
    expand = (pad_expanded(we, 1, width), *_padded(width, a_e, b_e))
    taps_p = pad_expanded(taps, 2, width)
    out = ffi.conv_output(x, 3, stride, pads, c)
    stats = ffi.fused_block_train_stats(x, expand, taps_p, out.shape[1:3], clamp_bounds(acts[0]), stride, pads)
    mean_r, var_r = stats[0, :we.shape[1]], stats[1, :we.shape[1]]
    a_d, b_d, _ = input_map(scale_d, bias_d, mean_r, var_r, epsilon)
    project = (pad_expanded(wp, 0, width), jnp.ones((c,), jnp.float32), jnp.zeros((c,), jnp.float32))
    bounds = (clamp_bounds(acts[0]), clamp_bounds(acts[1]), clamp_bounds("linear"))
    p = ffi.fused_block_forward(x, expand, (taps_p, *_padded(width, a_d, b_d)), project, bounds, stride, pads, 0,
                                2 if inner else 0)
    residuals = (x, we, scale_e, bias_e, taps, scale_d, bias_d, wp, mean_z, var_z, mean_r, var_r, gram, sum_x)
    return (p, (mean_z, var_z), (mean_r, var_r)), residuals


def _bn_backward_coefficients(a, rstd, mean, sum_g, sum_gx, count):
    """BatchNorm's backward pass as ``g_in = a * g + beta * x + gamma`` (g: the gradient of its
    output where the activation is open, x: its input) with (grad scale, grad bias)."""
    grad_scale = rstd * (sum_gx - mean * sum_g)
    beta = -a * rstd * grad_scale / count
    return beta, -a * sum_g / count - beta * mean, grad_scale, sum_g


def _backward(epsilon, acts, stride, pads, inner, residuals, cotangents):
    x, we, scale_e, bias_e, taps, scale_d, bias_d, wp, mean_z, var_z, mean_r, var_r, gram, sum_x = residuals
    gp = cotangents[0]
    ec, width = we.shape[1], -(-we.shape[1] // 16) * 16
    (a_e, b_e, rstd_e), (a_d, b_d, rstd_d) = _maps((scale_e, bias_e, scale_d, bias_d),
                                                   (mean_z, var_z, mean_r, var_r), epsilon)
    expand = (pad_expanded(we, 1, width), *_padded(width, a_e, b_e))
    depthwise = (pad_expanded(taps, 2, width), *_padded(width, a_d, b_d))
    project_t = pad_expanded(wp, 0, width).T
    bounds = (clamp_bounds(acts[0]), clamp_bounds(acts[1]))
    residual = 2 if inner else 0
    grad_wp, sums_d = ffi.fused_block_train_bwd_sums(x, expand, depthwise, project_t, gp, bounds, stride, pads,
                                                     residual)
    beta_d, gamma_d, grad_scale_d, grad_bias_d = _bn_backward_coefficients(
        a_d, rstd_d, mean_r, sums_d[0, :ec], sums_d[1, :ec], gp.size // gp.shape[-1])
    coef = jnp.stack(_padded(width, a_d, beta_d, gamma_d))
    g, partial, sums_e = ffi.fused_block_train_bwd(x, expand, depthwise, project_t, gp, coef, bounds, stride, pads,
                                                   residual)
    cin = x.shape[-1]
    grad_we = partial[:cin * width].reshape(cin, width)[:, :ec]
    grad_taps = partial[cin * width:].reshape(3, 3, width)[..., :ec]
    beta_e, gamma_e, grad_scale_e, grad_bias_e = _bn_backward_coefficients(
        a_e, rstd_e, mean_z, sums_e[0, :ec], sums_e[1, :ec], x.size // cin)
    grad_x = g + x @ ((we * beta_e) @ we.T) + we @ gamma_e
    grad_we = grad_we + gram @ (we * beta_e) + jnp.outer(sum_x, gamma_e)
    return (grad_x, grad_we, grad_scale_e, grad_bias_e, grad_taps, grad_scale_d, grad_bias_d,
            grad_wp[:ec])


fused_train_block.defvjp(_forward, _backward)
