"""MobileNetV2 (Sandler et al. 2018) in Flax NNX, built from the decoded stage table of
:class:`manifold_lab.models.config.MobileNetV2Config`, with the Section 6.4 ablation switches.

Network: 3x3 conv (stride ``config.stem_stride``) + BN + ReLU6 -> 17 bottleneck blocks
(``config.blocks()``) -> 1x1 conv to ``config.head_channels`` + BN + ReLU6 -> global average pool
-> dropout (drop probability ``config.dropout_rate``) -> dense classifier. Convolutions have no
bias (BatchNorm follows each). The ``small`` layout (28-32 px inputs) runs the stem and the first
stride-2 stage at stride 1, so 32 px ends at 4x4 and 28 px at 4x4 (``same`` padding); ``stem1``
runs only the stem at stride 1 and ``bneck1`` only that stage (28 px ends at 2x2 with either).

Block i (input x_i, spec ``config.blocks()[i]``), Table 1::

    z_i     = BN(x_i @ W_expand)                 # the expansion's pre-activation
              (+ z_{i-1}  under residual="expansion_preact", see below)
    a_i     = ReLU6(z_i)                         # absent when t = 1: a_i = x_i
    e_i     = a_i  (+ e_{i-1}  under residual="expansion", see below)
    d_i     = ReLU6(BN(depthwise3x3_stride_s(e_i)))  (+ e_i  under residual="inner", see below)
    p_i     = act(BN(d_i @ W_project))           # act = config.bottleneck_activation
    x_{i+1} = p_i  (+ x_i  under residual="bottleneck" where spec.bottleneck_shortcut)

``bottleneck_activation``: ``linear`` (the paper's linear bottleneck), ``relu6`` or ``relu``,
applied after the projection's BatchNorm and before the residual add (TF-Slim's
``project_activation_fn``, Fig. 6a).

``residual`` (Fig. 6b; ``expansion_preact`` and ``inner`` are further readings of the paper's
"shortcuts connecting the expanded layers", about which the paper says nothing more). Every
placement has the same layers, parameters and multiply-adds (an add is not a multiply-add):

- ``bottleneck`` (paper): identity shortcut from the block input to the block output where
  the stride is 1 and the depths match (10 blocks of the 224 px network)::

      x_i --> expand --> e_i --> dw --> project --(+)--> x_{i+1}
       |                                          ^
       +------------------------------------------+

- ``expansion`` ("shortcut between expanded layers"): the same layers, parameters and
  multiply-adds, re-cut so that the residual stream runs through the *expanded* tensors (the
  depthwise inputs, taken after the expansion's ReLU6). For every block index i in
  ``config.expansion_shortcuts()``, i.e. blocks i-1 and i both have an expansion conv, block i-1
  has stride 1 and both expanded widths are equal (so the tensors have the same shape),
  ``e_i = a_i + e_{i-1}``; ``e_{i-1}`` already includes its own shortcut, so the sums chain like
  an ordinary residual stream. There are no shortcuts between bottlenecks. The residual branch is
  thus ``dw -> project -> expand`` (a non-inverted block: wide -> narrow -> wide)::

      e_{i-1} --> dw --> project --> x_i --> expand --> a_i --(+)--> e_i --> dw --> ...
         |                                                 ^
         +-------------------------------------------------+

  At 224 px and width 1 this gives 10 shortcuts, at blocks 3, 5, 6, 8, 9, 10, 12, 13, 15, 16.

- ``expansion_preact`` (pre-activation stream between expanded layers): the block pairs of
  ``expansion`` (``config.expansion_shortcuts()``), with the add moved before the expansion's
  ReLU6. The stream carries the expansion's pre-activation sum z_i (after the expansion's
  BatchNorm, before its ReLU6): for i in ``config.expansion_shortcuts()``
  ``z_i = BN(x_i @ W_expand) + z_{i-1}``, for the other blocks with an expansion
  ``z_i = BN(x_i @ W_expand)``, and every block's depthwise takes ``e_i = ReLU6(z_i)``. Block i
  passes z_i on, not e_i, so no ReLU6 clips the stream itself: it is an unbounded sum of
  BatchNorm outputs that each block reads through its own ReLU6 (as in a pre-activation ResNet,
  He et al. 2016), where under ``expansion`` the stream is a sum of ReLU6 outputs, in [0, 6k]
  after k terms. No shortcuts between bottlenecks::

      z_{i-1} --> ReLU6 --> dw --> project --> x_i --> expand --> BN --(+)--> z_i --> ReLU6 --> ...
         |                                                              ^
         +--------------------------------------------------------------+

- ``inner``: a shortcut inside every block with stride 1 and an expansion conv
  (``config.inner_shortcuts()``), from the expansion output to the depthwise output, both after
  their ReLU6: ``d_i = ReLU6(BN(dw(e_i))) + e_i`` (the shapes match: the depthwise keeps the
  channels and stride 1 the spatial size); the projection reads this d_i. There are no
  bottleneck shortcuts and no shortcuts between blocks, so, like ``expansion``, it is a pure
  alternative placement: each shortcut skips the depthwise layer alone, inside the expanded
  space, and the expansions and projections of all blocks stay on every path through the network
  (no stream chains from block to block). The stride-2 blocks and the t = 1 block have none::

      x_i --> expand --> e_i --> dw --(+)--> d_i --> project --> x_{i+1}
                          |          ^
                          +----------+

  At 224 px and width 1 this gives 12 shortcuts, at blocks 2, 4, 5, 7, 8, 9, 10, 11, 12, 14,
  15, 16.

- ``none``: no shortcuts at all.

Intermediates (``capture=True``), in forward order:
``stem`` (after the stem's ReLU6); for every block, under ``residual="expansion_preact"`` and where
the block has an expansion, ``block{i:02d}/preactivation`` (z_i: the stream, after the shortcut
add); ``block{i:02d}/expansion`` (e_i: the depthwise input, after the expansion's ReLU6 and, under
``residual="expansion"``, after the shortcut add; ReLU6(z_i) under ``expansion_preact``; the block
input for the t = 1 block), ``block{i:02d}/depthwise`` (d_i: the projection input, after the
depthwise's ReLU6 and, under ``residual="inner"``, after the shortcut add),
``block{i:02d}/projection`` (x_{i+1}: the block output after the bottleneck activation and the
shortcut add); ``head`` (after the last 1x1 conv's ReLU6), ``pooled`` (float32 global average),
``logits``. (The dict is in this order when the model is called directly; a dict returned through
``jax.jit`` and other transformations comes back with sorted keys.) Capturing records the
tensors of the very forward pass that computes the logits: where the kernel backend folds a
BatchNorm and activation into the next depthwise kernel (so that e_i, or the stem output, is
never written out), the recorded tensor is computed on the side (see
:meth:`~manifold_lab.models.backend.KernelBackend.observe`), and the logits are the same with and
without ``capture`` under ``block_impl="plain"``.

Fused blocks (``block_impl``, :mod:`manifold_lab.models.backend`): without ``capture``, the native
backend may compute a whole block (expansion, depthwise, projection, BatchNorms, activations, the
bottleneck or inner shortcut) by kernels that keep e_i in cache-sized tiles: in inference one call,
in training passes that recompute the tiles (the t = 1 block excepted); ``capture`` needs e_i and
d_i, so it runs every block layer by layer, and its logits then equal the fused ones up to float32
rounding (the kernels apply each BatchNorm as a per-channel scale and bias, and sum in another
order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from manifold_lab.models.activations import activation
from manifold_lab.models.backend import DeferredBN, KernelBackend, backend_for
from manifold_lab.models.config import EXPANSION_STREAMS, BlockSpec, MobileNetV2Config
from manifold_lab.models.depthwise import DepthwiseBN
from manifold_lab.models.layers import Classifier, ConvBN, check_call

Array = jax.Array


class InvertedResidual(nnx.Module):
    """One bottleneck block: optional 1x1 expansion, 3x3 depthwise, 1x1 projection (see module doc).

    ``backend``: the network's kernel backend (default: resolved from ``config.depthwise_impl``)."""

    def __init__(self, spec: BlockSpec, config: MobileNetV2Config, *, expansion_shortcut: bool,
                 rngs: nnx.Rngs, backend: KernelBackend | None = None) -> None:
        backend = backend if backend is not None else backend_for(config.depthwise_impl,
                                                                  block_impl=config.block_impl)
        common = dict(bn_epsilon=config.bn_epsilon, bn_decay=config.bn_decay,
                      dtype=jnp.dtype(config.compute_dtype), backend=backend, rngs=rngs)
        self.backend = backend
        self.index = spec.index
        self.bottleneck_shortcut = config.residual == "bottleneck" and spec.bottleneck_shortcut
        self.expansion_shortcut = expansion_shortcut  # receives the stream of block i-1
        self.passes_stream = config.residual in EXPANSION_STREAMS  # block i+1 may read e_i (or z_i)
        self.preactivation_stream = config.residual == "expansion_preact"  # the stream carries z_i
        self.inner_shortcut = config.residual == "inner" and spec.index in config.inner_shortcuts()
        # a shortcut may read e_i (or z_i) besides the depthwise layer (every block of an expansion
        # stream, a block with an inner shortcut): the expansion's output is then not foldable
        self.keep_expanded = config.residual in EXPANSION_STREAMS or self.inner_shortcut
        self.expansion = (ConvBN(spec.in_channels, spec.expanded_channels, act="relu6", **common)
                          if spec.has_expansion else None)
        self.depthwise = DepthwiseBN(spec.expanded_channels, stride=spec.stride, padding=config.padding,
                                     act="relu6", **common)
        self.projection = ConvBN(spec.expanded_channels, spec.out_channels,
                                 act=config.bottleneck_activation, **common)

    @property
    def input_feeds_depthwise_only(self) -> bool:
        """Whether the depthwise layer is the only reader of the block input: no expansion, and no
        shortcut that reads the input (which is then also e_i)."""
        return (self.expansion is None and not self.bottleneck_shortcut and not self.expansion_shortcut
                and not self.keep_expanded)

    def fused(self, x: Array | DeferredBN, train: bool, capture: bool) -> Array | None:
        """The block output by the fused block kernels where the backend fuses this block
        (:meth:`~manifold_lab.models.backend.KernelBackend.fuses_block`: without ``capture``, no
        expansion stream, whose shortcut reads e_i, and in training a block with an expansion);
        None otherwise."""
        if capture or self.passes_stream or (train and self.expansion is None):
            return None
        if not self.backend.fuses_block(x, train):
            return None
        shortcut = "bottleneck" if self.bottleneck_shortcut else ("inner" if self.inner_shortcut else None)
        return self.backend.inverted_residual(x, self.expansion, self.depthwise, self.projection, shortcut, train)

    def expand(self, x: Array | DeferredBN, prev_stream: Array | None, train: bool
               ) -> tuple[Array | DeferredBN, Array | None]:
        """(e_i, the stream tensor passed on to block i+1) from the block input x_i and block
        i-1's stream tensor: (e_i, e_i) with e_i = a_i [+ e_{i-1}]; under the pre-activation
        stream (ReLU6(z_i), z_i) with z_i = BN(x_i @ W_expand) [+ z_{i-1}]; (x_i, x_i) without an
        expansion (t = 1). The bracketed add where the block receives a shortcut; the stream is
        None where no block reads it (``residual`` not an expansion stream)."""
        if self.expansion is None:
            e = x
        elif self.preactivation_stream:
            z = self.expansion.preactivation(x, train)
            if self.expansion_shortcut:
                z = z + prev_stream
            return activation(self.expansion.act)(z), z
        else:
            e = self.expansion(x, train, foldable=not self.keep_expanded)
            if self.expansion_shortcut:
                e = e + prev_stream
        return e, (e if self.passes_stream else None)

    def __call__(self, x: Array | DeferredBN, prev_stream: Array | None, train: bool,
                 acts: dict[str, Array] | None = None) -> tuple[Array, Array | None]:
        """Returns (block output x_{i+1}, stream tensor): the stream tensor is e_i, or z_i under
        ``residual="expansion_preact"``; ``prev_stream`` is block i-1's. ``x`` may be the stem's
        deferred output where :attr:`input_feeds_depthwise_only`. With ``acts``, the block's
        intermediates are recorded into it. In inference without ``acts`` the backend may run the
        whole block as one fused kernel call (:meth:`fused`)."""
        fused = self.fused(x, train, acts is not None)
        if fused is not None:
            return fused, None
        e, stream = self.expand(x, prev_stream, train)  # 1x1 expansion + BN + ReLU6 [+ stream]
        d = self.depthwise(e, train)  # 3x3 depthwise + BN + ReLU6
        if self.inner_shortcut:
            d = d + e
        y = self.projection(d, train)  # 1x1 projection + BN + bottleneck activation
        if self.bottleneck_shortcut:
            y = y + x
        if acts is not None:
            name = f"block{self.index:02d}"
            if self.preactivation_stream and self.expansion is not None:
                acts[f"{name}/preactivation"] = stream
            acts[f"{name}/expansion"] = self.backend.observe(e, train)
            acts[f"{name}/depthwise"] = d
            acts[f"{name}/projection"] = y
        return y, stream


class MobileNetV2(nnx.Module):
    """MobileNetV2 with the switches of :class:`MobileNetV2Config` (see the module docstring)."""

    def __init__(self, config: MobileNetV2Config, *, rngs: nnx.Rngs) -> None:
        self.config = config
        self.backend = backend_for(config.depthwise_impl, block_impl=config.block_impl)
        common = dict(bn_epsilon=config.bn_epsilon, bn_decay=config.bn_decay,
                      dtype=jnp.dtype(config.compute_dtype), backend=self.backend, rngs=rngs)
        self.stem = ConvBN(config.in_channels, config.stem_out, kernel_size=3, stride=config.stem_stride,
                           padding=config.padding, act="relu6", **common)
        shortcuts = set(config.expansion_shortcuts()) if config.residual in EXPANSION_STREAMS else set()
        self.blocks = nnx.List([
            InvertedResidual(spec, config, expansion_shortcut=spec.index in shortcuts, rngs=rngs,
                             backend=self.backend)
            for spec in config.blocks()
        ])
        last = config.blocks()[-1].out_channels
        self.head = ConvBN(last, config.head_channels, act="relu6", **common)
        self.classifier = Classifier(config.head_channels, config.num_classes,
                                     dropout_rate=config.dropout_rate, rngs=rngs)

    def __call__(self, x: Array, train: bool = False, dropout_key: Array | None = None,
                 capture: bool = False) -> Array | tuple[Array, dict[str, Array]]:
        """Logits (float32, ``[N, num_classes]``) of NHWC images ``x``; with ``capture=True`` also
        the ordered dict of named intermediates. ``train=True`` normalises with batch statistics,
        updates the running averages and applies dropout (which needs ``dropout_key``)."""
        check_call(x, self.config.in_channels, train, self.config.dropout_rate, dropout_key)
        acts: dict[str, Array] | None = {} if capture else None
        x = x.astype(jnp.dtype(self.config.compute_dtype))
        h = self.stem(x, train, foldable=self.blocks[0].input_feeds_depthwise_only)
        if acts is not None:
            acts["stem"] = self.backend.observe(h, train)
        stream = None
        for block in self.blocks:
            h, stream = block(h, stream, train, acts)
        h = self.head(h, train)
        pooled = self.classifier.pool(h)
        logits = self.classifier(pooled, train, dropout_key).astype(jnp.float32)
        if acts is None:
            return logits
        acts["head"] = h
        acts["pooled"] = pooled
        acts["logits"] = logits
        return logits, acts
