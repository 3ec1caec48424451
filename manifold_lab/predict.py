"""``manifold-lab predict RUN_DIR IMAGES...``: class probabilities of images with a trained run.

Images go through the run's own preprocessing, read from ``config.json``'s ``resolved``: resized
to the run's image size (bilinear, as the dataset loaders resize; for ``imagefolder`` runs the
shorter side to ``size * 256 / 224`` and the centre crop, as its evaluation), converted to the run's
channels (grey or RGB), normalised with the training data's ``mean``/``std``. Runs written before
``resolved`` recorded ``mean``/``std`` take them from the dataset (which must then be at hand).
Example::

    from manifold_lab.predict import predict, load_predictor
    probs = predict("runs/digits", ["a.png", "b.jpg"])    # float32 [2, num_classes]
    predictor = load_predictor("runs/digits")            # restore once, predict many times
    probs = predictor(test_images_uint8)                 # arrays: [N,H,W,C], [N,H,W], [H,W,C], [H,W]

Inputs: paths of image files (anything Pillow reads: PNG, JPEG, ...), PIL images, and numpy
arrays, alone or in a list. Integer arrays are pixel values 0-255; float arrays pixel values on the
[0, 1] scale. An array of 4 dimensions (or 3 with more than 4 channels) is a batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from manifold_lab.cli import ArgumentParser, UsageError, command_name, positive_int, run_main

PROG = command_name("predict", "manifold_lab.predict")
#: The ratio of the resized shorter side to the crop for ``imagefolder`` runs (their evaluation).
CENTRE_CROP_RATIO = 256 / 224


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a run's network expects its input: ``image_shape`` ``(H, W, C)``; the training data's
    ``mean``/``std`` per channel on the [0, 1] scale; ``centre_crop``: resize the shorter side to
    ``H * 256 / 224`` and crop the centre (else resize to ``H x W``); ``class_names`` (may be
    empty); ``dtype`` of the network's input."""

    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    centre_crop: bool = False
    class_names: tuple[str, ...] = ()
    dtype: str = "float32"

    @classmethod
    def of_run(cls, run_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None
               ) -> Preprocessing:
        """The preprocessing recorded in ``run_dir/config.json`` (the dataset's statistics for older
        runs that did not record them)."""
        from manifold_lab.train.run_dir import RunDir
        run = RunDir(run_dir)
        cfg, resolved = run.train_config().resolved(), run.resolved()
        if "mean" not in resolved or "std" not in resolved:
            from manifold_lab.data import load_dataset
            train = load_dataset(cfg.dataset, data_dir if data_dir is not None else cfg.data_dir,
                                 cfg.image_size)[0]
            resolved = {**resolved, "mean": train.mean, "std": train.std,
                        "class_names": getattr(train, "class_names", ())}
        try:
            shape = tuple(int(d) for d in resolved["image_shape"])
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"corrupt run config {run.config_path}: no image shape") from None
        mean, std = tuple(map(float, resolved["mean"])), tuple(map(float, resolved["std"]))
        return cls(shape, mean, std,  # type: ignore[arg-type]
                   centre_crop=cfg.dataset == "imagefolder",
                   class_names=tuple(map(str, resolved.get("class_names") or ())), dtype=cfg.compute_dtype)

    def pixels(self, image: Any) -> np.ndarray:
        """One image (a path, a PIL image or an array) as float32 pixel values 0-255 of shape
        :attr:`image_shape`."""
        from PIL import Image
        if isinstance(image, (str, os.PathLike)):
            image = _open(Path(image))
        if isinstance(image, Image.Image):
            return self._fit(image)
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise UsageError(f"an image array must be [H,W], [H,W,C] with C in 1, 3, 4; got {array.shape}")
        values = array.astype(np.float32) * (255.0 if np.issubdtype(array.dtype, np.floating) else 1.0)
        if array.shape[:2] == self.image_shape[:2] and array.shape[-1] == self.image_shape[-1]:
            return values
        as_uint8 = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return self._fit(Image.fromarray(as_uint8[..., 0] if as_uint8.shape[-1] == 1 else as_uint8))

    def _fit(self, image: Any) -> np.ndarray:
        """A PIL image in the run's channels and size, as float32 pixel values."""
        from PIL import Image
        height, width, channels = self.image_shape
        image = image.convert("L" if channels == 1 else "RGB")
        if self.centre_crop:
            short = max(height, round(height * CENTRE_CROP_RATIO))
            scale = short / min(image.size)
            new_w, new_h = max(short, round(image.size[0] * scale)), max(short, round(image.size[1] * scale))
            image = image.resize((new_w, new_h), Image.BILINEAR)
            top, left = (new_h - height) // 2, (new_w - width) // 2
            image = image.crop((left, top, left + width, top + height))
        elif image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
        array = np.asarray(image, np.float32)
        return array[..., None] if channels == 1 else array

    def batch(self, images: Any) -> np.ndarray:
        """Images (one, a list, or a batch array) as normalised network input ``[N, H, W, C]``."""
        from manifold_lab.data.pipeline import normalize
        pixels = np.stack([self.pixels(image) for image in _as_list(images)])
        return np.asarray(normalize(pixels, self.mean, self.std, self.dtype))


def _open(path: Path) -> Any:
    """A PIL image read from ``path`` (UsageError when missing or unreadable)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise UsageError(f"no image at {path}") from None
    except (OSError, UnidentifiedImageError) as exc:
        raise UsageError(f"cannot read image {path}: {exc}") from None


def _as_list(images: Any) -> list[Any]:
    """A list of single images from one image, a sequence of them, or a batch array."""
    if isinstance(images, (str, os.PathLike)) or hasattr(images, "getpixel"):
        return [images]
    if isinstance(images, np.ndarray) or hasattr(images, "__array__"):
        array = np.asarray(images)
        if array.ndim == 4 or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
            return list(array)
        return [array]
    if isinstance(images, Sequence):
        return list(images)
    raise UsageError(f"cannot read images from a {type(images).__name__}")


class Predictor:
    """A restored network with its preprocessing: ``predictor(images)`` gives class probabilities
    (float32 ``[N, num_classes]``); :meth:`logits` the raw scores. Batches of ``batch_size``
    images run through one jitted program (the last one padded)."""

    def __init__(self, model: Any, preprocessing: Preprocessing, batch_size: int = 256) -> None:
        import jax
        from flax import nnx
        graphdef, state = nnx.split(model)
        self.preprocessing, self.batch_size, self._state = preprocessing, batch_size, state
        self._forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False))

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.preprocessing.class_names

    def logits(self, images: Any) -> np.ndarray:
        """The network's float32 scores of ``images`` (see the module docstring for the inputs)."""
        x = self.preprocessing.batch(images)
        size = min(len(x), self.batch_size)
        out = []
        for start in range(0, len(x), size):
            chunk = x[start:start + size]
            padded = np.concatenate([chunk, np.repeat(chunk[:1], size - len(chunk), 0)])
            out.append(np.asarray(self._forward(self._state, padded), np.float32)[:len(chunk)])
        return np.concatenate(out)

    def __call__(self, images: Any) -> np.ndarray:
        """Class probabilities (softmax of :meth:`logits`, float32 ``[N, num_classes]``)."""
        logits = self.logits(images).astype(np.float64)
        exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def load_predictor(run_dir: str | os.PathLike[str], *, weights: str | None = None, step: int | None = None,
                   data_dir: str | os.PathLike[str] | None = None) -> Predictor:
    """The :class:`Predictor` of a run directory: checkpoint ``step`` (default: the newest),
    ``weights`` ``raw`` or ``ema`` (default: as the run evaluated)."""
    from manifold_lab.train.run_dir import RunDir
    if weights not in (None, "raw", "ema"):
        raise UsageError(f"weights must be raw or ema, got {weights!r}")
    model = RunDir(run_dir).restore_model(use_ema=None if weights is None else weights == "ema",
                                          require_complete=False, step=step)
    return Predictor(model, Preprocessing.of_run(run_dir, data_dir))


def predict(run_dir_or_model: Any, images: Any, *, preprocessing: Preprocessing | None = None,
            weights: str | None = None, step: int | None = None) -> np.ndarray:
    """Class probabilities (float32 ``[N, num_classes]``) of ``images`` by a run directory's
    network (restored as in :func:`load_predictor`), a :class:`Predictor`, or an ``nnx.Module``
    with its ``preprocessing`` (required then: the model does not know its input statistics)."""
    if isinstance(run_dir_or_model, Predictor):
        return run_dir_or_model(images)
    if isinstance(run_dir_or_model, (str, os.PathLike)):
        return load_predictor(run_dir_or_model, weights=weights, step=step)(images)
    if preprocessing is None:
        raise ValueError("predicting with a model needs its Preprocessing (image shape, mean, std)")
    return Predictor(run_dir_or_model, preprocessing)(images)


def top_classes(probabilities: np.ndarray, k: int, class_names: Sequence[str] = ()) -> list[list[dict[str, Any]]]:
    """Per image, the ``k`` most probable classes: ``{"class", "name", "probability"}``, best first."""
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    name = lambda c: class_names[c] if c < len(class_names) else str(c)
    return [[{"class": int(c), "name": name(int(c)), "probability": float(p[c])} for c in row]
            for p, row in zip(probabilities, order)]


def build_parser() -> ArgumentParser:
    """The command line of ``manifold-lab predict``."""
    parser = ArgumentParser(prog=PROG, description="Class probabilities of image files with a trained run, "
                            "through the run's recorded preprocessing.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (config.json, checkpoints/)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    model = parser.add_argument_group("network")
    model.add_argument("--weights", choices=("raw", "ema"), default=None,
                       help="raw weights or their moving average (default: ema where the run kept one)")
    model.add_argument("--step", type=positive_int, default=None,
                       help="use this kept checkpoint (default: the newest)")
    model.add_argument("--data-dir", default=None,
                       help="dataset location, for runs that did not record their statistics (default: the run's)")
    out = parser.add_argument_group("output")
    out.add_argument("--top", type=positive_int, default=5, metavar="K",
                     help="print the K most probable classes per image (default: 5)")
    out.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``manifold-lab predict``: print each image's most probable classes; returns the exit code."""
    args = build_parser().parse_args(argv)
    predictor = load_predictor(args.run_dir, weights=args.weights, step=args.step, data_dir=args.data_dir)
    tops = top_classes(predictor(args.images), args.top, predictor.class_names)
    if args.json:
        print(json.dumps({"run_dir": args.run_dir, "predictions": [
            {"image": image, "top": top} for image, top in zip(args.images, tops)]}))
        return 0
    for image, top in zip(args.images, tops):
        print(f"{image}: " + ", ".join(f"{t['name']} {t['probability']:.4f}" for t in top))
    return 0


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`predict`: ``manifold_lab.predict`` names the module (a submodule
    import binds it there) and the function at once."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return predict(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog=PROG))
