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
from manifold_lab.models.config import DEPTHWISE_IMPLS
from manifold_lab.models.convolution import (IM2COL_MAX_DEPTH, im2col_conv, pointwise_conv, shift_depthwise,
                                             xla_conv)
from manifold_lab.models.geometry import spatial_pads
from manifold_lab.native.ops import (bn_act_depthwise_train, fused_inference_depthwise, native_conv,
                                     native_depthwise)

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

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"backend kind must be one of {', '.join(KINDS)}; got {self.kind!r}")

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


def backend_for(impl: str, platform: str | None = None) -> KernelBackend:
    """The backend that ``depthwise_impl=impl`` means on ``platform`` (default: JAX's default
    backend): ``auto`` -> ``native`` on CPU (``shift`` where the native kernels cannot be built),
    ``xla`` elsewhere; the explicit kinds unchanged (``native`` raises off the CPU or where the
    native kernels cannot be built)."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise_impl must be auto, xla, shift or native; got {impl!r}")
    platform = jax.default_backend() if platform is None else platform
    if impl == "auto":
        if platform != "cpu":
            return KernelBackend("xla")
        return KernelBackend("native" if native.available() else "shift")
    if impl == "native":
        if platform != "cpu":
            raise ValueError("depthwise_impl='native' runs on the CPU backend only; use auto or xla")
        if not native.available():
            raise ValueError(f"depthwise_impl='native' is unavailable: {native.unavailable_reason()}")
    return KernelBackend(impl)
