"""ImageNet-layout image folders streamed with Grain, decoding in worker processes.

Layout: ``root/train/<class>/*.{jpg,jpeg,png}`` and ``root/val/<class>/...`` (or ``root/test``).
``root`` is ``data_dir`` (``--data-dir``), else ``$IMAGEFOLDER_DIR``, else
``$MANIFOLD_LAB_DATA_DIR/imagefolder``. Class indices follow the sorted folder names of ``train``;
the evaluation split may hold a subset of those classes.

Decoding (PIL, converted to RGB) and resizing run in Grain worker processes: the shorter side is
resized to ``round(image_size * 256 / 224)`` (bilinear), then training takes a random
``image_size`` crop and a random horizontal flip, evaluation the centre crop. Batches are numpy
uint8 ``[batch, image_size, image_size, 3]`` with int32 labels; training drops the remainder and
evaluation pads the last batch and returns a mask, so shapes are static. Normalise on device with
:func:`manifold_lab.data.pipeline.normalize` and ``.mean``/``.std`` (the ImageNet RGB statistics).
Training batch ``s`` (order: a per-epoch permutation; crop and flip) is a pure function of
``(seed, s)``, whatever the number of workers or the step a run resumes from.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grain
import numpy as np

from manifold_lab.cli import UsageError
from manifold_lab.data.base import resolve_data_dir

EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
RESIZE_RATIO = 256 / 224


@dataclass(frozen=True)
class _Decode:
    """Picklable per-record transform run in the workers. Training records ``(path, label, seed)``
    give ``(image, label)``, the crop and flip drawn from ``seed``; evaluation records
    ``(path, label, valid)`` give ``(image, label, valid)`` (centre crop)."""

    image_size: int
    train: bool

    def __call__(self, record: tuple) -> tuple:
        from PIL import Image, UnidentifiedImageError

        path, label, extra = record
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise UsageError(f"corrupt image {path}: {exc}") from None
        width, height = img.size
        short = max(self.image_size, round(self.image_size * RESIZE_RATIO))
        scale = short / min(width, height)
        new_w, new_h = max(short, round(width * scale)), max(short, round(height * scale))
        img = img.resize((new_w, new_h), Image.BILINEAR)
        if self.train:
            rng = np.random.default_rng(extra)
            top = int(rng.integers(0, new_h - self.image_size + 1))
            left = int(rng.integers(0, new_w - self.image_size + 1))
        else:
            top, left = (new_h - self.image_size) // 2, (new_w - self.image_size) // 2
        arr = np.asarray(img.crop((left, top, left + self.image_size, top + self.image_size)), np.uint8)
        if self.train and rng.random() < 0.5:
            arr = arr[:, ::-1]
        if self.train:
            return np.ascontiguousarray(arr), np.int32(label)
        return np.ascontiguousarray(arr), np.int32(label), np.bool_(extra)


class _TrainRecords(Sequence):
    """Lazy training records for global positions ``start, start + 1, ...``: position ``p`` is
    slot ``p % per_epoch`` of epoch ``p // per_epoch``, whose order is a numpy permutation seeded by
    ``(seed, epoch)``; each record carries its own augmentation seed ``(seed, epoch, slot)``.
    A pure function of the position, so it is the same in every worker and on every resume."""

    def __init__(self, files: list[tuple[str, int]], seed: int, per_epoch: int, start: int, length: int) -> None:
        self.files, self.seed, self.per_epoch, self.start, self.length = files, seed, per_epoch, start, length
        self._cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[str, int, int]:  # type: ignore[override]
        epoch, slot = divmod(self.start + int(index), self.per_epoch)
        cache = self._cache  # read once: Grain may call this from several threads
        if cache is None or cache[0] != epoch:
            cache = (epoch, np.random.default_rng(_seed(self.seed, epoch, 0)).permutation(len(self.files)))
            self._cache = cache
        path, label = self.files[int(cache[1][slot])]
        return path, label, _seed(self.seed, epoch, 1, slot)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _list_split(directory: Path, class_index: dict[str, int]) -> list[tuple[str, int]]:
    files = []
    for class_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
        if class_dir.name not in class_index:
            raise UsageError(f"class folder {class_dir} is not among the training classes")
        files += [(str(f), class_index[class_dir.name]) for f in sorted(class_dir.iterdir())
                  if f.suffix.lower() in EXTENSIONS and f.is_file()]
    if not files:
        raise UsageError(f"no images ({', '.join(EXTENSIONS)}) under {directory}/<class>/")
    return files


class ImageFolder:
    """One split of an image-folder dataset, streamed in batches (see the module docstring)."""

    def __init__(self, files: list[tuple[str, int]], class_names: tuple[str, ...], image_size: int,
                 train: bool, name: str = "imagefolder") -> None:
        self.files = files
        self.class_names = class_names
        self.num_classes = len(class_names)
        self.image_size = image_size
        self.train = train
        self.name = name
        self.mean = IMAGENET_MEAN
        self.std = IMAGENET_STD
        self.flip = train

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(image_size, image_size, 3)``."""
        return (self.image_size, self.image_size, 3)

    @property
    def labels(self) -> np.ndarray:
        """All labels in file order, int32 ``[N]``."""
        return np.asarray([label for _, label in self.files], np.int32)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Training batches per epoch (remainder dropped) or evaluation batches (last one padded)."""
        return len(self.files) // batch_size if self.train else -(-len(self.files) // batch_size)

    def dataset(self, batch_size: int, *, seed: int = 0, start_step: int = 0, num_steps: int | None = None
                ) -> grain.MapDataset:
        """The batched Grain pipeline. Training: steps ``start_step .. start_step + num_steps - 1``
        (default: to the end of the epoch holding ``start_step``), each epoch reshuffled, records
        ``(images, labels)``; batch ``s`` depends only on ``(seed, s)``. Evaluation: every file once in
        order, padded to whole batches, records ``(images, labels, mask)``; seed and steps ignored."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        decode = _Decode(self.image_size, self.train)
        if not self.train:
            total = self.steps_per_epoch(batch_size) * batch_size
            first_path, first_label = self.files[0]
            records = [(path, label, True) for path, label in self.files]
            records += [(first_path, first_label, False)] * (total - len(self.files))
            return grain.MapDataset.source(records).map(decode).batch(batch_size, drop_remainder=False)
        spe = self.steps_per_epoch(batch_size)
        if spe == 0:
            raise UsageError(f"batch size {batch_size} exceeds the {len(self.files)} training images")
        if num_steps is None:
            num_steps = spe - start_step % spe
        source = _TrainRecords(self.files, seed, spe * batch_size, start_step * batch_size, num_steps * batch_size)
        return grain.MapDataset.source(source).map(decode).batch(batch_size, drop_remainder=True)

    def batches(self, batch_size: int, *, seed: int = 0, start_step: int = 0, num_steps: int | None = None,
                num_workers: int | None = None) -> Iterator[tuple[np.ndarray, ...]]:
        """Iterate numpy batches of :meth:`dataset`, decoding in ``num_workers`` processes (default
        ``min(4, cpu count)``; 0 decodes in this process). Starting workers costs seconds, so ask for
        many steps at once (``num_steps`` may span epochs). Programs using workers need the usual
        ``if __name__ == "__main__":`` guard (workers are spawned)."""
        if num_workers is None:
            num_workers = min(4, os.cpu_count() or 1)
        it = self.dataset(batch_size, seed=seed, start_step=start_step, num_steps=num_steps).to_iter_dataset()
        if num_workers > 0:
            _absl_flags_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
        for batch in it:
            yield tuple(np.array(a) for a in batch)  # plain copies: the shared memory is freed at once


def _absl_flags_parsed() -> None:
    """Grain 0.2.x reads an Abseil flag in ``mp_prefetch`` and fails with ``UnparsedFlagAccessError``
    in programs that never parse Abseil flags (fixed in later Grain releases): mark
    them parsed (keeping defaults) when nobody has."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def load_imagefolder(data_dir: str | os.PathLike[str] | None, image_size: int | None = None
                     ) -> tuple[ImageFolder, ImageFolder]:
    """Train and evaluation (``val`` or else ``test``) splits of an image-folder tree."""
    root = resolve_data_dir(data_dir, "IMAGEFOLDER_DIR", "imagefolder")
    train_dir = root / "train"
    eval_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if not train_dir.is_dir() or eval_dir is None:
        raise UsageError(f"image folder not found at {root}: expected {root}/train/<class>/*.jpg and "
                         f"{root}/val/<class>/... (or test/); pass --data-dir")
    class_names = tuple(sorted(p.name for p in train_dir.iterdir() if p.is_dir()))
    if not class_names:
        raise UsageError(f"no class folders under {train_dir}")
    index = {name: i for i, name in enumerate(class_names)}
    size = image_size or DEFAULT_IMAGE_SIZE
    return (ImageFolder(_list_split(train_dir, index), class_names, size, train=True),
            ImageFolder(_list_split(eval_dir, index), class_names, size, train=False))
