"""Multi-process data parallelism on the CPU: the same short run as one process with two devices and
as two processes with one device each (``jax.distributed`` on a localhost coordinator, Gloo
collectives), started through ``python -m manifold_lab.train``.

Checked: the same records up to float rounding, every file written by process 0 alone (process 1's
working folder stays empty and the run directory holds one set of records), the streamed
image-folder path (each process decodes only its rows of every batch) giving the numbers of one
process, and a checkpoint written by two processes resumed by one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from manifold_lab.data import load_dataset
from manifold_lab.train import TrainConfig, load_run, train

#: Seconds a layout may take (a cold compilation cache on 2 busy cores included) before it is killed.
LIMIT_S = 300
DIGITS = ["--dataset", "digits", "--image-size", "16", "--width", "0.35", "--batch-size", "16", "--steps", "2",
          "--log-every", "1", "--eval-every", "1", "--lr", "0.005", "--eval-bn", "running", "--quiet"]
#: The run directory's own files (checkpoints aside), written once, by process 0.
RUN_FILES = {"config.json", "metrics.jsonl", "summary.json", "checkpoints"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(args: list[str], *, processes: int, cwd: Path) -> None:
    """Run ``python -m manifold_lab.train ARGS`` as ``processes`` processes of one device each (one
    process: two forced host devices), each in its own working folder ``cwd/p<i>``. Stops at the
    first failure or after :data:`LIMIT_S`, killing every process group left (Grain workers too)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if processes == 1:
        commands = [args]
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    else:
        env.pop("XLA_FLAGS", None)
        address = f"127.0.0.1:{_free_port()}"
        commands = [args + ["--coordinator-address", address, "--num-processes", str(processes),
                            "--process-id", str(i)] for i in range(processes)]
    children = []
    try:
        for i, command in enumerate(commands):
            (cwd / f"p{i}").mkdir(parents=True, exist_ok=True)
            with open(cwd / f"p{i}.err", "w") as err:
                children.append(subprocess.Popen([sys.executable, "-m", "manifold_lab.train", *command],
                                                 cwd=cwd / f"p{i}", env=env, stdout=subprocess.DEVNULL,
                                                 stderr=err, start_new_session=True))
        deadline = time.monotonic() + LIMIT_S
        while any(c.poll() is None for c in children) and not any(c.poll() for c in children):
            assert time.monotonic() < deadline, f"{processes} processes still running after {LIMIT_S} s"
            time.sleep(0.2)
        for i, child in enumerate(children):
            assert child.returncode == 0, (cwd / f"p{i}.err").read_text()[-3000:]
    finally:
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()


def _records(run: Path) -> list[dict]:
    return load_run(run)[1]


def _assert_same_records(reference: Path, other: Path, keys: tuple[str, ...], rel: float) -> None:
    ref, oth = _records(reference), _records(other)
    assert [r["step"] for r in oth] == [r["step"] for r in ref]
    for a, b in zip(ref, oth):
        for key in keys:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-6), (key, a["step"])


def _assert_written_by_process_0(run: Path, cwd: Path, steps: int) -> None:
    assert {p.name for p in run.iterdir()} == RUN_FILES
    assert len((run / "metrics.jsonl").read_text().splitlines()) == steps  # one writer
    assert not any((cwd / "p1").iterdir())  # nothing relative to process 1's working folder
    assert load_run(run)[0]["environment"]["process_count"] == 2


def test_two_processes_match_one_process_with_two_devices(tmp_path: Path) -> None:
    """Two steps as one process with two devices and as two processes with one each: the same
    records (both layouts reduce over the same two shards), the files written by process 0 alone."""
    _train(DIGITS + ["--out", str(tmp_path / "one")], processes=1, cwd=tmp_path / "cwd_one")
    _train(DIGITS + ["--out", str(tmp_path / "two")], processes=2, cwd=tmp_path / "cwd_two")
    _assert_written_by_process_0(tmp_path / "two", tmp_path / "cwd_two", steps=2)
    _assert_same_records(tmp_path / "one", tmp_path / "two",
                         ("loss", "train_accuracy", "test_loss", "test_accuracy"), rel=1e-5)


def test_image_folder_rows_per_process_and_resume_in_another_layout(tmp_path: Path) -> None:
    """The streamed path: two processes each decode their half of every training, evaluation and
    precise-statistics batch for one step; one process (one device) resumes their checkpoint for a
    second step. The records are those of one process decoding whole batches throughout, up to the
    rounding of the gradient reduction."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 3)):
        for c, name in enumerate(("dark", "bright")):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 100, (20, 18, 3)) + 150 * c
                Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "data" / split / name / f"{i}.png")
    cfg = TrainConfig(dataset="imagefolder", data_dir=str(tmp_path / "data"), image_size=16, layout="small",
                      width=0.35, batch_size=4, steps=2, log_every=1, eval_every=1, eval_batch_size=4,
                      eval_bn="both", eval_bn_batches=2, lr=0.005)
    flags = ("dataset", "data_dir", "image_size", "layout", "width", "batch_size", "log_every", "eval_every",
             "eval_batch_size", "eval_bn", "eval_bn_batches", "lr")
    args = [f"--{k.replace('_', '-')}={getattr(cfg, k)}" for k in flags]
    _train(args + ["--steps=1", "--quiet", "--out", str(tmp_path / "two")], processes=2, cwd=tmp_path / "cwd")
    _assert_written_by_process_0(tmp_path / "two", tmp_path / "cwd", steps=1)
    train(cfg, tmp_path / "two", resume=True, verbose=False)
    train(cfg, tmp_path / "one", verbose=False)
    _assert_same_records(tmp_path / "one", tmp_path / "two",
                         ("loss", "test_loss_running", "test_loss_precise"), rel=1e-3)


def test_process_rows_split_each_batch_without_changing_it(tmp_path: Path) -> None:
    """In the data layer: the halves of each global batch, loaded apart, are the whole batch (same
    images, crops and order), for training and for padded evaluation batches."""
    from PIL import Image

    for split in ("train", "val"):
        for c in range(2):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(5):
                Image.fromarray(np.full((12 + i, 14, 3), 40 * c + 7 * i, np.uint8)).save(
                    tmp_path / split / f"c{c}" / f"{i}.png")
    train, test = load_dataset("imagefolder", data_dir=tmp_path, image_size=8)
    whole = list(train.batches(4, seed=5, start_step=1, num_steps=3, num_workers=0))
    halves = [list(train.batches(4, seed=5, start_step=1, num_steps=3, num_workers=0, rows=rows))
              for rows in ((0, 2), (2, 4))]
    for full, first, second in zip(whole, *halves):
        for a, b, c in zip(full, first, second):
            np.testing.assert_array_equal(a, np.concatenate([b, c]))
    whole = list(test.batches(4, num_workers=0))
    halves = [list(test.batches(4, num_workers=0, rows=rows)) for rows in ((0, 2), (2, 4))]
    assert len(whole) == len(halves[0]) == 3
    for full, first, second in zip(whole, *halves):
        for a, b, c in zip(full, first, second):
            np.testing.assert_array_equal(a, np.concatenate([b, c]))
