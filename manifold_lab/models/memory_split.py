"""Memory-efficient bottleneck evaluation (paper Section 5).

A bottleneck block is F = A o N o B with B the 1x1 expansion (+BatchNorm, ReLU6), N the per-channel
3x3 depthwise (+BatchNorm, ReLU6) and A the linear 1x1 projection. Because N acts on each channel
on its own, the expanded channels can be cut into k slices and

    F(x) = sum_{i=1..k} (A_i o N o B_i)(x),

where B_i computes slice i of the expansion and A_i is the projection's rows for that slice. Only
one slice of the expanded tensor (1/k of it) is alive at a time; the multiply-adds do not change.
The projection's BatchNorm, the bottleneck activation and the shortcut are applied once, after the
sum (BatchNorm is affine per *output* channel, so it commutes with the sum).

Eval mode only: every BatchNorm uses its running statistics, as a per-channel scale and offset,
which split exactly by channel. The k slices run in a ``lax.fori_loop`` (slice i read from the
weights with a dynamic slice) so that XLA keeps one slice of the expanded tensor live, not all
of them.

    blk = split_block(model.blocks[3])                  # weights of one block of our model
    y = split_apply(blk, x, k=4)                        # == model.blocks[3](x, None, False)[0]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from manifold_lab.models.activations import activation
from manifold_lab.models.batchnorm import folded_batch_norm
from manifold_lab.models.depthwise import depthwise_conv
from manifold_lab.models.mobilenet_v2 import InvertedResidual

Array = jax.Array


@partial(jax.tree_util.register_dataclass,
         data_fields=["expand_kernel", "expand_scale", "expand_offset", "depthwise_kernel",
                      "depthwise_scale", "depthwise_offset", "project_kernel", "project_scale",
                      "project_offset"],
         meta_fields=["stride", "padding", "depthwise_impl", "project_activation", "shortcut"])
@dataclasses.dataclass(frozen=True)
class SplitBlock:
    """One bottleneck's weights with BatchNorm as per-channel scale/offset (eval mode).

    ``expand_kernel`` is ``None`` for a block without expansion (t = 1): its depthwise then reads
    the input channels directly.
    """

    expand_kernel: Array | None  # (C_in, E)
    expand_scale: Array | None  # (E,)
    expand_offset: Array | None  # (E,)
    depthwise_kernel: Array  # (3, 3, E)
    depthwise_scale: Array  # (E,)
    depthwise_offset: Array  # (E,)
    project_kernel: Array  # (E, C_out)
    project_scale: Array  # (C_out,)
    project_offset: Array  # (C_out,)
    stride: int
    padding: str
    depthwise_impl: str
    project_activation: str
    shortcut: bool

    @property
    def expanded_channels(self) -> int:
        """The width E of the expanded tensor (the depthwise layer's channels)."""
        return self.depthwise_kernel.shape[-1]


def split_block(block: InvertedResidual) -> SplitBlock:
    """The eval-mode weights of one of our model's bottleneck blocks, ready for :func:`split_apply`.

    Blocks that receive a shortcut between expanded tensors (``residual="expansion"`` or
    ``"expansion_preact"``) or hold one around their depthwise layer (``"inner"``) are refused: the
    split computes the plain Table 1 block only."""
    if block.expansion_shortcut or block.inner_shortcut:
        kind = "an expansion shortcut" if block.expansion_shortcut else "an inner shortcut"
        raise ValueError(f"the Section 5 split computes the plain Table 1 block; this block takes {kind}")
    if block.expansion is not None:
        expand_kernel = block.expansion.kernel[...][0, 0]
        expand_scale, expand_offset = folded_batch_norm(block.expansion.bn)
    else:
        expand_kernel = expand_scale = expand_offset = None
    dw_scale, dw_offset = folded_batch_norm(block.depthwise.bn)
    pr_scale, pr_offset = folded_batch_norm(block.projection.bn)
    return SplitBlock(
        expand_kernel, expand_scale, expand_offset,
        block.depthwise.kernel[...][:, :, 0, :], dw_scale, dw_offset,
        block.projection.kernel[...][0, 0], pr_scale, pr_offset,
        stride=block.depthwise.stride, padding=block.depthwise.padding,
        depthwise_impl=block.depthwise.backend.kind, project_activation=block.projection.act,
        shortcut=block.bottleneck_shortcut)


def split_apply(block: SplitBlock, x: Array, k: int) -> Array:
    """The block's output computed over ``k`` slices of its expanded channels (one at a time).

    ``k`` must divide the expansion width. ``k = 1`` is the ordinary evaluation."""
    width = block.expanded_channels
    if k < 1 or width % k:
        raise ValueError(f"k={k} does not divide the expansion width {width}")
    c = width // k

    def cut(array: Array, i: Array, axis: int = -1) -> Array:
        """Slice i (channels i*c .. i*c + c) of ``array`` along ``axis``: read in place, no copy
        of the weights is made (a stacked/transposed copy would cost more than it saves on the
        7x7 blocks, whose weights outweigh their activations)."""
        return jax.lax.dynamic_slice_in_dim(array, i * c, c, axis)

    def one_slice(i: Array, acc: Array) -> Array:
        if block.expand_kernel is not None:
            h = jnp.dot(x, cut(block.expand_kernel, i))
            h = jax.nn.relu6(h * cut(block.expand_scale, i) + cut(block.expand_offset, i))
        else:  # no expansion: slice i of the "expanded" tensor is slice i of the input
            h = cut(x, i)
        h = depthwise_conv(h, cut(block.depthwise_kernel, i)[:, :, None, :], stride=block.stride,
                           padding=block.padding, impl=block.depthwise_impl)
        h = jax.nn.relu6(h * cut(block.depthwise_scale, i) + cut(block.depthwise_offset, i))
        return acc + jnp.dot(h, cut(block.project_kernel, i, axis=0))

    n, height, wid, _ = x.shape
    out_hw = (-(-height // block.stride), -(-wid // block.stride))
    acc = jnp.zeros((n, *out_hw, block.project_kernel.shape[1]), x.dtype)
    acc = jax.lax.fori_loop(0, k, one_slice, acc)
    y = activation(block.project_activation)(acc * block.project_scale + block.project_offset)
    return y + x if block.shortcut else y


def compiled_temp_bytes(fn: Callable[..., Any], *args: Any) -> int:
    """Peak temporary buffer bytes XLA allocates for ``jax.jit(fn)(*args)`` (its compiled
    memory analysis; arguments and outputs are not included)."""
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)
