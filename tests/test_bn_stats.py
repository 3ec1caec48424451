"""BatchNorm statistics for evaluation: the population combination, precise statistics against a
direct computation, zero-debiased running averages, and a short run that evaluates as it trains."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from manifold_lab.cli import run_main
from manifold_lab.data import load_dataset, normalize, pipeline_spec
from manifold_lab.data.pipeline import epoch_permutation, train_batch
from manifold_lab.models import build_model
from manifold_lab.train import TrainConfig, restore_model, train
from manifold_lab.train import bn_stats
from manifold_lab.train.__main__ import main as cli_main
from manifold_lab.train.network import model_config_for, model_init_fn
from manifold_lab.train.step import split_state

CFG = TrainConfig(dataset="digits", image_size=16, width=0.35, batch_size=16, steps=1, log_every=1,
                  eval_every=1, lr=0.005)


def test_population_combines_equal_batches_exactly() -> None:
    """Mean of the batch means; mean of the batch variances plus the variance of the means: the
    mean and (biased) variance of all the examples together."""
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, (5, 40, 7)).astype(np.float64)  # 5 batches of 40, 7 channels
    per_batch = {"layer": {"bn": {"mean": jnp.asarray(data.mean(1), jnp.float32),
                                  "var": jnp.asarray(data.var(1), jnp.float32)}}}
    out = bn_stats.population(per_batch)["layer"]["bn"]
    flat = data.reshape(-1, 7)
    np.testing.assert_allclose(out["mean"], flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(out["var"], flat.var(0), rtol=1e-5)


def test_debias_moves_all_the_way_at_step_one_and_tracks_a_constant() -> None:
    """With the model's biased update ``d * old + (1 - d) * batch``, the debiased average equals the
    batch at step 1 and stays at a constant batch value afterwards (the initial 0/1 never count)."""
    decay, value = 0.997, 2.5
    avg = jnp.zeros(3)
    for step in range(1, 6):
        updated = decay * avg + (1 - decay) * value
        avg = bn_stats.debias(avg, updated, decay, jnp.int32(step))
        np.testing.assert_allclose(avg, value, rtol=2e-4)
    # decay-weighted mean of the batches seen (weights summing to one)
    batches = [1.0, 4.0]
    avg = jnp.zeros(())
    for step, b in enumerate(batches, start=1):
        avg = bn_stats.debias(avg, decay * avg + (1 - decay) * b, decay, jnp.int32(step))
    expected = (decay * batches[0] + batches[1]) / (1 + decay)
    np.testing.assert_allclose(avg, expected, rtol=2e-4)


def _digits_setup(batch_size: int):
    train_data, _ = load_dataset("digits", image_size=16)
    mcfg = model_config_for(CFG.resolved(), train_data.num_classes, 1)
    model = build_model(mcfg, rngs=nnx.Rngs(0))
    spec = pipeline_spec(train_data, batch_size, crop_padding=0, flip=False)
    return train_data, model, spec


def test_precise_statistics_equal_the_population_statistics_computed_directly() -> None:
    """The stem's precise statistics are the mean and variance of its convolution output over all
    the images of the batches used; every layer's are finite with non-negative variances."""
    train_data, model, spec = _digits_setup(batch_size=16)
    graphdef, params, stats = split_state(model)
    images, labels = jnp.asarray(train_data.images), jnp.asarray(train_data.labels)
    seed_key = jax.random.key(3)
    precise = jax.jit(bn_stats.make_memory_precise(graphdef, spec, num_batches=4))
    out = precise(params, stats, seed_key, images, labels)

    key = jax.random.fold_in(seed_key, bn_stats.PRECISE_STREAM)
    perm = epoch_permutation(key, 0, spec.num_examples)
    x = jnp.concatenate([train_batch(key, i, images, labels, spec, perm)[0] for i in range(4)])
    conv = np.asarray(model.stem.conv(x), np.float64)
    conv = conv.reshape(-1, conv.shape[-1])
    np.testing.assert_allclose(out["stem"]["bn"]["mean"], conv.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["stem"]["bn"]["var"], conv.var(0), rtol=1e-4, atol=1e-5)
    for leaf in jax.tree.leaves(out):
        assert np.all(np.isfinite(leaf))
    assert all(np.all(np.asarray(var) >= 0) for _, var in _variances(out))
    # the running statistics given in are not mixed in
    shifted = jax.tree.map(lambda a: a + 100.0, stats)
    again = precise(params, shifted, seed_key, images, labels)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)


def _variances(tree, path=()):
    """(path, variance) of every BatchNorm entry of a statistics tree."""
    if isinstance(tree, dict) and "var" in tree:
        yield "/".join(path), tree["var"]
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _variances(v, (*path, str(k)))


def test_running_averages_after_one_step_are_the_first_batch_statistics(tmp_path: Path) -> None:
    """Zero-debiasing in the engine: after one step at the paper's decay 0.997 the running averages
    are the first batch's statistics under the initial weights, not 0.3% of the way from 0/1."""
    cfg = CFG.replace(bn_decay=0.997, augment=False)
    train(cfg, tmp_path / "run", verbose=False)
    restored = split_state(restore_model(tmp_path / "run"))[2]
    train_data, model, spec = _digits_setup(batch_size=16)
    mcfg = model_config_for(cfg.resolved(), train_data.num_classes, 1)
    params0, stats0 = model_init_fn(mcfg)(jnp.uint32(cfg.seed))
    x, _ = train_batch(jax.random.key(cfg.seed), 0, jnp.asarray(train_data.images),
                       jnp.asarray(train_data.labels), spec)
    graphdef = split_state(model)[0]
    expected = bn_stats.batch_statistics_fn(graphdef)(params0, stats0, x)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4)


def test_short_run_evaluates_close_to_its_training_accuracy(tmp_path: Path) -> None:
    """The paper's BatchNorm decay 0.997 in a run of 80 steps: precise statistics (the default)
    evaluate within a few points of the training accuracy; both protocols are recorded."""
    out = tmp_path / "digits"
    code = run_main(cli_main, ["--dataset", "digits", "--image-size", "16", "--width", "0.35",
                               "--layout", "small", "--batch-size", "64", "--seed", "5", "--steps", "80",
                               "--eval-bn", "both", "--quiet", "--out", str(out)], prog="train")
    assert code == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    final = lines[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_bn"] == final["eval_bn"] == "precise"
    assert summary["final_test_accuracy"] == final["test_accuracy"] == final["test_accuracy_precise"]
    assert "final_test_accuracy_running" in summary
    recent_train = np.mean([r["train_accuracy"] for r in lines[-20:]])
    assert final["test_accuracy"] >= 0.75  # 77.8% with one XLA thread, 80.6% with two
    assert final["test_accuracy"] >= recent_train - 0.05
    config = json.loads((out / "config.json").read_text())
    assert config["eval_bn"] == "both" and config["eval_bn_batches"] == 50


def test_vmapped_seeds_estimate_the_same_precise_statistics_as_single_runs(tmp_path: Path) -> None:
    """Multi-seed training evaluates each seed with its own precise statistics (its own weights and
    its own batches): the same numbers as the seed trained alone, to float tolerance."""
    from manifold_lab.train import train_seeds
    cfg = CFG.replace(eval_bn="both", eval_bn_batches=3)
    dirs = [tmp_path / "v0", tmp_path / "v1"]
    train_seeds(cfg, [0, 1], dirs, verbose=False)
    for seed, vmapped in zip((0, 1), dirs):
        alone = tmp_path / f"alone{seed}"
        train(cfg.replace(seed=seed), alone, verbose=False)
        a = json.loads((alone / "summary.json").read_text())
        b = json.loads((vmapped / "summary.json").read_text())
        for key in ("final_test_loss_precise", "final_test_loss_running"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    first = [json.loads((d / "summary.json").read_text())["final_test_loss_precise"] for d in dirs]
    assert first[0] != first[1]
