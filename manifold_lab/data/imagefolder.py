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

Several processes (multi-host data parallelism) each load only their ``rows`` of every global
batch (training and evaluation alike): the rows a process's devices hold. Row ``r`` of batch ``s`` is
the same image with the same crop whatever the split into processes, so the numbers do not depend
on the process count.

Corrupt files (PIL cannot decode them) never pass silently: a :class:`BadImages` record names each
once and stops the loader (UsageError naming the file) when more than its ``limit`` distinct files
failed. Under the limit, a corrupt training file is replaced by the next file in file order (sorted
by class and name) that decodes, cropped and flipped as the original would have been, and a corrupt
evaluation image is left out (mask False). The replacement is a function of the file list alone, so
a resumed run, any number of workers and any number of processes meet the same one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grain
import numpy as np

from manifold_lab.cli import UsageError
from manifold_lab.data.base import resolve_data_dir

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
RESIZE_RATIO = 256 / 224


def _open_rgb(path: str) -> PILImage:
    """The decoded RGB image at ``path`` (PIL); raises what PIL raises for a corrupt file."""
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for a file it cannot decode (unidentified, truncated, malformed, oversized)."""
    from PIL import Image

    return OSError, SyntaxError, ValueError, Image.DecompressionBombError


def decode_error(path: str) -> str | None:
    """Why ``path`` does not decode (PIL's message), or None when it does."""
    try:
        _open_rgb(path)
    except _decode_errors() as exc:
        message = str(exc).replace(f" {path!r}", "")  # PIL repeats the file name
        return message.splitlines()[0] if message else type(exc).__name__
    return None


@dataclass(frozen=True)
class _Decode:
    """Picklable per-record transform run in the workers. Records are ``(file index, extra)``.
    Training (``extra`` the augmentation seed) gives ``(image, label, failed)``: a file that does not
    decode is replaced by the next in file order, up to ``tries`` files in all. Evaluation (``extra``
    whether the record is real or padding) gives ``(image, label, valid, failed)``: a file that does
    not decode is left out (valid False). ``failed`` is int32 ``[2]``: the record's file index and how
    many consecutive files from it failed (0: none), which :class:`BadImages` reads."""

    files: Sequence[tuple[str, int]]
    image_size: int
    train: bool
    tries: int = 1

    def __call__(self, record: tuple[int, int]) -> tuple:
        index, extra = record
        label = self.files[index][1]
        img, failed = None, 0
        if self.train or extra:
            while img is None and failed < (self.tries if self.train else 1):
                path, label = self.files[(index + failed) % len(self.files)]
                try:
                    img = _open_rgb(path)
                except _decode_errors():
                    failed += 1
        arr = np.zeros(self.image_shape, np.uint8) if img is None else self._crop(img, extra)
        report = np.asarray([index, failed], np.int32)
        if self.train:
            return arr, np.int32(label), report
        return arr, np.int32(label), np.bool_(extra and img is not None), report

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    def _crop(self, img: PILImage, extra: int) -> np.ndarray:
        """Resize the shorter side, then the random (training, seeded by ``extra``) or centre crop."""
        from PIL import Image

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
        return np.ascontiguousarray(arr)


class _TrainRecords(Sequence):
    """Lazy training records ``(file index, augmentation seed)``: rows ``rows`` of the global batches
    ``start_step, start_step + 1, ...`` of ``batch_size``. Row ``r`` of batch ``s`` is global position
    ``p = s * batch_size + r``: slot ``p % per_epoch`` of epoch ``p // per_epoch``, whose order is a
    numpy permutation seeded by ``(seed, epoch)``; the augmentation seed is ``(seed, epoch, slot)``.
    A pure function of the position, so it is the same in every worker, process and resume."""

    def __init__(self, num_files: int, seed: int, batch_size: int, per_epoch: int, start_step: int,
                 num_steps: int, rows: tuple[int, int]) -> None:
        self.num_files, self.seed, self.batch_size, self.per_epoch = num_files, seed, batch_size, per_epoch
        self.start_step, self.num_steps, self.rows = start_step, num_steps, rows
        self._cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.num_steps * (self.rows[1] - self.rows[0])

    def __getitem__(self, index: int) -> tuple[int, int]:  # type: ignore[override]
        step, row = divmod(int(index), self.rows[1] - self.rows[0])
        position = (self.start_step + step) * self.batch_size + self.rows[0] + row
        epoch, slot = divmod(position, self.per_epoch)
        cache = self._cache  # read once: Grain may call this from several threads
        if cache is None or cache[0] != epoch:
            cache = (epoch, np.random.default_rng(_seed(self.seed, epoch, 0)).permutation(self.num_files))
            self._cache = cache
        return int(cache[1][slot]), _seed(self.seed, epoch, 1, slot)


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


class BadImages:
    """The corrupt image files a run has met, over its splits and processes.

    :meth:`check` reads a batch's ``failed`` reports (see :class:`_Decode`) combined over the
    processes by ``gather`` (this process's alone by default), so every process sees the same files
    and stops at the same batch. Each file is named once on stderr (where ``announce``); the file
    that makes more than ``limit`` distinct ones raises UsageError naming it, ending with ``hint``.
    ``left_out``: evaluation records left out so far (every process counted)."""

    def __init__(self, limit: int = 0, *, announce: bool = True,
                 gather: Callable[[np.ndarray], np.ndarray] | None = None, hint: str = "") -> None:
        self.limit, self.announce, self.hint = limit, announce, hint
        self.gather = gather or (lambda failed: failed)
        self.files: dict[str, str] = {}  # path -> why it does not decode
        self.left_out = 0

    def check(self, split: ImageFolder, failed: np.ndarray) -> None:
        """Record one batch's reports of ``split``; UsageError beyond the limit."""
        reports = np.asarray(self.gather(failed)).reshape(-1, 2)
        for index, count in reports[reports[:, 1] > 0].tolist():
            self.left_out += 0 if split.train else 1
            for k in range(count):
                path = split.files[(index + k) % len(split.files)][0]
                if path not in self.files:
                    self._add(path, split.train)

    def _add(self, path: str, train: bool) -> None:
        why = decode_error(path) or "not decodable"
        self.files[path] = why
        count = len(self.files)
        if count > self.limit:
            beyond = f" ({count} corrupt images, more than {self.limit})" if self.limit else ""
            raise UsageError(f"corrupt image {path}: {why}{beyond}{self.hint}")
        if self.announce:
            done = "replaced by the next image in file order" if train else "left out of the evaluation"
            print(f"warning: corrupt image {path} ({why}): {done} ({count} of at most {self.limit})",
                  file=sys.stderr, flush=True)


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

    def dataset(self, batch_size: int, *, seed: int = 0, start_step: int = 0, num_steps: int | None = None,
                rows: tuple[int, int] | None = None, tries: int = 1) -> grain.MapDataset:
        """The batched Grain pipeline of rows ``rows`` (default: all) of each global batch of
        ``batch_size``. Training: steps ``start_step .. start_step + num_steps - 1`` (default: to the
        end of the epoch holding ``start_step``), each epoch reshuffled, records ``(images, labels,
        failed)``; batch ``s`` depends only on ``(seed, s)``; ``tries``: files tried per record (a
        corrupt one is replaced by the next). Evaluation: every file once in order, padded to whole
        batches, records ``(images, labels, mask, failed)``; seed, steps and tries ignored."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        rows = rows or (0, batch_size)
        if not 0 <= rows[0] < rows[1] <= batch_size:
            raise ValueError(f"rows {rows} are not a slice of a batch of {batch_size}")
        decode = _Decode(self.files, self.image_size, self.train, max(1, min(tries, len(self.files))))
        local = rows[1] - rows[0]
        if not self.train:
            positions = [b * batch_size + r for b in range(self.steps_per_epoch(batch_size))
                         for r in range(*rows)]
            records = [(p, True) if p < len(self.files) else (0, False) for p in positions]
            return grain.MapDataset.source(records).map(decode).batch(local, drop_remainder=False)
        spe = self.steps_per_epoch(batch_size)
        if spe == 0:
            raise UsageError(f"batch size {batch_size} exceeds the {len(self.files)} training images")
        if num_steps is None:
            num_steps = spe - start_step % spe
        source = _TrainRecords(len(self.files), seed, batch_size, spe * batch_size, start_step, num_steps, rows)
        return grain.MapDataset.source(source).map(decode).batch(local, drop_remainder=True)

    def batches(self, batch_size: int, *, seed: int = 0, start_step: int = 0, num_steps: int | None = None,
                num_workers: int | None = None, rows: tuple[int, int] | None = None,
                bad: BadImages | None = None) -> Iterator[tuple[np.ndarray, ...]]:
        """Iterate numpy batches ``(images, labels)`` (training) or ``(images, labels, mask)``
        (evaluation) of :meth:`dataset`, decoding in ``num_workers`` processes (default
        ``min(4, cpu count)``; 0 decodes in this process). ``rows``: the rows of each global batch to
        load (this process's share, :func:`manifold_lab.train.sharding.process_rows`; default all).
        ``bad`` records the corrupt files met and sets how many may be replaced or left out (default:
        a fresh :class:`BadImages` that stops at the first). Starting workers costs seconds, so ask for many steps at once (``num_steps`` may
        span epochs). Programs using workers need the usual ``if __name__ == "__main__":`` guard
        (workers are spawned)."""
        bad = bad or BadImages()
        if num_workers is None:
            num_workers = min(4, os.cpu_count() or 1)
        it = self.dataset(batch_size, seed=seed, start_step=start_step, num_steps=num_steps, rows=rows,
                          tries=bad.limit + 1).to_iter_dataset()
        if num_workers > 0:
            _absl_flags_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
        for batch in it:
            bad.check(self, np.asarray(batch[-1]))
            yield tuple(np.array(a) for a in batch[:-1])  # plain copies: the shared memory is freed at once


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
