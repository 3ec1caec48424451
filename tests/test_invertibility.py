"""Appendix A's measures: the per-point rank test against NumPy, a linear network that keeps
everything, and the spiral, where the same test gives Theorem 1's numbers."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from manifold_lab.invertibility import (active_mask, audit_model, linear_decoder_ev, rank_test,
                                        with_population_statistics)
from manifold_lab.models import build_model, model_config
from manifold_lab.models.config import BottleneckStage
from manifold_lab.spiral.manifolds import make_manifold
from manifold_lab.spiral.theory import theorem1


@pytest.mark.parametrize("seed", range(6))
def test_rank_test_equals_numpy_including_rank_deficient_rows(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k, d = int(rng.integers(3, 40)), int(rng.integers(2, 12))
    rows = rng.normal(size=(k, d)).astype(np.float32)
    if seed % 2 == 0:  # columns dependent: every subset of rows is rank deficient
        rows[:, -1] = 2 * rows[:, 0] - rows[:, 1]
    if seed % 3 == 0:  # repeated rows: small subsets lose rank
        rows[k // 2:] = rows[: k - k // 2]
    mask = rng.random((300, k)) < rng.uniform(0.1, 0.9)
    rank, smallest = rank_test(mask, rows)
    reference = [np.linalg.matrix_rank(rows[m]) if m.any() else 0 for m in mask]
    np.testing.assert_array_equal(rank, reference)
    full = rank == d
    exact = [np.linalg.svd(rows[m].astype(np.float64), compute_uv=False)[d - 1] for m in mask[full]]
    np.testing.assert_allclose(smallest[full], exact, rtol=1e-4, atol=1e-6)
    assert np.all(smallest[~full] == 0)


def test_linear_decoder_recovers_a_linear_map_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 5))
    y = x @ rng.normal(size=(5, 9))  # injective: x is a linear function of y
    assert linear_decoder_ev(y[:400], x[:400], y[400:], x[400:]) == pytest.approx(1.0, abs=1e-9)
    noise = rng.normal(size=(600, 9))
    assert linear_decoder_ev(noise[:400], x[:400], noise[400:], x[400:]) < 0.1


def _linear_network() -> nnx.Module:
    """Every layer linear (no ReLU6 anywhere), every block at stride 1 and as wide as its input."""
    stages = (BottleneckStage(1, 8, 1, 1), BottleneckStage(6, 8, 2, 2))
    cfg = model_config("mobilenet_v2", width=1.0, layout="small", num_classes=4, in_channels=3,
                       stem_channels=8, last_channels=16, stages=stages, depthwise_impl="xla")
    model = build_model(cfg, rngs=nnx.Rngs(0))
    for _, module in nnx.iter_graph(model):
        if hasattr(module, "act"):
            module.act = "linear"
    return model


def test_a_linear_network_keeps_every_pixel_invertible_and_every_input_decodable() -> None:
    rng = np.random.default_rng(1)
    model = _linear_network()
    images = rng.normal(size=(1280, 6, 6, 3)).astype(np.float32)
    model = with_population_statistics(model, images[:256], batch_size=128)
    audits = audit_model(model, images[1024:], images[:1024], batch_size=128)
    expanded = [a for a in audits if a.expanded_channels is not None]
    assert len(audits) == 3 and len(expanded) == 2
    for a in expanded:
        assert a.invertible_share == 1.0 and a.below_threshold_share == 0.0
        assert a.active_histogram[-1] == a.pixels == 256 * 36  # every unit active at every pixel
    for a in audits:
        assert a.decoder_ev == pytest.approx(1.0, abs=1e-4)
        assert a.clipped_share is None  # linear bottleneck


def test_relu6_network_counts_active_units_and_bottleneck_clips() -> None:
    stages = (BottleneckStage(1, 8, 1, 1), BottleneckStage(6, 8, 2, 2))
    cfg = model_config("mobilenet_v2", width=1.0, layout="small", num_classes=4, in_channels=3,
                       stem_channels=8, last_channels=16, stages=stages, bottleneck_activation="relu6")
    images = np.random.default_rng(2).normal(size=(128, 6, 6, 3)).astype(np.float32)
    model = with_population_statistics(build_model(cfg, rngs=nnx.Rngs(0)), images, batch_size=64)
    audits = audit_model(model, images, batch_size=64)
    for a in audits[1:]:
        assert sum(a.active_histogram) == a.pixels == 128 * 36
        assert 0.0 < a.invertible_share <= 1.0 and a.decoder_ev is None
        assert 0.0 < a.clipped_share < 1.0  # about half the bottleneck's outputs are below 0


def test_on_the_spiral_the_rank_test_gives_theorem_1() -> None:
    """ReLU(T x) of a 2-D spiral: a point is not invertible exactly when fewer than d = 2 units are
    active (Gaussian rows are in general position), and the mean over draws of T is Theorem 1."""
    x, _ = make_manifold("spiral", 500, seed=0)
    rng = np.random.default_rng(3)
    for n in (2, 3, 5):
        fractions = []
        for _ in range(120):
            t = rng.normal(size=(n, 2)).astype(np.float32)
            pre = x @ t.T
            mask = np.asarray(active_mask(pre, "relu"))
            rank, _ = rank_test(mask, t)
            np.testing.assert_array_equal(rank < 2, mask.sum(axis=1) < 2)
            fractions.append(np.mean(rank < 2))
        se = np.std(fractions, ddof=1) / np.sqrt(len(fractions))
        assert abs(np.mean(fractions) - theorem1(n, 2)) < 4 * se + 1e-3


def test_no_decoder_from_fewer_training_images_than_features() -> None:
    stages = (BottleneckStage(1, 8, 1, 1), BottleneckStage(6, 8, 2, 2))
    cfg = model_config("mobilenet_v2", width=1.0, layout="small", num_classes=4, in_channels=3,
                       stem_channels=8, last_channels=16, stages=stages)
    images = np.random.default_rng(4).normal(size=(96, 6, 6, 3)).astype(np.float32)
    audits = audit_model(build_model(cfg, rngs=nnx.Rngs(0)), images[:32], images[32:], batch_size=32)
    assert all(a.decoder_ev is None for a in audits)  # 64 images, 288 features per output map
