"""Arrays from one ``.npz`` file: ``x_train``, ``y_train``, ``x_test``, ``y_test``.

``data_dir`` (``--data-dir``, or ``$NPZ_PATH``) is the ``.npz`` file itself. Images are uint8 (or
integers in 0..255, or floats in [0, 1] which are scaled by 255 and rounded), shaped ``[N, H, W]``
(grayscale; a channel axis is added) or ``[N, H, W, C]`` with C = 1 or 3. Labels are integers
``[N]`` in ``[0, num_classes)`` with ``num_classes = max label + 1`` over both splits (or an optional
scalar ``num_classes`` entry), at most :data:`MAX_CLASSES`. Augmentation defaults: crop padding 4,
horizontal flip off (unknown content: turn it on with the pipeline's ``flip`` override when it
makes sense).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from manifold_lab.cli import UsageError
from manifold_lab.data.base import ArrayDataset, make_splits, resolve_data_dir

KEYS = ("x_train", "y_train", "x_test", "y_test")
#: The most classes a file may declare or label (the classifier has one output per class).
MAX_CLASSES = 1_000_000


def _images(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise UsageError(f"bad npz file {path}: {key} has shape {x.shape}, expected NHW or NHWC with C = 1 or 3")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating) and x.size and x.min() >= 0.0 and x.max() <= 1.0:
        return np.round(x * 255.0).astype(np.uint8)
    if np.issubdtype(x.dtype, np.integer) and (not x.size or (x.min() >= 0 and x.max() <= 255)):
        return x.astype(np.uint8)
    raise UsageError(f"bad npz file {path}: {key} must be uint8, integers in 0..255 or floats in [0, 1]")


def _declared_classes(value: np.ndarray, path: Path) -> int:
    """The file's ``num_classes`` entry: one integer in [1, MAX_CLASSES]."""
    if value.shape != () or not np.issubdtype(value.dtype, np.integer) or not 1 <= int(value) <= MAX_CLASSES:
        shown = f"shape {value.shape}" if value.shape != () else f"{value.dtype} {value.item()!r}"
        raise UsageError(f"bad npz file {path}: num_classes must be one integer in [1, {MAX_CLASSES}], "
                         f"got {shown}")
    return int(value)


def _num_classes(declared: int | None, train: np.ndarray, test: np.ndarray, path: Path) -> int:
    """The class count: ``declared``, else the largest label + 1; every label must lie in
    ``[0, count)`` and the count in ``[1, MAX_CLASSES]`` (checked before labels become int32)."""
    low = min(int(train.min()), int(test.min(initial=0)))
    high = max(int(train.max()), int(test.max(initial=0)))
    count = declared if declared is not None else high + 1
    if low < 0 or high >= count or count > MAX_CLASSES:
        raise UsageError(f"bad npz file {path}: labels span [{low}, {high}], outside [0, {count}) or "
                         f"beyond {MAX_CLASSES} classes")
    return count


def load_npz(data_dir: str | os.PathLike[str] | None) -> tuple[ArrayDataset, ArrayDataset]:
    """Train and test splits from an ``.npz`` file (see the module docstring for the keys)."""
    path = resolve_data_dir(data_dir, "NPZ_PATH", "dataset.npz")
    if not path.is_file():
        raise UsageError(f"npz dataset not found at {path}: pass --data-dir FILE.npz with x_train, y_train, "
                         "x_test, y_test")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in KEYS if k not in npz.files]
            if missing:
                raise UsageError(f"bad npz file {path}: missing {', '.join(missing)} "
                                 "(needs x_train, y_train, x_test, y_test)")
            arrays = {k: npz[k] for k in KEYS}
            explicit = _declared_classes(npz["num_classes"], path) if "num_classes" in npz.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UsageError(f"corrupt npz file {path}: {exc}") from None
    splits = []
    for split in ("train", "test"):
        x = _images(arrays[f"x_{split}"], path, f"x_{split}")
        y = arrays[f"y_{split}"].reshape(-1)
        if not np.issubdtype(y.dtype, np.integer) or y.shape[0] != x.shape[0]:
            raise UsageError(f"bad npz file {path}: y_{split} must hold {x.shape[0]} integer labels")
        splits.append((x, y))
    if splits[0][0].shape[1:] != splits[1][0].shape[1:]:
        raise UsageError(f"bad npz file {path}: train images {splits[0][0].shape[1:]} and test images "
                         f"{splits[1][0].shape[1:]} differ in shape")
    if splits[0][0].shape[0] == 0:
        raise UsageError(f"bad npz file {path}: x_train is empty")
    num_classes = _num_classes(explicit, splits[0][1], splits[1][1], path)
    return make_splits("npz", splits[0], splits[1], num_classes, crop_padding=4, flip=False)
