"""Training engine: optimiser, step, run files, resume, divergence, interrupts, CLI, sharding, seeds.

Every engine test uses one configuration (digits at 16 px, MobileNetV2 0.35 small, batch 16, six
steps), so they share one compiled program per process (the engine caches programs; the learning
rate is runtime data, so the divergence test with lr=1e30 reuses it too).
"""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from manifold_lab.cli import UsageError, run_main
from manifold_lab.data import load_dataset, normalize
from manifold_lab.models import build_model, model_config
from manifold_lab.train import (EXIT_DIVERGED, TrainConfig, TrainingDiverged, is_complete, load_run,
                                restore_model, train, train_seeds)
from manifold_lab.train import records, run_dir as run_files
from manifold_lab.train.__main__ import main as cli_main
from manifold_lab.train.checkpoint import Checkpointer
from manifold_lab.train.network import model_config_for, model_init_fn
from manifold_lab.train.optim import make_optimizer, unit_schedule
from manifold_lab.train.step import make_train_step, split_state

REPO = Path(__file__).resolve().parents[1]
# lr 0.005: smooth dynamics, so float-level differences (sharding, vmap) stay float-level; evaluated
# with the running statistics, which the checkpoints hold (precise statistics: tests/test_bn_stats.py)
CFG = TrainConfig(dataset="digits", image_size=16, width=0.35, batch_size=16, steps=6, log_every=1,
                  eval_every=3, checkpoint_every=2, lr=0.005, eval_bn="running")
CLI_FLAGS = ["--dataset", "digits", "--image-size", "16", "--width", "0.35", "--batch-size", "16",
             "--steps", "6", "--log-every", "1", "--eval-every", "3", "--eval-bn", "running", "--quiet"]
TIMING = set(records.TIMING_KEYS)


def _strip_timing(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def _param_leaves(run_dir: Path, step: int | None = None) -> list[np.ndarray]:
    model = restore_model(run_dir, step=step, require_complete=False)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


#: Two steps, evaluated and checkpointed after each: for comparisons up to float tolerance. Later
#: steps are not compared: rounding differences of order 1e-6 in the gradients (different reduction
#: orders) flip ReLU6 units and argmax ties, and the runs drift apart like any chaotic system.
SHORT = CFG.replace(steps=2, eval_every=1, checkpoint_every=1)


def _assert_close_runs(reference: Path, other: Path) -> None:
    ref, oth = load_run(reference)[1], load_run(other)[1]
    assert [r["step"] for r in ref] == [r["step"] for r in oth] == [1, 2]
    assert oth[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-5)  # same initial weights and batch
    assert oth[0]["test_loss"] == pytest.approx(ref[0]["test_loss"], rel=1e-4)  # after one update
    assert oth[1]["loss"] == pytest.approx(ref[1]["loss"], rel=1e-3)
    for a, b in zip(_param_leaves(reference, step=1), _param_leaves(other, step=1)):
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-4)  # updates are ~1e-2


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("full")
    train(CFG, run_dir, verbose=False)
    return run_dir


# ----------------------------------------------------------------------------- config and optimiser

def test_config_round_trip_defaults_and_validation() -> None:
    cfg = TrainConfig(width=0.5, ema_decay=0.999, steps=10)
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    paper = TrainConfig().resolved()
    assert (paper.optimizer, paper.lr, paper.weight_decay, paper.batch_size, paper.lr_decay) == \
        ("paper", 0.045, 4e-5, 96, 0.98)
    assert (paper.momentum, paper.rmsprop_decay, paper.layout, paper.dataset) == (0.9, 0.9, "small", "fashion_mnist")
    assert TrainConfig(dataset="imagefolder").resolved().layout == "imagenet"
    assert TrainConfig(optimizer="adamw").resolved().lr == 1e-3
    assert (paper.lr_schedule, TrainConfig(optimizer="sgd").resolved().lr_schedule) == ("staircase", "cosine")
    for bad in (dict(width=0), dict(optimizer="lamb"), dict(lr_schedule="linear"), dict(residual="both"),
                dict(label_smoothing=1.0), dict(batch_size=0), dict(ema_decay=1.5), dict(compute_dtype="float16")):
        with pytest.raises(UsageError):
            TrainConfig(**bad)
    with pytest.raises(UsageError, match="unknown training config keys"):
        TrainConfig.from_dict({"widht": 1.0})


def test_paper_optimizer_is_tf_rmsprop_with_masked_l2() -> None:
    """Two updates against TF1 RMSProp written out by hand: ms starts at 1, eps inside the sqrt,
    lr inside the momentum, L2 (wd * w) on conv kernels only, lr x 0.98 after each epoch."""
    cfg = TrainConfig(lr=0.1, weight_decay=0.01, rmsprop_eps=1.0).resolved()
    tx, _ = make_optimizer(cfg, steps_per_epoch=1, total_steps=2)
    params = {"conv": {"kernel": jnp.array([1.0, -2.0])}, "depthwise": {"kernel": jnp.array([3.0])},
              "bn": {"bias": jnp.array([0.5])}}
    grads = [jax.tree.map(lambda p: jnp.full_like(p, g), params) for g in (0.5, -1.0)]
    state = tx.init(params)
    ms = {k: np.ones_like(np.asarray(v["kernel" if "kernel" in v else "bias"])) for k, v in params.items()}
    mom = {k: np.zeros_like(v) for k, v in ms.items()}
    expect = {k: np.asarray(v["kernel" if "kernel" in v else "bias"], np.float64) for k, v in params.items()}
    for step, g_tree in enumerate(grads):
        updates, state = tx.update(g_tree, state, params)
        params = optax.apply_updates(params, updates)
        lr = 0.1 * 0.98 ** step
        for k in expect:
            g = float(jax.tree.leaves(g_tree[k])[0][0]) + (0.01 * expect[k] if k == "conv" else 0.0)
            ms[k] = 0.9 * ms[k] + 0.1 * g**2
            mom[k] = 0.9 * mom[k] + lr * g / np.sqrt(ms[k] + 1.0)
            expect[k] = expect[k] - mom[k]
    for k in expect:
        np.testing.assert_allclose(np.asarray(jax.tree.leaves(params[k])[0]), expect[k], rtol=1e-6)

def test_lr_schedules_staircase_and_cosine() -> None:
    """The paper's staircase (x lr_decay once per epoch) and the cosine option, for any optimiser."""
    staircase = unit_schedule(TrainConfig(lr_decay=0.5).resolved(), steps_per_epoch=10, total_steps=40)
    assert [float(staircase(s)) for s in (0, 9, 10, 25, 39)] == [1.0, 1.0, 0.5, 0.25, 0.125]
    for optimizer in ("paper", "sgd"):
        cosine = unit_schedule(TrainConfig(optimizer=optimizer, lr_schedule="cosine").resolved(),
                               steps_per_epoch=10, total_steps=40)
        expected = [0.5 * (1 + np.cos(np.pi * s / 40)) for s in (0, 10, 20, 30, 40)]
        np.testing.assert_allclose([float(cosine(s)) for s in (0, 10, 20, 30, 40)], expected, atol=1e-6)


def test_train_step_reduces_loss_in_one_and_several_steps() -> None:
    """The functional step on a fixed batch (MobileNetV1, which shares V2's layers and compiles
    faster; the engine tests below run V2)."""
    train_data, _ = load_dataset("digits", image_size=16)
    mcfg = model_config("mobilenet_v1", width=0.35, layout="small", num_classes=10, in_channels=1,
                        dropout_rate=0.0)
    graphdef, params, stats = split_state(build_model(mcfg, rngs=nnx.Rngs(0)))
    tx, _ = make_optimizer(TrainConfig(lr=0.01).resolved(), steps_per_epoch=100, total_steps=100)
    step = jax.jit(make_train_step(graphdef, tx), donate_argnums=(0, 1, 2))
    x = normalize(jnp.asarray(train_data.images[:32]), train_data.mean, train_data.std)
    y = jnp.asarray(train_data.labels[:32])
    opt_state = tx.init(params)
    losses = []
    for i in range(8):  # the loss returned is the loss before that step's update
        params, stats, opt_state, loss, accuracy = step(params, stats, opt_state, x, y, jax.random.key(i))
        losses.append(float(loss))
    assert 0.0 <= float(accuracy) <= 1.0
    assert losses[1] < losses[0] - 0.01, losses          # one step
    assert losses[7] < losses[1] - 0.05, losses          # several steps
    assert all(np.isfinite(losses))


# ----------------------------------------------------------------------------- run files

def test_run_files_summary_and_restore(full_run: Path) -> None:
    config, recs = load_run(full_run)
    assert TrainConfig.from_dict(config) == CFG.resolved()
    assert config["resolved"]["total_steps"] == 6 and config["resolved"]["steps_per_epoch"] == 1437 // 16
    assert config["resolved"]["params"] > 0 and config["model_config"]["width"] == 0.35
    env = config["environment"]
    assert env["versions"]["jax"] == jax.__version__ and env["devices"] and env["process_count"] == 1
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    for r in recs:
        assert {"step", "epoch", "loss", "train_accuracy", "learning_rate", "images_per_second"} <= set(r)
        assert r["learning_rate"] == pytest.approx(0.005) and np.isfinite(r["loss"])
    assert [r["step"] for r in recs if "test_accuracy" in r] == [3, 6]
    summary = json.loads((full_run / "summary.json").read_text())
    assert set(run_files.SUMMARY_KEYS) <= set(summary) and summary["steps"] == 6
    assert summary["final_test_accuracy"] == recs[-1]["test_accuracy"]
    assert is_complete(full_run)
    assert Checkpointer(full_run).steps() == [4, 6]
    # the restored model reproduces the logged final evaluation
    test = load_dataset("digits", image_size=16)[1]
    model = restore_model(full_run)
    graphdef, state = nnx.split(model)
    x = normalize(jnp.asarray(test.images), test.mean, test.std)
    logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False))(state, x)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(test.labels)))
    assert accuracy == pytest.approx(summary["final_test_accuracy"], abs=1e-6)


def test_ema_averages_weights_and_batchnorm_statistics(tmp_path: Path) -> None:
    """After one update the EMA is d * initial + (1 - d) * updated, TF's d = min(decay, 2 / 11), for
    the weights and the BatchNorm statistics alike; training itself is unchanged by it."""
    cfg = SHORT.replace(steps=1, ema_decay=0.999)
    train(cfg.replace(ema_decay=None), tmp_path / "raw", verbose=False)
    train(cfg, tmp_path / "ema", verbose=False)
    mcfg = model_config_for(cfg.resolved(), num_classes=10, in_channels=1)
    initial = jax.tree.leaves(model_init_fn(mcfg)(jnp.uint32(cfg.seed)))
    leaves = lambda run, **kw: [np.asarray(x) for x in jax.tree.leaves(  # params then statistics
        split_state(restore_model(tmp_path / run, **kw))[1:])]
    updated = leaves("raw")
    for a, b in zip(leaves("ema", use_ema=False), updated):
        np.testing.assert_array_equal(a, b)
    d = 2.0 / 11.0
    averaged = leaves("ema")
    assert len(averaged) == len(initial) == len(updated)
    for avg, p0, p1 in zip(averaged, initial, updated):
        np.testing.assert_allclose(avg, d * np.asarray(p0) + (1 - d) * p1, rtol=1e-5, atol=1e-6)
    moved = [not np.allclose(a, p) for a, p in zip(averaged, updated)]
    assert sum(moved) > len(averaged) // 2  # the averages differ from the raw values
    with pytest.raises(UsageError, match="kept no weight EMA"):
        restore_model(tmp_path / "raw", use_ema=True)


def test_is_complete_rejects_inconsistent_summary(full_run: Path, tmp_path: Path) -> None:
    for name in ("config.json", "summary.json", "metrics.jsonl"):
        (tmp_path / name).write_bytes((full_run / name).read_bytes())
    assert is_complete(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["width"] = 0.5
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert not is_complete(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(UsageError, match="corrupt metrics"):
        load_run(tmp_path)


# ----------------------------------------------------------------------------- resume, interrupt, divergence

def test_resume_gives_exactly_the_uninterrupted_run(full_run: Path, tmp_path: Path) -> None:
    assert train(CFG, tmp_path, stop_at_step=3, verbose=False) is None
    assert not is_complete(tmp_path)
    assert Checkpointer(tmp_path).steps() == [2, 3]
    # lose the newest checkpoint: the resumed run restarts at 2 and rewrites the record of step 3
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "3")
    with pytest.raises(UsageError, match="already holds a run"):
        train(CFG, tmp_path, verbose=False)
    summary = train(CFG, tmp_path, resume=True, verbose=False)
    assert summary is not None and is_complete(tmp_path)
    assert _strip_timing(load_run(tmp_path)[1]) == _strip_timing(load_run(full_run)[1])
    for a, b in zip(_param_leaves(tmp_path), _param_leaves(full_run)):
        np.testing.assert_array_equal(a, b)
    assert train(CFG, tmp_path, resume=True, verbose=False) == summary  # complete: nothing to do


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(full_run: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    original = records.Progress.update

    def interrupt_at_step_4(self: records.Progress, record: dict) -> None:
        original(self, record)
        if record["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(records.Progress, "update", interrupt_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(CFG.replace(checkpoint_every=5), tmp_path, verbose=False)
    assert Checkpointer(tmp_path).latest_step() == 4
    monkeypatch.setattr(records.Progress, "update", original)
    train(CFG.replace(checkpoint_every=5), tmp_path, resume=True, verbose=False)
    assert _strip_timing(load_run(tmp_path)[1]) == _strip_timing(load_run(full_run)[1])


def test_divergence_stops_with_message_and_keeps_last_good_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(TrainingDiverged) as info:
        train(CFG.replace(lr=1e30, checkpoint_every=1), tmp_path / "api", verbose=False)
    err = info.value
    assert "non-finite loss" in str(err) and err.checkpoint_step is not None and err.checkpoint_step < err.step
    ckpt = Checkpointer(tmp_path / "api")
    assert ckpt.latest_step() == err.checkpoint_step
    assert not (tmp_path / "api" / "summary.json").exists()
    model = restore_model(tmp_path / "api", require_complete=False)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))
    # the command line: exit code 3 and one line on stderr
    code = run_main(cli_main, CLI_FLAGS + ["--lr", "1e30", "--checkpoint-every", "1", "--out",
                                           str(tmp_path / "cli")], prog="train")
    err_text = capsys.readouterr().err.strip()
    assert code == EXIT_DIVERGED == 3
    assert len(err_text.splitlines()) == 1 and "training diverged" in err_text and "last good checkpoint" in err_text


# ----------------------------------------------------------------------------- command line

def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "manifold_lab.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


@pytest.mark.parametrize("args, message", [
    (["--width", "wide"], "argument --width: expected a number"),
    (["--steps", "3", "--epochs", "2"], "not allowed with"),
    (["--lr-schedule", "linear"], "argument --lr-schedule: invalid choice"),
    (["--data-dir", "/nonexistent/fmnist"], "Fashion-MNIST not found"),
])
def test_cli_bad_flags_and_missing_data_exit_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = _cli(args + ["--out", str(tmp_path / "run")])
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_cli_resume_reads_the_saved_config(full_run: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    # a complete run: --resume alone loads its config and reports the summary without training
    assert run_main(cli_main, ["--out", str(full_run), "--resume"], prog="train") == 0
    assert "test accuracy" in capsys.readouterr().out
    assert run_main(cli_main, ["--out", str(full_run), "--resume", "--width", "0.5"], prog="train") == 2
    assert "config differs in width" in capsys.readouterr().err


# ----------------------------------------------------------------------------- scale

def test_two_devices_match_one_device(tmp_path: Path) -> None:
    """Data parallel over two (forced host) devices: the batch is split, BatchNorm statistics are
    global, so the loss, the update (hence the gradients) and the evaluation match one device."""
    script = textwrap.dedent(f"""
        import jax
        from manifold_lab.train import TrainConfig, train
        assert jax.device_count() == 2, jax.devices()
        train(TrainConfig.from_json({SHORT.replace(num_devices=2).to_json()!r}), {str(tmp_path / "two")!r},
              verbose=False)
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(load_run(tmp_path / "two")[0]["environment"]["devices"]) == 2
    train(SHORT, tmp_path / "one", verbose=False)
    _assert_close_runs(tmp_path / "one", tmp_path / "two")


def test_vmapped_seeds_match_seeds_run_one_by_one(tmp_path: Path) -> None:
    dirs = [tmp_path / "v0", tmp_path / "v1"]
    summaries = train_seeds(SHORT, [0, 1], dirs, verbose=False)
    assert [s["seed"] for s in summaries] == [0, 1] and all(is_complete(d) for d in dirs)
    for seed, vmapped in zip((0, 1), dirs):
        train(SHORT.replace(seed=seed), tmp_path / f"one{seed}", verbose=False)
        _assert_close_runs(tmp_path / f"one{seed}", vmapped)
    assert load_run(dirs[0])[1][0]["loss"] != load_run(dirs[1])[1][0]["loss"]  # the seeds differ


# ----------------------------------------------------------------------------- other data paths and dtypes

def test_bfloat16_compute_trains_with_float32_state(full_run: Path, tmp_path: Path) -> None:
    """bfloat16 activations end to end: the run completes, its first loss is the float32 run's up to
    bfloat16 rounding, and parameters, BatchNorm statistics and optimiser state stay float32."""
    run_dir = tmp_path / "bf16"
    summary = train(CFG.replace(compute_dtype="bfloat16", steps=3, eval_every=3, checkpoint_every=3),
                    run_dir, verbose=False)
    recs = load_run(run_dir)[1]
    assert [r["step"] for r in recs] == [1, 2, 3] and np.isfinite(summary["final_test_loss"])
    assert recs[0]["loss"] == pytest.approx(load_run(full_run)[1][0]["loss"], rel=3e-2)
    assert recs[0]["loss"] != load_run(full_run)[1][0]["loss"]  # really computed in bfloat16
    saved = ocp.StandardCheckpointer().metadata(run_dir / "checkpoints" / "3" / "default").item_metadata.tree
    dtypes = {str(leaf.dtype) for leaf in jax.tree.leaves(saved)}  # as written, not cast by a template
    assert dtypes == {"float32", "int32"}  # int32: step counters
    assert {"opt_state", "params", "batch_stats"} <= set(saved)  # the nested layout of the train state


@pytest.fixture(scope="module")
def tiny_imagefolder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes (dark and bright noise) of 20x18 PNG/JPEG images in the ImageNet layout."""
    from PIL import Image
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for c, name in enumerate(("dark", "bright")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 100, (20, 18, 3)) + 150 * c
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_imagefolder_training_end_to_end(tiny_imagefolder: Path, tmp_path: Path) -> None:
    """The streamed path (Grain workers decode, the device normalises): a run trains, evaluates on
    the val split, checkpoints and resumes to the same metrics; multi-seed needs in-memory data."""
    cfg = TrainConfig(dataset="imagefolder", data_dir=str(tiny_imagefolder), image_size=32, layout="small",
                      width=0.35, batch_size=4, steps=4, log_every=1, eval_every=2, checkpoint_every=2,
                      eval_batch_size=8, lr=0.005)
    full = tmp_path / "full"
    summary = train(cfg, full, verbose=False)
    config, recs = load_run(full)
    assert config["resolved"]["num_classes"] == 2 and config["model_config"]["in_channels"] == 3
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert [r["step"] for r in recs if "test_accuracy" in r] == [2, 4]
    assert all(np.isfinite(r["loss"]) for r in recs) and 0.0 <= summary["final_test_accuracy"] <= 1.0
    assert recs[0]["loss"] == pytest.approx(float(np.log(2.0)), abs=0.5)  # two classes, small logits
    part = tmp_path / "part"
    train(cfg, part, verbose=False, stop_at_step=2)
    train(cfg, part, resume=True, verbose=False)
    assert _strip_timing(load_run(part)[1]) == _strip_timing(recs)
    with pytest.raises(UsageError, match="in-memory"):
        train_seeds(cfg, [0, 1], [tmp_path / "s0", tmp_path / "s1"], verbose=False)


def test_cli_help_is_grouped_and_generated_from_the_config_fields(capsys: pytest.CaptureFixture[str]) -> None:
    from manifold_lab.train.__main__ import GROUPS, build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert all(f"\n{title}:\n" in text for title in GROUPS.values())
    assert "--layout" in text and "--preset" not in text
    assert "--bn-decay BN_DECAY" in text and "(default: 0.997)" in text
    flags = set(re.findall(r"(--[a-z-]+)", text))
    assert {"--no-augment", "--dropout", "--ema", "--devices", "--epochs", "--steps"} <= flags
