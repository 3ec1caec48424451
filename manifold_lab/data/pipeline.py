"""On-device input pipeline for in-memory datasets: shuffling, batching, augmentation, normalisation.

Everything here is a pure, jittable function of ``(key, step, arrays)`` with static shapes, so it
composes with ``jax.jit``, ``jax.vmap`` over a leading seed axis (one data order per seed) and
sharding (shard the batch axis of the outputs, e.g. with ``jax.lax.with_sharding_constraint`` or
``out_shardings``). Determinism: the data order of epoch ``e`` is
``jax.random.permutation(fold_in(fold_in(key, 0), e), N)`` and the augmentation of step ``s`` uses
``fold_in(fold_in(key, 1), s)``, so a run restarted at step ``s`` sees exactly the same batches.

Example::

    import jax
    from manifold_lab.data import (load_dataset, to_device, pipeline_spec, epoch_permutation,
                                   train_batch, eval_batch, num_eval_batches)

    train, test = load_dataset("fashion_mnist")
    spec = pipeline_spec(train, batch_size=96)        # dataset defaults: pad 4, zero fill, flip on
    images, labels = to_device(train)                 # uint8 on device, once
    key = jax.random.key(0)
    perm = epoch_permutation(key, 0, len(train))      # once per epoch (costly to redo every step)
    step_fn = jax.jit(train_batch, static_argnames="spec")
    x, y = step_fn(key, 0, images, labels, spec=spec, perm=perm)  # float32 [96,28,28,1], int32 [96]

    # k seeds in one program, each with its own order and augmentation:
    keys = jax.vmap(jax.random.key)(jax.numpy.arange(3))
    perms = jax.vmap(epoch_permutation, in_axes=(0, None, None))(keys, 0, len(train))
    batch_of = lambda k, p: train_batch(k, 0, images, labels, spec, p)
    xs, ys = jax.vmap(batch_of)(keys, perms)          # [3, 96, 28, 28, 1], [3, 96]

    # evaluation: static shapes, the last batch padded and masked, every example counted once
    t_images, t_labels = to_device(test)
    eval_fn = jax.jit(eval_batch, static_argnames=("batch_size", "mean", "std", "dtype"))
    for i in range(num_eval_batches(len(test), 500)):
        x, y, mask = eval_fn(i, t_images, t_labels, batch_size=500, mean=spec.mean, std=spec.std)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from manifold_lab.data.base import ArrayDataset

PadMode = Literal["constant", "reflect", "edge"]
_ORDER_STREAM = 0
_AUGMENT_STREAM = 1


@dataclass(frozen=True)
class PipelineSpec:
    """Static (hashable) settings of the training pipeline.

    ``crop_padding``: pixels added on each side before a random crop back to the original size
    (0 disables cropping). ``pad_mode``: ``"constant"`` (zeros, the usual CIFAR recipe and the
    background colour of Fashion-MNIST/digits), ``"reflect"`` or ``"edge"``. ``flip``: random
    horizontal flip with probability 1/2. ``mean``/``std``: per-channel, on the [0, 1] scale.
    """

    batch_size: int
    num_examples: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 4
    pad_mode: PadMode = "constant"
    flip: bool = True
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= self.num_examples:
            raise ValueError(f"batch_size {self.batch_size} must be in [1, {self.num_examples}]")
        if self.crop_padding < 0 or self.pad_mode not in ("constant", "reflect", "edge"):
            raise ValueError(f"bad crop settings: padding {self.crop_padding}, mode {self.pad_mode!r}")

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per epoch (the remainder of the permutation is dropped)."""
        return steps_per_epoch(self.num_examples, self.batch_size)


def pipeline_spec(dataset: ArrayDataset, batch_size: int, *, crop_padding: int | None = None,
                  pad_mode: PadMode = "constant", flip: bool | None = None,
                  dtype: str = "float32") -> PipelineSpec:
    """A :class:`PipelineSpec` with the dataset's defaults (its ``crop_padding``, ``flip``, ``mean``,
    ``std``) unless overridden. ``crop_padding=0, flip=False`` turns augmentation off."""
    return PipelineSpec(batch_size=batch_size, num_examples=len(dataset), mean=dataset.mean,
                        std=dataset.std,
                        crop_padding=dataset.crop_padding if crop_padding is None else crop_padding,
                        pad_mode=pad_mode, flip=dataset.flip if flip is None else flip, dtype=dtype)


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Training steps per epoch: ``N // batch`` (``ceil`` when ``drop_remainder`` is False)."""
    return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    """Evaluation batches covering all ``num_examples`` (the last one padded): ``ceil(N / batch)``."""
    return -(-num_examples // batch_size)


def to_device(dataset: ArrayDataset, sharding: jax.sharding.Sharding | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """Put a dataset's uint8 images and int32 labels on the device once (replicated by default,
    or with ``sharding``); returns ``(images, labels)``."""
    return jax.device_put(dataset.images, sharding), jax.device_put(dataset.labels, sharding)


def epoch_permutation(key: jax.Array, epoch: jax.Array | int, num_examples: int) -> jax.Array:
    """The data order of ``epoch``: a permutation of ``range(num_examples)`` (int32)."""
    order_key = jax.random.fold_in(jax.random.fold_in(key, _ORDER_STREAM), epoch)
    return jax.random.permutation(order_key, num_examples).astype(jnp.int32)


def batch_indices(key: jax.Array, step: jax.Array | int, num_examples: int, batch_size: int,
                  perm: jax.Array | None = None) -> jax.Array:
    """Example indices of training ``step``: slice ``step % steps_per_epoch`` of the permutation of
    epoch ``step // steps_per_epoch``. Every example appears at most once per epoch (exactly once
    when ``batch_size`` divides ``num_examples``). ``perm``, when given, must be that epoch's
    :func:`epoch_permutation` (saves recomputing it every step; see :func:`train_batch`)."""
    spe = steps_per_epoch(num_examples, batch_size)
    step = jnp.asarray(step, jnp.int32)
    if perm is None:
        perm = epoch_permutation(key, step // spe, num_examples)
    return jax.lax.dynamic_slice_in_dim(perm, (step % spe) * batch_size, batch_size)


def random_crop(key: jax.Array, images: jax.Array, padding: int, pad_mode: PadMode = "constant") -> jax.Array:
    """Pad ``[B,H,W,C]`` images by ``padding`` per side and crop each back to ``H x W`` at an
    independent uniform offset in ``[0, 2 * padding]``."""
    if padding == 0:
        return images
    b, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode=pad_mode)
    offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1)
    crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
    return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Mirror each ``[B,H,W,C]`` image left-right with probability 1/2."""
    flips = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(flips[:, None, None, None], images[:, :, ::-1, :], images)


def augment(key: jax.Array, images: jax.Array, *, crop_padding: int = 4, pad_mode: PadMode = "constant",
            flip: bool = True) -> jax.Array:
    """Random crop with padding, then (if ``flip``) random horizontal flip; dtype and shape kept."""
    crop_key, flip_key = jax.random.split(key)
    images = random_crop(crop_key, images, crop_padding, pad_mode)
    return random_flip(flip_key, images) if flip else images


def normalize(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...],
              dtype: str | jnp.dtype = "float32") -> jax.Array:
    """uint8 images to ``(x / 255 - mean) / std`` in ``dtype`` (computed in float32)."""
    scale = np.asarray(std, np.float32) * 255.0
    shift = np.asarray(mean, np.float32) * 255.0
    return ((images.astype(jnp.float32) - shift) / scale).astype(dtype)


def train_batch(key: jax.Array, step: jax.Array | int, images: jax.Array, labels: jax.Array,
                spec: PipelineSpec, perm: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The training batch of ``step``: shuffled (per-epoch permutation), augmented, normalised.
    Returns ``(x [batch,H,W,C] spec.dtype, y int32 [batch])``. Jit with ``static_argnames='spec'``.

    ``perm``: this epoch's ``epoch_permutation(key, step // spec.steps_per_epoch, N)``. Pass it in a
    training loop: a permutation of 60,000 costs ~40 ms on 2 CPU cores, so compute it once per
    epoch (jitted, vmapped over seeds) rather than inside every step. Without it the permutation
    is recomputed here; the batches are identical either way."""
    idx = batch_indices(key, step, spec.num_examples, spec.batch_size, perm)
    batch = jnp.take(images, idx, axis=0)
    aug_key = jax.random.fold_in(jax.random.fold_in(key, _AUGMENT_STREAM), step)
    batch = augment(aug_key, batch, crop_padding=spec.crop_padding, pad_mode=spec.pad_mode, flip=spec.flip)
    return normalize(batch, spec.mean, spec.std, spec.dtype), jnp.take(labels, idx, axis=0)


def eval_batch(index: jax.Array | int, images: jax.Array, labels: jax.Array, *, batch_size: int,
               mean: tuple[float, ...], std: tuple[float, ...], dtype: str = "float32"
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Evaluation batch ``index`` (in order, no augmentation) with a static shape: positions past the
    end repeat example 0 and get ``mask`` False. Returns ``(x, y, mask bool [batch])``; over
    ``range(num_eval_batches(N, batch_size))`` every example has mask True exactly once.
    Jit with ``static_argnames=('batch_size', 'mean', 'std', 'dtype')``."""
    num = images.shape[0]
    pos = jnp.asarray(index, jnp.int32) * batch_size + jnp.arange(batch_size, dtype=jnp.int32)
    mask = pos < num
    idx = jnp.where(mask, pos, 0)
    x = normalize(jnp.take(images, idx, axis=0), mean, std, dtype)
    return x, jnp.take(labels, idx, axis=0), mask


_train_batch_jit = jax.jit(train_batch, static_argnames="spec")
_epoch_permutation_jit = jax.jit(epoch_permutation, static_argnames="num_examples")


def device_batches(key: jax.Array, images: jax.Array, labels: jax.Array, spec: PipelineSpec,
                   start_step: int = 0, num_steps: int | None = None) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Convenience iterator of jitted :func:`train_batch` results for steps ``start_step, ...``
    (``num_steps`` of them, or one epoch's worth when None). Training loops that fuse the pipeline
    into their own jitted step should call :func:`train_batch` inside it instead."""
    count = spec.steps_per_epoch if num_steps is None else num_steps
    spe, epoch, perm = spec.steps_per_epoch, None, None
    for step in range(start_step, start_step + count):
        if step // spe != epoch:
            epoch = step // spe
            perm = _epoch_permutation_jit(key, epoch, spec.num_examples)
        yield _train_batch_jit(key, step, images, labels, spec=spec, perm=perm)
