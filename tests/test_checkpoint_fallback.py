"""Resuming safely: damaged checkpoints fall back to the previous one, only finite states are saved,
and a run continues from a new data location.

Same tiny configuration as tests/test_train.py (digits at 16 px, MobileNetV2 0.35, batch 16), so the
runs share its compiled programs; four steps, checkpoints at 2 and at a stop after step 3.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from manifold_lab.cli import run_main
from manifold_lab.data import load_dataset
from manifold_lab.train import TrainConfig, TrainingDiverged, is_complete, load_run, restore_model, train
from manifold_lab.train import loop, records
from manifold_lab.train.__main__ import main as cli_main
from manifold_lab.train.checkpoint import (MANIFEST_FILE, CheckpointDamaged, Checkpointer, file_digests,
                                           flatten_state, unflatten_state)
from manifold_lab.train.config import RESERVED_KEYS
from manifold_lab.train.run_dir import config_digest

CFG = TrainConfig(dataset="digits", image_size=16, width=0.35, batch_size=16, steps=4, log_every=1,
                  eval_every=2, checkpoint_every=2, lr=0.005, eval_bn="running")
TIMING = set(records.TIMING_KEYS)


def _records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in load_run(run_dir)[1]]


def _weights(run_dir: Path) -> list[np.ndarray]:
    return [np.asarray(v) for v in flatten_state(restore_model(run_dir, require_complete=False)).values()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("full")
    train(CFG, run_dir, verbose=False)
    return run_dir


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stopped after step 3: checkpoints 2 and 3, each with its checksums."""
    run_dir = tmp_path_factory.mktemp("partial")
    assert train(CFG, run_dir, stop_at_step=3, verbose=False) is None
    assert Checkpointer(run_dir).steps() == [2, 3]
    return run_dir


def _damage(step_dir: Path, how: str) -> None:
    """Truncate the largest data file of a checkpoint to half, or overwrite 4 of its bytes;
    ``*-unsealed``: first remove the checksums (a step saved before they existed)."""
    if how.endswith("unsealed"):
        (step_dir / MANIFEST_FILE).unlink()
    data = max((p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST_FILE),
               key=lambda p: p.stat().st_size)
    size = data.stat().st_size
    with open(data, "r+b") as fh:
        if how.startswith("truncate"):
            fh.truncate(size // 2)
        else:
            fh.seek(size // 2)
            flipped = bytes(b ^ 0xFF for b in fh.read(4))
            fh.seek(size // 2)
            fh.write(flipped)


@pytest.mark.parametrize("how", ["truncate", "overwrite", "truncate-unsealed"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(
        how: str, full_run: Path, partial_run: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(partial_run, run)
    _damage(run / "checkpoints" / "3", how)
    code = run_main(cli_main, ["--out", str(run), "--resume", "--quiet"], prog="train")
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 0, err
    assert len(err) == 1 and "damaged checkpoint set aside" in err[0] and err[0].endswith("using step 2"), err
    assert (run / "checkpoints" / "3.corrupt").is_dir()  # kept for inspection, never read
    assert is_complete(run) and _records(run) == _records(full_run)
    for a, b in zip(_weights(run), _weights(full_run), strict=True):
        np.testing.assert_array_equal(a, b)


def test_no_intact_checkpoint_is_one_line_and_moves_nothing(partial_run: Path, tmp_path: Path,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(partial_run, run)
    for step in (2, 3):
        _damage(run / "checkpoints" / str(step), "overwrite")
    assert run_main(cli_main, ["--out", str(run), "--resume", "--quiet"], prog="train") == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint 3" in err[0] and "no older one is intact" in err[0], err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "3"]
    with pytest.raises(CheckpointDamaged, match="checkpoint 3 .* is damaged: .* does not match its SHA-256"):
        restore_model(run, require_complete=False)


def test_checksums_are_written_once_an_asynchronous_save_is_on_disk(full_run: Path, tmp_path: Path) -> None:
    state = Checkpointer(full_run).restore_flat(4)
    checkpointer = Checkpointer(tmp_path, asynchronous=True)
    checkpointer.save(4, state)
    for array in state.values():
        array.delete()  # the training step donates the buffers right after save returns
    checkpointer.close()
    step_dir = tmp_path / "checkpoints" / "4"
    recorded = json.loads((step_dir / MANIFEST_FILE).read_text())["sha256"]
    assert recorded == file_digests(step_dir) and len(recorded) > 3
    assert Checkpointer(tmp_path).damage(4) is None
    _damage(step_dir, "overwrite")
    assert "does not match its SHA-256 checksum" in Checkpointer(tmp_path).damage(4)


def test_a_state_with_infinite_batchnorm_statistics_is_never_saved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 3 makes a BatchNorm variance infinite while its loss and weights stay finite: the loop
    refuses to save it and names step 2 as the last good checkpoint."""
    original = loop._programs

    def poisoned(key: loop._ProgramKey) -> loop._Programs:
        programs = original(key)

        def step(state: dict, *args: object) -> dict:
            state = programs.step(state, *args)
            if int(state["step"]) == 3:  # after the step's own check of its loss and weights
                stats = flatten_state(state["batch_stats"])
                name = next(n for n in stats if n.endswith("var"))
                stats[name] = jnp.full_like(stats[name], jnp.inf)
                state = {**state, "batch_stats": unflatten_state(stats, state["batch_stats"])}
            return state
        return dataclasses.replace(programs, step=step)
    monkeypatch.setattr(loop, "_programs", poisoned)
    with pytest.raises(TrainingDiverged, match="non-finite batch_stats by step 3; the last good checkpoint is "
                                               "step 2") as info:
        train(CFG.replace(checkpoint_every=1), tmp_path, verbose=False)
    assert info.value.checkpoint_step == 2
    assert Checkpointer(tmp_path).steps() == [1, 2]
    assert all(np.isfinite(np.asarray(v)).all() for v in Checkpointer(tmp_path).restore_flat(2).values())


def test_a_run_continues_from_a_new_data_location(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The data moves (the old copy is gone): the run resumes where it stopped, config.json records
    the new place, and the run's identity (its digest) ignores where the data lies."""
    train_split, test_split = load_dataset("digits", None, 16)
    old, new = tmp_path / "old" / "digits.npz", tmp_path / "new" / "digits.npz"
    for path in (old, new):
        path.parent.mkdir()
        np.savez(path, x_train=train_split.images, y_train=train_split.labels, x_test=test_split.images,
                 y_test=test_split.labels)
    run = tmp_path / "run"
    assert train(CFG.replace(dataset="npz", data_dir=str(old), image_size=None), run, stop_at_step=2,
                 verbose=False) is None
    old.unlink()
    assert run_main(cli_main, ["--out", str(run), "--resume", "--data-dir", str(new)], prog="train") == 0
    assert "resuming from step 2 of 4" in capsys.readouterr().out
    config, recs = load_run(run)
    assert config["data_dir"] == str(new) and [r["step"] for r in recs] == [1, 2, 3, 4] and is_complete(run)
    fields = {k: v for k, v in config.items() if k not in RESERVED_KEYS}
    assert config_digest(fields) == config_digest({**fields, "data_dir": str(old)})
    # a run finished before the location was left out recorded the digest of every field
    summary = json.loads((run / "summary.json").read_text())
    summary["config_sha256"] = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    (run / "summary.json").write_text(json.dumps(summary))
    assert is_complete(run)
