"""``manifold-lab evaluate`` and ``manifold-lab predict`` on one small trained run.

The run (digits at 16 px, MobileNetV2 0.35, six steps, weight EMA, evaluated under both BatchNorm
protocols at steps 3 and 6, checkpointed at the same steps) is trained once per module; evaluation
must reproduce its recorded numbers exactly, and prediction from image files must agree with the
network applied to the arrays the files were written from.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from manifold_lab.cli import run_main
from manifold_lab.data import load_dataset, normalize
from manifold_lab.evaluate import evaluate, main as evaluate_main
from manifold_lab.predict import Preprocessing, load_predictor, main as predict_main, predict
from manifold_lab.train import TrainConfig, load_run, restore_model, train

CFG = TrainConfig(dataset="digits", image_size=16, width=0.35, batch_size=16, steps=6, log_every=3,
                  eval_every=3, checkpoint_every=3, lr=0.005, eval_bn="both", eval_bn_batches=4,
                  ema_decay=0.9)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evaluate") / "run"
    train(CFG, out, verbose=False)
    return out


def test_final_checkpoint_reproduces_the_summary_exactly(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    result = evaluate(run_dir)  # the run's own protocol: EMA weights, precise statistics
    assert (result["step"], result["weights"], result["eval_bn"]) == (6, "ema", "precise")
    assert result["test_accuracy"] == summary["final_test_accuracy"]
    assert result["test_loss"] == summary["final_test_loss"]
    running = evaluate(run_dir, eval_bn="running")
    assert running["test_accuracy"] == summary["final_test_accuracy_running"]
    assert running["test_loss"] == summary["final_test_loss_running"]
    assert result["test_examples"] == 360
    assert result["test_accuracy"] <= result["top5_accuracy"] <= 1.0  # 10 classes: top-5 reported


def test_an_earlier_checkpoint_reproduces_its_metrics_line(run_dir: Path) -> None:
    record = next(r for r in load_run(run_dir)[1] if r["step"] == 3)
    result = evaluate(run_dir, step=3)
    assert (result["test_accuracy"], result["test_loss"]) == (record["test_accuracy_precise"],
                                                              record["test_loss_precise"])


def test_raw_weights_and_the_command_line(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = evaluate(run_dir, weights="raw", eval_bn="running")
    assert raw["weights"] == "raw" and 0.0 <= raw["test_accuracy"] <= 1.0
    assert evaluate_main([str(run_dir), "--weights", "raw", "--eval-bn", "running", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == raw
    assert evaluate_main([str(run_dir), "--step", "6", "--eval-bn", "running"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{run_dir}: step 6, ema weights, running BatchNorm: test accuracy ")
    assert "top-5" in line and "(360 images)" in line


@pytest.mark.parametrize("argv, message", [
    (["{missing}"], "no run config at"),
    (["{run}", "--step", "5"], "no checkpoint of step 5"),
    (["{run}", "--eval-bn", "both"], "invalid choice"),
])
def test_evaluate_errors_are_one_line(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      argv: list[str], message: str) -> None:
    argv = [a.format(run=run_dir, missing=tmp_path / "none") for a in argv]
    assert run_main(evaluate_main, argv, prog="manifold-lab evaluate") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("manifold-lab evaluate: error:")


def test_config_records_what_inference_needs(run_dir: Path) -> None:
    resolved = json.loads((run_dir / "config.json").read_text())["resolved"]
    train_data = load_dataset("digits", None, 16)[0]
    assert resolved["mean"] == list(train_data.mean) and resolved["std"] == list(train_data.std)
    assert resolved["class_names"] == [str(d) for d in range(10)]
    assert Preprocessing.of_run(run_dir) == Preprocessing((16, 16, 1), train_data.mean, train_data.std,
                                                          class_names=tuple(map(str, range(10))))


def test_predict_on_image_files_matches_the_model_on_the_arrays(run_dir: Path, tmp_path: Path) -> None:
    train_data, test_data = load_dataset("digits", None, 16)
    images = test_data.images[:24]
    model = restore_model(run_dir)
    reference = np.asarray(model(normalize(jnp.asarray(images), train_data.mean, train_data.std), train=False))
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image[..., 0]).save(paths[-1])
    from_files = predict(run_dir, paths)
    assert from_files.shape == (24, 10)
    np.testing.assert_allclose(from_files.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(from_files.argmax(axis=1), reference.argmax(axis=1))
    predictor = load_predictor(run_dir)
    np.testing.assert_array_equal(predictor(images), from_files)  # PNG round trip: the same pixels
    np.testing.assert_array_equal(predictor(images[..., 0]), from_files)  # [N, H, W] grey batch
    np.testing.assert_allclose(predictor(images.astype(np.float32) / 255.0), from_files, rtol=1e-5, atol=1e-6)
    single = predict(model, images[0], preprocessing=predictor.preprocessing)
    np.testing.assert_allclose(single[0], from_files[0], rtol=1e-5, atol=1e-6)


def test_predict_resizes_and_converts_colour_images(run_dir: Path, tmp_path: Path) -> None:
    """A larger RGB JPEG goes through the run's preprocessing: grey, 16 x 16."""
    predictor = load_predictor(run_dir)
    rgb = np.zeros((48, 48, 3), np.uint8)
    rgb[8:40, 20:28] = 255  # a bright vertical bar
    Image.fromarray(rgb).save(tmp_path / "bar.jpg")
    pixels = predictor.preprocessing.pixels(tmp_path / "bar.jpg")
    assert pixels.shape == (16, 16, 1) and pixels.max() > 200 and pixels[:, :4].max() < 30
    assert predictor([tmp_path / "bar.jpg"]).shape == (1, 10)


def test_predict_command_line(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    test_data = load_dataset("digits", None, 16)[1]
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(test_data.images[i, ..., 0]).save(paths[-1])
    expected = predict(run_dir, paths)
    assert predict_main([str(run_dir), *paths, "--top", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for row, probs in zip(out["predictions"], expected):
        assert [t["class"] for t in row["top"]] == list(np.argsort(-probs, kind="stable")[:3])
        assert row["top"][0]["name"] == str(row["top"][0]["class"])
        assert row["top"][0]["probability"] == pytest.approx(float(probs.max()))
    assert predict_main([str(run_dir), *paths, "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{paths[0]}: ") and lines[0].count(",") == 1
    assert run_main(predict_main, [str(run_dir), str(tmp_path / "missing.png")], prog="manifold-lab predict") == 2
    assert "no image at" in capsys.readouterr().err


def test_centre_crop_preprocessing_matches_the_imagefolder_evaluation(tmp_path: Path) -> None:
    from manifold_lab.data.imagefolder import _Decode
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    prep = Preprocessing((24, 24, 3), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), centre_crop=True)
    expected = _Decode([(str(tmp_path / "x.png"), 0)], 24, train=False)((0, True))[0]
    np.testing.assert_array_equal(prep.pixels(tmp_path / "x.png"), expected.astype(np.float32))


def test_streamed_imagefolder_run_agrees_with_predict_on_its_files(tmp_path: Path) -> None:
    """An ``imagefolder`` run: the streamed evaluation (Grain decoding, normalised on the device)
    against :func:`predict` on the same validation files (PIL centre crop, normalised on the host)."""
    rng = np.random.default_rng(0)
    files, labels = [], []
    for split, count in (("train", 8), ("val", 3)):
        for c, name in enumerate(("dark", "bright")):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(count):
                path = tmp_path / "data" / split / name / f"{i}.png"
                Image.fromarray((rng.integers(0, 100, (20, 18, 3)) + 150 * c).astype(np.uint8)).save(path)
                if split == "val":
                    files.append(path)
                    labels.append(("bright", "dark").index(name))  # classes in sorted folder order
    cfg = TrainConfig(dataset="imagefolder", data_dir=str(tmp_path / "data"), image_size=16, layout="small",
                      width=0.35, batch_size=4, steps=2, eval_every=2, eval_batch_size=4, lr=0.005,
                      eval_bn="running")
    train(cfg, tmp_path / "run", verbose=False)
    result = evaluate(tmp_path / "run")
    assert (result["eval_bn"], result["test_examples"], result["top5_accuracy"]) == ("running", 6, None)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())  # the engine normalises its test batches
    assert result["test_loss"] == pytest.approx(summary["final_test_loss"], rel=1e-6)
    assert result["test_accuracy"] == summary["final_test_accuracy"]
    probs = predict(tmp_path / "run", files)
    labels_array = np.asarray(labels)
    assert result["test_accuracy"] == pytest.approx(float(np.mean(probs.argmax(1) == labels_array)))
    loss = float(np.mean(-np.log(probs[np.arange(6), labels_array])))
    assert result["test_loss"] == pytest.approx(loss, rel=1e-4)
    assert evaluate(tmp_path / "run", eval_bn="precise")["eval_bn"] == "precise"
