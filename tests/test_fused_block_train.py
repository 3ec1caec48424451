"""Training through the fused block kernels (:mod:`manifold_lab.native.block_train`): the raw
projection, both batch statistics and every gradient equal a pure-JAX reference (float32
rounding; gradients by cosine, since a pixel whose pre-activation lies within rounding of a
ReLU6 kink may fall on the other side of it in the other form) at the shapes that reach each
split of the kernels' work; a block equals the plain layers for every shortcut the kernels
compute and both bottleneck activations; a whole training step of a network matches the plain
path in loss, running statistics and gradients; ``auto`` fuses training blocks where measured
faster."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from manifold_lab import native
from manifold_lab.models import backend_for, build_model, model_config
from manifold_lab.models.backend import DeferredBN, KernelBackend
from manifold_lab.models.config import BlockSpec, MobileNetV2Config
from manifold_lab.models.geometry import spatial_pads
from manifold_lab.models.mobilenet_v2 import InvertedResidual
from manifold_lab.native.block_train import fused_train_block
from manifold_lab.train.step import make_grad_fn, split_state
from test_fused_block import SMALL, randomize_statistics

needs_kernels = pytest.mark.skipif(
    not native.available() or native.load("fused_block") is None or native.load("fused_block_train") is None,
    reason="native kernels or the fused block kernels (AVX-512) unavailable")

TRAIN_TARGET = "manifold_fused_block_train_stats"
EPSILON = 1e-3


def cosine(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def reference_block(x, we, scale_e, bias_e, taps, scale_d, bias_d, wp, stride, pads, inner):
    """The same block in plain JAX: (raw projection, expansion statistics, depthwise statistics)."""
    def bn_relu6(t, scale, bias):
        mean, var = jnp.mean(t, (0, 1, 2)), jnp.var(t, (0, 1, 2))
        return jnp.clip((t - mean) * jax.lax.rsqrt(var + EPSILON) * scale + bias, 0.0, 6.0), (mean, var)

    e, stats_e = bn_relu6(x @ we, scale_e, bias_e)
    r = jax.lax.conv_general_dilated(e, taps[:, :, None, :], (stride, stride), pads,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=e.shape[-1],
                                     precision="highest")
    d, stats_d = bn_relu6(r, scale_d, bias_d)
    return (d + e if inner else d) @ wp, stats_e, stats_d


def block_operands(key, batch, size, cin, expanded, cout):
    keys = jax.random.split(key, 8)
    return (jax.random.normal(keys[0], (batch, *size, cin)),
            jax.random.normal(keys[1], (cin, expanded)) / np.sqrt(cin),
            jax.random.uniform(keys[2], (expanded,), minval=0.5, maxval=1.5),
            0.5 * jax.random.normal(keys[3], (expanded,)),
            jax.random.normal(keys[4], (3, 3, expanded)) / 3,
            jax.random.uniform(keys[5], (expanded,), minval=0.5, maxval=1.5),
            0.5 * jax.random.normal(keys[6], (expanded,)),
            jax.random.normal(keys[7], (expanded, cout)) / np.sqrt(expanded))


@needs_kernels
@pytest.mark.parametrize("cin, expanded, cout, stride, size, batch, inner", [
    (5, 30, 7, 2, (9, 8), 1, False),       # channel tails everywhere, E padded to 32, batch 1
    (8, 20, 8, 1, (7, 7), 2, True),        # the inner shortcut, tasks of whole images
    (16, 320, 16, 1, (40, 40), 1, False),  # several strips: the depthwise transpose spills into the next
    (16, 320, 24, 2, (41, 40), 2, False),  # strips at stride 2 and an odd size
    (16, 320, 16, 1, (10, 120), 1, True),  # a wide row: the expanded channels in several slices
])
def test_fused_train_block_equals_reference(cin, expanded, cout, stride, size, batch, inner):
    operands = block_operands(jax.random.key(0), batch, size, cin, expanded, cout)
    pads = spatial_pads(operands[0].shape, 3, stride, "same")
    fused = lambda *a: fused_train_block(*a, EPSILON, ("relu6", "relu6"), stride, pads, inner)
    reference = lambda *a: reference_block(*a, stride, pads, inner)
    got, want = jax.jit(fused)(*operands), reference(*operands)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(w))))
    weights = jax.random.normal(jax.random.key(1), got[0].shape)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a)[0] * weights), argnums=tuple(range(8)))(*operands)
             for f in (jax.jit(fused), reference)]
    for g, w in zip(*grads):
        assert cosine(g, w) > 0.99999


def block_gradients(spec: BlockSpec, config: MobileNetV2Config, x: jax.Array):
    """(gradients of the parameters and the input, updated BatchNorm statistics) of one block in
    training, for a fixed output weighting."""
    block = InvertedResidual(spec, config, expansion_shortcut=False, rngs=nnx.Rngs(0))
    randomize_statistics(block, jax.random.key(1))
    graphdef, params, stats = nnx.split(block, nnx.Param, nnx.BatchStat)

    def loss(p, s, x):
        module = nnx.merge(graphdef, p, s, copy=True)
        y = module(x, None, True)[0]
        weights = jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape))
        return jnp.sum(y * weights), nnx.state(module, nnx.BatchStat)

    return jax.jit(jax.grad(loss, argnums=(0, 2), has_aux=True))(params, stats, x)


@needs_kernels
@pytest.mark.parametrize("residual, act, stride", [
    ("bottleneck", "linear", 1), ("bottleneck", "relu6", 2), ("inner", "linear", 1), ("inner", "relu6", 2),
    ("none", "linear", 2), ("none", "relu6", 1)])
def test_fused_training_block_equals_plain(residual, act, stride):
    """Every shortcut the kernels compute (the bottleneck one added after them) and both bottleneck
    activations, at an odd size: gradients and the moved running statistics."""
    cin = 16
    spec = BlockSpec(index=1, in_channels=cin, expanded_channels=96, out_channels=cin, stride=stride,
                     has_expansion=True, bottleneck_shortcut=stride == 1)
    x = jax.random.normal(jax.random.key(2), (3, 11, 13, cin))
    results = {impl: block_gradients(spec, MobileNetV2Config(residual=residual, bottleneck_activation=act,
                                                             block_impl=impl), x) for impl in ("plain", "fused")}
    (grads, stats), (want_grads, want_stats) = results["fused"], results["plain"]
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        assert cosine(g, w) > 0.9999
    for g, w in zip(jax.tree.leaves(stats), jax.tree.leaves(want_stats)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


@needs_kernels
def test_training_step_matches_plain():
    """One training batch of a small network at 29 px, every block but the t = 1 one fused (the
    compiled step calls the training kernels): loss, running statistics and gradients."""
    images = jax.random.uniform(jax.random.key(2), (4, 29, 29, 3), minval=-1.0, maxval=1.0)
    labels = jnp.arange(4) % 10
    out = {}
    for impl in ("plain", "fused"):
        model = build_model(model_config("mobilenet_v2", **SMALL, block_impl=impl), rngs=nnx.Rngs(0))
        graphdef, params, stats = split_state(model)
        step = jax.jit(make_grad_fn(graphdef))
        args = (params, stats, images, labels, jax.random.key(3))
        calls = step.lower(*args).as_text().count(TRAIN_TARGET)
        assert calls == (len(model.blocks) - 1 if impl == "fused" else 0)
        out[impl] = step(*args)
    ((loss, (logits, stats)), grads), ((want_loss, (want_logits, want_stats)), want_grads) = out["fused"], out["plain"]
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=1e-4, atol=1e-4)
    for g, w in zip(jax.tree.leaves(stats), jax.tree.leaves(want_stats)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
    flat = lambda tree: np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])
    assert cosine(flat(grads), flat(want_grads)) > 0.999
    # a linear bottleneck's BatchNorm bias feeds only layers that a BatchNorm normalises again: its
    # gradient is zero but for rounding (norm ~1e-9), in both forms; every other leaf is compared
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        if np.linalg.norm(w) < 1e-6:
            assert np.linalg.norm(g) < 1e-6
        else:
            assert cosine(g, w) > 0.999


@needs_kernels
def test_auto_fuses_training_blocks_where_measured_faster():
    """In training ``auto`` fuses blocks whose input rows are at least 56 pixels wide (the 224 px
    network's blocks 1-3); never the stem's deferred output (the t = 1 block)."""
    backend = backend_for("auto", "cpu")
    assert backend.fuses_block(jnp.ones((32, 56, 56, 24)), train=True)
    assert not backend.fuses_block(jnp.ones((32, 28, 28, 32)), train=True)
    assert backend.fuses_block(jnp.ones((32, 28, 28, 32)), train=False)
    fused = KernelBackend("native", "fused")
    assert fused.fuses_block(jnp.ones((2, 4, 4, 16)), train=True)
    deferred = DeferredBN(jnp.ones((2, 64, 64, 16)), nnx.BatchNorm(16, rngs=nnx.Rngs(0)), "relu6")
    assert not fused.fuses_block(deferred, train=True)
