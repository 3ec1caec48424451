"""Kernel backends: how a network's convolutions and BatchNorms are computed, resolved once from the
config's ``depthwise_impl`` by :func:`backend_for` and handed to every layer.

Kinds (:data:`KINDS`):

- ``xla``: the depthwise convolution by XLA's grouped convolution; everything in pure JAX.
- ``shift``: the depthwise convolution in the pure-JAX shift form
  (:func:`manifold_lab.models.convolution.shift_depthwise`), several times faster on XLA:CPU.
- ``native``: the C++ kernels of :mod:`manifold_lab.native` for float32 tensors (the depthwise
  convolution, the stem's convolution, BatchNorm's training reductions), with BatchNorm and
  activations folded into the depthwise kernels; other dtypes take the ``shift`` form and pure JAX.

``auto`` resolves to ``native`` on the CPU backend where the native kernels build (a C++ compiler
is installed), else ``shift``; to ``xla`` on GPU/TPU.

Blocks (``block_impl``, resolved into :attr:`KernelBackend.blocks`): a MobileNetV2
inverted-residual block runs layer by layer (``plain``) or, with the native kind, by the fused
block kernels (``fused``), which never write the expanded tensor out: in inference one call
(:func:`manifold_lab.native.ops.fused_inference_block`), in training the recomputing passes of
:func:`manifold_lab.native.block_train.fused_train_block`. ``auto`` fuses the blocks whose shape
:func:`fused_block_is_faster` names, on the CPU where the kernels build (AVX-512), and runs the
others, and every block on GPU/TPU, plain. ``capture`` always takes the plain path, as do blocks
whose shortcut reads the expanded tensor (``residual`` an expansion stream) and, in training, the
t = 1 block.

Dense convolutions are the same in every kind except the native stem: 1x1 stride-1 as a matmul,
few input channels (k * k * C_in <= ``IM2COL_MAX_DEPTH``) by im2col, others by XLA (see
:mod:`manifold_lab.models.convolution`).

Folding: a layer whose output only a depthwise layer reads (the network knows which) asks
:meth:`KernelBackend.bn_act` for it with ``foldable=True``. The native backend then returns a
:class:`DeferredBN` (the raw convolution output, BatchNorm and activation still to apply), which
:meth:`KernelBackend.depthwise_bn_act` applies inside its kernel, so the tensor is never written
out; the other kinds apply them at once. Recording an intermediate (``capture``) goes through
:meth:`KernelBackend.observe`, which computes a deferred tensor on the side, so that recording
never changes the arithmetic of the forward pass.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from manifold_lab import native
from manifold_lab.models.activations import activation_spec
from manifold_lab.models.batchnorm import (batch_norm_act, bn_stats, folded_batch_norm, input_map,
                                           update_running_stats)
from manifold_lab.models.config import BLOCK_IMPLS, DEPTHWISE_IMPLS
from manifold_lab.models.convolution import (IM2COL_MAX_DEPTH, im2col_conv, pointwise_conv, shift_depthwise,
                                             xla_conv)
from manifold_lab.models.geometry import spatial_pads
from manifold_lab.native.block_train import fused_train_block
from manifold_lab.native.ops import (bn_act_depthwise_train, fused_inference_block, fused_inference_depthwise,
                                     native_conv, native_depthwise)

Array = jax.Array

#: The resolved backend kinds (also the explicit ``depthwise_impl`` choices besides ``auto``).
KINDS: tuple[str, ...] = tuple(impl for impl in DEPTHWISE_IMPLS if impl != "auto")


@dataclasses.dataclass(frozen=True)
class DeferredBN:
    """A convolution's raw output ``raw`` whose BatchNorm ``bn`` and activation ``act`` are still to
    apply: the native backend hands it to the depthwise layer that reads it, which applies them
    inside its kernel (in training from the batch statistics of ``raw``)."""

    raw: Array
    bn: nnx.BatchNorm
    act: str


@dataclasses.dataclass(frozen=True)
class KernelBackend:
    """One resolved kind (:data:`KINDS`): the arithmetic of every convolution and BatchNorm of a
    network (see the module docstring). Make it with :func:`backend_for`, which checks that the
    kind can run here."""

    kind: str
    blocks: str = "plain"  # a BLOCK_IMPLS choice; fused or auto with the native kind only

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"backend kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.blocks not in BLOCK_IMPLS or (self.blocks != "plain" and self.kind != "native"):
            raise ValueError(f"fused blocks need the native kind; got blocks={self.blocks!r} with {self.kind!r}")

    def native_for(self, x: Array) -> bool:
        """Whether ``x`` goes through the native kernels: the native kind and float32."""
        return self.kind == "native" and x.dtype == jnp.float32

    def conv(self, x: Array, kernel: Array, *, stride: int, padding: str) -> Array:
        """A dense convolution of NHWC ``x`` with the HWIO ``kernel``, without bias."""
        k = kernel.shape[0]
        if k == 1 and stride == 1:
            return pointwise_conv(x, kernel)
        pads = spatial_pads(x.shape, k, stride, padding)
        if k * k * x.shape[-1] <= IM2COL_MAX_DEPTH:
            if self.native_for(x):
                return native_conv(x, kernel, stride, pads)
            return im2col_conv(x, kernel, stride, pads)
        return xla_conv(x, kernel, stride, pads)

    def depthwise(self, x: Array, kernel: Array, *, stride: int = 1, padding: str = "same") -> Array:
        """Depthwise convolution of NHWC ``x`` with an HWIO kernel of shape ``(k, k, 1, C)``."""
        k, channels = kernel.shape[0], x.shape[-1]
        if kernel.shape != (k, k, 1, channels):
            raise ValueError(f"depthwise kernel must be ({k}, {k}, 1, {channels}), got {kernel.shape}")
        pads = spatial_pads(x.shape, k, stride, padding)
        if self.kind == "xla":
            return xla_conv(x, kernel, stride, pads, groups=channels)
        if self.native_for(x) and kernel.dtype == jnp.float32:
            return native_depthwise(x, kernel[:, :, 0, :], stride, pads)
        return shift_depthwise(x, kernel[:, :, 0, :], stride, pads)

    def bn_act(self, bn: nnx.BatchNorm, x: Array, train: bool, act: str, *,
               foldable: bool = False) -> Array | DeferredBN:
        """``act(bn(x))`` (training: batch statistics, running averages updated). ``foldable``: only
        a depthwise layer (:meth:`depthwise_bn_act`) reads the result, so the backend may defer it."""
        if foldable and self.native_for(x):
            return DeferredBN(x, bn, act)
        return batch_norm_act(bn, x, train, act, self.native_for(x))

    def depthwise_bn_act(self, x: Array | DeferredBN, kernel: Array, *, stride: int, padding: str,
                         bn: nnx.BatchNorm, act: str, train: bool) -> Array:
        """``act(bn(depthwise(x)))``, a deferred input's BatchNorm and activation applied first."""
        source = x.raw if isinstance(x, DeferredBN) else x
        if not train and self.native_for(source):
            in_bn, in_act = (x.bn, x.act) if isinstance(x, DeferredBN) else (None, "linear")
            return fused_inference_depthwise(source, kernel, stride=stride, padding=padding, out_bn=bn,
                                             out_act=act, in_bn=in_bn, in_act=in_act)
        if isinstance(x, DeferredBN):
            pads = spatial_pads(source.shape, kernel.shape[0], stride, padding)
            y, mean, var = bn_act_depthwise_train(source, kernel[:, :, 0, :], x.bn.scale[...], x.bn.bias[...],
                                                  x.bn.epsilon, x.act, stride, pads)
            update_running_stats(x.bn, mean, var)
        else:
            y = self.depthwise(x, kernel, stride=stride, padding=padding)
        return self.bn_act(bn, y, train, act)

    def fuses_block(self, x: Array | DeferredBN, train: bool = False) -> bool:
        """Whether an inverted-residual block with input ``x`` runs fused: :attr:`blocks` ``fused``,
        or ``auto`` where the fused kernels are faster at this shape (:func:`fused_block_is_faster`);
        float32 only; in training only where the training kernels load and ``x`` is an array (the
        block has an expansion: the t = 1 block reads the stem's deferred output)."""
        source = x.raw if isinstance(x, DeferredBN) else x
        if self.blocks == "plain" or not self.native_for(source):
            return False
        if train and (isinstance(x, DeferredBN) or native.load("fused_block_train") is None):
            return False
        return self.blocks == "fused" or fused_block_is_faster(source.shape, train)

    def inverted_residual(self, x: Array | DeferredBN, expansion: nnx.Module | None, depthwise: nnx.Module,
                          projection: nnx.Module, shortcut: str | None, train: bool = False) -> Array:
        """A whole block by the fused kernels (see :meth:`fuses_block`): the layers are the block's
        ``ConvBN`` / ``DepthwiseBN`` modules (``expansion`` None for t = 1, whose input may be the
        stem's deferred output; in inference only); ``shortcut`` None, ``"bottleneck"`` or
        ``"inner"``. Inference: one kernel call. Training: :func:`fused_train_block` computes the raw
        projection and the batch statistics, which move the expansion's and the depthwise layer's
        running averages; the projection's BatchNorm, activation and the shortcut follow here."""
        if train:
            return self._train_inverted_residual(x, expansion, depthwise, projection, shortcut)
        deferred = isinstance(x, DeferredBN)
        source = x.raw if deferred else x
        if expansion is not None:
            expand = dict(expand_kernel=expansion.kernel[...], expand_bn=expansion.bn, expand_act=expansion.act)
        else:
            expand = dict(expand_kernel=None, expand_bn=x.bn if deferred else None,
                          expand_act=x.act if deferred else "linear")
        return fused_inference_block(source, **expand, dw_kernel=depthwise.kernel[...], dw_bn=depthwise.bn,
                                     dw_act=depthwise.act, project_kernel=projection.kernel[...],
                                     project_bn=projection.bn, project_act=projection.act,
                                     stride=depthwise.stride, padding=depthwise.padding, shortcut=shortcut)

    def _train_inverted_residual(self, x: Array, expansion: nnx.Module, depthwise: nnx.Module,
                                 projection: nnx.Module, shortcut: str | None) -> Array:
        pads = spatial_pads(x.shape, 3, depthwise.stride, depthwise.padding)
        ebn, dbn = expansion.bn, depthwise.bn  # one epsilon: the network's (config.bn_epsilon)
        p, expansion_stats, depthwise_stats = fused_train_block(
            x, expansion.kernel[...][0, 0], ebn.scale[...], ebn.bias[...], depthwise.kernel[...][:, :, 0, :],
            dbn.scale[...], dbn.bias[...], projection.kernel[...][0, 0], ebn.epsilon, (expansion.act, depthwise.act),
            depthwise.stride, pads, shortcut == "inner")
        update_running_stats(ebn, *expansion_stats)
        update_running_stats(dbn, *depthwise_stats)
        y = self.bn_act(projection.bn, p, True, projection.act)
        return y + x if shortcut == "bottleneck" else y

    def observe(self, value: Array | DeferredBN, train: bool) -> Array:
        """The tensor ``value`` stands for, to record (``capture``) without touching the forward pass:
        an array as it is; a deferred one computed on the side as the depthwise kernel applies it
        (``clamp(raw * a + b)``, BatchNorm folded into ``a, b``; training: from the batch
        statistics, running averages not updated again), outside differentiation."""
        if not isinstance(value, DeferredBN):
            return value
        raw, bn = jax.lax.stop_gradient(value.raw), value.bn
        if train:
            mean, var = bn_stats(raw, self.native_for(raw))
            a, b, _ = input_map(bn.scale[...], bn.bias[...], mean, var, bn.epsilon)
        else:
            a, b = folded_batch_norm(bn)
        a, b = jax.lax.stop_gradient((a, b))
        spec = activation_spec(value.act)
        return jnp.minimum(jnp.maximum(raw * a + b, spec.lo), spec.hi)


def _kind_for(impl: str, platform: str) -> str:
    """The kind ``depthwise_impl=impl`` resolves to on ``platform`` (see :func:`backend_for`)."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise_impl must be auto, xla, shift or native; got {impl!r}")
    if impl == "auto":
        if platform != "cpu":
            return "xla"
        return "native" if native.available() else "shift"
    if impl == "native":
        if platform != "cpu":
            raise ValueError("depthwise_impl='native' runs on the CPU backend only; use auto or xla")
        if not native.available():
            raise ValueError(f"depthwise_impl='native' is unavailable: {native.unavailable_reason()}")
    return impl


def _blocks_for(block_impl: str, kind: str) -> str:
    """The blocks ``block_impl`` resolves to with ``kind``: ``auto`` stays ``auto`` where the fused
    kernel loads (native kind), else ``plain``; ``fused`` raises where it cannot run."""
    if block_impl not in BLOCK_IMPLS:
        raise ValueError(f"block_impl must be auto, plain or fused; got {block_impl!r}")
    if block_impl == "plain":
        return "plain"
    if kind != "native":
        if block_impl == "fused":
            raise ValueError(f"block_impl='fused' needs the native kernels (depthwise_impl auto or native "
                             f"on the CPU); got the {kind} kind")
        return "plain"
    if native.load("fused_block") is None:
        if block_impl == "fused":
            raise ValueError(f"block_impl='fused' is unavailable: {native.reason('fused_block')}")
        return "plain"
    return block_impl


def backend_for(impl: str, platform: str | None = None, block_impl: str = "auto") -> KernelBackend:
    """The backend that ``depthwise_impl=impl`` and ``block_impl`` mean on ``platform`` (default:
    JAX's default backend): ``auto`` -> ``native`` on CPU (``shift`` where the native kernels
    cannot be built), ``xla`` elsewhere; the explicit kinds unchanged (``native`` raises off the
    CPU or where the native kernels cannot be built). Blocks: see the module docstring
    (``fused`` raises where the fused kernel cannot run)."""
    platform = jax.default_backend() if platform is None else platform
    kind = _kind_for(impl, platform)
    return KernelBackend(kind, _blocks_for(block_impl, kind))


#: The fused kernel expands one input row at a time, so a row must be this wide for its matrix
#: products to reuse the weights: benchmarks/fused_block.py (2 shared cores) measured 1x1 inputs
#: (32 px, batch 128, E = 960) at 0.8x the plain layers, 2x2 inputs at 1.1-1.9x, and every block
#: shape of the 224 px network at 1.1-2.9x at batch 1 and 1.1-2.2x at batch 32.
FUSED_MIN_WIDTH = 2

#: Training: the fused passes compute the expanded tiles four times (statistics, forward, two
#: backward passes), which pays only where the plain layers are bound by memory traffic: two runs
#: of the benchmark's ``--train`` table (batch 32, 224 px) measured the 112 px wide input at
#: 1.08-1.20x the plain layers, the 56 px ones at 0.98-1.19x, the 28 px ones at 0.84-1.13x and
#: the narrower ones at 0.67-0.93x.
FUSED_TRAIN_MIN_WIDTH = 56


def fused_block_is_faster(shape: tuple[int, ...], train: bool = False) -> bool:
    """Whether the fused block kernels beat the plain layers for a block whose NHWC input has this
    ``shape`` (see :data:`FUSED_MIN_WIDTH` and :data:`FUSED_TRAIN_MIN_WIDTH`)."""
    return shape[2] >= (FUSED_TRAIN_MIN_WIDTH if train else FUSED_MIN_WIDTH)
