"""Corrupt files in an image folder: a training file is replaced by the next file in file order, an
evaluation file left out, each named once on stderr, and one file beyond ``max_bad_images`` stops
the run with one line naming it; a stopped run resumes past the file with a larger limit."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from manifold_lab.cli import UsageError, run_main
from manifold_lab.data import load_dataset
from manifold_lab.data.imagefolder import BadImages
from manifold_lab.train import TrainConfig, load_run, train
from manifold_lab.train.__main__ import main as cli_main

#: A corrupt file sorted between two good ones of its class: in the clean copy of the tree it is a
#: copy of the file after it, which is what replacing it must give.
BAD_TRAIN, NEXT_TRAIN, BAD_VAL = "c0/1a.png", "c0/2.png", "c0/0a.png"


def _tree(root: Path, corrupt: bool) -> Path:
    """Two classes of 20x18 noise images: train 4 per class (with ``BAD_TRAIN`` among them), val 2
    per class plus ``BAD_VAL``. ``corrupt``: those files hold garbage; otherwise ``BAD_TRAIN`` is a
    copy of ``NEXT_TRAIN`` and ``BAD_VAL`` is absent."""
    rng = np.random.default_rng(0)
    for split, names in (("train", ("0", "1", "2")), ("val", ("0", "1"))):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for name in names + (("3",) if split == "train" and c == 1 else ()):
                pixels = rng.integers(0, 100, (20, 18, 3)) + 150 * c
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / f"c{c}" / f"{name}.png")
    if corrupt:
        (root / "train" / BAD_TRAIN).write_bytes(b"not a png")
        (root / "val" / BAD_VAL).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    else:
        shutil.copy(root / "train" / NEXT_TRAIN, root / "train" / BAD_TRAIN)
    return root


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return (_tree(tmp_path_factory.mktemp("corrupt"), True), _tree(tmp_path_factory.mktemp("clean"), False))


def test_a_corrupt_training_file_is_replaced_by_the_next_file(trees: tuple[Path, Path],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Two epochs: the batches equal those of the tree where the file is a copy of the next one,
    with a worker process and when started mid-way; the file is named once; none allowed: the
    loader stops with one line naming it."""
    corrupt, clean = (load_dataset("imagefolder", data_dir=t, image_size=8)[0] for t in trees)
    expected = list(clean.batches(4, seed=2, num_steps=4, num_workers=0))
    bad = BadImages(limit=1)
    for got in (list(corrupt.batches(4, seed=2, num_steps=4, num_workers=1, bad=bad)),
                list(corrupt.batches(4, seed=2, start_step=2, num_steps=2, num_workers=0, bad=bad))):
        for a, b in zip(expected[-len(got):], got):
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
    warnings = [line for line in capsys.readouterr().err.splitlines() if BAD_TRAIN in line]
    assert len(warnings) == 1 and "replaced by the next image" in warnings[0]
    assert list(bad.files) == [str(trees[0] / "train" / BAD_TRAIN)]
    with pytest.raises(UsageError) as excinfo:
        list(corrupt.batches(4, seed=2, num_steps=2, num_workers=0))
    assert BAD_TRAIN in str(excinfo.value) and len(str(excinfo.value).splitlines()) == 1


def test_a_corrupt_evaluation_file_is_left_out_and_counted(trees: tuple[Path, Path]) -> None:
    test = load_dataset("imagefolder", data_dir=trees[0], image_size=8)[1]
    bad = BadImages(limit=1, announce=False)
    masks = np.concatenate([mask for _, _, mask in test.batches(4, num_workers=0, bad=bad)])
    names = [Path(path).relative_to(trees[0] / "val").as_posix() for path, _ in test.files]
    assert masks.tolist() == [name != BAD_VAL for name in names] + [False] * (8 - len(names))
    assert bad.left_out == 1 and list(bad.files) == [str(trees[0] / "val" / BAD_VAL)]


def test_a_run_stops_on_one_file_too_many_and_resumes_past_it(trees: tuple[Path, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """None allowed: exit code 2 and one line naming the training file. ``--resume`` allowing two:
    the run ends with the records of the clean tree (the replacement trained on, the evaluation over
    the readable images only), and each file is named once."""
    cfg = TrainConfig(dataset="imagefolder", image_size=16, layout="small", width=0.35, batch_size=4, steps=3,
                      log_every=1, eval_every=3, checkpoint_every=1, eval_batch_size=8, eval_bn="running", lr=0.005)
    flags = ["--dataset", "imagefolder", "--image-size", "16", "--layout", "small", "--width", "0.35",
             "--batch-size", "4", "--steps", "3", "--log-every", "1", "--eval-every", "3", "--checkpoint-every",
             "1", "--eval-batch-size", "8", "--eval-bn", "running", "--lr", "0.005", "--quiet",
             "--data-dir", str(trees[0]), "--out", str(tmp_path / "run")]
    assert run_main(cli_main, flags + ["--max-bad-images", "0"], prog="train") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt image" in err[0] and BAD_TRAIN in err[0]
    assert run_main(cli_main, flags + ["--resume", "--max-bad-images", "2"], prog="train") == 0
    err = capsys.readouterr().err.splitlines()
    assert [sum(name in line for line in err) for name in (BAD_TRAIN, BAD_VAL)] == [1, 1]
    train(cfg.replace(data_dir=str(trees[1])), tmp_path / "clean", verbose=False)
    got, expected = load_run(tmp_path / "run")[1], load_run(tmp_path / "clean")[1]
    assert [r["step"] for r in got] == [1, 2, 3]
    for a, b in zip(expected, got):
        for key in ("loss", "train_accuracy", "test_loss", "test_accuracy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a["step"])
