"""The activations by config name: the one table that the layers, BatchNorm's hand-written gradient
and the native kernels all read.

Every activation here is a clamp ``min(max(x, lo), hi)``: ``linear`` (the paper's linear
bottleneck) with no bounds, ``relu`` at 0 and ``relu6`` at 0 and 6. The clamp bounds are what the
native kernels apply when they fold an activation in; the open interval ``(lo, hi)`` is where the
activation passes gradient (JAX's convention at the kinks: 0).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax

Array = jax.Array


def _identity(x: Array) -> Array:
    return x


@dataclasses.dataclass(frozen=True)
class Activation:
    """One activation: its JAX function and its clamp bounds."""

    name: str
    fn: Callable[[Array], Array]
    lo: float
    hi: float

    @property
    def gradient_interval(self) -> tuple[float, float] | None:
        """The open interval where the gradient passes; None where it passes everywhere."""
        if self.lo == -math.inf and self.hi == math.inf:
            return None
        return self.lo, self.hi


ACTIVATIONS: dict[str, Activation] = {
    "linear": Activation("linear", _identity, -math.inf, math.inf),
    "relu": Activation("relu", jax.nn.relu, 0.0, math.inf),
    "relu6": Activation("relu6", jax.nn.relu6, 0.0, 6.0),
}


def activation_spec(name: str) -> Activation:
    """The :class:`Activation` called ``name`` (``linear``, ``relu`` or ``relu6``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}") from None


def activation(name: str) -> Callable[[Array], Array]:
    """The activation function called ``name`` (``linear``, ``relu`` or ``relu6``)."""
    return activation_spec(name).fn
