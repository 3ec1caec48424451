"""Fig. 7's positive-channel statistics as numbers, without JAX: what the measuring step records and
the report reads back.

For one expanded layer (the expansion output of a t = 6 bottleneck, after its ReLU6) the measuring
step counts, at every pixel of every test image, how many channels are positive. Those counts are
kept as sufficient statistics rather than per pixel: a histogram over all pixels of all images
(how many pixels have k positive channels, k = 0..width) and, per image, the sum of the counts and
of their squares. That is enough for everything the report states (mean, standard deviation,
quartiles, minimum and maximum over all pixels, the share below the invertibility threshold, and
bootstrap resamples of images) and small enough to store for 224 px networks, where per-pixel
counts would run to millions of numbers per layer.

Fractions are of the expanded width; the invertibility threshold is the block's input width
(Lemma 2: at least as many active units as input dimensions), 1/6 of the expanded width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

#: Bootstrap resamples of the images behind every Fig. 7 interval, and their generator's seed.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def _percentile(histogram: np.ndarray, q: float) -> float:
    """The ``q``-th percentile (NumPy's default linear method) of the values ``k`` repeated
    ``histogram[k]`` times, without expanding them."""
    total = int(histogram.sum())
    position = q / 100.0 * (total - 1)
    below, above = int(np.floor(position)), int(np.ceil(position))
    cumulative = np.cumsum(histogram)
    lo = float(np.searchsorted(cumulative, below, side="right"))
    hi = float(np.searchsorted(cumulative, above, side="right"))
    t = position - below
    return lo + (hi - lo) * t if t < 0.5 else hi - (hi - lo) * (1.0 - t)


@dataclasses.dataclass(frozen=True, eq=False)
class LayerActivity:
    """Positive channels of one expansion output over ``images`` test images of ``pixels`` pixels
    each. Statistics are over all pixels of all images, as fractions of the expanded width;
    intervals come from resampling images (pixels of one image are not independent)."""

    block: int
    name: str
    channels: int  # expanded width
    threshold: int  # block input width (invertibility threshold)
    pixels: int  # per image
    histogram: np.ndarray  # [channels + 1]: pixels (of all images) with k positive channels
    image_sums: np.ndarray  # [images]: per image, the sum over its pixels of the count
    image_square_sums: np.ndarray  # [images]: per image, the sum over its pixels of the count squared

    @classmethod
    def from_counts(cls, block: int, name: str, channels: int, threshold: int,
                    counts: np.ndarray) -> LayerActivity:
        """From per-pixel counts ``[images, pixels]`` (integers in [0, channels])."""
        counts = np.asarray(counts, dtype=np.int64)
        if counts.ndim != 2 or counts.size == 0:
            raise ValueError("counts must be a non-empty [images, pixels] array")
        return cls(block, name, channels, threshold, int(counts.shape[1]),
                   np.bincount(counts.ravel(), minlength=channels + 1),
                   counts.sum(axis=1), np.square(counts).sum(axis=1))

    @property
    def images(self) -> int:
        """Number of test images counted."""
        return int(self.image_sums.shape[0])

    @property
    def _values(self) -> np.ndarray:
        """The fraction of positive channels that each histogram bin stands for."""
        return np.arange(self.histogram.shape[0]) / self.channels

    @property
    def min(self) -> int:
        """Fewest positive channels at any pixel."""
        return int(np.flatnonzero(self.histogram)[0])

    @property
    def max(self) -> int:
        """Most positive channels at any pixel."""
        return int(np.flatnonzero(self.histogram)[-1])

    @property
    def mean(self) -> float:
        """Average fraction of positive channels over all pixels."""
        return float(self.histogram @ self._values / self.histogram.sum())

    @property
    def std(self) -> float:
        """Standard deviation across pixels (and images) of the positive fraction."""
        return float(np.sqrt(self.histogram @ np.square(self._values - self.mean) / self.histogram.sum()))

    @property
    def quartiles(self) -> tuple[float, float]:
        """25th and 75th percentile of the positive fraction over all pixels."""
        return (_percentile(self.histogram, 25) / self.channels, _percentile(self.histogram, 75) / self.channels)

    @property
    def threshold_fraction(self) -> float:
        """The invertibility threshold as a fraction of the expanded width."""
        return self.threshold / self.channels

    @property
    def below_threshold(self) -> float:
        """Share of pixels with fewer positive channels than the block's input width."""
        return float(self.histogram[:self.threshold].sum() / self.histogram.sum())

    def bootstrap_moments(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of the positive fraction for each row of image ``weights`` ``[B, images]``
        (how often each image is drawn in a resample)."""
        s1 = self.image_sums / self.channels
        s2 = self.image_square_sums / float(self.channels) ** 2
        n = weights.sum(axis=1) * self.pixels
        mean = weights @ s1 / n
        return mean, np.sqrt(np.maximum(weights @ s2 / n - mean * mean, 0.0))

    def to_json(self) -> dict[str, Any]:
        """The layer as JSON values (integers only: exact and byte-stable)."""
        return {"block": self.block, "name": self.name, "channels": self.channels, "threshold": self.threshold,
                "pixels": self.pixels, "histogram": self.histogram.tolist(),
                "image_sums": self.image_sums.tolist(), "image_square_sums": self.image_square_sums.tolist()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LayerActivity:
        """Inverse of :meth:`to_json`; ``ValueError`` when a field is missing or inconsistent."""
        try:
            layer = cls(int(data["block"]), str(data["name"]), int(data["channels"]), int(data["threshold"]),
                        int(data["pixels"]), np.asarray(data["histogram"], dtype=np.int64),
                        np.asarray(data["image_sums"], dtype=np.int64),
                        np.asarray(data["image_square_sums"], dtype=np.int64))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad layer record: {exc.__class__.__name__}: {exc}") from None
        if (layer.histogram.shape != (layer.channels + 1,) or layer.images == 0
                or layer.image_square_sums.shape != layer.image_sums.shape
                or int(layer.histogram.sum()) != layer.images * layer.pixels):
            raise ValueError(f"bad layer record {layer.name!r}: inconsistent sizes")
        return layer


def bootstrap_weights(images: int, resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``[resamples, images]`` multiplicities of a fixed-seed bootstrap of the images (the same
    resamples serve every layer and every network, so ratios are paired)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, images, (resamples, images))
    return np.stack([np.bincount(d, minlength=images) for d in draws]).astype(np.float64)


def interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap ``samples``."""
    lo, hi = np.percentile(samples, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(lo), float(hi)
