"""Training-engine additions: extending a run, starting from another run's weights, the nested
checkpoint layout (and the flat one it replaced), kept checkpoints, TensorBoard and the console.

Same configuration as tests/test_train.py (digits at 16 px, MobileNetV2 0.35, batch 16), so the
runs share one compiled program per process.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from manifold_lab.cli import UsageError, run_main
from manifold_lab.train import TrainConfig, is_complete, load_run, restore_model, train
from manifold_lab.train import records
from manifold_lab.train.__main__ import main as cli_main
from manifold_lab.train.checkpoint import Checkpointer, flatten_state
from manifold_lab.train.loop import RESUME_FREE_FIELDS, parse_init_from
from manifold_lab.train.network import model_config_for, model_init_fn
from manifold_lab.train.optim import make_optimizer
from manifold_lab.train.run_dir import RunDir
from manifold_lab.train.step import init_state

CFG = TrainConfig(dataset="digits", image_size=16, width=0.35, batch_size=16, steps=6, log_every=1,
                  eval_every=3, checkpoint_every=2, lr=0.005, eval_bn="running")
TIMING = set(records.TIMING_KEYS)


def _strip(recs: list[dict], drop_test_at: int | None = None) -> list[dict]:
    """Records without timing fields (and without the evaluation fields of step ``drop_test_at``)."""
    return [{k: v for k, v in r.items() if k not in TIMING and not (r["step"] == drop_test_at and
                                                                    (k.startswith("test_") or k == "eval_bn"))}
            for r in recs]


def _leaves(run_dir: Path, step: int | None = None) -> list[np.ndarray]:
    model = restore_model(run_dir, step=step, require_complete=False)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def _template(cfg: TrainConfig) -> dict:
    """The abstract train state of ``cfg`` on digits (nested, as the engine holds it)."""
    cfg = cfg.resolved()
    mcfg = model_config_for(cfg, num_classes=10, in_channels=1)
    tx, _ = make_optimizer(cfg, 1437 // 16, 6)
    return jax.eval_shape(lambda: init_state(*model_init_fn(mcfg)(jnp.uint32(0)), tx, cfg.ema_decay is not None))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("full")
    train(CFG, run_dir, verbose=False)
    return run_dir


# ----------------------------------------------------------------------------- extending a run

def test_extending_a_finished_run_equals_the_longer_run(full_run: Path, tmp_path: Path) -> None:
    """A finished 4-step run resumed with 6 steps: the weights and records of the 6-step run (the
    4-step run's closing evaluation stays in its record), its summary rewritten for 6 steps."""
    short = train(CFG.replace(steps=4), tmp_path, verbose=False)
    assert short is not None and short["steps"] == 4 and is_complete(tmp_path)
    summary = train(CFG, tmp_path, resume=True, verbose=False)
    assert summary is not None and summary["steps"] == 6 and is_complete(tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    config, recs = load_run(tmp_path)
    assert config["steps"] == 6 and config["resolved"]["total_steps"] == 6
    assert "test_accuracy" in recs[3]  # step 4: the short run's final evaluation
    assert _strip(recs, drop_test_at=4) == _strip(load_run(full_run)[1])
    for a, b in zip(_leaves(tmp_path), _leaves(full_run)):
        np.testing.assert_array_equal(a, b)
    assert Checkpointer(tmp_path).steps() == [4, 6]
    assert train(CFG, tmp_path, resume=True, verbose=False) == summary  # complete: nothing to do


def test_extending_a_partial_run_with_other_logging_settings(full_run: Path, tmp_path: Path) -> None:
    """Resuming a stopped 4-step run as a 6-step run while changing when it evaluates and
    checkpoints: evaluation and checkpoints change nothing numerically (records and weights equal the
    uninterrupted run's), and config.json holds the new settings."""
    train(CFG.replace(steps=4), tmp_path, stop_at_step=3, verbose=False)
    changed = CFG.replace(eval_every=2, checkpoint_every=1, eval_batch_size=500)
    train(changed, tmp_path, resume=True, verbose=False)
    recs = load_run(tmp_path)[1]
    assert [r["step"] for r in recs if "test_accuracy" in r] == [3, 4, 6]  # 3: before the resume
    plain = lambda rs: [{k: v for k, v in r.items() if not k.startswith("test_") and k != "eval_bn"}
                        for r in _strip(rs)]
    assert plain(recs) == plain(load_run(full_run)[1])
    for a, b in zip(_leaves(tmp_path), _leaves(full_run)):
        np.testing.assert_array_equal(a, b)
    saved = RunDir(tmp_path).train_config()
    assert (saved.eval_every, saved.checkpoint_every, saved.steps) == (2, 1, 6) and is_complete(tmp_path)
    assert {"log_every", "eval_every", "checkpoint_every", "eval_batch_size"} <= set(RESUME_FREE_FIELDS)


def test_cli_extends_a_copy_of_a_finished_run(full_run: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "copy"
    shutil.copytree(full_run, run)
    assert run_main(cli_main, ["--out", str(run), "--resume", "--steps", "8", "--quiet"], prog="train") == 0
    assert "8 steps" in capsys.readouterr().out
    assert RunDir(run).summary()["steps"] == 8 and is_complete(run)
    assert [r["step"] for r in load_run(run)[1]] == list(range(1, 9))


def _saved_run(path: Path, cfg: TrainConfig) -> Path:
    """A run directory holding only ``cfg``'s config.json (the checks happen before any training)."""
    path.mkdir(parents=True)
    RunDir(path).write_config(cfg.resolved().to_dict(), {}, {}, {})
    return path


def test_length_of_a_cosine_run_cannot_change(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _saved_run(tmp_path / "cos", CFG.replace(lr_schedule="cosine"))
    with pytest.raises(UsageError, match="cosine learning-rate schedule depends on the total steps; "
                                         "start a new run with --init-from"):
        train(CFG.replace(lr_schedule="cosine", steps=10), run, resume=True, verbose=False)
    assert run_main(cli_main, ["--out", str(run), "--resume", "--steps", "10", "--quiet"], prog="train") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot change the length" in err


@pytest.mark.parametrize("flags, message", [
    (["--width", "0.5"], "--width is 0.35 in the saved run, 0.5 given"),
    (["--no-augment"], "--no-augment is off in the saved run, on given"),
    (["--lr", "0.01"], "--lr is 0.005 in the saved run, 0.01 given"),
    (["--ema", "0.9"], "--ema is None in the saved run, 0.9 given"),
])
def test_resume_refusals_name_the_flag_and_both_values(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       flags: list[str], message: str) -> None:
    run = _saved_run(tmp_path / "run", CFG)
    assert run_main(cli_main, ["--out", str(run), "--resume", "--quiet", *flags], prog="train") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and f"cannot resume {run}" in err


# ----------------------------------------------------------------------------- --init-from

def test_init_from_starts_with_the_source_weights_and_a_fresh_optimiser(full_run: Path, tmp_path: Path) -> None:
    new = tmp_path / "ft"
    assert train(CFG.replace(lr=0.001), new, init_from=f"{full_run}:4", stop_at_step=0, verbose=False) is None
    for a, b in zip(_leaves(new, step=0), _leaves(full_run, step=4)):
        np.testing.assert_array_equal(a, b)
    flat = Checkpointer(new).restore_flat(0)
    assert int(flat["step"]) == 0 and all(int(v) == 0 for k, v in flat.items() if k.endswith(".count"))
    assert json.loads((new / "config.json").read_text())["init_from"] == {"run": str(full_run.resolve()), "step": 4}
    assert RunDir(new).train_config().lr == 0.001  # init_from is no TrainConfig field
    summary = train(CFG.replace(lr=0.001), new, resume=True, verbose=False)
    assert summary is not None and is_complete(new)
    with pytest.raises(UsageError, match=f"--init-from is {full_run.resolve()}:4 in the saved run"):
        train(CFG.replace(lr=0.001), new, resume=True, init_from=full_run, verbose=False)
    # the newest checkpoint by default; the EMA starts from the loaded weights
    ema = tmp_path / "ema"
    train(CFG.replace(ema_decay=0.9), ema, init_from=full_run, stop_at_step=0, verbose=False)
    for a, b in zip(_leaves(ema, step=0), _leaves(full_run, step=6)):
        np.testing.assert_array_equal(a, b)


def test_init_from_refuses_another_shape_or_a_missing_checkpoint(full_run: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UsageError, match=r"no checkpoint 5 \(kept: 4, 6\)"):
        train(CFG, tmp_path / "a", init_from=f"{full_run}:5", verbose=False)
    with pytest.raises(UsageError, match="no run directory with checkpoints"):
        train(CFG, tmp_path / "a", init_from=tmp_path, verbose=False)
    assert not (tmp_path / "checkpoints").exists()
    code = run_main(cli_main, ["--init-from", str(full_run), "--width", "0.5", "--out", str(tmp_path / "b"),
                               "--quiet"], prog="train")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "a different model" in err and "shape" in err
    assert parse_init_from("runs/a:12") == (Path("runs/a"), 12) and parse_init_from("runs/a") == (Path("runs/a"), None)


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoints_are_nested_and_restore_with_plain_orbax(full_run: Path) -> None:
    template = _template(CFG)
    path = full_run / "checkpoints" / "6" / "default"
    plain = ocp.StandardCheckpointer().restore(path, template)
    assert jax.tree.structure(plain) == jax.tree.structure(template)
    ours = Checkpointer(full_run).restore(6, template)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(ours)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    manager = ocp.CheckpointManager(full_run / "checkpoints")
    restored = manager.restore(6, args=ocp.args.StandardRestore(template))
    assert jax.tree.structure(restored) == jax.tree.structure(template)
    # into nnx.state of the network: the "params" subtree has the model's nested layout
    model = restore_model(full_run)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_flat_checkpoints_of_older_runs_still_restore(full_run: Path, tmp_path: Path) -> None:
    """A run whose checkpoints hold the earlier layout (one dict keyed by dotted paths)."""
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        shutil.copy(full_run / name, old / name)
    state = Checkpointer(full_run).restore(6, _template(CFG))
    manager = ocp.CheckpointManager((old / "checkpoints").absolute(),
                                    options=ocp.CheckpointManagerOptions(create=True))
    manager.save(6, args=ocp.args.StandardSave(flatten_state(state)))
    manager.wait_until_finished()
    saved = ocp.StandardCheckpointer().metadata(old / "checkpoints" / "6" / "default").item_metadata.tree
    assert "params.stem.conv.kernel" in saved or any(k.startswith("params.") for k in saved)
    for a, b in zip(_leaves(old), _leaves(full_run)):
        np.testing.assert_array_equal(a, b)
    assert set(Checkpointer(old).restore_flat(6)) == set(flatten_state(state))
    assert is_complete(old)


def test_asynchronous_saving_writes_the_same_checkpoint(full_run: Path, tmp_path: Path) -> None:
    """The accelerator path (background writes), forced on the CPU: the state donated right after
    ``save`` returns does not change what was written."""
    template = _template(CFG)
    state = Checkpointer(full_run).restore(6, template)
    expected = [np.asarray(x).copy() for x in jax.tree.leaves(state)]
    checkpointer = Checkpointer(tmp_path, asynchronous=True)
    checkpointer.save(6, state)
    jax.tree.map(lambda x: x.delete(), state)  # the training step donates the buffers
    checkpointer.close()
    restored = Checkpointer(tmp_path).restore(6, template)
    for a, b in zip(jax.tree.leaves(restored), expected):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_init_from_gives_every_seed_the_source_weights(full_run: Path, tmp_path: Path) -> None:
    from manifold_lab.train import train_seeds
    dirs = [tmp_path / "s0", tmp_path / "s1"]
    assert train_seeds(CFG, [0, 1], dirs, init_from=full_run, stop_at_step=0, verbose=False) is None
    for d in dirs:
        for a, b in zip(_leaves(d, step=0), _leaves(full_run, step=6)):
            np.testing.assert_array_equal(a, b)


def test_keep_sets_the_number_of_checkpoints(tmp_path: Path) -> None:
    train(CFG.replace(steps=4, checkpoint_every=1), tmp_path, keep=3, verbose=False)
    assert Checkpointer(tmp_path).steps() == [2, 3, 4]


# ----------------------------------------------------------------------------- TensorBoard and console

def _events(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the event files under ``directory`` (the TFRecord framing read by hand)."""
    from tensorboardX.proto import event_pb2
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_event_files_hold_the_metrics(tmp_path: Path) -> None:
    pytest.importorskip("tensorboardX")
    cfg = CFG.replace(steps=2, eval_every=2)
    train(cfg, tmp_path, tensorboard=True, verbose=False)
    scalars = _events(tmp_path / "tensorboard")
    recs = load_run(tmp_path)[1]
    assert [s for s, _ in scalars["train/loss"]] == [1, 2]
    assert scalars["train/loss"][1][1] == pytest.approx(recs[1]["loss"], rel=1e-6)
    assert scalars["train/learning_rate"][0][1] == pytest.approx(0.005)
    assert "train/accuracy" in scalars
    assert scalars["test/accuracy_running"] == [(2, pytest.approx(recs[1]["test_accuracy_running"]))]
    assert scalars["test/loss_running"] == [(2, pytest.approx(recs[1]["test_loss_running"]))]
    assert scalars["test/accuracy"][0][1] == pytest.approx(recs[1]["test_accuracy"])


def test_tensorboard_without_tensorboardx_is_a_usage_error(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(UsageError, match=r"--tensorboard needs tensorboardX: pip install 'manifold-lab\[tensorboard\]'"):
        records.TensorBoardWriter(tmp_path, None)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_shows_elapsed_rate_and_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    record = {"step": 5, "epoch": 0.05, "loss": 1.0, "train_accuracy": 0.5, "learning_rate": 0.01,
              "images_per_second": 100.0, "elapsed_s": 75.0}
    clock = iter([100.0, 102.0, 100.0, 104.0, 106.0])
    monkeypatch.setattr(records.time, "perf_counter", lambda: next(clock))
    plain = io.StringIO()
    progress = records.Progress(10, stream=plain)
    progress.update({**record, "step": 4})  # the first line: no rate yet (compilation)
    progress.update(record)                 # one step in 2 s: 5 steps left take 10 s
    lines = plain.getvalue().splitlines()
    assert lines[0].endswith("elapsed 1:15 eta ?") and lines[1].endswith("elapsed 1:15 eta 0:10")
    assert "step 5/10" in lines[1]
    tty = _Terminal()
    progress = records.Progress(10, stream=tty, label="[seed 3]")
    progress.update({**record, "step": 3})
    progress.update(record)                 # two steps in 4 s: a rich bar, redrawn in place
    progress.update({**record, "step": 6, "test_accuracy": 0.75, "test_loss": 0.5})
    progress.close()
    frames = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", frame) for frame in tty.getvalue().split("\r")]
    assert any(f.startswith("[seed 3] ") and "5/10 1:15 0.50 step/s 0:10 left loss 1.0000" in f
               for f in frames)
    assert any("[seed 3] step 6/10" in f and "test_acc 0.7500" in f for f in frames)  # kept on screen
    assert tty.getvalue().endswith("\x1b[?25h")  # closed: the cursor is shown again
    assert records.clock(3725) == "1:02:05" and records.clock(59.6) == "1:00"


def test_cli_has_the_run_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from manifold_lab.train.__main__ import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--init-from RUN_DIR[:STEP]", "--keep N", "--tensorboard"))
