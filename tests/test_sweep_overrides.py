"""Sweep overrides (``--set``), user preset files (``--preset-file``) and :func:`ablations.run_sweep`.

Training is replaced by a fake trainer that writes finished runs in the trainer's format, so these
tests exercise planning, ids and the runner, not the network.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import ablations
from ablations.plan import build_plan
from ablations.cli import sweep_preset
from ablations.run import main as run_cli, preset_args
from ablations.studies import apply_overrides, get_preset, load_preset_file, preset_to_dict
from manifold_lab.cli import UsageError, run_main

SMOKE = get_preset("smoke")


def _ids(study: str, preset) -> list[str]:
    return [r.run_id for r in build_plan(study, preset)]


def _dry_run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    code = run_main(run_cli, [*argv, "--dry-run"], prog="python -m ablations.run")
    out = capsys.readouterr()
    return code, [line.split("\t")[0] for line in out.out.splitlines()], out.err


def test_overrides_set_preset_fields_and_training_fields() -> None:
    preset = apply_overrides(SMOKE, {"seeds": 2, "widths": [0.35, 1.0], "lr": 0.05, "steps": 4})
    assert (preset.seeds, preset.widths, preset.train["lr"], preset.train["steps"]) == (2, (0.35, 1.0), 0.05, 4)
    assert SMOKE.train["steps"] == 3 and "lr" not in SMOKE.train  # the original is untouched
    epochs = apply_overrides(SMOKE, {"epochs": 3})
    assert epochs.train["epochs"] == 3 and "steps" not in epochs.train  # epochs replaces the steps
    assert apply_overrides(SMOKE, {"name": "mine"}).name == "mine"
    assert apply_overrides(SMOKE, {}) == SMOKE


@pytest.mark.parametrize("overrides, message", [
    ({"bogus": 1}, "--set bogus: not a preset field"),
    ({"seeds": "x"}, "--set seeds: seeds must be int"),
    ({"seeds": 2.5}, "--set seeds"),
    ({"lr": -1}, "--set: lr must be positive"),
    ({"train": {}}, "--set train: not a preset field"),
])
def test_bad_overrides_are_one_line_usage_errors(overrides: dict, message: str) -> None:
    with pytest.raises(UsageError, match="^" + message.replace("(", r"\(")) as exc:
        apply_overrides(SMOKE, overrides)
    assert "\n" not in str(exc.value)


def test_ids_change_only_with_the_configs_they_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["fig6a", "--preset", "smoke", "--out", str(tmp_path)]
    code, plain, _ = _dry_run(base, capsys)
    assert code == 0 and plain == _ids("fig6a", SMOKE) and len(plain) == 2
    assert _dry_run([*base, "--set", "steps=3", "--set", "width_seeds=1"], capsys)[1] == plain  # no change
    changed = _dry_run([*base, "--set", "steps=4"], capsys)[1]
    assert len(changed) == 2 and not set(changed) & set(plain)
    more_seeds = _dry_run([*base, "--set", "seeds=2"], capsys)[1]
    assert set(plain) < set(more_seeds) and len(more_seeds) == 4  # seed 0 keeps its ids
    code, _, err = _dry_run([*base, "--set", "epochs"], capsys)
    assert code == 2 and "expected KEY=VALUE" in err and err.count("\n") == 1
    code, _, err = _dry_run([*base, "--set", "nope=1"], capsys)
    assert code == 2 and "--set nope: not a preset field" in err


PRESET_PY = '''
from ablations.studies import Preset, get_preset
import dataclasses


def tiny() -> Preset:
    """Two seeds of the smoke preset at 4 steps."""
    base = get_preset("smoke")
    return dataclasses.replace(base, name="tiny", doc=tiny.__doc__, seeds=2, train={**base.train, "steps": 4})
'''


@pytest.mark.parametrize("source", [
    PRESET_PY,
    PRESET_PY + "\nPRESET = tiny()\n",
    "import dataclasses\nfrom ablations import studies\n\n\ndef get_preset():\n"
    "    base = studies.get_preset('smoke')\n"
    "    return dataclasses.replace(base, name='tiny', seeds=2, train={**base.train, 'steps': 4})\n",
])
def test_preset_files_define_a_preset(tmp_path: Path, source: str) -> None:
    path = tmp_path / "mine.py"
    path.write_text(source)
    preset = load_preset_file(path)
    assert (preset.seeds, preset.train["steps"]) == (2, 4)
    assert _ids("fig6a", preset) == _ids("fig6a", apply_overrides(SMOKE, {"seeds": 2, "steps": 4}))


def test_preset_file_errors(tmp_path: Path) -> None:
    (tmp_path / "none.py").write_text("x = 1\n")
    (tmp_path / "raises.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "wrong.py").write_text("PRESET = 3\n")
    for name, message in [("none.py", "define PRESET"), ("raises.py", "RuntimeError: boom"),
                          ("wrong.py", "expected an ablations.studies.Preset"), ("absent.py", "no preset file")]:
        with pytest.raises(UsageError, match=message) as exc:
            load_preset_file(tmp_path / name)
        assert "\n" not in str(exc.value)


def test_workers_get_the_overridden_preset_through_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert preset_args(SMOKE, tmp_path) == ["--preset", "smoke"]
    preset = sweep_preset("smoke", ["steps=4", "seeds=2"])
    flag, path = preset_args(preset, tmp_path)
    assert flag == "--preset-file" and Path(path).parent == tmp_path / "_presets"
    assert preset_to_dict(load_preset_file(path)) == preset_to_dict(preset)
    code, ids, _ = _dry_run(["fig6a", "--preset-file", path, "--out", str(tmp_path)], capsys)
    assert code == 0 and ids == _ids("fig6a", preset)


def _write_run(cfg, run_dir: Path) -> dict:
    """A finished run in the trainer's format (what the runner verifies)."""
    from manifold_lab.train.network import model_config_for
    from manifold_lab.train.run_dir import RunDir, config_digest
    cfg = cfg.resolved()
    steps = cfg.steps
    run = RunDir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run.write_config(cfg.to_dict(), {"total_steps": steps, "steps_per_epoch": 44, "num_classes": 10,
                                     "image_shape": [32, 32, 1]},
                     dataclasses.asdict(model_config_for(cfg, 10, 1)), {})
    run.metrics_path.write_text(json.dumps({"step": steps, "test_accuracy": 0.5, "test_loss": 1.0}) + "\n")
    (run.checkpoint_dir / str(steps)).mkdir(parents=True)
    summary = {"final_test_accuracy": 0.5, "final_test_loss": 1.0, "steps": steps, "epochs": steps / 44,
               "wall_time_s": 1.0, "train_images_per_second": 1.0, "params": 1,
               "config_sha256": config_digest(cfg.to_dict())}
    run.write_summary(summary)
    return summary


def test_run_sweep_from_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import manifold_lab.train as trainer
    from ablations import measure
    trained, measured = [], []
    monkeypatch.setattr(trainer, "train", lambda cfg, run_dir, resume=False, **_: (
        trained.append((cfg.seed, cfg.steps)), _write_run(cfg, Path(run_dir)))[1])
    monkeypatch.setattr(measure, "measure_preset", lambda out, preset, **_: measured.append(preset.name) or [])
    result = ablations.run_sweep("fig6a", "smoke", tmp_path, workers=1, overrides={"steps": 4, "seeds": 2},
                                 multi_seed="off")
    assert isinstance(result, ablations.SweepResult) and result.exit_code == 0
    assert sorted(trained) == [(0, 4), (0, 4), (1, 4), (1, 4)] and result.trained == 4
    assert list(result.status.values()) == ["done"] * 4 and result.root == tmp_path / "smoke"
    assert measured == []  # fig6a alone does not complete the preset's plan
    again = ablations.run_sweep("fig6a", "smoke", tmp_path, workers=1, overrides=["steps=4", "seeds=2"])
    assert again.trained == 0 and again.status == result.status
    with pytest.raises(UsageError, match="--set bogus"):
        ablations.run_sweep("fig6a", "smoke", tmp_path, overrides={"bogus": 1})


@pytest.mark.parametrize("module", ["ablations.figures", "ablations.measure"])
def test_measure_and_figures_take_the_sweeps_preset_options(tmp_path: Path, module: str) -> None:
    """``--set`` and ``--preset-file`` give measure and figures the sweep's own preset (and so its
    run ids); without a preset they take the only one under --results."""
    import importlib
    from ablations.cli import preset_from_args
    parser = importlib.import_module(module).build_parser()
    (tmp_path / "smoke").mkdir()
    args = parser.parse_args(["--results", str(tmp_path), "--set", "steps=4", "--set", "seeds=2"])
    preset = preset_from_args(args, tmp_path)
    assert preset_to_dict(preset) == preset_to_dict(sweep_preset("smoke", ["steps=4", "seeds=2"]))
    assert _ids("fig6a", preset) != _ids("fig6a", SMOKE)
    path = preset_args(preset, tmp_path)[1]
    args = parser.parse_args(["--results", str(tmp_path), "--preset-file", path])
    assert preset_to_dict(preset_from_args(args, tmp_path)) == preset_to_dict(preset)
    assert preset_from_args(parser.parse_args(["--results", str(tmp_path)]), tmp_path) == SMOKE
