"""The in-memory dataset record shared by every array loader, and small helpers for loaders."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from manifold_lab.cli import UsageError

DATA_DIR_ENV = "MANIFOLD_LAB_DATA_DIR"


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """One split of an in-memory image dataset.

    ``images`` are uint8 ``[N, H, W, C]``; ``labels`` int32 ``[N]`` in ``[0, num_classes)``.
    ``mean``/``std`` are per-channel statistics of the *training* split on the ``[0, 1]`` scale
    (both splits carry the training values), used as ``(x / 255 - mean) / std``.
    ``crop_padding`` and ``flip`` are the dataset's default augmentation (random crop after
    padding by ``crop_padding`` pixels per side; horizontal flip on or off).
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 4
    flip: bool = True
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N,H,W,C], got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels shape {self.labels.shape} does not match {self.images.shape[0]} images")
        if len(self.mean) != self.images.shape[-1] or len(self.std) != self.images.shape[-1]:
            raise ValueError("mean/std need one value per channel")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        return tuple(int(d) for d in self.images.shape[1:])  # type: ignore[return-value]


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 ``[N,H,W,C]`` images on the [0, 1] scale
    (float64 accumulation, so exact enough and independent of batch order)."""
    flat = images.reshape(-1, images.shape[-1])
    total = flat.shape[0]
    s = np.zeros(flat.shape[1], np.float64)
    s2 = np.zeros(flat.shape[1], np.float64)
    for start in range(0, total, 1 << 22):  # bounded temporaries for large arrays
        chunk = flat[start:start + (1 << 22)].astype(np.float64)
        s += chunk.sum(0)
        s2 += np.square(chunk).sum(0)
    mean = s / total
    std = np.sqrt(np.maximum(s2 / total - mean**2, 0.0))
    std = np.where(std > 0, std, 255.0)
    return tuple(float(m) / 255.0 for m in mean), tuple(float(v) / 255.0 for v in std)


def make_splits(name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                num_classes: int, *, crop_padding: int, flip: bool,
                class_names: tuple[str, ...] = ()) -> tuple[ArrayDataset, ArrayDataset]:
    """Build train/test :class:`ArrayDataset` s that share the training split's statistics."""
    mean, std = channel_stats(train[0])
    common = dict(num_classes=num_classes, name=name, mean=mean, std=std, crop_padding=crop_padding,
                  flip=flip, class_names=class_names)
    out = []
    for images, labels in (train, test):
        labels = np.asarray(labels, np.int32)
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise UsageError(f"{name}: labels outside [0, {num_classes})")
        out.append(ArrayDataset(np.ascontiguousarray(images, np.uint8), labels, **common))
    return out[0], out[1]


def resolve_data_dir(data_dir: str | os.PathLike[str] | None, env_var: str | None, subdir: str,
                     default: str | os.PathLike[str] | None = None) -> Path:
    """Where a dataset lives: ``data_dir`` if given, else ``$env_var``, else
    ``$MANIFOLD_LAB_DATA_DIR/subdir``, else ``default``. Raises UsageError when none applies."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if env_var and os.environ.get(env_var):
        return Path(os.environ[env_var]).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser() / subdir
    if default is not None:
        return Path(default)
    hint = f"${env_var} or " if env_var else ""
    raise UsageError(f"no data directory for this dataset: pass --data-dir (or set {hint}${DATA_DIR_ENV})")


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 ``[N,H,W,C]`` images (C = 1 or 3) to ``size`` x ``size`` with bilinear
    interpolation (PIL, antialiased when shrinking); returns uint8 ``[N,size,size,C]``."""
    from PIL import Image

    if images.shape[1:3] == (size, size):
        return images
    channels = images.shape[-1]
    out = np.empty((images.shape[0], size, size, channels), np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(img[..., 0] if channels == 1 else img)
        res = np.asarray(pil.resize((size, size), Image.BILINEAR))
        out[i] = res[..., None] if channels == 1 else res
    return out
