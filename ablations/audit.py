"""Audit one trained MobileNetV2 layer by layer: Appendix A's invertibility condition and how much
of each block's input its output still carries.

``python -m ablations.audit RUN_DIR [--count N] [--train-count M] [--out DIR] [--data-dir DIR]``
restores a complete run (its checkpoint's weights and BatchNorm running averages) and audits it on
the first N test images of the run's dataset, normalised as in training; the block-input decoders
are fitted on the first M training images (default 4096 for in-memory datasets, none for streamed
image folders, whose 224 px feature maps are too large to decode).

``python -m ablations.audit --keras-weights FILE (--images DIR | --dataset NAME) [--image-size 224]``
audits a ``keras.applications.MobileNetV2`` weights file (:mod:`manifold_lab.models.keras_import`)
on natural images: ``--images DIR`` takes the JPEG and PNG files under DIR (sorted, sub-folders
included), decoded as :mod:`manifold_lab.data.imagefolder` decodes evaluation images (shorter side
to 256/224 of the input size, centre crop), ``--dataset NAME`` the test split of a dataset of
:mod:`manifold_lab.data` resized to the input; both scaled to [-1, 1] as Keras' MobileNetV2
preprocessing expects. The paper's own network, audited with the published ImageNet weights::

    # on a machine with Keras (pip install keras), once:
    python -c "import keras; keras.applications.MobileNetV2(weights='imagenet').save_weights('mnv2.weights.h5')"
    # here, with any folder of natural photographs (e.g. a few hundred ImageNet validation images):
    python -m ablations.audit --keras-weights mnv2.weights.h5 --images photos/ --count 256 --out audit/imagenet

(The Keras-Applications file ``mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5`` works
as well.) At 224 px no decoder is fitted (every block output has more than ``--max-decoder-features``
values) unless ``--train-count`` names training images, which then come from the same source.

Per block (:class:`manifold_lab.invertibility.BlockAudit`): the share of pixels where Lemma 2
holds (the active units, strictly between 0 and 6, of the expansion's BatchNorm-folded 1x1 map have
rank equal to the block's input width), the distribution of the number of active units against
that threshold (as in Fig. 7), the smallest singular value of the active rows, the explained
variance of the best linear decoder of the block input from the block output, and the share of
the projection's outputs clipped by a ReLU6 or ReLU bottleneck. Writes ``OUT/audit.json`` (the
blocks, what was audited and the provenance, as :mod:`ablations.measure` records it) and
``OUT/audit.png``; prints one line per expanded block. Bad flags, folders or files: one line,
exit code 2.
"""

from __future__ import annotations

import hashlib
import sys
import zipfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from manifold_lab.atomic import atomic_savefig, atomic_write_json
from manifold_lab.cli import (ArgumentParser, Bounds, UsageError, command_name, nonnegative_int, positive_int,
                              run_main, writable_dir)
from manifold_lab.train.config import BATCH, IMAGE_SIZE
from ablations.audit_records import MAX_DECODER_FEATURES, BlockRecord, expanded_blocks, read_blocks, whole_batches
from ablations.measurements import jsonable

PROG = command_name("audit", "ablations.audit")

FORMAT = 1
#: Training images of the decoders for in-memory datasets (streamed ones default to none).
DEFAULT_TRAIN_IMAGES = 4096
#: ``--max-decoder-features``: a decoder's float64 Gram matrix of 16384 features takes 2 GiB.
DECODER_FEATURES = Bounds(1, 16384, integral=True)
#: Keras' MobileNetV2 preprocessing: uint8 pixels to [-1, 1].
KERAS_SCALING = "x / 127.5 - 1 (Keras' MobileNetV2 preprocessing)"


class Source:
    """What is audited: the model, the images it sees and how they were made, as JSON."""

    def __init__(self, model: Any, test: np.ndarray, train: np.ndarray | None, description: dict[str, Any]) -> None:
        self.model, self.test, self.train, self.description = model, test, train, description


# ----------------------------------------------------------------------------------- images


def decode_files(files: Sequence[str], image_size: int) -> np.ndarray:
    """uint8 ``[N, image_size, image_size, 3]`` of image files, decoded as the project decodes
    evaluation images (:class:`manifold_lab.data.imagefolder.ImageFolder`: RGB, shorter side to
    256/224 of the size, centre crop), in this process."""
    from manifold_lab.data.imagefolder import ImageFolder

    if not files:
        return np.zeros((0, image_size, image_size, 3), np.uint8)
    folder = ImageFolder([(str(f), 0) for f in files], ("images",), image_size, train=False)
    batch = min(64, len(files))
    chunks = [images[mask] for images, _, mask in folder.batches(batch, num_workers=0)]
    return np.concatenate(chunks)


def image_files(directory: Path) -> list[str]:
    """The JPEG and PNG files under ``directory`` (sub-folders included), sorted; UsageError if none."""
    from manifold_lab.data.imagefolder import EXTENSIONS

    if not directory.is_dir():
        raise UsageError(f"--images {str(directory)!r} is not a directory")
    files = sorted(str(p) for p in directory.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not files:
        raise UsageError(f"no images ({', '.join(EXTENSIONS)}) under {str(directory)!r}")
    return files


def _split_images(split: Any, count: int, image_size: int | None = None) -> np.ndarray:
    """The first ``count`` uint8 images of a dataset split (in memory, or a streamed image folder
    decoded in evaluation mode)."""
    if hasattr(split, "images"):
        return np.asarray(split.images[:count])
    return decode_files([path for path, _ in split.files[:count]], image_size or split.image_size)


def _normalised(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 images to ``(x / 255 - mean) / std`` as the training pipeline computes it (float32)."""
    from manifold_lab.data import normalize

    return np.asarray(normalize(images, tuple(mean), tuple(std)))


# ----------------------------------------------------------------------------------- sources


def run_source(run_dir: Path, count: int, train_count: int | None, data_dir: str | None) -> Source:
    """A complete run's restored model and images of its dataset (see the module docstring)."""
    from manifold_lab.data import load_dataset
    from manifold_lab.train.run_dir import RunDir

    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise UsageError(f"run directory {str(run_dir)!r} does not exist")
    if not run.is_complete():
        raise UsageError(f"{run_dir} is not a complete run (no valid summary.json)")
    config = run.config_json()
    data_dir = data_dir if data_dir is not None else config.get("data_dir")
    train_split, test_split = load_dataset(config["dataset"], data_dir=data_dir, image_size=config.get("image_size"))
    streamed = not hasattr(test_split, "images")
    train_count = (0 if streamed else DEFAULT_TRAIN_IMAGES) if train_count is None else train_count
    test = _normalised(_split_images(test_split, count), test_split.mean, test_split.std)
    train = (_normalised(_split_images(train_split, train_count), test_split.mean, test_split.std)
             if train_count else None)
    summary = run.summary()
    description = {"kind": "run", "run_dir": str(run_dir), "run": run.path.name,
                   "config_sha256": summary.get("config_sha256"), "steps": summary.get("steps"),
                   "dataset": config["dataset"], "images": "first test images of the dataset",
                   "normalisation": "(x / 255 - mean) / std of the training split, as in training"}
    return Source(run.restore_model(), test, train, description)


def _keras_images(args: Any, files: list[str] | None, in_channels: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """uint8 test and training images for a Keras model from ``--images`` (its ``files``) or
    ``--dataset``."""
    from manifold_lab.data import load_dataset

    size, train_count = args.image_size, args.train_count or 0
    if files is not None:
        test = decode_files(files[:args.count], size)
        train = decode_files(files[args.count:args.count + train_count], size) if train_count else None
        if train is not None and not len(train):
            raise UsageError(f"--train-count: no images under {args.images!r} beyond the first {args.count}")
        return test, train, f"files under {args.images}"
    train_split, test_split = load_dataset(args.dataset, data_dir=args.data_dir, image_size=size)
    if test_split.image_shape[-1] != in_channels:
        raise UsageError(f"dataset {args.dataset!r} has {test_split.image_shape[-1]} channels; the Keras "
                         f"model takes {in_channels}")
    train = _split_images(train_split, train_count, size) if train_count else None
    return _split_images(test_split, args.count, size), train, f"test split of dataset {args.dataset}"


def keras_source(args: Any) -> Source:
    """A Keras MobileNetV2 weights file in our model, and natural images scaled to [-1, 1]."""
    from manifold_lab.models.keras_import import load_keras_weights

    path = Path(args.keras_weights)
    if not path.is_file():
        raise UsageError(f"--keras-weights {str(path)!r} is not a file")
    if args.images is None and args.dataset is None:
        raise UsageError("--keras-weights needs --images DIR or --dataset NAME")
    files = image_files(Path(args.images)) if args.images is not None else None
    try:
        model = load_keras_weights(path)
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as exc:
        raise UsageError(f"--keras-weights {str(path)!r}: {str(exc).splitlines()[0]}") from None
    test, train, origin = _keras_images(args, files, model.config.in_channels)
    scale = lambda x: x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)  # noqa: E731
    description = {"kind": "keras", "weights": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                   "images": origin, "image_size": args.image_size, "normalisation": KERAS_SCALING}
    return Source(model, scale(test), None if train is None else scale(train), description)


# ----------------------------------------------------------------------------------- audit


def _model_description(model: Any, images: np.ndarray) -> dict[str, Any]:
    c = model.config
    return {"width": c.width, "layout": c.layout, "bottleneck_activation": c.bottleneck_activation,
            "residual": c.residual, "num_classes": c.num_classes, "image_shape": list(images.shape[1:])}


def audit_document(source: Source, batch_size: int, max_features: int, command: str) -> dict[str, Any]:
    """Audit ``source`` and return the ``audit.json`` object (see :func:`main`)."""
    from manifold_lab.invertibility import audit_model
    from ablations.measure import provenance

    if not len(source.test):
        raise UsageError("no test images to audit")
    test = whole_batches(source.test, batch_size)
    train = None if source.train is None or not len(source.train) else whole_batches(source.train, batch_size)
    start = time.perf_counter()
    blocks = audit_model(source.model, test, train, batch_size=batch_size, max_decoder_features=max_features)
    inputs = {"test_images": int(len(test)), "train_images": 0 if train is None else int(len(train)),
              "batch_size": batch_size, "max_decoder_features": max_features}
    return jsonable({"format": FORMAT, "what": "Appendix A audit: per-block invertibility and information",
                     "source": source.description, "model": _model_description(source.model, source.test),
                     "inputs": inputs, "provenance": provenance(command, time.perf_counter() - start),
                     "blocks": [b.to_dict() for b in blocks]})


def summary_lines(blocks: Sequence[BlockRecord]) -> list[str]:
    """One line per expanded block: Lemma 2 share, pixels below the threshold, decoder, clipping."""
    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.2f}%"
    return [f"block {b.index:2d}: {b.in_channels:4d} -> {b.expanded_channels:4d}: Lemma 2 holds at "
            f"{pct(b.invertible_share)} of {b.pixels} pixels, below threshold {pct(b.below_threshold_share)}, "
            f"decoder EV {pct(b.decoder_ev)}, clipped {pct(b.clipped_share)}" for b in expanded_blocks(blocks)]


def write_outputs(out: Path, document: dict[str, Any]) -> tuple[Path, Path]:
    """``audit.json`` and ``audit.png`` under ``out``."""
    import matplotlib.pyplot as plt

    from ablations import plots

    blocks = read_blocks(document["blocks"])
    json_path, png_path = out / "audit.json", out / "audit.png"
    atomic_write_json(json_path, document)
    title = document["source"].get("run") or Path(document["source"].get("weights", "model")).name
    fig = plots.plot_audit(blocks, f"{title}: {document['inputs']['test_images']} test images")
    atomic_savefig(fig, png_path, metadata={"Software": None}, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return json_path, png_path


def build_parser() -> ArgumentParser:
    """The command line of ``python -m ablations.audit`` (``manifold-lab audit``)."""
    parser = ArgumentParser(prog=PROG, description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("run_dir", nargs="?", default=None, help="a complete run directory")
    network = parser.add_argument_group("network (a run, or Keras weights)")
    network.add_argument("--keras-weights", default=None, metavar="FILE", help="a Keras MobileNetV2 weights "
                         "file (.keras, .weights.h5 or legacy .h5) instead of a run")
    source = network.add_mutually_exclusive_group()
    source.add_argument("--images", default=None, metavar="DIR", help="with --keras-weights: JPEG/PNG files")
    source.add_argument("--dataset", default=None, metavar="NAME",
                        help="with --keras-weights: a dataset's test split")
    network.add_argument("--image-size", type=IMAGE_SIZE, default=224, help="with --keras-weights: input size")
    audit = parser.add_argument_group("audit")
    audit.add_argument("--count", type=positive_int, default=512, help="test images audited")
    audit.add_argument("--train-count", type=nonnegative_int, default=None, metavar="M",
                       help=f"training images of the decoders (default: {DEFAULT_TRAIN_IMAGES} for in-memory "
                            "datasets of a run, else none)")
    audit.add_argument("--batch-size", type=BATCH, default=128,
                       help="images per forward pass; images beyond whole batches are not audited")
    audit.add_argument("--max-decoder-features", type=DECODER_FEATURES, default=MAX_DECODER_FEATURES,
                       help="blocks whose output has more values per image than this get no decoder")
    where = parser.add_argument_group("data and output")
    where.add_argument("--data-dir", default=None, help="dataset folder, if the run or --dataset needs one")
    where.add_argument("--out", default=None, help="output folder (default: audit/<run or weights name>)")
    return parser


def _source(args: Any) -> Source:
    """The run or the Keras file named on the command line (exactly one)."""
    if (args.run_dir is None) == (args.keras_weights is None):
        raise UsageError("give either RUN_DIR or --keras-weights FILE")
    if args.run_dir is not None:
        if args.images is not None or args.dataset is not None:
            raise UsageError("--images and --dataset go with --keras-weights; a run is audited on its dataset")
        return run_source(Path(args.run_dir), args.count, args.train_count, args.data_dir)
    return keras_source(args)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ablations.audit``: audit a run or a Keras file; write audit.json and audit.png."""
    args = build_parser().parse_args(argv)
    name = Path(args.run_dir).resolve().name if args.run_dir else Path(args.keras_weights or "model").name
    out = Path(args.out) if args.out else Path("audit") / name
    source = _source(args)
    writable_dir(out)
    command = "python -m ablations.audit " + " ".join(sys.argv[1:] if argv is None else argv)
    document = audit_document(source, args.batch_size, args.max_decoder_features, command)
    for line in summary_lines(read_blocks(document["blocks"])):
        print(line)
    for path in write_outputs(out, document):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog=PROG))
