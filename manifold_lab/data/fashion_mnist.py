"""Fashion-MNIST from the IDX files of the Debian package ``dataset-fashion-mnist``.

Location, first match wins: the ``data_dir`` argument (``--data-dir``), ``$FASHION_MNIST_DIR``,
``$MANIFOLD_LAB_DATA_DIR/fashion-mnist``, then ``/usr/share/datasets/fashion-mnist``. Each of the
four files may be gzip-compressed (``train-images-idx3-ubyte.gz``) or not (``train-images-idx3-ubyte``).
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from manifold_lab.cli import UsageError
from manifold_lab.data.base import ArrayDataset, make_splits, resolve_data_dir

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "FASHION_MNIST_DIR"
IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Ankle boot")
SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str | os.PathLike[str], magic: int) -> np.ndarray:
    """Read one uint8 IDX file (gzip or plain) and check its header against ``magic``
    (2051 images ``[N, rows, cols]``, 2049 labels ``[N]``) and its payload size.
    Raises UsageError with a one-line reason when the file is unreadable or corrupt."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise UsageError(f"corrupt Fashion-MNIST file {path}: {exc}") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UsageError(f"corrupt Fashion-MNIST file {path}: truncated header ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise UsageError(f"corrupt Fashion-MNIST file {path}: magic number {found}, expected {magic}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise UsageError(f"corrupt Fashion-MNIST file {path}: {len(raw) - header} data bytes, "
                         f"header {shape} needs {expected}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def load_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 28, 28, 1]`` uint8 and labels ``[N]`` int32 of ``split`` ('train' or 'test').
    Checks headers, payload sizes, 28x28 images, matching counts and labels 0..9 (not N itself,
    so small files in the same format work: the real files hold 60,000 and 10,000)."""
    image_stem, label_stem = SPLITS[split]
    paths = [_find(directory, image_stem), _find(directory, label_stem)]
    if None in paths:
        raise UsageError(f"Fashion-MNIST not found in {directory}: install it with "
                         "`apt-get install -y dataset-fashion-mnist` or pass --data-dir")
    images = read_idx(paths[0], IMAGES_MAGIC)
    labels = read_idx(paths[1], LABELS_MAGIC)
    if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0] or not len(labels):
        raise UsageError(f"corrupt Fashion-MNIST {split} split in {directory}: images {images.shape}, "
                         f"labels {labels.shape}; expected N images of 28x28 and N labels")
    if labels.max() > 9:
        raise UsageError(f"corrupt Fashion-MNIST {split} labels in {directory}: label {labels.max()} > 9")
    return images[..., None], labels.astype(np.int32)


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """Fashion-MNIST: 60,000 train / 10,000 test grayscale 28x28x1 images, 10 classes.
    Augmentation defaults: crop padding 4, horizontal flip on (clothes are left-right symmetric)."""
    directory = resolve_data_dir(data_dir, ENV_VAR, "fashion-mnist", DEFAULT_DIR)
    return make_splits("fashion_mnist", load_split(directory, "train"), load_split(directory, "test"), 10,
                       crop_padding=4, flip=True, class_names=CLASS_NAMES)
