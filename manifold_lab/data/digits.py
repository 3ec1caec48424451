"""scikit-learn's bundled handwritten digits (1,797 images of 8x8, values 0..16), always available.

The 0..16 intensities are rescaled to uint8 0..255 (``round(v * 255 / 16)``) and the images are
resized with bilinear interpolation to ``image_size`` (default 32, so the 32-px networks accept them).
Split: fixed and stratified, 20% test (``sklearn.model_selection.train_test_split(test_size=0.2,
stratify=labels, random_state=0)``): 1,437 train / 360 test, the same on every run.
"""

from __future__ import annotations

import numpy as np

from manifold_lab.data.base import ArrayDataset, make_splits, resize_images

DEFAULT_IMAGE_SIZE = 32
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def load_digits(image_size: int | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """Digits as uint8 ``[N, image_size, image_size, 1]``, 10 classes.
    Augmentation defaults: crop padding 2, no horizontal flip (digits are not mirror-symmetric)."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    images = resize_images(images, image_size or DEFAULT_IMAGE_SIZE)
    labels = bunch.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(images, labels, test_size=TEST_FRACTION, stratify=labels,
                                              random_state=SPLIT_SEED)
    return make_splits("digits", (x_tr, y_tr), (x_te, y_te), 10, crop_padding=2, flip=False,
                       class_names=tuple(str(d) for d in range(10)))
