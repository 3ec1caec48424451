"""Per-layer invertibility audits as numbers, without JAX: what ``audit.json`` and the ``appendix_a``
measurement hold and what the report and the plots read back.

One audited bottleneck block is the JSON object of
:meth:`manifold_lab.invertibility.BlockAudit.to_dict` (written by the JAX side); this module reads
it as a :class:`BlockRecord` so that rendering never imports the core module or JAX. The fields:
block ``index``, ``stride``, ``in_channels``, ``out_channels``, ``expanded_channels`` (None without
an expansion conv), ``pixels`` (images x height x width of the expansion output),
``invertible_share`` (share of pixels where Lemma 2's condition holds: the active units of the
expansion's BatchNorm-folded 1x1 map have rank ``in_channels``), ``below_threshold_share`` (share
with fewer active units than ``in_channels``), ``active_histogram`` (pixels by number of active
units, 0..expanded width), ``sigma_min_p05`` / ``sigma_min_median`` (smallest singular value of the
active rows relative to the map's largest, 5th percentile and median over pixels),
``decoder_ev`` (test explained variance of the best ridge decoder of the block input from the
block output) and ``clipped_share`` (share of the projection's outputs at a clip of the bottleneck
activation). The Lemma 2 fields are None for a block without expansion, ``decoder_ev`` when no
decoder was fitted, ``clipped_share`` for a linear bottleneck.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Block outputs with more values than this get no decoder (the ridge fit is quadratic in them).
MAX_DECODER_FEATURES = 4096
#: Share of pixels at which Lemma 2's condition must hold for a layer to count as invertible.
HOLDS_SHARE = 0.99

_OPTIONAL_FLOATS = ("invertible_share", "below_threshold_share", "sigma_min_p05", "sigma_min_median",
                    "decoder_ev", "clipped_share")


def whole_batches(images: np.ndarray, batch_size: int) -> np.ndarray:
    """The first images of ``images`` that fill equal batches of ``min(batch_size, len(images))``:
    what :func:`manifold_lab.invertibility.audit_model` looks at (it drops a remainder to keep
    shapes static), so that the counts recorded are the counts audited."""
    batch = max(1, min(batch_size, len(images)))
    return images[:len(images) // batch * batch]


def _percentile(histogram: np.ndarray, q: float) -> float:
    """The ``q``-th percentile (lower value) of the values ``k`` repeated ``histogram[k]`` times."""
    cumulative = np.cumsum(histogram)
    return float(np.searchsorted(cumulative, q / 100.0 * (cumulative[-1] - 1), side="right"))


@dataclasses.dataclass(frozen=True, eq=False)
class BlockRecord:
    """One audited block as read from JSON (see the module docstring for the fields)."""

    index: int
    stride: int
    in_channels: int
    out_channels: int
    expanded_channels: int | None
    pixels: int
    invertible_share: float | None
    below_threshold_share: float | None
    active_histogram: np.ndarray | None
    sigma_min_p05: float | None
    sigma_min_median: float | None
    decoder_ev: float | None
    clipped_share: float | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BlockRecord:
        """A block from its JSON object; ``ValueError`` when a field is missing or inconsistent."""
        try:
            optional = {k: None if data[k] is None else float(data[k]) for k in _OPTIONAL_FLOATS}
            expanded = None if data["expanded_channels"] is None else int(data["expanded_channels"])
            hist = data["active_histogram"]
            record = cls(int(data["index"]), int(data["stride"]), int(data["in_channels"]),
                         int(data["out_channels"]), expanded, int(data["pixels"]),
                         active_histogram=None if hist is None else np.asarray(hist, dtype=np.int64), **optional)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad block record: {exc.__class__.__name__}: {exc}") from None
        hist = record.active_histogram
        if hist is not None and (expanded is None or hist.shape != (expanded + 1,) or int(hist.sum()) != record.pixels):
            raise ValueError(f"bad block record {record.index}: the active histogram does not fit the block")
        return record

    @property
    def expanded(self) -> bool:
        """Whether the block has an expansion conv (Lemma 2 concerns only these)."""
        return self.expanded_channels is not None and self.invertible_share is not None

    @property
    def threshold_fraction(self) -> float | None:
        """The invertibility threshold (input width) as a fraction of the expanded width."""
        return None if not self.expanded_channels else self.in_channels / self.expanded_channels

    def active_percentiles(self, qs: Sequence[float]) -> list[float]:
        """Percentiles ``qs`` of the fraction of active units over pixels (expanded blocks only)."""
        if self.active_histogram is None or not self.expanded_channels:
            raise ValueError(f"block {self.index} has no active-unit histogram")
        return [_percentile(self.active_histogram, q) / self.expanded_channels for q in qs]


def read_blocks(raw: Any) -> list[BlockRecord]:
    """The blocks of a JSON list of block objects; ``ValueError`` when malformed or empty."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("expected a non-empty list of block records")
    return [BlockRecord.from_json(b) for b in raw]


def expanded_blocks(blocks: Sequence[BlockRecord]) -> list[BlockRecord]:
    """The blocks with an expansion conv, in network order."""
    return [b for b in blocks if b.expanded]


def pooled_share(per_network: Sequence[Sequence[BlockRecord]], field: str = "invertible_share") -> list[float]:
    """Per expanded layer, ``field`` pooled over networks of one architecture (pixel-weighted)."""
    layers = [expanded_blocks(blocks) for blocks in per_network]
    return [float(sum(getattr(b, field) * b.pixels for b in column) / sum(b.pixels for b in column))
            for column in zip(*layers)]


def pooled_histogram(per_network: Sequence[Sequence[BlockRecord]], layer: int) -> BlockRecord:
    """Expanded layer ``layer`` of the first network with the histograms of all networks summed
    (for percentiles over the pixels of every network)."""
    column = [expanded_blocks(blocks)[layer] for blocks in per_network]
    total = np.sum([b.active_histogram for b in column], axis=0)
    return dataclasses.replace(column[0], active_histogram=total, pixels=int(total.sum()))


def mean_field(blocks: Sequence[BlockRecord], field: str, indices: Sequence[int] | None = None) -> float | None:
    """Mean of ``field`` over the blocks with a value (or over the blocks ``indices``); None if none."""
    values = [getattr(b, field) for b in blocks if (indices is None or b.index in indices)]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None
