"""The 3x3 depthwise convolution and its conv + BatchNorm + activation unit.

The depthwise convolution has three equivalent forms, one per kernel backend
(:mod:`manifold_lab.models.backend`): ``xla`` (XLA's grouped convolution), ``shift`` (pure-JAX
shifted multiply-adds, :func:`manifold_lab.models.convolution.shift_depthwise`) and ``native``
(C++ kernels through XLA's FFI, :mod:`manifold_lab.native`; float32 only, other dtypes take the
``shift`` form). ``auto`` is ``native`` on the CPU backend where it can be built, else ``shift``,
and ``xla`` on GPU/TPU.

All forms share the padding geometry of :func:`manifold_lab.models.geometry.pad_amounts`
(``same``: TF 'SAME'; ``symmetric``: (1, 1)). Kernels are stored HWIO as ``(3, 3, 1, C)``, the
layout of a grouped convolution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from manifold_lab.models.backend import KINDS, DeferredBN, KernelBackend, backend_for
from manifold_lab.models.layers import he_normal

Array = jax.Array

#: The depthwise forms (the backend kinds).
DEPTHWISE_FORMS: tuple[str, ...] = KINDS


def resolve_impl(impl: str) -> str:
    """The form ``depthwise_impl=impl`` runs as here: the kind of :func:`backend_for`'s backend."""
    return backend_for(impl).kind


def depthwise_conv(x: Array, kernel: Array, *, stride: int = 1, padding: str = "same",
                   impl: str | KernelBackend = "auto") -> Array:
    """Depthwise convolution of NHWC ``x`` with an HWIO kernel of shape ``(k, k, 1, C)``, in the form
    of ``impl`` (a ``depthwise_impl`` choice, or a resolved backend)."""
    backend = impl if isinstance(impl, KernelBackend) else backend_for(impl)
    return backend.depthwise(x, kernel, stride=stride, padding=padding)


class DepthwiseBN(nnx.Module):
    """3x3 depthwise convolution without bias, BatchNorm, then an activation (ReLU6 by default),
    computed by ``backend`` (default: ``backend_for("auto")``)."""

    def __init__(self, channels: int, *, stride: int = 1, padding: str = "same",
                 backend: KernelBackend | None = None, act: str = "relu6", bn_epsilon: float = 1e-3,
                 bn_decay: float = 0.997, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs) -> None:
        self.stride = stride
        self.padding = padding
        self.backend = backend if backend is not None else backend_for("auto")
        self.act = act
        self.dtype = jnp.dtype(dtype)
        # He normal with the per-channel fan (9 taps) of a depthwise filter.
        self.kernel = nnx.Param(he_normal(rngs.params(), (3, 3, 1, channels), fan=9))
        self.bn = nnx.BatchNorm(channels, momentum=bn_decay, epsilon=bn_epsilon,
                                dtype=self.dtype, rngs=rngs)

    def __call__(self, x: Array | DeferredBN, train: bool) -> Array:
        """``act(bn(depthwise(x)))``; ``x`` may be the previous layer's deferred output (its BatchNorm
        and activation then applied inside the depthwise kernel)."""
        return self.backend.depthwise_bn_act(x, self.kernel[...].astype(self.dtype), stride=self.stride,
                                             padding=self.padding, bn=self.bn, act=self.act, train=train)
