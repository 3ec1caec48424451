"""Ablation sweeps: statistics, the run plan (ids, dedup, shards), the resumable runner, the
measuring step, the figures and the report. Most tests use a fake trainer that writes run
directories in the trainer's exact format (config.json, metrics.jsonl, summary.json); the last one
runs the real ``smoke`` preset."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ablations import stats
from ablations.plan import (CORRUPT, DONE, PARTIAL, build_plan, parse_shard, preset_dir,
                            run_status, shard)
from ablations.studies import ALL_STUDIES, STUDIES, get_preset
from manifold_lab.cli import UsageError, run_main
from manifold_lab.train.run_dir import RunDir

# ------------------------------------------------------------------------------------------ stats


@pytest.mark.parametrize("df, expected", [
    (1, 12.706204736174694), (2, 4.302652729749462), (3, 3.1824463052837078), (5, 2.5705818356363146),
    (10, 2.228138851986274), (30, 2.0422724563012378), (10000, 1.960201239890626),  # near the normal limit
])
def test_mean_ci_uses_the_student_t_quantile(df, expected):
    """The half-width of the interval is t_{0.975, n-1} standard errors (reference quantiles)."""
    values = [float(i % 7) for i in range(df + 1)]
    est = stats.mean_ci(values)
    se = est.sd / math.sqrt(est.n)
    assert est.half_width / se == pytest.approx(expected, rel=1e-10)
    assert est.mean - est.lo == pytest.approx(est.hi - est.mean, rel=1e-12)


def test_welch_quantile_at_fractional_degrees_of_freedom_matches_scipy():
    from scipy import stats as sps
    diff = stats.welch([2, 4, 6, 8, 10], [1, 2, 3, 4], confidence=0.9)
    se = math.sqrt(10.0 / 5 + (5.0 / 3) / 4)
    assert (diff.hi - diff.lo) / 2 / se == pytest.approx(sps.t.ppf(0.95, diff.df), rel=1e-12)
    assert not hasattr(stats, "t_ppf") and not hasattr(stats, "betainc")


def test_mean_ci_reference_and_degenerate_cases():
    est = stats.mean_ci([0.91, 0.905, 0.913])
    assert est.mean == pytest.approx(0.9093333333333333)
    assert (est.lo, est.hi) == (pytest.approx(0.8992938102972511), pytest.approx(0.9193728563694153))
    assert est.n == 3
    one = stats.mean_ci([0.5])
    assert (one.mean, one.lo, one.hi, one.n) == (0.5, None, None, 1)
    with pytest.raises(ValueError):
        stats.mean_ci([])


def test_welch_reference_values():
    diff = stats.welch([2, 4, 6, 8, 10], [1, 2, 3, 4])  # variant - baseline
    assert diff.diff == pytest.approx(3.5)
    assert diff.df == pytest.approx(5.520787746170677, rel=1e-10)
    assert diff.lo == pytest.approx(-0.3853680805140449, rel=1e-9)
    assert diff.hi == pytest.approx(7.385368080514045, rel=1e-9)
    assert stats.welch([1.0], [1.0, 2.0]).lo is None
    same = stats.welch([1.0, 1.0], [0.0, 0.0])
    assert (same.lo, same.hi) == (1.0, 1.0)


def test_band_pointwise_t_interval():
    mean, lo, hi = stats.band([[1.0, 2.0], [3.0, 2.0]])
    assert mean.tolist() == [2.0, 2.0]
    half = 12.706204736174694 * math.sqrt(2.0) / math.sqrt(2.0)
    assert lo[0] == pytest.approx(2.0 - half) and hi[0] == pytest.approx(2.0 + half)
    assert lo[1] == hi[1] == 2.0


@pytest.mark.parametrize("lo, hi, paper, expected", [
    (-1.0, -0.2, -0.65, stats.REPRODUCED),
    (0.2, 1.0, -0.65, stats.CONTRADICTED),
    (-0.5, 0.3, -0.65, stats.NOT_RESOLVED),
    (0.1, 0.4, 1.2, stats.REPRODUCED),
    (None, None, -0.65, stats.NOT_RESOLVED),
])
def test_verdict_rule(lo, hi, paper, expected):
    diff = stats.Difference(0.0 if lo is None else (lo + hi) / 2, lo, hi, 4.0, 3, 3)
    assert stats.verdict(diff, paper) == expected


# ------------------------------------------------------------------------------------------ plan


def test_plan_dedupes_the_baseline_across_studies():
    preset = get_preset("cpu")
    runs = build_plan("all", preset)
    ids = [r.run_id for r in runs]
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    baseline = [r for r in runs if ("fig7", "baseline") in r.members]
    assert len(baseline) == 1 and baseline[0].seed == 0
    assert {"fig6a", "fig6b", "fig7"} <= {s for s, _ in baseline[0].members}
    # fig6a: 2 variants x 8 seeds, fig6b: 3 x 8 sharing the 8 baseline seeds, fig5: its widths
    # (0.35, 0.5, 1.0) sharing 0.35 with the baseline
    assert preset.widths == (0.35, 0.5, 1.0) and preset.seeds == 8
    assert len(runs) == 16 + 16 + 2
    groups = {r.group_id for r in runs}
    assert all(r.run_id == f"{r.group_id}-s{r.seed}" for r in runs) and len(groups) == 4 + 2
    assert [r.run_id for r in build_plan("all", preset)] == ids  # deterministic
    assert len(build_plan("fig6a", preset, seeds=5)) == 10


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 20])
def test_shards_partition_the_runs_exactly(count):
    runs = build_plan("all", get_preset("cpu"))
    parts = [shard(runs, i, count) for i in range(1, count + 1)]
    flat = [r.run_id for part in parts for r in part]
    assert sorted(flat) == sorted(r.run_id for r in runs)
    assert len(flat) == len(set(flat))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("text", ["0/3", "4/3", "1/0", "x", "1-2", "-1/2", ""])
def test_bad_shard_specs(text):
    with pytest.raises(UsageError):
        parse_shard(text)
    assert parse_shard(" 2/5 ") == (2, 5)


# ------------------------------------------------------------------------------------------ fake trainer

EFFECTS = {"relu6": -0.03, "expansion": -0.015, "none": -0.045}


def _fake_accuracy(cfg) -> float:
    effect = EFFECTS.get(cfg.bottleneck_activation, 0.0) + EFFECTS.get(cfg.residual, 0.0)
    return 0.90 + effect + 0.04 * (cfg.width - 0.35) + 0.002 * ((cfg.seed * 7) % 3 - 1)


def _write_fake_run(cfg, run_dir: Path) -> dict:
    """A finished run in the trainer's format (RunDir writers, the same digest and resolved keys)."""
    from manifold_lab.train.network import model_config_for
    from manifold_lab.train.run_dir import RunDir, config_digest

    cfg = cfg.resolved()
    run_dir.mkdir(parents=True, exist_ok=True)
    steps = cfg.steps or 3
    resolved = {"total_steps": steps, "steps_per_epoch": 44, "num_classes": 10, "image_shape": [32, 32, 1]}
    RunDir(run_dir).write_config(cfg.to_dict(), resolved, dataclasses.asdict(model_config_for(cfg, 10, 1)), {})
    final = _fake_accuracy(cfg)
    lines = [{"step": s, "epoch": s / 44, "loss": 1.0 / s, "train_accuracy": 0.5, "learning_rate": 0.045,
              "images_per_second": 100.0, "test_accuracy": final - 0.1 * (steps - s) / steps, "test_loss": 0.5}
             for s in range(1, steps + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run_dir / "checkpoints" / str(steps)).mkdir(parents=True, exist_ok=True)
    summary = {"final_test_accuracy": final, "final_test_loss": 0.5, "steps": steps, "epochs": steps / 44,
               "wall_time_s": 1.0, "train_images_per_second": 100.0, "params": 1,
               "config_sha256": config_digest(cfg.to_dict())}
    RunDir(run_dir).write_summary(summary)
    return summary


class FakeTrainer:
    """Counts calls; writes complete runs. Records the measuring step's calls instead of measuring
    (fake runs have no weights)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[int, ...], bool]] = []
        self.measured: list[tuple[Path, str]] = []

    def measure(self, results, preset, **_):
        self.measured.append((Path(results), preset.name))
        return []

    def train(self, cfg, run_dir, resume=False, **_):
        run_dir = Path(run_dir)
        if not resume and RunDir(run_dir).holds_run():  # as the engine decides (the sweep's lock file is no run)
            raise UsageError(f"{run_dir} already holds a run")
        self.calls.append(("train", (cfg.seed,), resume))
        return _write_fake_run(cfg, run_dir)

    def train_seeds(self, cfg, seeds, run_dirs, resume=False, **_):
        self.calls.append(("train_seeds", tuple(seeds), resume))
        return [_write_fake_run(cfg.replace(seed=s), Path(d)) for s, d in zip(seeds, run_dirs)]


def _patch_trainer(monkeypatch, fake: FakeTrainer) -> None:
    import manifold_lab.train as trainer
    from ablations import measure
    monkeypatch.setattr(trainer, "train", fake.train)
    monkeypatch.setattr(trainer, "train_seeds", fake.train_seeds)
    monkeypatch.setattr(measure, "measure_preset", fake.measure)


@pytest.fixture
def fake_trainer(monkeypatch):
    fake = FakeTrainer()
    _patch_trainer(monkeypatch, fake)
    return fake


def _run(argv, capsys):
    """``ablations.run`` in this process (``--workers 1`` unless given: the fake trainer lives here)."""
    from ablations.run import main
    argv = list(argv) if "--workers" in argv else [*argv, "--workers", "1"]
    code = run_main(main, argv, prog="python -m ablations.run")
    out = capsys.readouterr()
    return code, out.out, out.err


def _status(root: Path, run) -> str:
    return run_status(root / run.run_id, run.expected_config())[0]


def test_runner_trains_missing_runs_once_and_resume_skips_finished(tmp_path, capsys, fake_trainer):
    code, out, _ = _run(["all", "--preset", "smoke", "--out", str(tmp_path)], capsys)
    assert code == 0, out
    runs = build_plan("all", get_preset("smoke"))
    assert len(fake_trainer.calls) == len(runs) == 4  # the baseline shared by four studies trains once
    root = preset_dir(tmp_path, get_preset("smoke"))
    assert all(_status(root, r) == DONE for r in runs)
    assert "[4/4]" in out and "training" in out
    fake_trainer.calls.clear()
    code, out, _ = _run(["all", "--preset", "smoke", "--out", str(tmp_path)], capsys)
    assert code == 0 and fake_trainer.calls == [] and out.count("done, skipped") == 4


def test_runner_measures_once_every_run_of_the_preset_is_done(tmp_path, capsys, fake_trainer):
    """The measuring step follows the sweep that completes the preset's plan (not a partial one,
    not a worker's single run, not with --no-measure)."""
    code, out, _ = _run(["fig6a", "--preset", "smoke", "--out", str(tmp_path)], capsys)
    assert code == 0 and fake_trainer.measured == [] and "2 of 4 runs of preset smoke not done yet" in out
    rid = build_plan("fig6b", get_preset("smoke"))[0].run_id
    assert _run(["fig6b", "--preset", "smoke", "--out", str(tmp_path), "--only", rid], capsys)[0] == 0
    assert _run(["fig6b", "--preset", "smoke", "--out", str(tmp_path), "--no-measure"], capsys)[0] == 0
    assert fake_trainer.measured == []
    code, out, _ = _run(["fig6b", "--preset", "smoke", "--out", str(tmp_path)], capsys)
    assert code == 0 and "every run of preset smoke is done: measuring" in out
    assert fake_trainer.measured == [(tmp_path, "smoke")]


def test_runner_uses_multi_seed_training_per_configuration(tmp_path, capsys, fake_trainer):
    code, _, _ = _run(["fig6a", "--preset", "smoke", "--seeds", "3", "--out", str(tmp_path),
                       "--multi-seed", "on"], capsys)
    assert code == 0
    assert sorted(fake_trainer.calls) == [("train_seeds", (0, 1, 2), False)] * 2
    # one seed of a group lost: only that seed is retrained, alone
    root = preset_dir(tmp_path, get_preset("smoke"))
    victim = build_plan("fig6a", get_preset("smoke"), seeds=3)[1]
    shutil.rmtree(root / victim.run_id)
    fake_trainer.calls.clear()
    assert _run(["fig6a", "--preset", "smoke", "--seeds", "3", "--out", str(tmp_path),
                 "--multi-seed", "on"], capsys)[0] == 0
    assert fake_trainer.calls == [("train", (victim.seed,), False)]


def test_runner_trains_seeds_one_by_one_on_cpu_by_default(tmp_path, capsys, fake_trainer):
    """``--multi-seed auto`` on the CPU backend (the tests' backend) trains each seed alone."""
    code, out, _ = _run(["fig6a", "--preset", "smoke", "--seeds", "2", "--out", str(tmp_path)], capsys)
    assert code == 0 and "multi-seed group" not in out and "[4/4]" in out
    assert sorted(fake_trainer.calls) == [("train", (0,), False), ("train", (0,), False),
                                          ("train", (1,), False), ("train", (1,), False)]


def test_multi_seed_refusal_falls_back_to_one_run_per_seed(tmp_path, capsys, fake_trainer, monkeypatch):
    import manifold_lab.train as trainer

    def refuse(cfg, seeds, run_dirs, **_):
        for d in run_dirs:  # the real engine creates the directories before refusing
            Path(d).mkdir(parents=True, exist_ok=True)
        raise UsageError("multi-seed training needs an in-memory dataset (not imagefolder)")
    monkeypatch.setattr(trainer, "train_seeds", refuse)
    code, out, _ = _run(["fig6a", "--preset", "smoke", "--seeds", "2", "--out", str(tmp_path),
                         "--multi-seed", "on"], capsys)
    assert code == 0 and "one by one" in out
    assert sorted(fake_trainer.calls) == [("train", (0,), False), ("train", (0,), False),
                                          ("train", (1,), False), ("train", (1,), False)]
    assert not (tmp_path / "smoke" / "_quarantine").exists()


def test_corrupt_and_partial_runs_are_detected_and_rerun(tmp_path, capsys, fake_trainer):
    preset = get_preset("smoke")
    assert _run(["fig6b", "--preset", preset.name, "--out", str(tmp_path)], capsys)[0] == 0
    root = preset_dir(tmp_path, preset)
    a, b, c = build_plan("fig6b", preset)
    # a: a garbage metrics line; b: config.json edited (another width); c: killed before the summary
    with open(root / a.run_id / "metrics.jsonl", "a") as fh:
        fh.write("{not json\n")
    cfg = json.loads((root / b.run_id / "config.json").read_text())
    cfg["width"] = 0.5
    (root / b.run_id / "config.json").write_text(json.dumps(cfg))
    (root / c.run_id / "summary.json").unlink()
    assert [_status(root, r) for r in (a, b, c)] == [CORRUPT, CORRUPT, PARTIAL]
    code, out, _ = _run(["fig6b", "--preset", preset.name, "--out", str(tmp_path), "--dry-run"], capsys)
    statuses = {line.split("\t")[0]: line.split("\t")[-1] for line in out.splitlines()}
    assert statuses == {a.run_id: CORRUPT, b.run_id: CORRUPT, c.run_id: PARTIAL}
    fake_trainer.calls.clear()
    assert _run(["fig6b", "--preset", preset.name, "--out", str(tmp_path)], capsys)[0] == 0
    assert sorted(fake_trainer.calls) == [("train", (0,), False), ("train", (0,), False), ("train", (0,), True)]
    assert all(_status(root, r) == DONE for r in (a, b, c))
    assert len(list((root / "_quarantine").iterdir())) == 2  # corrupt runs kept aside, never read
    # no summary and no checkpoint: restarted from scratch, not resumed
    (root / a.run_id / "summary.json").unlink()
    shutil.rmtree(root / a.run_id / "checkpoints")
    assert _status(root, a) == CORRUPT
    fake_trainer.calls.clear()
    assert _run(["fig6b", "--preset", preset.name, "--out", str(tmp_path)], capsys)[0] == 0
    assert fake_trainer.calls == [("train", (0,), False)]


def test_dry_run_lists_one_line_per_run_and_shards_cover_all(tmp_path, capsys, fake_trainer):
    code, out, err = _run(["all", "--preset", "cpu", "--out", str(tmp_path), "--dry-run"], capsys)
    assert code == 0 and fake_trainer.calls == []
    lines = out.splitlines()
    assert len(lines) == 34 and all(len(line.split("\t")) == 4 and line.endswith("\tmissing") for line in lines)
    assert "34 runs: 34 missing" in err
    assert not (tmp_path / "cpu").exists()  # a dry run writes nothing
    sharded = []
    for i in (1, 2, 3):
        code, out, _ = _run(["all", "--preset", "cpu", "--out", str(tmp_path), "--dry-run",
                             "--shard", f"{i}/3"], capsys)
        sharded += out.splitlines()
    assert sorted(sharded) == sorted(lines)


@pytest.mark.parametrize("argv, needle", [
    (["fig9", "--preset", "smoke"], "unknown study 'fig9'"),
    (["all", "--preset", "huge"], "unknown preset 'huge'"),
    (["all", "--preset", "smoke", "--shard", "3/2"], "--shard"),
    (["all", "--preset", "smoke", "--seeds", "0"], "positive integer"),
    (["all", "--preset", "smoke", "--workers", "0"], "--workers"),
    (["all", "--preset", "smoke", "--workers", "999"], "exceeds the"),
    (["all", "--preset", "smoke", "--workers", "2", "--multi-seed", "on"], "--multi-seed on"),
    (["all", "--preset", "smoke", "--only", "nope"], "--only: no run 'nope'"),
])
def test_bad_arguments_exit_2_with_one_line(argv, needle, tmp_path, capsys):
    code, out, err = _run([*argv, "--out", str(tmp_path)], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err


def test_unreadable_results_folder_exits_2(tmp_path, capsys):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    code, _, err = _run(["all", "--preset", "smoke", "--out", str(not_a_dir)], capsys)
    assert code == 2 and "not a readable directory" in err and len(err.strip().splitlines()) == 1
    from ablations.figures import main as figures_main
    from ablations.measure import main as measure_main
    for results in (not_a_dir, tmp_path / "absent"):
        for main, argv in ((figures_main, ["--out", str(tmp_path / "f")]), (measure_main, [])):
            code = run_main(main, ["--results", str(results), *argv], prog="f")
            err = capsys.readouterr().err
            assert code == 2 and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ measure


def _measure(argv, capsys=None) -> tuple[int, str]:
    from ablations.measure import main
    code = run_main(main, argv, prog="python -m ablations.measure")
    return code, capsys.readouterr().err if capsys is not None else ""


@pytest.mark.parametrize("argv, needle", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--preset", "smoke", "--only", "fig6a"], "--only: unknown measurement 'fig6a'"),
    (["--preset", "smoke", "--bogus"], "unrecognized arguments"),
])
def test_measure_bad_arguments_exit_2_with_one_line(argv, needle, tmp_path, capsys):
    (tmp_path / "smoke").mkdir()
    code, err = _measure([*argv, "--results", str(tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err


def test_measure_lists_what_it_cannot_measure(tmp_path, capsys):
    """Missing runs: nothing written for them, one line each, exit code 1; what needs no run is measured."""
    from ablations.measurements import read_measurement
    root = tmp_path / "smoke"
    root.mkdir()
    code, err = _measure(["--results", str(tmp_path), "--only", "fig7", "--only", "fig5", "--only", "tables"],
                         capsys)
    assert code == 1
    assert [line.split(":")[1].strip() for line in err.splitlines()] == ["fig7", "fig5"]
    assert "no completed baseline run (seed 0)" in err and "python -m ablations.run fig7 --preset smoke" in err
    assert read_measurement(root, "fig7") is None and read_measurement(root, "tables").status == "measured"


# ------------------------------------------------------------------------------------------ figures


@pytest.fixture(scope="module")
def fake_results(tmp_path_factory):
    """A results folder of fake runs (fig6a at 3 seeds, fig6b at 1 with its "none" run lost) and its
    measurements, with the trainer's initialisation standing in for the trained weights."""
    import manifold_lab.train as trainer
    from ablations import measure
    from ablations.run import main as run

    results = tmp_path_factory.mktemp("fake") / "results"
    with pytest.MonkeyPatch.context() as mp:
        _patch_trainer(mp, FakeTrainer())
        for study, seeds in (("fig6a", "3"), ("fig6b", "1")):
            argv = [study, "--preset", "smoke", "--seeds", seeds, "--out", str(results), "--workers", "1"]
            assert run_main(run, argv, prog="run") == 0
    none_run = next(r for r in build_plan("fig6b", get_preset("smoke")) if ("fig6b", "none") in r.members)
    shutil.rmtree(results / "smoke" / none_run.run_id)
    with pytest.MonkeyPatch.context() as mp:  # fake runs have no weights: "trained" = initialisation
        mp.setattr(trainer, "restore_model", lambda run_dir, **_: measure.initial_model(Path(run_dir)))
        assert run_main(measure.main, ["--results", str(results)], prog="measure") == 0
    return results


def _render(results: Path, out: Path, *extra: str) -> str:
    from ablations import figures
    code = run_main(figures.main, ["--results", str(results), "--out", str(out), *extra], prog="figures")
    assert code == 0
    return (out / "REPORT.md").read_text()


def test_figures_and_report_from_fake_results(tmp_path, fake_results):
    out = tmp_path / "figures"
    report = _render(fake_results, out)
    for name in ("fig1_spiral.png", "fig1_theorem1.png", "spiral_metrics.json", "fig6a.png", "fig6b.png",
                 "fig5.png", "fig7.png", "appendix_a.png", "tables.md", "REPORT.md"):
        assert (out / name).stat().st_size > 0, name
    assert report.startswith("<!-- Generated")
    # fig6a: relu6 is 3 points worse in every seed -> the paper's sign, interval excludes 0
    assert "| Relu6 in bottleneck − Linear bottleneck | -0.65 | -3.00 [" in report
    summary = {line.split(" | ")[0]: line.rsplit(" | ", 1)[1] for line in report.splitlines()
               if line.startswith("| fig6")}
    assert summary["| fig6a: Relu6 in bottleneck − Linear bottleneck (< 0 in the paper)"] == "reproduced |"
    # fig6b: one seed of "expansion" gives no interval; "none" was lost and is reported missing
    assert summary["| fig6b: Shortcut between expansions − Shortcut between bottlenecks (< 0 in the paper)"] \
        == f"{stats.NOT_RESOLVED} |"
    assert "| Shortcut between expansions | 70.45 | 88.30 (no CI: 1 seed) | 1 |" in report
    assert "| No residual | 69.60 | missing | 0 |" in report
    assert "fig7 (a): step-0 average" in report
    for line in report.splitlines():  # every table row keeps its column count (no stray pipes)
        if line.startswith("| fig7") or line.startswith("| Theorem"):
            assert line.count(" | ") in (1, 2), line
    tables = (out / "tables.md").read_text()
    assert "Table 2" in tables and "1600" in tables and "400" in tables
    assert "MobileNetV1 (1.0), untrained" in tables and "CPU latency" in tables
    assert "Theorem 1: expected collapsed fraction | reproduced" in report
    # where the measured numbers come from, and no preset docstring beyond its first sentence
    assert "## Measurements" in report and "measured by `ablations.measure` on CPU" in report
    assert f"Preset: {get_preset('smoke').summary}\n" in report and "Command:" not in report
    # a second results folder of the same preset: its Fig. 6 verdicts are listed beside these
    report = _render(fake_results, out, "--replicate", str(fake_results), "--replicate-note", "the same runs")
    assert "## Second run with another float rounding" in report and "The same comparisons in the same runs" in report
    agree = next(line for line in report.splitlines() if "Verdicts agree in" in line)
    total = agree.split("Verdicts agree in ")[1].split(" of ")
    assert total[0] == total[1].rstrip(".")


def test_rendering_twice_gives_the_same_bytes(tmp_path, fake_results):
    """Rendering reads files only: the same folder gives byte-identical outputs, figures included."""
    first, second = tmp_path / "a", tmp_path / "b"
    _render(fake_results, first)
    _render(fake_results, second)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir()) and "REPORT.md" in names and "fig7.png" in names
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_figures_from_measurements_equal_the_experiments_own(tmp_path, fake_results):
    """The Fig. 1 panels drawn from the measurement file are the spiral module's own figure."""
    import matplotlib.image as mpimg
    from manifold_lab.spiral import run_experiment, write_outputs
    preset = get_preset("smoke")
    _render(fake_results, tmp_path / "out")
    result = run_experiment(points=preset.spiral_points, trials=preset.spiral_trials, seed=0)
    write_outputs(result, tmp_path / "direct", figure_name="fig1_spiral.png", theorem_name="fig1_theorem1.png")
    for name in ("fig1_spiral.png", "fig1_theorem1.png"):
        assert (mpimg.imread(tmp_path / "out" / name) == mpimg.imread(tmp_path / "direct" / name)).all(), name
    assert json.loads((tmp_path / "out" / "spiral_metrics.json").read_text()) == json.loads(
        (tmp_path / "direct" / "spiral_metrics.json").read_text())


def test_figures_render_in_a_process_without_jax(tmp_path, fake_results):
    """``import jax`` fails in the rendering process: the report still renders, to the same bytes."""
    _render(fake_results, tmp_path / "with_jax")
    script = ("import sys; sys.modules['jax'] = None\n"
              "from manifold_lab.cli import run_main\nfrom ablations.figures import main\n"
              f"sys.exit(run_main(main, {['--results', str(fake_results), '--out', str(tmp_path / 'no_jax')]!r}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    for name in ("REPORT.md", "tables.md", "fig7.png", "fig1_spiral.png"):
        assert (tmp_path / "no_jax" / name).read_bytes() == (tmp_path / "with_jax" / name).read_bytes(), name


def test_report_names_missing_or_stale_measurements(tmp_path, fake_results):
    """No crash without measurements: each section says what is missing and the command that makes it."""
    results = tmp_path / "results"
    shutil.copytree(fake_results, results)
    measured = results / "smoke" / "measurements"
    for name in ("fig7", "spiral", "tables"):
        (measured / f"{name}.json").unlink()
    fig5 = json.loads((measured / "fig5.json").read_text())
    fig5["inputs"]["runs"]["w0.35"]["run"] = "another-run-s0"
    (measured / "fig5.json").write_text(json.dumps(fig5))
    out = tmp_path / "f"
    report = _render(results, out)
    command = "python -m ablations.measure --preset smoke --results RESULTS --only"
    assert f"not measured yet: run `{command} fig7`" in report and f"`{command} spiral`" in report
    assert f"refresh it with `{command} fig5`" in report
    summary = [line for line in report.splitlines() if line.endswith("| skipped: not measured |")]
    assert len(summary) == 4  # the three spiral claims and Fig. 7
    assert "| fig6a: Relu6 in bottleneck − Linear bottleneck (< 0 in the paper) | reproduced |" in report
    tables = (out / "tables.md").read_text()
    assert f"`{command} tables`" in tables and f"`{command} fig5`" in tables
    assert not (out / "fig7.png").exists() and not (out / "fig5.png").exists()


def test_figures_skip_missing_studies_with_a_note(tmp_path, capsys):
    from ablations import figures
    results = tmp_path / "results"
    (results / "smoke").mkdir(parents=True)
    assert _measure(["--results", str(results), "--only", "spiral", "--only", "tables"])[0] == 0
    code = run_main(figures.main, ["--results", str(results), "--out", str(tmp_path / "f")], prog="figures")
    assert code == 0, capsys.readouterr().err
    report = (tmp_path / "f" / "REPORT.md").read_text()
    for name in ("fig6a", "fig6b", "fig5"):
        assert f"no completed runs for {name}" in report
    assert "no completed baseline run" in report
    assert not (tmp_path / "f" / "fig6a.png").exists()
    assert (tmp_path / "f" / "tables.md").exists() and (tmp_path / "f" / "fig1_spiral.png").exists()


# ------------------------------------------------------------------------------------------ real smoke


def test_real_smoke_preset_end_to_end(tmp_path, capsys):
    """Every study of the smoke preset through the real trainer (in worker processes, one per core,
    where there are two cores), the measuring step that ends the sweep, then every figure from the
    results and measurements."""
    from ablations import figures

    results, out = tmp_path / "results", tmp_path / "figures"
    code, log, err = _run(["all", "--preset", "smoke", "--out", str(results), "--workers", "auto"], capsys)
    assert code == 0, log + err
    if len(os.sched_getaffinity(0)) >= 2:
        assert "2 workers" in log and log.count("training on CPU") == 4, log
    preset = get_preset("smoke")
    runs = build_plan("all", preset)
    assert all(_status(preset_dir(results, preset), r) == DONE for r in runs)
    assert "every run of preset smoke is done: measuring" in log
    measured = sorted(p.name for p in (preset_dir(results, preset) / "measurements").iterdir())
    assert measured == ["appendix_a.json", "fig5.json", "fig7.json", "spiral.json", "tables.json"]
    code = run_main(figures.main, ["--results", str(results), "--out", str(out), "--preset", "smoke"],
                    prog="figures")
    assert code == 0, capsys.readouterr().err
    for name in ("fig6a.png", "fig6b.png", "fig5.png", "fig7.png", "appendix_a.png", "tables.md", "REPORT.md"):
        assert (out / name).exists(), name
    report = (out / "REPORT.md").read_text()
    assert "Skipped" not in report and "not measured" not in report
    assert set(ALL_STUDIES) <= {name for name in STUDIES if name in report}
