"""Fig. 7 (Appendix A): positive-channel distributions per expanded layer, bootstrap intervals over
images, the spread rule that gives "dramatically" a number, and the counts against the network."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ablations import report, stats
from ablations.activity import LayerActivity, bootstrap_weights
from ablations.analysis import positive_channel_stats, positive_counts
from ablations.studies import STUDIES
from manifold_lab.models import build_model, model_config


def _layer(counts: np.ndarray, channels: int = 48, threshold: int = 8, block: int = 1) -> LayerActivity:
    return LayerActivity.from_counts(block, f"block{block:02d}/expansion", channels, threshold, counts)


def test_layer_statistics_are_over_every_pixel_of_every_image() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 49, (6, 20))
    layer = _layer(counts)
    f = counts / 48
    assert layer.mean == pytest.approx(f.mean()) and layer.std == pytest.approx(f.std())
    assert layer.quartiles == pytest.approx(tuple(np.percentile(f, [25, 75])))
    assert layer.below_threshold == pytest.approx(np.mean(counts < 8))
    assert (layer.min, layer.max) == (counts.min(), counts.max())
    mean, sd = layer.bootstrap_moments(np.ones((1, 6)))
    assert mean[0] == pytest.approx(f.mean()) and sd[0] == pytest.approx(f.std())
    # a resample that draws image 0 twice and image 1 not at all
    w = np.ones((1, 6))
    w[0, 0], w[0, 1] = 2, 0
    drawn = np.concatenate([f[0], f[0], f[2:].ravel()])
    mean, sd = layer.bootstrap_moments(w)
    assert mean[0] == pytest.approx(drawn.mean()) and sd[0] == pytest.approx(drawn.std())


def test_layer_statistics_survive_the_measurement_file_exactly() -> None:
    """The JSON form holds integers only: a layer read back gives the same numbers, and quartiles
    from the histogram equal NumPy's percentiles of the per-pixel fractions."""
    import json
    rng = np.random.default_rng(3)
    for shape in ((5, 7), (1, 1), (3, 40)):
        counts = rng.integers(0, 49, shape)
        layer = _layer(counts)
        back = LayerActivity.from_json(json.loads(json.dumps(layer.to_json())))
        assert (back.mean, back.std, back.quartiles, back.min, back.max, back.below_threshold, back.images) == (
            layer.mean, layer.std, layer.quartiles, layer.min, layer.max, layer.below_threshold, layer.images)
        assert layer.quartiles == pytest.approx(tuple(np.percentile(counts / 48, [25, 75])), abs=1e-15)
    bad = {**layer.to_json(), "histogram": [1, 2]}
    with pytest.raises(ValueError, match="inconsistent"):
        LayerActivity.from_json(bad)


def test_bootstrap_weights_are_fixed_and_count_every_draw() -> None:
    w = bootstrap_weights(10, resamples=50)
    assert w.shape == (50, 10) and np.all(w.sum(axis=1) == 10)
    np.testing.assert_array_equal(w, bootstrap_weights(10, resamples=50))


@pytest.mark.parametrize("lo, hi, expected", [
    (2.1, 3.0, stats.REPRODUCED), (1.05, 1.3, report.DIRECTION_ONLY), (0.5, 0.9, stats.CONTRADICTED),
    (0.9, 1.2, stats.NOT_RESOLVED)])
def test_spread_rule(lo, hi, expected) -> None:
    assert report.spread_verdict(lo, hi) == expected


def _spread_layers(scale: float, seed: int) -> list[LayerActivity]:
    rng = np.random.default_rng(seed)
    return [_layer(np.clip(np.rint(24 + scale * rng.normal(0, 3, (40, 30))), 0, 48).astype(int), block=b)
            for b in range(1, 5)]


@pytest.mark.parametrize("scale, verdict", [(3.0, stats.REPRODUCED), (1.15, report.DIRECTION_ONLY)])
def test_fig7_section_words_the_spread_by_its_measured_growth(scale: float, verdict: str) -> None:
    init = _spread_layers(1.0, seed=1)
    trained = _spread_layers(scale, seed=2)
    section = report.fig7_section(STUDIES["fig7"], trained, init, "fig7.png", init_running=init)
    spread = [v for c, v in section.verdicts if "grew dramatically" in c]
    assert spread == [verdict]
    table = [line for line in section.body.splitlines() if line.startswith("| 1 (block01)")]
    assert len(table) == 1 and table[0].count(" | ") == 7
    assert "below threshold" in section.body and "IQR" in section.body


def test_positive_counts_match_the_network_in_both_modes() -> None:
    """Counts per pixel equal the captured expansion outputs' positive channels, with running
    statistics (inference) and with the batch's own statistics (a training-mode forward)."""
    cfg = model_config("mobilenet_v2", width=0.35, num_classes=10, in_channels=1, layout="bneck1",
                       depthwise_impl="xla")
    model = build_model(cfg, rngs=nnx.Rngs(0))
    x = np.asarray(jax.random.normal(jax.random.key(1), (4, 28, 28, 1)), np.float32)
    for batch_statistics in (False, True):
        counts = positive_counts(model, cfg, x, batch_size=4, batch_statistics=batch_statistics)
        layers = positive_channel_stats(model, cfg, x, batch_size=4, batch_statistics=batch_statistics)
        graphdef, state = nnx.split(model)
        copy = nnx.merge(graphdef, state, copy=True)
        _, acts = copy(jnp.asarray(x), train=batch_statistics, dropout_key=jax.random.key(0), capture=True)
        assert len(layers) == sum(b.has_expansion for b in cfg.blocks()) == len(counts)
        for layer in layers:
            expected = np.sum(np.asarray(acts[layer.name]) > 0, axis=-1).reshape(4, -1)
            np.testing.assert_array_equal(counts[layer.name], expected)
            np.testing.assert_array_equal(layer.histogram, np.bincount(expected.ravel(), minlength=layer.channels + 1))
            np.testing.assert_array_equal(layer.image_sums, expected.sum(axis=1))
