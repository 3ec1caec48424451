"""Benchmark: the Appendix A audit (:func:`manifold_lab.invertibility.audit_model`) of one width-0.35
MobileNetV2 on the default JAX backend, as the measuring step runs it (``appendix_a`` in
:mod:`ablations.measure` audits 4 networks per seed like this one).

The network is a trained width-0.35 run of a results folder (``--results``: the first complete run
with width 0.35 and a linear bottleneck under ``RESULTS/<preset>/``, audited on its dataset's
first test and training images, normalised as in training), or without ``--results`` a freshly
initialised width-0.35 ``bneck1`` network at 28 px (seed 0, BatchNorm statistics of the training
images; Fashion-MNIST when installed, else normal noise). Two cases: the Lemma 2 and clipping
audit of the test images alone, and the same with the block-input decoders fitted on the training
images. Each time is the median of ``--repeats`` calls after one untimed warm-up (which compiles),
with the min-max spread; the 1-minute load average before and after is printed with the table.

    .venv/bin/python benchmarks/audit.py [--results results --preset cpu] [--images 512]
        [--train-images 4096] [--repeats 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from manifold_lab.cli import ArgumentParser, UsageError, nonnegative_int, positive_int, run_main  # noqa: E402

WIDTH = 0.35


def find_run(results: Path, preset: str | None) -> Path:
    """The first complete width-0.35 run with a linear bottleneck under the preset's folder."""
    from ablations.cli import open_results
    from manifold_lab.train.run_dir import RunDir

    _, root = open_results(results, preset)
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        run = RunDir(path)
        if run.holds_run() and run.is_complete():
            config = run.config_json()
            if float(config.get("width", 0)) == WIDTH and config.get("bottleneck_activation") == "linear":
                return path
    raise UsageError(f"no complete width-{WIDTH:g} run with a linear bottleneck under {str(root)!r}")


def trained_network(run_dir: Path, images: int, train_images: int) -> tuple[str, Any, np.ndarray, np.ndarray]:
    """(label, restored model, test images, training images) of a trained run."""
    from ablations.measure import test_images, train_images as first_train_images
    from manifold_lab.train.run_dir import RunDir

    run = RunDir(run_dir)
    config = run.config_json()
    test = test_images(config, images)
    if test is None:
        raise UsageError(f"{run_dir}: dataset {config['dataset']!r} is streamed; the benchmark needs in-memory images")
    return (f"trained run {run_dir.name} ({config['dataset']})", run.restore_model(), test,
            first_train_images(config, train_images))


def fresh_network(images: int, train_images: int) -> tuple[str, Any, np.ndarray, np.ndarray]:
    """(label, step-0 width-0.35 bneck1 network at 28 px, test images, training images)."""
    from ablations.analysis import init_model
    from manifold_lab.data import load_dataset, normalize
    from manifold_lab.invertibility import with_population_statistics
    from manifold_lab.models import model_config

    try:
        train, test = load_dataset("fashion_mnist")
        source = "Fashion-MNIST"
        x_test = np.asarray(normalize(test.images[:images], test.mean, test.std))
        x_train = np.asarray(normalize(train.images[:train_images], train.mean, train.std))
    except UsageError:
        source = "normal noise"
        rng = np.random.default_rng(0)
        x_test = rng.standard_normal((images, 28, 28, 1), dtype=np.float32)
        x_train = rng.standard_normal((train_images, 28, 28, 1), dtype=np.float32)
    cfg = model_config("mobilenet_v2", width=WIDTH, layout="bneck1", num_classes=10, in_channels=1)
    model = with_population_statistics(init_model(cfg, 0), x_train if len(x_train) else x_test)
    return f"fresh width-{WIDTH:g} bneck1 network, 28 px ({source})", model, x_test, x_train


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """(median, min, max) seconds of ``repeats`` calls after one untimed warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=None, help="results folder holding a trained run")
    parser.add_argument("--preset", default=None, help="preset folder under --results (default: the only one)")
    parser.add_argument("--images", type=positive_int, default=512, help="test images audited")
    parser.add_argument("--train-images", type=nonnegative_int, default=4096, help="training images of the decoders")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--repeats", type=positive_int, default=3)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import jax

    from manifold_lab.invertibility import audit_model

    args = build_parser().parse_args(argv)
    load_before = os.getloadavg()[0]
    label, model, test, train = (trained_network(find_run(args.results, args.preset), args.images, args.train_images)
                                 if args.results is not None else fresh_network(args.images, args.train_images))
    cases = [("Lemma 2 + clipping", None)] + ([(f"+ decoders ({len(train)} train images)", train)]
                                             if len(train) else [])
    rows = []
    for name, fit in cases:
        t = timed(lambda: audit_model(model, test, fit, batch_size=args.batch_size), args.repeats)
        rows.append(f"| {name} | {t[0]:.2f} ({t[1]:.2f}-{t[2]:.2f}) | {1e3 * t[0] / len(test):.2f} |")
    print(f"{label}; {len(test)} test images, batch {args.batch_size}; backend {jax.default_backend()}, "
          f"JAX {jax.__version__}, {len(os.sched_getaffinity(0))} usable cores; median (min-max) of "
          f"{args.repeats} after a warm-up; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print("| case | s per audit | ms per test image |\n|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog="benchmarks/audit.py"))
