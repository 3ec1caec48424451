"""Datasets and the on-device pipeline: every loader on a small fixture written here, error paths,
and the pipeline's determinism, epoch coverage, augmentation and evaluation masking."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from manifold_lab.cli import UsageError
from manifold_lab.data import (DATASETS, ArrayDataset, augment, batch_indices, device_batches,
                               epoch_permutation, eval_batch, load_dataset, normalize, num_eval_batches,
                               pipeline_spec, random_crop, steps_per_epoch, to_device, train_batch)
from manifold_lab.data.fashion_mnist import DEFAULT_DIR

# ---------------------------------------------------------------- fixtures


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(directory: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> dict:
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        arrays[prefix] = (images, labels)
        for kind, arr, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            data = _idx_bytes(arr, magic)
            name = directory / f"{prefix}-{kind}-ubyte"
            if gz:
                name.with_name(name.name + ".gz").write_bytes(gzip.compress(data))
            else:
                name.write_bytes(data)
    return arrays


@pytest.fixture
def idx_dir(tmp_path: Path) -> tuple[Path, dict]:
    return tmp_path, _write_idx(tmp_path)


def _one_line_usage_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


# ---------------------------------------------------------------- Fashion-MNIST (IDX)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_fixture(tmp_path: Path, gz: bool) -> None:
    arrays = _write_idx(tmp_path, gz=gz)
    train, test = load_dataset("fashion_mnist", data_dir=tmp_path)
    assert isinstance(train, ArrayDataset) and train.name == "fashion_mnist"
    assert train.images.shape == (12, 28, 28, 1) and test.images.shape == (5, 28, 28, 1)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
    np.testing.assert_array_equal(train.images[..., 0], arrays["train"][0])
    np.testing.assert_array_equal(test.labels, arrays["t10k"][1])
    assert train.num_classes == 10 and train.flip and train.crop_padding == 4
    np.testing.assert_allclose(train.mean, [arrays["train"][0].mean() / 255], rtol=1e-9)
    np.testing.assert_allclose(train.std, [arrays["train"][0].std() / 255], rtol=1e-9)
    assert test.mean == train.mean and test.std == train.std  # training statistics for both


def test_fashion_mnist_env_var_and_resize(idx_dir, monkeypatch) -> None:
    directory, _ = idx_dir
    monkeypatch.setenv("FASHION_MNIST_DIR", str(directory))
    train, test = load_dataset("fashion_mnist", image_size=32)
    assert train.images.shape == (12, 32, 32, 1) and test.images.shape == (5, 32, 32, 1)
    monkeypatch.delenv("FASHION_MNIST_DIR")
    monkeypatch.setenv("MANIFOLD_LAB_DATA_DIR", str(directory.parent))
    with pytest.raises(UsageError):  # looks in $MANIFOLD_LAB_DATA_DIR/fashion-mnist
        load_dataset("fashion_mnist")


def test_fashion_mnist_missing(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as excinfo:
        load_dataset("fashion_mnist", data_dir=tmp_path / "nowhere")
    message = _one_line_usage_error(excinfo)
    assert message == (f"Fashion-MNIST not found in {tmp_path / 'nowhere'}: install it with "
                       "`apt-get install -y dataset-fashion-mnist` or pass --data-dir")


@pytest.mark.parametrize("damage", ["magic", "truncated", "count_mismatch", "bad_gzip", "label_range"])
def test_fashion_mnist_corrupt(tmp_path: Path, damage: str) -> None:
    _write_idx(tmp_path, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    labels = tmp_path / "train-labels-idx1-ubyte"
    if damage == "magic":
        images.write_bytes((2049).to_bytes(4, "big") + images.read_bytes()[4:])
    elif damage == "truncated":
        images.write_bytes(images.read_bytes()[:-100])
    elif damage == "count_mismatch":
        labels.write_bytes(_idx_bytes(np.zeros(11, np.uint8), 2049))
    elif damage == "bad_gzip":
        labels.unlink()
        (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b" + b"not gzip at all")
    else:
        labels.write_bytes(_idx_bytes(np.full(12, 10, np.uint8), 2049))
    with pytest.raises(UsageError) as excinfo:
        load_dataset("fashion_mnist", data_dir=tmp_path)
    assert "corrupt Fashion-MNIST" in _one_line_usage_error(excinfo)


@pytest.mark.skipif(not Path(DEFAULT_DIR).is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist() -> None:
    train, test = load_dataset("fashion_mnist")
    assert train.images.shape == (60_000, 28, 28, 1) and test.images.shape == (10_000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(train.labels), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(test.labels), np.full(10, 1000))
    assert train.mean[0] == pytest.approx(0.2860, abs=1e-4) and train.std[0] == pytest.approx(0.3530, abs=1e-4)


# ---------------------------------------------------------------- digits, CIFAR, npz


def test_digits() -> None:
    train, test = load_dataset("digits")
    assert train.images.shape == (1437, 32, 32, 1) and test.images.shape == (360, 32, 32, 1)
    assert train.images.dtype == np.uint8 and train.images.max() == 255 and train.images.min() == 0
    assert not train.flip and train.num_classes == 10
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=10) >= 35, True)  # stratified
    again, _ = load_dataset("digits")
    np.testing.assert_array_equal(again.labels, train.labels)  # fixed split
    small, _ = load_dataset("digits", image_size=8)
    assert small.images.shape == (1437, 8, 8, 1)
    assert set(np.unique(small.images)) <= {round(v * 255 / 16) for v in range(17)}


def _write_cifar(root: Path, num_classes: int) -> dict:
    rng = np.random.default_rng(num_classes)
    if num_classes == 10:
        folder, names, label_key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"
        meta = ("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    else:
        folder, names, label_key = root / "cifar-100-python", ["train", "test"], b"fine_labels"
        meta = ("meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    folder.mkdir()
    written = {}
    for name in names:
        data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, num_classes, 3)]
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": data, label_key: labels, b"coarse_labels": [0, 0, 0]}, fh)
        written[name] = (data, labels)
    with open(folder / meta[0], "wb") as fh:
        pickle.dump(meta[1], fh)
    return written


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_pickle_layout(tmp_path: Path, num_classes: int) -> None:
    written = _write_cifar(tmp_path, num_classes)
    train, test = load_dataset(f"cifar{num_classes}", data_dir=tmp_path)
    n_train = 15 if num_classes == 10 else 3
    assert train.images.shape == (n_train, 32, 32, 3) and test.images.shape == (3, 32, 32, 3)
    assert train.num_classes == num_classes and len(train.class_names) == num_classes
    data, labels = written["test_batch" if num_classes == 10 else "test"]
    # channel-major rows: pixel (r, c) of channel k is data[k * 1024 + r * 32 + c]
    assert test.images[1, 2, 5, 0] == data[1, 0 * 1024 + 2 * 32 + 5]
    assert test.images[1, 2, 5, 2] == data[1, 2 * 1024 + 2 * 32 + 5]
    np.testing.assert_array_equal(test.labels, labels)


def test_cifar_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as excinfo:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "CIFAR-10 not found" in _one_line_usage_error(excinfo)
    _write_cifar(tmp_path, 10)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(UsageError) as excinfo:
        load_dataset("cifar10", data_dir=tmp_path / "cifar-10-batches-py")
    assert "corrupt CIFAR file" in _one_line_usage_error(excinfo)


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "float"])
def test_npz(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(1)
    shape = (6, 16, 16) if layout == "NHW" else (6, 16, 16, 3)
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    stored = x / 255.0 if layout == "float" else x
    path = tmp_path / "d.npz"
    np.savez(path, x_train=stored, y_train=np.array([0, 1, 2, 3, 4, 0]), x_test=stored[:2], y_test=np.array([1, 6]))
    train, test = load_dataset("npz", data_dir=path)
    expected = x[..., None] if layout == "NHW" else x
    np.testing.assert_array_equal(train.images, expected)
    assert test.images.shape == (2,) + expected.shape[1:] and train.num_classes == 7
    np.testing.assert_array_equal(test.labels, [1, 6])


def test_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        load_dataset("npz", data_dir=tmp_path / "absent.npz")
    np.savez(tmp_path / "partial.npz", x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(2, int))
    with pytest.raises(UsageError) as excinfo:
        load_dataset("npz", data_dir=tmp_path / "partial.npz")
    assert "missing x_test, y_test" in _one_line_usage_error(excinfo)
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(UsageError):
        load_dataset("npz", data_dir=tmp_path / "broken.npz")


def test_unknown_dataset() -> None:
    with pytest.raises(UsageError) as excinfo:
        load_dataset("mnist2")
    assert "unknown dataset 'mnist2'" in _one_line_usage_error(excinfo)
    assert set(DATASETS) == {"fashion_mnist", "digits", "cifar10", "cifar100", "npz", "imagefolder"}


# ---------------------------------------------------------------- image folder (Grain)

CLASSES = ("ant", "bee", "cow")


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory) -> Path:
    """Class c's images are uniform grey 60 * c + 20 (+ i), so labels are checkable from pixels."""
    root = tmp_path_factory.mktemp("imagefolder")
    for split, count in (("train", 5), ("val", 3)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                img = Image.fromarray(np.full((24 + 4 * i, 30, 3), 60 * c + 20 + i, np.uint8))
                img.save(folder / f"{i}.{'png' if i % 2 else 'jpg'}", quality=95)
    (root / "train" / "bee" / "notes.txt").write_text("not an image")
    return root


def _grey_class(images: np.ndarray) -> np.ndarray:
    return np.round((images.reshape(len(images), -1).mean(1) - 20) / 60).astype(int)


def test_imagefolder_train_stream(image_tree: Path) -> None:
    train, test = load_dataset("imagefolder", data_dir=image_tree, image_size=16)
    assert train.num_classes == 3 and train.class_names == CLASSES and len(train) == 15 and len(test) == 9
    assert train.image_shape == (16, 16, 3) and train.steps_per_epoch(4) == 3
    batches = list(train.batches(4, seed=3, num_steps=6, num_workers=0))
    assert len(batches) == 6
    for images, labels in batches:
        assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8 and labels.dtype == np.int32
        np.testing.assert_array_equal(_grey_class(images), labels)
    first_epoch = np.concatenate([b[1] for b in batches[:3]])
    assert len(first_epoch) == 12 and np.bincount(first_epoch, minlength=3).max() <= 5
    resumed = list(train.batches(4, seed=3, start_step=4, num_steps=2, num_workers=0))
    for a, b in zip(batches[4:], resumed):
        np.testing.assert_array_equal(a[0], b[0])
    other = list(train.batches(4, seed=4, num_steps=3, num_workers=0))
    assert any((a[1] != b[1]).any() for a, b in zip(batches, other))


def test_imagefolder_eval_padding_and_workers(image_tree: Path) -> None:
    train, test = load_dataset("imagefolder", data_dir=image_tree, image_size=16)
    batches = list(test.batches(4, num_workers=0))
    assert len(batches) == 3 == test.steps_per_epoch(4)
    masks = np.concatenate([b[2] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    assert masks.sum() == 9 and not masks[9:].any()
    np.testing.assert_array_equal(labels[masks], test.labels)
    for images, labels_, _ in batches:
        assert images.shape == (4, 16, 16, 3)
        np.testing.assert_array_equal(_grey_class(images), labels_)
    # one worker process decodes exactly the same batches as the main process
    inline = list(train.batches(4, seed=1, num_steps=3, num_workers=0))
    pooled = list(train.batches(4, seed=1, num_steps=3, num_workers=1))
    assert len(pooled) == 3
    for a, b in zip(inline, pooled):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_imagefolder_missing_and_corrupt(tmp_path: Path, image_tree: Path) -> None:
    with pytest.raises(UsageError) as excinfo:
        load_dataset("imagefolder", data_dir=tmp_path)
    assert "image folder not found" in _one_line_usage_error(excinfo)
    (tmp_path / "train" / "x").mkdir(parents=True)
    (tmp_path / "val" / "x").mkdir(parents=True)
    (tmp_path / "train" / "x" / "bad.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "val" / "x" / "bad.png").write_bytes(b"not a png")
    _, test = load_dataset("imagefolder", data_dir=tmp_path, image_size=8)
    with pytest.raises(UsageError, match="corrupt image"):
        next(test.batches(1, num_workers=0))


# ---------------------------------------------------------------- on-device pipeline


def _toy(n: int = 12, size: int = 8, channels: int = 1) -> ArrayDataset:
    images = (np.arange(n * size * size * channels) % 251).astype(np.uint8).reshape(n, size, size, channels)
    images[:, 0, 0, 0] = np.arange(n)  # example id readable from the corner pixel
    return ArrayDataset(images, np.arange(n, dtype=np.int32) % 3, 3, "toy", (0.5,) * channels,
                        (0.25,) * channels, crop_padding=2, flip=True)


def test_epoch_permutation_covers_each_example_once() -> None:
    key = jax.random.key(7)
    assert steps_per_epoch(12, 4) == 3 and steps_per_epoch(13, 4) == 3
    assert steps_per_epoch(13, 4, drop_remainder=False) == 4 and num_eval_batches(13, 4) == 4
    epochs = []
    for epoch in range(2):
        seen = np.concatenate([np.asarray(batch_indices(key, epoch * 3 + s, 12, 4)) for s in range(3)])
        np.testing.assert_array_equal(np.sort(seen), np.arange(12))
        np.testing.assert_array_equal(seen, np.asarray(epoch_permutation(key, epoch, 12)))
        epochs.append(seen)
    assert (epochs[0] != epochs[1]).any()  # reshuffled every epoch
    perm = epoch_permutation(key, 1, 12)
    np.testing.assert_array_equal(batch_indices(key, 4, 12, 4, perm), batch_indices(key, 4, 12, 4))


def test_train_batch_deterministic_and_vmappable() -> None:
    ds = _toy()
    spec = pipeline_spec(ds, batch_size=4)
    images, labels = to_device(ds)
    fn = jax.jit(train_batch, static_argnames="spec")
    key = jax.random.key(0)
    x1, y1 = fn(key, 5, images, labels, spec=spec)
    x2, y2 = fn(key, 5, images, labels, spec=spec)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert x1.shape == (4, 8, 8, 1) and x1.dtype == jnp.float32 and y1.dtype == jnp.int32
    # values are normalised uint8: (v / 255 - 0.5) / 0.25 lies in [-2, 2]
    assert float(x1.min()) >= -2.0 and float(x1.max()) <= 2.0
    x3, _ = fn(jax.random.key(1), 5, images, labels, spec=spec)
    assert not np.array_equal(x1, x3)
    keys = jax.vmap(jax.random.key)(jnp.arange(3))
    perms = jax.vmap(epoch_permutation, in_axes=(0, None, None))(keys, 1, 12)
    xs, ys = jax.jit(jax.vmap(lambda k, p: train_batch(k, 5, images, labels, spec, p)))(keys, perms)
    assert xs.shape == (3, 4, 8, 8, 1)
    for i in range(3):
        xi, yi = fn(jax.random.key(i), 5, images, labels, spec=spec)
        np.testing.assert_allclose(xs[i], xi, rtol=0, atol=0)
        np.testing.assert_array_equal(ys[i], yi)
    steps = list(device_batches(key, images, labels, spec, start_step=5, num_steps=2))
    np.testing.assert_array_equal(steps[0][0], x1)
    assert len(list(device_batches(key, images, labels, spec))) == 3


def test_augmentation_crop_and_flip() -> None:
    rng = np.random.default_rng(0)
    batch = jnp.asarray(rng.integers(1, 256, (64, 6, 6, 2), dtype=np.uint8))
    out = np.asarray(augment(jax.random.key(3), batch, crop_padding=2, pad_mode="constant", flip=True))
    assert out.shape == batch.shape and out.dtype == np.uint8
    src = np.pad(np.asarray(batch), ((0, 0), (2, 2), (2, 2), (0, 0)))
    shifts, flips = set(), 0
    for i in range(64):  # every output is a 6x6 window of the zero-padded image, maybe mirrored
        windows = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (0, 1)
                   if np.array_equal(out[i], (src[i, dy:dy + 6, dx:dx + 6][:, ::-1] if f else
                                              src[i, dy:dy + 6, dx:dx + 6]))]
        assert windows, i
        shifts.add(windows[0][:2])
        flips += windows[0][2]
    assert len(shifts) > 8 and 16 < flips < 48
    no_aug = augment(jax.random.key(3), batch, crop_padding=0, flip=False)
    np.testing.assert_array_equal(no_aug, batch)
    reflect = np.asarray(random_crop(jax.random.key(0), batch, 2, "reflect"))
    assert (reflect > 0).all()  # reflection never introduces the zero fill
    digits_like = pipeline_spec(ArrayDataset(np.zeros((4, 8, 8, 1), np.uint8), np.zeros(4, np.int32), 1,
                                             "d", (0.0,), (1.0,), flip=False), batch_size=2)
    assert digits_like.flip is False and pipeline_spec(_toy(), 4, flip=False).flip is False


def test_normalize_matches_statistics() -> None:
    ds = _toy(channels=3)
    x = normalize(jnp.asarray(ds.images), ds.mean, ds.std)
    expected = (ds.images / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(np.asarray(x), expected, atol=1e-5)
    assert normalize(jnp.asarray(ds.images), ds.mean, ds.std, "bfloat16").dtype == jnp.bfloat16


def test_eval_batches_pad_and_mask_each_example_once() -> None:
    ds = _toy(n=10)
    images, labels = to_device(ds)
    fn = jax.jit(eval_batch, static_argnames=("batch_size", "mean", "std", "dtype"))
    ids, masks = [], []
    for i in range(num_eval_batches(10, 4)):
        x, y, mask = fn(i, images, labels, batch_size=4, mean=ds.mean, std=ds.std)
        assert x.shape == (4, 8, 8, 1) and mask.dtype == jnp.bool_
        corner = np.round(np.asarray(x[:, 0, 0, 0]) * 0.25 * 255 + 0.5 * 255).astype(int)
        ids.append(corner)
        masks.append(np.asarray(mask))
    ids, masks = np.concatenate(ids), np.concatenate(masks)
    assert masks.sum() == 10 and masks[:10].all()
    np.testing.assert_array_equal(ids[masks], np.arange(10))  # in order, each exactly once
