"""Every numeric input has bounds: an infinite, absurdly large or malformed number stops the command
with one line and exit code 2 before any work (no traceback, no hang, no memory exhaustion)."""

from __future__ import annotations

import argparse
import pickle
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from manifold_lab.cli import Bounds, UsageError, number, run_main
from manifold_lab.models.config import NetworkOptions
from manifold_lab.train.config import TrainConfig

TRAIN = ["--dataset", "digits", "--image-size", "16", "--steps", "1", "--quiet"]


def _exits_2(main: Callable[[Sequence[str] | None], int | None], argv: list[str],
             capfd: pytest.CaptureFixture[str]) -> str:
    """Run a command in-process: exit code 2 with one line on stderr, within seconds; the line."""
    start = time.monotonic()
    code = run_main(main, argv, prog="cmd")
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert time.monotonic() - start < 30
    return err[0]


def _train_main(argv: Sequence[str] | None) -> int:
    from manifold_lab.train.__main__ import main
    return main(argv)


@pytest.mark.parametrize("flags, needle", [
    (["--width", "inf"], "argument --width: expected a number in (0, 16], got 'inf'"),
    (["--width", "nan"], "argument --width"),
    (["--image-size", "1000000"], "argument --image-size: expected an integer in [1, 4096]"),
    (["--lr", "inf"], "argument --lr"),
    (["--lr", "0"], "argument --lr"),
    (["--epochs", "1e400"], "argument --epochs"),
    (["--batch-size", "1000000000"], "argument --batch-size"),
    (["--seed", str(2**32)], "argument --seed"),
    (["--seeds", "1000000000"], "argument --seeds: expected an integer in [1, 10000]"),
    (["--weight-decay", "inf"], "argument --weight-decay"),
    (["--dropout", "inf"], "argument --dropout: expected a finite number"),
])
def test_train_flags_are_bounded(flags: list[str], needle: str, tmp_path: Path,
                                 capfd: pytest.CaptureFixture[str]) -> None:
    line = _exits_2(_train_main, TRAIN + flags + ["--out", str(tmp_path / "run")], capfd)
    assert needle in line
    assert not (tmp_path / "run").exists()  # nothing was started


def test_a_config_file_is_held_to_the_same_bounds(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"dataset": "digits", "width": Infinity}')
    line = _exits_2(_train_main, ["--config", str(config), "--out", str(tmp_path / "run")], capfd)
    assert "width must be positive and at most 16, got inf" in line


def test_costs_resolution_is_bounded(capfd: pytest.CaptureFixture[str]) -> None:
    from manifold_lab.costs.__main__ import main
    assert "expected an integer in [1, 4096], got '1000000000'" in _exits_2(main, ["--resolution", "1000000000"], capfd)
    assert "argument --width" in _exits_2(main, ["--width", "inf"], capfd)
    assert "argument --classes" in _exits_2(main, ["--classes", "10000000000"], capfd)


def test_sweep_seed_counts_are_bounded_before_the_plan_is_built(tmp_path: Path,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    from ablations.run import main
    out = ["--out", str(tmp_path), "--dry-run"]
    assert "--seeds must be a positive integer at most 10000" in _exits_2(
        main, ["all", "--preset", "smoke", "--seeds", "1000000000", *out], capfd)
    assert "seeds must be a positive integer at most 10000" in _exits_2(
        main, ["all", "--preset", "smoke", "--set", "seeds=1000000000", *out], capfd)


def test_audit_sizes_are_bounded(capfd: pytest.CaptureFixture[str]) -> None:
    from ablations.audit import main
    assert "argument --image-size" in _exits_2(main, ["--image-size", "1000000"], capfd)
    assert "argument --max-decoder-features" in _exits_2(main, ["--max-decoder-features", "10000000"], capfd)


def _npz(path: Path, **extra: object) -> Path:
    images, labels = np.zeros((4, 8, 8), np.uint8), np.arange(4) % 2
    np.savez(path, **{"x_train": images, "y_train": labels, "x_test": images, "y_test": labels, **extra})
    return path


@pytest.mark.parametrize("extra, needle", [
    ({"num_classes": np.array([10, 10])}, "num_classes must be one integer in [1, 1000000], got shape (2,)"),
    ({"num_classes": np.array(2.5)}, "num_classes must be one integer"),
    ({"num_classes": np.array(10**12)}, "num_classes must be one integer"),
    ({"y_test": np.array([0, 1, 2**40, 1])}, "labels span [0, 1099511627776]"),
])
def test_npz_class_counts_are_checked(extra: dict, needle: str, tmp_path: Path,
                                      capfd: pytest.CaptureFixture[str]) -> None:
    path = _npz(tmp_path / "data.npz", **extra)
    line = _exits_2(_train_main, ["--dataset", "npz", "--data-dir", str(path), "--out", str(tmp_path / "r")], capfd)
    assert needle in line


def test_a_cifar_pickle_that_overflows_is_a_corrupt_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    batch = pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0]}, protocol=2)
    for name in [f"data_batch_{i}" for i in range(2, 6)] + ["test_batch"]:
        (tmp_path / name).write_bytes(batch)
    (tmp_path / "data_batch_1").write_bytes(b"\x80\x04\x95" + (2**63 + 5).to_bytes(8, "little") + b"N.")
    line = _exits_2(_train_main, ["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out",
                                  str(tmp_path / "r")], capfd)
    assert "corrupt CIFAR file" in line and "OverflowError" in line


def test_bounds_check_values_and_flag_text() -> None:
    width = Bounds(0.0, 16.0, open_low=True)
    assert width("1.4") == 1.4 and width.problem(16) is None
    for bad in (0.0, -1.0, 16.5, float("inf"), float("nan"), "1", True, None):
        assert width.problem(bad) is not None
    size = Bounds(1, 4096, integral=True)
    assert size("4096") == 4096 and size.problem(4096) is None
    for bad in (0, 4097, 2.0, 10**400, True):
        assert size.problem(bad) is not None
    for text in ("1e3", "x", "9" * 5000):
        with pytest.raises(argparse.ArgumentTypeError, match=r"expected an integer in \[1, 4096\]"):
            size(text)
    with pytest.raises(argparse.ArgumentTypeError, match="expected a finite number"):
        number("-inf")
    smoothing = Bounds(0.0, 1.0, open_high=True)
    assert smoothing.problem(0.0) is None and "in [0, 1)" in smoothing.problem(1.0)


@pytest.mark.parametrize("fields", [dict(width=float("inf")), dict(width=17), dict(image_size=10**6),
                                    dict(epochs=float("inf")), dict(lr=float("nan")), dict(seed=-1),
                                    dict(steps=10**10), dict(eval_batch_size=0), dict(momentum=1.5),
                                    dict(batch_size=96.0)])
def test_train_config_fields_carry_their_bounds(fields: dict) -> None:
    with pytest.raises(UsageError, match=f"^{next(iter(fields))} must be"):
        TrainConfig(**fields)
    with pytest.raises(ValueError, match="width must be positive and at most 16"):
        NetworkOptions(width=1e6)
