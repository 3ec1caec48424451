"""Arrays from one ``.npz`` file: ``x_train``, ``y_train``, ``x_test``, ``y_test``.

``data_dir`` (``--data-dir``, or ``$NPZ_PATH``) is the ``.npz`` file itself. Images are uint8 (or
integers in 0..255, or floats in [0, 1] which are scaled by 255 and rounded), shaped ``[N, H, W]``
(grayscale; a channel axis is added) or ``[N, H, W, C]`` with C = 1 or 3. Labels are integers
``[N]`` in ``[0, num_classes)`` with ``num_classes = max label + 1`` over both splits (or an optional
scalar ``num_classes`` entry). Augmentation defaults: crop padding 4, horizontal flip off (unknown
content: turn it on with the pipeline's ``flip`` override when it makes sense).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from manifold_lab.cli import UsageError
from manifold_lab.data.base import ArrayDataset, make_splits, resolve_data_dir

KEYS = ("x_train", "y_train", "x_test", "y_test")


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
            explicit = int(npz["num_classes"]) if "num_classes" in npz.files else None
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
    num_classes = explicit or int(max(splits[0][1].max(), splits[1][1].max(initial=0))) + 1
    return make_splits("npz", splits[0], splits[1], num_classes, crop_padding=4, flip=False)
