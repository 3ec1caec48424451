"""The run-directory module: file names, status, configs written under former field names, and a
sweep adopting a run saved under the id its config had before a field was renamed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from manifold_lab.cli import UsageError
from manifold_lab.train.config import ADDED_FIELDS, RENAMED_FIELDS, TrainConfig
from manifold_lab.train.run_dir import CORRUPT, DONE, LOCK_FILE, MISSING, PARTIAL, RunDir, config_digest

CFG = TrainConfig(dataset="digits", width=0.35, layout="bneck1", bn_decay=0.99, steps=4).resolved()


def _legacy(fields: dict) -> dict:
    """``fields`` under the names older versions wrote."""
    former = {new: old for old, new in RENAMED_FIELDS.items()}
    return {former.get(k, k): v for k, v in fields.items()}


def _finished_run(path: Path, fields: dict) -> RunDir:
    run = RunDir(path)
    path.mkdir(parents=True)
    resolved = {"total_steps": 4, "steps_per_epoch": 10, "num_classes": 10, "image_shape": [8, 8, 1]}
    run.write_config(fields, resolved, {}, {})
    run.metrics_path.write_text(json.dumps({"step": 4, "test_accuracy": 0.5}) + "\n")
    run.write_summary({"final_test_accuracy": 0.5, "final_test_loss": 1.0, "steps": 4, "epochs": 0.4,
                       "wall_time_s": 1.0, "train_images_per_second": 1.0, "params": 1,
                       "config_sha256": config_digest(fields)})
    return run


def test_a_config_written_under_former_field_names_still_loads(tmp_path: Path) -> None:
    legacy = _legacy(CFG.to_dict())
    assert {"preset", "bn_momentum"} <= set(legacy) and "layout" not in legacy
    assert TrainConfig.from_dict(legacy) == CFG
    run = _finished_run(tmp_path / "old", legacy)
    assert run.train_config() == CFG
    assert run.is_complete()
    assert run.status(CFG.to_dict()) == (DONE, "complete")


def test_status_of_missing_partial_corrupt_and_mismatched_runs(tmp_path: Path) -> None:
    assert RunDir(tmp_path / "absent").status()[0] == MISSING
    run = _finished_run(tmp_path / "run", CFG.to_dict())
    assert run.status(CFG.to_dict())[0] == DONE
    status, reason = run.status(CFG.replace(width=0.5).to_dict())
    assert (status, reason) == (CORRUPT, "config mismatch: width")
    run.summary_path.unlink()
    assert run.status()[0] == CORRUPT  # no summary and no checkpoint
    (run.checkpoint_dir / "4").mkdir(parents=True)
    assert run.status()[0] == PARTIAL
    run.config_path.write_text("{not json")
    assert run.status()[0] == CORRUPT
    with pytest.raises(UsageError, match="corrupt run config"):
        run.train_config()


def test_a_sweep_adopts_a_run_saved_under_an_earlier_id(tmp_path: Path) -> None:
    from ablations.plan import adopt_earlier_ids, build_plan, run_status
    from ablations.studies import get_preset

    run = build_plan("fig6a", get_preset("smoke"))[0]
    expected = run.expected_config()
    old_name = run.run_id.replace(run.group_id.rsplit("-", 1)[1], "0123456789")
    _finished_run(tmp_path / old_name, _legacy(expected))
    (tmp_path / run.run_id).mkdir()
    (tmp_path / run.run_id / LOCK_FILE).write_text('{"host": "gone", "pid": 1}\n')  # left by a killed process
    assert run_status(tmp_path / run.run_id, expected)[0] == MISSING
    messages: list[str] = []
    assert adopt_earlier_ids(tmp_path, [run], messages.append) == [old_name]
    assert run_status(tmp_path / run.run_id, expected)[0] == DONE and len(messages) == 1
    assert adopt_earlier_ids(tmp_path, [run], messages.append) == []  # nothing left to adopt


def test_reading_runs_does_not_import_jax(tmp_path: Path) -> None:
    _finished_run(tmp_path / "run", CFG.to_dict())
    code = ("import sys; sys.modules['jax'] = None\n"
            "from manifold_lab.train.run_dir import RunDir\n"
            f"run = RunDir({str(tmp_path / 'run')!r})\n"
            "assert run.status()[0] == 'done' and run.train_config().layout == 'bneck1'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_fields_added_later_keep_the_ids_and_status_of_runs_saved_before(tmp_path: Path) -> None:
    """A run recorded before a field existed is the same run as one at that field's default, and a
    different run from one that sets it otherwise."""
    from ablations.plan import build_plan, group_id, run_status
    from ablations.studies import get_preset

    run = build_plan("fig6a", get_preset("smoke"))[0]
    expected = run.expected_config()
    before = {k: v for k, v in expected.items() if k not in ADDED_FIELDS}
    assert set(ADDED_FIELDS) <= set(expected) and group_id(before) == group_id(expected)
    _finished_run(tmp_path / "old", before)
    assert run_status(tmp_path / "old", expected) == (DONE, "complete")
    assert config_digest(before) == config_digest(expected)
    changed = {**expected, "block_impl": "plain", "max_bad_images": 0}
    assert group_id(changed) != group_id(expected)
    assert run_status(tmp_path / "old", changed) == (CORRUPT, "config mismatch: block_impl, max_bad_images")
