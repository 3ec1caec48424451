"""The fused inverted-residual block kernel (inference): equal to the plain layers up to float32
rounding for every shortcut placement it computes (bottleneck, inner, none) and both bottleneck
activations, at stride 1 and 2, odd sizes, batch 1 and the kernel's other work splits (channel
tails, several strips, several channel slices, the t = 1 block fed by the stem's deferred
BatchNorm); the placements whose shortcut reads the expanded tensor and ``capture`` run the
plain layers (training: tests/test_fused_block_train.py); ``block_impl`` resolves like ``depthwise_impl``. The Section 5 memory bounds
the kernel is measured against reproduce Table 3."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from manifold_lab import native
from manifold_lab.models import backend_for, build_model, model_config
from manifold_lab.models.backend import KernelBackend
from manifold_lab.costs.memory_bounds import memory_bounds
from manifold_lab.models.config import BlockSpec, BottleneckStage, MobileNetV2Config
from manifold_lab.models.mobilenet_v2 import InvertedResidual

needs_kernel = pytest.mark.skipif(not native.available() or native.load("fused_block") is None,
                                  reason="native kernels or the fused block kernel (AVX-512) unavailable")

#: a t = 1 block fed by the stem, stride-1 blocks with shortcuts, a stride-2 block, odd sizes
STAGES = (BottleneckStage(1, 16, 1, 1), BottleneckStage(6, 24, 2, 2), BottleneckStage(6, 40, 1, 2))
SMALL = dict(width=0.35, layout="imagenet", num_classes=10, in_channels=3, stages=STAGES, last_channels=64)


def randomize_statistics(module: nnx.Module, key: jax.Array) -> None:
    """BatchNorm statistics and affine parameters away from 0 / 1, so that folding is exercised."""
    for _, bn in nnx.iter_graph(module):
        if isinstance(bn, nnx.BatchNorm):
            key, *keys = jax.random.split(key, 5)
            shape = bn.scale.shape
            bn.scale[...] = jax.random.uniform(keys[0], shape, minval=0.5, maxval=1.5)
            bn.bias[...] = 0.5 * jax.random.normal(keys[1], shape)
            bn.mean[...] = 0.5 * jax.random.normal(keys[2], shape)
            bn.var[...] = jax.random.uniform(keys[3], shape, minval=0.5, maxval=2.0)


FUSED_TARGET = "manifold_fused_block_fwd"


def network_logits(residual: str, act: str, impl: str, images: jax.Array, capture: bool = False,
                   fused_calls: int | None = None) -> jax.Array:
    """Inference logits of one small network (the same weights for every ``impl``); with
    ``fused_calls``, the compiled forward pass must call the fused kernel that many times."""
    config = model_config("mobilenet_v2", **SMALL, residual=residual, bottleneck_activation=act, block_impl=impl)
    model = build_model(config, rngs=nnx.Rngs(0))
    randomize_statistics(model, jax.random.key(1))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False, capture=capture))
    if fused_calls is not None:
        assert forward.lower(state, images).as_text().count(FUSED_TARGET) == fused_calls
    out = forward(state, images)
    return out[0] if capture else out


def assert_close(got: jax.Array, want: jax.Array) -> None:
    scale = float(jnp.max(jnp.abs(want)))
    assert scale > 1e-3
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5 * scale, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("act", ["linear", "relu6"])
@pytest.mark.parametrize("residual", ["bottleneck", "inner", "none"])
def test_fused_network_equals_plain(residual, act):
    """Whole networks at an odd size (every block fused: the t = 1 block reads the stem's deferred
    BatchNorm, the stride-2 blocks pad an odd size) and batch 1 (channels split between tasks)."""
    blocks = len(MobileNetV2Config(**SMALL).blocks())
    for batch, size in ((1, 37), (3, 29)):
        images = jax.random.uniform(jax.random.key(2), (batch, size, size, 3), minval=-1.0, maxval=1.0)
        assert_close(network_logits(residual, act, "fused", images, fused_calls=blocks),
                     network_logits(residual, act, "plain", images, fused_calls=0))


@needs_kernel
@pytest.mark.parametrize("residual", ["expansion", "expansion_preact"])
def test_expansion_streams_take_the_plain_path(residual):
    """Their shortcuts read e_i, which the fused kernel never writes: every block runs plain, so the
    logits are those of ``block_impl="plain"`` bit for bit."""
    images = jax.random.uniform(jax.random.key(2), (2, 29, 29, 3), minval=-1.0, maxval=1.0)
    fused, plain = (network_logits(residual, "linear", impl, images, fused_calls=0) for impl in ("fused", "plain"))
    np.testing.assert_array_equal(np.asarray(fused), np.asarray(plain))


@needs_kernel
def test_capture_takes_the_plain_path():
    """``capture`` records e_i and d_i, so it runs the plain layers (logits bit for bit those of
    ``plain``, within rounding of the fused ones); in training the t = 1 block runs plain too."""
    images = jax.random.uniform(jax.random.key(2), (2, 29, 29, 3), minval=-1.0, maxval=1.0)
    captured = network_logits("bottleneck", "linear", "fused", images, capture=True, fused_calls=0)
    np.testing.assert_array_equal(np.asarray(captured),
                                  np.asarray(network_logits("bottleneck", "linear", "plain", images, capture=True)))
    assert_close(network_logits("bottleneck", "linear", "fused", images), captured)
    config = MobileNetV2Config(**SMALL, block_impl="fused")
    first, spec = config.blocks()[0], config.blocks()[2]
    block = InvertedResidual(spec, config, expansion_shortcut=False, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 8, 8, spec.in_channels))
    assert block.fused(x, train=False, capture=True) is None
    assert block.fused(x, train=False, capture=False) is not None
    t1 = InvertedResidual(first, config, expansion_shortcut=False, rngs=nnx.Rngs(0))
    assert t1.fused(jnp.ones((1, 8, 8, first.in_channels)), train=True, capture=False) is None


@needs_kernel
@pytest.mark.parametrize("cin, expanded, cout, stride, size, batch", [
    (5, 30, 7, 2, (9, 8), 1),        # channel tails everywhere, E padded to 32
    (24, 144, 24, 1, (70, 64), 1),   # several strips of output rows, shortcut
    (8, 192, 8, 1, (6, 250), 2),     # a wide row: the expanded channels in several slices
    (16, 96, 24, 2, (15, 15), 9),    # stride 2 at an odd size, tasks of whole images (the last short)
    (24, 144, 40, 2, (2, 3), 9),     # 1 x 2 outputs: the projection's rows span images
])
def test_fused_block_equals_plain(cin, expanded, cout, stride, size, batch):
    """One block at shapes that reach each split of the kernel's work."""
    spec = BlockSpec(index=1, in_channels=cin, expanded_channels=expanded, out_channels=cout, stride=stride,
                     has_expansion=True, bottleneck_shortcut=stride == 1 and cin == cout)
    outputs, state = {}, None
    for impl in ("plain", "fused"):
        block = InvertedResidual(spec, MobileNetV2Config(block_impl=impl), expansion_shortcut=False,
                                 rngs=nnx.Rngs(0))
        randomize_statistics(block, jax.random.key(1))
        graphdef, block_state = nnx.split(block)
        state = block_state if state is None else state
        x = jax.random.normal(jax.random.key(2), (batch, *size, cin))
        outputs[impl] = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x, None, False)[0])(state, x)
    assert outputs["fused"].shape == outputs["plain"].shape
    assert_close(outputs["fused"], outputs["plain"])


@needs_kernel
def test_block_impl_resolves_like_depthwise_impl():
    assert backend_for("auto", "cpu", block_impl="fused") == KernelBackend("native", "fused")
    assert backend_for("auto", "cpu", block_impl="plain") == KernelBackend("native")
    assert backend_for("auto", "gpu", block_impl="auto") == KernelBackend("xla")
    assert backend_for("shift", "cpu", block_impl="auto") == KernelBackend("shift")
    with pytest.raises(ValueError, match="needs the native kernels"):
        backend_for("xla", "cpu", block_impl="fused")
    with pytest.raises(ValueError, match="block_impl must be"):
        backend_for("auto", "cpu", block_impl="merged")
    with pytest.raises(ValueError, match="native kind"):
        KernelBackend("shift", "fused")
    with pytest.raises(ValueError):
        MobileNetV2Config(block_impl="merged")


@needs_kernel
def test_auto_fuses_where_measured_faster():
    """``auto`` fuses float32 blocks whose input rows are at least 2 pixels wide."""
    backend = backend_for("auto", "cpu")
    assert backend.blocks == "auto"
    assert backend.fuses_block(jnp.ones((32, 7, 7, 160))) and backend.fuses_block(jnp.ones((1, 2, 2, 96)))
    assert not backend.fuses_block(jnp.ones((128, 1, 1, 160)))
    assert not backend.fuses_block(jnp.ones((8, 4, 4, 16), jnp.bfloat16))
    assert KernelBackend("native", "fused").fuses_block(jnp.ones((128, 1, 1, 160)))
    assert not backend_for("auto", "cpu", block_impl="plain").fuses_block(jnp.ones((1, 8, 8, 16)))


def test_memory_bounds_reproduce_table3():
    """The largest Section 5 tensor of the 224 px network is 112 x 112 x 16 (Table 3's 400K at 2
    bytes); the largest input + output pair adds the 224 x 224 x 3 image; both scale with the batch
    and the activation width."""
    two_bytes = memory_bounds(MobileNetV2Config(), 224, batch=1, bytes_per_activation=2)
    assert two_bytes.largest_tensor == "block00/output" and two_bytes.largest_bytes // 1000 == 401
    assert two_bytes.pair == ("input", "block00/output")
    assert two_bytes.pair_bytes == 2 * (224 * 224 * 3 + 112 * 112 * 16)
    assert memory_bounds(MobileNetV2Config(), 224, batch=32).largest_bytes == 64 * two_bytes.largest_bytes
