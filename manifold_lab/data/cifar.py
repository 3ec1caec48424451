"""CIFAR-10 / CIFAR-100 from a local directory in the standard python-pickle layout.

``data_dir`` (``--data-dir``; else ``$CIFAR10_DIR`` / ``$CIFAR100_DIR``; else
``$MANIFOLD_LAB_DATA_DIR/cifar-10-batches-py`` or ``.../cifar-100-python``) is either the extracted
folder itself or its parent:

- CIFAR-10: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``, key ``labels``;
- CIFAR-100: ``cifar-100-python/{train, test, meta}``, key ``fine_labels`` (100 classes).

Each batch holds ``data`` (uint8 ``[N, 3072]``, channel-major 3x32x32); returned as 32x32x3 uint8.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from manifold_lab.cli import UsageError
from manifold_lab.data.base import ArrayDataset, make_splits, resolve_data_dir

LAYOUTS = {
    10: dict(folder="cifar-10-batches-py", env="CIFAR10_DIR", label_key="labels", names_key="label_names",
             meta="batches.meta", train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
             url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    100: dict(folder="cifar-100-python", env="CIFAR100_DIR", label_key="fine_labels",
              names_key="fine_label_names", meta="meta", train=["train"], test=["test"],
              url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError, OverflowError, MemoryError, RecursionError) as exc:
        raise UsageError(f"corrupt CIFAR file {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"corrupt CIFAR file {path}: expected a dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_batches(directory: Path, names: list[str], label_key: str, num_classes: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in names:
        batch = _unpickle(directory / name)
        if "data" not in batch or label_key not in batch:
            raise UsageError(f"corrupt CIFAR file {directory / name}: needs keys 'data' and {label_key!r}")
        data = np.asarray(batch["data"])
        lab = np.asarray(batch[label_key])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or lab.shape != (len(data),):
            raise UsageError(f"corrupt CIFAR file {directory / name}: data {data.dtype} {data.shape}, "
                             f"{lab.shape[0] if lab.ndim else 0} labels; expected uint8 [N, 3072] and N labels")
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise UsageError(f"corrupt CIFAR file {directory / name}: labels outside [0, {num_classes})")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab.astype(np.int32))
    return np.concatenate(images), np.concatenate(labels)


def load_cifar(data_dir: str | os.PathLike[str] | None, num_classes: int = 10
               ) -> tuple[ArrayDataset, ArrayDataset]:
    """CIFAR-10 (``num_classes=10``) or CIFAR-100 fine labels (``100``), 32x32x3 uint8.
    Augmentation defaults: crop padding 4 (zero fill), horizontal flip on."""
    layout = LAYOUTS[num_classes]
    root = resolve_data_dir(data_dir, layout["env"], layout["folder"])
    directory = root / layout["folder"] if (root / layout["folder"]).is_dir() else root
    missing = [n for n in layout["train"] + layout["test"] if not (directory / n).is_file()]
    if missing:
        raise UsageError(f"CIFAR-{num_classes} not found in {directory} (missing {missing[0]}): extract "
                         f"{layout['url']} there or pass --data-dir")
    train = _read_batches(directory, layout["train"], layout["label_key"], num_classes)
    test = _read_batches(directory, layout["test"], layout["label_key"], num_classes)
    names: tuple[str, ...] = ()
    if (directory / layout["meta"]).is_file():
        meta = _unpickle(directory / layout["meta"])
        names = tuple(str(n) for n in meta.get(layout["names_key"], ()))
        if names and len(names) != num_classes:
            raise UsageError(f"corrupt CIFAR meta {directory / layout['meta']}: {len(names)} class names, "
                             f"expected {num_classes}")
    return make_splits(f"cifar{num_classes}", train, test, num_classes, crop_padding=4, flip=True,
                       class_names=names)
