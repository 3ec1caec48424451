"""The Section 5 lower bounds on MobileNetV2's inference memory, in bytes, for a batch and an
activation width (Table 3 counts 16-bit activations of one image; the fused float32 kernels are
measured against 4 bytes).

Two bounds over the tensors that Section 5 must materialise
(:func:`manifold_lab.costs.tables.materialised_tensors_v2`): the largest one (Table 3's figure),
and the largest sum of two consecutive ones, a block's input and output, which are both alive
while the block runs (the input is read to the end, and the output is written from the start).
Pure Python: no JAX.
"""

from __future__ import annotations

import dataclasses

from manifold_lab.costs.tables import materialised_tensors_v2
from manifold_lab.models.config import MobileNetV2Config


@dataclasses.dataclass(frozen=True)
class MemoryBounds:
    """Bytes of the largest materialised tensor and of the largest input + output pair."""

    largest_tensor: str
    largest_bytes: int
    pair: tuple[str, str]
    pair_bytes: int


def memory_bounds(config: MobileNetV2Config, resolution: int, batch: int = 1,
                  bytes_per_activation: int = 4) -> MemoryBounds:
    """The two Section 5 bounds of ``config`` at ``resolution`` px for ``batch`` images."""
    tensors = materialised_tensors_v2(config, resolution)
    scale = batch * bytes_per_activation
    largest = max(tensors, key=lambda t: t.elements)
    first, second = max(zip(tensors, tensors[1:]), key=lambda p: p[0].elements + p[1].elements)
    return MemoryBounds(largest.name, largest.elements * scale, (first.name, second.name),
                        (first.elements + second.elements) * scale)
