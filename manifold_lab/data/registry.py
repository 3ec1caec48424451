"""``load_dataset``: one entry point for every dataset, by name."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace

from manifold_lab.cli import UsageError
from manifold_lab.data.base import ArrayDataset, resize_images

DATASETS: dict[str, str] = {
    "fashion_mnist": "Fashion-MNIST, 60k/10k 28x28x1, IDX files (apt-get install -y dataset-fashion-mnist)",
    "digits": "scikit-learn handwritten digits, 1437/360, 8x8 resized to 32x32x1 (always available)",
    "cifar10": "CIFAR-10, 50k/10k 32x32x3, python-pickle directory cifar-10-batches-py",
    "cifar100": "CIFAR-100 (fine labels), 50k/10k 32x32x3, python-pickle directory cifar-100-python",
    "npz": "arrays x_train, y_train, x_test, y_test in one .npz file (--data-dir is the file)",
    "imagefolder": "root/train/<class>/*.jpg|png and root/val|test/<class>/..., streamed with Grain",
}


def _resized(split: ArrayDataset, image_size: int | None) -> ArrayDataset:
    if image_size is None or split.image_shape[:2] == (image_size, image_size):
        return split
    return replace(split, images=resize_images(split.images, image_size))


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None, image_size: int | None = None):
    """Load the train and test splits of dataset ``name`` (one of :data:`DATASETS`).

    In-memory datasets return two :class:`~manifold_lab.data.base.ArrayDataset` (uint8 NHWC);
    ``image_size`` resizes them (bilinear) when given. ``imagefolder`` returns two
    :class:`~manifold_lab.data.imagefolder.ImageFolder` streaming datasets (``image_size`` default 224).
    Missing or corrupt data raise :class:`~manifold_lab.cli.UsageError` with a one-line message.
    """
    if image_size is not None and image_size < 1:
        raise UsageError(f"image size must be positive, got {image_size}")
    loaders: dict[str, Callable[[], tuple]] = {
        "fashion_mnist": lambda: _fashion_mnist(data_dir),
        "digits": lambda: _digits(image_size),
        "cifar10": lambda: _cifar(data_dir, 10),
        "cifar100": lambda: _cifar(data_dir, 100),
        "npz": lambda: _npz(data_dir),
        "imagefolder": lambda: _imagefolder(data_dir, image_size),
    }
    if name not in loaders:
        raise UsageError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    splits = loaders[name]()
    if name == "imagefolder":
        return splits
    return tuple(_resized(split, image_size) for split in splits)


def _fashion_mnist(data_dir):
    from manifold_lab.data.fashion_mnist import load_fashion_mnist
    return load_fashion_mnist(data_dir)


def _digits(image_size):
    from manifold_lab.data.digits import load_digits
    return load_digits(image_size)


def _cifar(data_dir, num_classes):
    from manifold_lab.data.cifar import load_cifar
    return load_cifar(data_dir, num_classes)


def _npz(data_dir):
    from manifold_lab.data.npz import load_npz
    return load_npz(data_dir)


def _imagefolder(data_dir, image_size):
    from manifold_lab.data.imagefolder import load_imagefolder
    return load_imagefolder(data_dir, image_size)
