"""The Appendix A audit: ``python -m ablations.audit`` on a trained run and on Keras weights, the
``appendix_a`` measurement of the sweep, its report section (rendered without JAX) and the
one-line errors of the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ablations import report_appendix_a, stats
from ablations.audit_records import BlockRecord
from ablations.plan import preset_dir
from ablations.studies import STUDIES, get_preset
from manifold_lab.cli import run_main

REPO = Path(__file__).resolve().parents[1]
#: The engine tests' configuration (tests/test_train.py), so the compiled programs are shared.
RUN_CONFIG = dict(dataset="digits", image_size=16, width=0.35, batch_size=16, steps=6, log_every=1,
                  eval_every=3, checkpoint_every=2, lr=0.005, eval_bn="running")


def _audit(argv, capsys) -> tuple[int, str, str]:
    from ablations.audit import main
    code = run_main(main, [str(a) for a in argv], prog="python -m ablations.audit")
    out = capsys.readouterr()
    return code, out.out, out.err


def _check_document(path: Path, blocks: int = 17) -> dict:
    doc = json.loads(path.read_text())
    assert doc["format"] == 1 and len(doc["blocks"]) == blocks
    records = [BlockRecord.from_json(b) for b in doc["blocks"]]
    assert records[0].expanded_channels is None and records[0].invertible_share is None
    for r in records[1:]:
        assert 0.0 <= r.invertible_share <= 1.0 and r.active_histogram.sum() == r.pixels
        assert r.invertible_share <= 1.0 - r.below_threshold_share + 1e-12  # rank n needs n active units
    assert {"command", "measured_at", "host", "device", "versions"} <= set(doc["provenance"])
    assert (path.parent / "audit.png").stat().st_size > 0
    return doc


# ------------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    from manifold_lab.train import TrainConfig, train
    run_dir = tmp_path_factory.mktemp("run")
    train(TrainConfig(**RUN_CONFIG), run_dir, verbose=False)
    return run_dir


def test_audit_of_a_trained_run_sees_what_the_measuring_step_sees(trained_run, tmp_path, capsys):
    """The command restores the run and audits the first test images normalised as in training:
    the same numbers as the core function on the measuring step's images."""
    from ablations.measure import test_images, train_images
    from manifold_lab.invertibility import audit_model
    from manifold_lab.train import load_run, restore_model

    code, out, err = _audit([trained_run, "--count", 24, "--train-count", 168, "--batch-size", 24,
                             "--out", tmp_path], capsys)
    assert code == 0, err
    assert len([line for line in out.splitlines() if line.startswith("block")]) == 16
    doc = _check_document(tmp_path / "audit.json")
    assert doc["source"]["kind"] == "run" and doc["source"]["run"] == trained_run.name
    assert doc["inputs"]["test_images"] == 24 and doc["inputs"]["train_images"] == 168
    config, _ = load_run(trained_run)
    direct = audit_model(restore_model(trained_run), test_images(config, 24), train_images(config, 168),
                         batch_size=24)
    assert [b.to_dict() for b in direct] == doc["blocks"]
    # 168 training images are fewer than the values of every output map at 16 px: no decoder
    assert all(b["decoder_ev"] is None for b in doc["blocks"])
    assert all(b["clipped_share"] is None for b in doc["blocks"])  # a linear bottleneck


@pytest.fixture(scope="module")
def keras_weights(tmp_path_factory) -> Path:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10,
                                           classifier_activation=None)
    path = tmp_path_factory.mktemp("keras") / "m.weights.h5"
    model.save_weights(path)
    return path


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_keras_weights_run_through_the_audit(keras_weights, tmp_path, capsys):
    """A Keras MobileNetV2 file and a folder of images: decoded as evaluation images, scaled to
    [-1, 1]; no decoder without training images."""
    from PIL import Image

    from ablations.audit import decode_files, image_files
    folder = tmp_path / "photos" / "sub"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 37, 3)).astype(np.uint8)).save(
            folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    (folder / "notes.txt").write_text("not an image")
    files = image_files(tmp_path / "photos")
    assert len(files) == 6 and decode_files(files, 32).shape == (6, 32, 32, 3)
    out = tmp_path / "out"
    code, _, err = _audit(["--keras-weights", keras_weights, "--images", tmp_path / "photos", "--image-size", 32,
                           "--count", 4, "--out", out], capsys)
    assert code == 0, err
    doc = _check_document(out / "audit.json")
    assert doc["source"]["kind"] == "keras" and doc["source"]["normalisation"].startswith("x / 127.5 - 1")
    assert doc["model"]["width"] == 0.35 and doc["inputs"]["test_images"] == 4
    assert all(b["decoder_ev"] is None for b in doc["blocks"])
    assert doc["blocks"][1]["pixels"] == 4 * 16 * 16  # 32 px: the stem halves; block 1 expands before its stride


@pytest.mark.parametrize("argv, needle", [
    ([], "give either RUN_DIR or --keras-weights FILE"),
    (["RUN", "--keras-weights", "KERAS"], "give either RUN_DIR or --keras-weights FILE"),
    (["ABSENT"], "does not exist"),
    (["EMPTY"], "is not a complete run"),
    (["RUN", "--images", "PHOTOS"], "--images and --dataset go with --keras-weights"),
    (["--keras-weights", "ABSENT"], "is not a file"),
    (["--keras-weights", "KERAS"], "needs --images DIR or --dataset NAME"),
    (["--keras-weights", "KERAS", "--images", "EMPTY"], "no images"),
    (["--keras-weights", "KERAS", "--images", "PHOTOS", "--dataset", "digits"], "not allowed with"),
    (["--keras-weights", "KERAS", "--dataset", "digits"], "--keras-weights"),
    (["RUN", "--count", "0"], "expected a positive integer"),
])
def test_bad_input_exits_2_with_one_line(argv, needle, tmp_path, capsys):
    """Bad flags, folders and files: one line on stderr, exit code 2 (nothing is audited)."""
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "PHOTOS").mkdir()
    (tmp_path / "KERAS").write_text("not a weights file")
    (tmp_path / "RUN").mkdir()
    places = {name: str(tmp_path / name) for name in ("ABSENT", "EMPTY", "PHOTOS", "KERAS", "RUN")}
    code, _, err = _audit([places.get(a, a) for a in argv], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert needle in err, err


# ------------------------------------------------------------------------------------ the measurement


def _write_fake_run(cfg, run_dir: Path) -> dict:
    """A finished run in the trainer's format, without weights (the measuring step is patched to
    restore the trainer's initialisation instead)."""
    import dataclasses
    from manifold_lab.train.network import model_config_for
    from manifold_lab.train.run_dir import RunDir, config_digest

    cfg = cfg.resolved()
    resolved = {"total_steps": cfg.steps, "steps_per_epoch": 44, "num_classes": 10, "image_shape": [32, 32, 1]}
    RunDir(run_dir).write_config(cfg.to_dict(), resolved, dataclasses.asdict(model_config_for(cfg, 10, 1)), {})
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": cfg.steps, "test_accuracy": 0.5}) + "\n")
    (run_dir / "checkpoints" / str(cfg.steps)).mkdir(parents=True)
    summary = {"final_test_accuracy": 0.5, "final_test_loss": 1.0, "steps": cfg.steps, "epochs": 0.1,
               "wall_time_s": 1.0, "train_images_per_second": 1.0, "params": 1,
               "config_sha256": config_digest(cfg.to_dict())}
    RunDir(run_dir).write_summary(summary)
    return summary


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory) -> Path:
    """fig6a of the smoke preset at two seeds (fake runs) and its ``appendix_a`` measurement, the
    trainer's initialisation standing in for the trained weights."""
    import manifold_lab.train as trainer
    from ablations import measure
    from ablations.run import main as run

    results = tmp_path_factory.mktemp("smoke") / "results"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "train", lambda cfg, run_dir, **_: _write_fake_run(cfg, Path(run_dir)))
        mp.setattr(measure, "measure_preset", lambda *a, **k: [])  # the sweep's own measuring step
        argv = ["fig6a", "--preset", "smoke", "--seeds", "2", "--out", str(results), "--workers", "1"]
        assert run_main(run, argv, prog="run") == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "restore_model", lambda run_dir, **_: measure.initial_model(Path(run_dir)))
        assert run_main(measure.main, ["--results", str(results), "--only", "appendix_a"], prog="measure") == 0
    return results


def test_appendix_a_measurement_layout(smoke_results):
    from ablations.measurements import appendix_a_inputs, read_measurement
    from ablations.results import load_study

    preset = get_preset("smoke")
    root = preset_dir(smoke_results, preset)
    m = read_measurement(root, "appendix_a")
    assert m.status == "measured"
    assert m.inputs == appendix_a_inputs(preset, load_study(root, STUDIES["fig6a"], preset))
    assert m.inputs["images"] == preset.fig7_images and m.inputs["train_images"] == preset.audit_train_images
    assert sorted(m.inputs["runs"]) == ["0", "1"] and sorted(m.inputs["runs"]["0"]) == ["linear", "relu6"]
    nets = m.data["networks"]
    assert sorted((n["variant"], n["state"], n["seed"]) for n in nets) == sorted(
        (v, s, seed) for v in ("linear", "relu6") for s in ("trained", "step0") for seed in (0, 1))
    for n in nets:
        assert len(n["blocks"]) == 17
        clipped = [b["clipped_share"] for b in n["blocks"]]
        assert all(c is None for c in clipped) if n["variant"] == "linear" else all(0 <= c <= 1 for c in clipped)
    assert m.data["images"] == preset.fig7_images and m.data["train_images"] == preset.audit_train_images


def _render(results: Path, out: Path, no_jax: bool) -> str:
    """``python -m ablations.figures`` in a fresh process, with ``import jax`` failing if ``no_jax``."""
    script = ("import sys\n" + ("sys.modules['jax'] = None\n" if no_jax else "")
              + "from manifold_lab.cli import run_main\nfrom ablations.figures import main\n"
              f"sys.exit(run_main(main, {['--results', str(results), '--out', str(out)]!r}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return (out / "REPORT.md").read_text()


def test_appendix_a_section_renders_without_jax(smoke_results, tmp_path):
    report = _render(smoke_results, tmp_path / "no_jax", no_jax=True)
    _render(smoke_results, tmp_path / "jax", no_jax=False)
    for name in ("REPORT.md", "appendix_a.png"):
        assert (tmp_path / "no_jax" / name).read_bytes() == (tmp_path / "jax" / name).read_bytes(), name
    assert f"## {report_appendix_a.TITLE}" in report and "![appendix_a](appendix_a.png)" in report
    summary = [line for line in report.splitlines() if line.startswith("| appendix_a: ")]
    assert len(summary) == 7 and "Lemma 2's condition holds at >= 99% of pixels in" in summary[0]
    assert "| appendix_a: decoder EV: ReLU6 − linear bottleneck, trained (< 0 in the paper's reading) |" in report
    section = report.split(f"## {report_appendix_a.TITLE}")[1].split("\n## ")[0]
    assert "What the paper does not claim" in section and "Skipped" not in section
    # a stale measurement is named with the command that refreshes it
    path = preset_dir(smoke_results, get_preset("smoke")) / "measurements" / "appendix_a.json"
    original = path.read_text()
    try:
        stale = json.loads(original)
        stale["inputs"]["train_images"] += 1
        path.write_text(json.dumps(stale))
        report = _render(smoke_results, tmp_path / "stale", no_jax=True)
    finally:
        path.write_text(original)
    assert "refresh it with `python -m ablations.measure --preset smoke --results RESULTS --only appendix_a`" in report
    assert "| appendix_a | skipped: not measured |" in report and not (tmp_path / "stale" / "appendix_a.png").exists()


# ------------------------------------------------------------------------------------ report wording


def _blocks(rng: np.random.Generator, holds: list[float], ev: float, clipped: float | None) -> list[dict]:
    """Audits of a 4-block network (block 0 without expansion) with the given Lemma 2 shares."""
    out = [{"index": 0, "stride": 1, "in_channels": 16, "out_channels": 8, "expanded_channels": None, "pixels": 100,
            "invertible_share": None, "below_threshold_share": None, "active_histogram": None,
            "sigma_min_p05": None, "sigma_min_median": None, "decoder_ev": ev + rng.normal(0, 0.005),
            "clipped_share": clipped}]
    for i, share in enumerate(holds, start=1):
        hist = [0] * 49
        hist[24] = 100
        out.append({"index": i, "stride": 1, "in_channels": 8, "out_channels": 8, "expanded_channels": 48,
                    "pixels": 100, "invertible_share": share, "below_threshold_share": 0.0,
                    "active_histogram": hist, "sigma_min_p05": 0.1, "sigma_min_median": 0.2,
                    "decoder_ev": ev + rng.normal(0, 0.005), "clipped_share": clipped})
    return out


def _audits(holds: list[float], relu6_ev: float = 0.80, seeds: int = 4) -> report_appendix_a.Audits:
    rng = np.random.default_rng(0)
    spec = {("linear", "trained"): (0.95, None), ("relu6", "trained"): (relu6_ev, 0.4),
            ("linear", "step0"): (0.90, None), ("relu6", "step0"): (0.85, 0.5)}
    nets = [{"variant": v, "state": s, "seed": seed, "blocks": _blocks(rng, holds, ev, clip)}
            for seed in range(seeds) for (v, s), (ev, clip) in spec.items()]
    return report_appendix_a.read_audits({"networks": nets, "images": 8, "train_images": 16, "dataset": "digits"},
                                         ("linear", "relu6"))


@pytest.mark.parametrize("holds, worded, verdict", [
    ([1.0, 0.995, 1.0], "in all 3 expanded layers", stats.REPRODUCED),
    ([1.0, 0.5, 0.9], "in 1 of 3 expanded layers", stats.REPRODUCED),  # all but two
    ([1.0, 0.5, 0.9, 0.2, 1.0, 1.0, 1.0], "in 4 of 7 expanded layers", stats.CONTRADICTED),
])
def test_lemma2_claim_is_worded_by_what_was_measured(holds, worded, verdict):
    section = report_appendix_a.appendix_a_section(STUDIES["fig6a"], _audits(holds), "appendix_a.png")
    claim, got = section.verdicts[0]
    assert worded in claim and "(trained, linear bottleneck, 4 seeds pooled)" in claim and got == verdict
    assert section.title == report_appendix_a.TITLE


def test_decoder_and_clipping_comparisons_use_the_paired_holm_family():
    section = report_appendix_a.appendix_a_section(STUDIES["fig6a"], _audits([1.0, 1.0, 1.0]), "appendix_a.png")
    verdicts = dict(section.verdicts)
    headline = "appendix_a: decoder EV: ReLU6 − linear bottleneck, trained (< 0 in the paper's reading)"
    assert verdicts[headline] == stats.REPRODUCED  # 15 points lower at every seed
    assert verdicts["appendix_a: decoder EV: trained − step 0, linear bottleneck"] == \
        report_appendix_a.NO_CLAIM_RESOLVED
    assert verdicts["appendix_a: Lemma 2 share of pixels: trained − step 0, linear bottleneck"] == \
        report_appendix_a.NO_CLAIM_UNRESOLVED  # equal shares: no difference
    assert "Trained, a ReLU6 bottleneck loses 15.0" in section.body
    assert "of explained variance against a linear one" in section.body
    assert "The ReLU6 bottleneck clips 40.00 [40.00, 40.00]% of its projection outputs" in section.body
    assert section.body.count(" at 99.") >= 1  # Holm-step intervals of the six comparisons
    gains = report_appendix_a.appendix_a_section(STUDIES["fig6a"], _audits([1.0], relu6_ev=0.99), "x.png")
    assert dict(gains.verdicts)[headline] == stats.CONTRADICTED and "ReLU6 bottleneck gains" in gains.body


def test_section_without_a_measurement_says_why():
    section = report_appendix_a.appendix_a_section(STUDIES["fig6a"], None, None, "not measured yet: run `x`")
    assert section.verdicts == [("appendix_a", "skipped: not measured")]
    assert "_Skipped: not measured yet" in section.body
    with pytest.raises(ValueError, match="no audit"):
        report_appendix_a.read_audits({"networks": [], "images": 1, "train_images": 1, "dataset": "d"},
                                      ("linear", "relu6"))
