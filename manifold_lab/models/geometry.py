"""Convolution padding geometry: integer arithmetic shared by the layers and the analytic cost model.

Pure Python (no JAX), so that :mod:`manifold_lab.costs` counts the network without importing the
code that runs it. Two conventions (``padding``):

- ``same``: TensorFlow 'SAME' (output ``ceil(size / stride)``, the odd pixel of padding at the end);
- ``symmetric``: torchvision, ``kernel // 2`` on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence

Pads = tuple[tuple[int, int], ...]


def pad_amounts(size: int, kernel: int, stride: int, padding: str) -> tuple[int, int]:
    """(low, high) padding of one spatial axis.

    ``same``: TensorFlow 'SAME' geometry (output ``ceil(size / stride)``, the odd pixel of padding
    at the end, e.g. (0, 1) for a 3x3 stride-2 conv on an even size). ``symmetric``: torchvision
    geometry, ``kernel // 2`` on both sides.
    """
    if padding == "same":
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2
    if padding == "symmetric":
        return kernel // 2, kernel // 2
    raise ValueError(f"padding must be 'same' or 'symmetric', got {padding!r}")


def output_size(size: int, kernel: int, stride: int, padding: str) -> int:
    """Spatial output size of a conv with this geometry."""
    lo, hi = pad_amounts(size, kernel, stride, padding)
    return (size + lo + hi - kernel) // stride + 1


def spatial_pads(shape: Sequence[int], kernel: int, stride: int, padding: str) -> Pads:
    """The (low, high) pads of both spatial axes of an NHWC ``shape``, as the convolutions take them."""
    return tuple(pad_amounts(n, kernel, stride, padding) for n in shape[1:3])
