"""Section 5 split evaluation: equal to the plain block for every k, less peak memory for k > 1."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from manifold_lab.models import InvertedResidual, MobileNetV2Config
from manifold_lab.models.memory_split import compiled_temp_bytes, split_apply, split_block


def _block(config: MobileNetV2Config, index: int, expansion_shortcut: bool = False) -> InvertedResidual:
    """Block ``index`` of ``config`` with random BatchNorm scale, offset and running statistics."""
    block = InvertedResidual(config.blocks()[index], config, expansion_shortcut=expansion_shortcut,
                             rngs=nnx.Rngs(index))
    rng = np.random.default_rng(index)
    for _, node in nnx.iter_graph(block):
        if isinstance(node, nnx.BatchNorm):
            n = node.mean.shape[0]
            node.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
            node.bias[...] = jnp.asarray(rng.normal(0, 0.2, n), jnp.float32)
            node.mean[...] = jnp.asarray(rng.normal(0, 0.2, n), jnp.float32)
            node.var[...] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
    return block


def _plain(block: InvertedResidual, x: jax.Array) -> jax.Array:
    graphdef, state = nnx.split(block)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, None, False)[0])(state, x)


# (config, block index, input size, k values): the t=1 block without expansion (32 channels),
# a stride-2 block (96 expanded), a stride-1 block with a shortcut and a ReLU6 bottleneck
# (symmetric padding, xla depthwise).
CASES = [
    (MobileNetV2Config(width=1.0), 0, 12, (1, 2, 32)),
    (MobileNetV2Config(width=1.0), 1, 16, (1, 2, 3, 4, 6, 96)),
    (MobileNetV2Config(width=0.5, bottleneck_activation="relu6", padding="symmetric",
                       depthwise_impl="xla"), 2, 9, (1, 4, 6)),
]


@pytest.mark.parametrize("config, index, size, ks", CASES, ids=["t1", "stride2", "shortcut-relu6"])
def test_split_equals_plain_block(config, index, size, ks):
    block = _block(config, index)
    spec = config.blocks()[index]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, size, size, spec.in_channels)),
                    jnp.float32)
    expected = np.asarray(_plain(block, x))
    assert np.std(expected) > 0.1
    weights = split_block(block)
    assert weights.shortcut == spec.bottleneck_shortcut
    for k in ks:
        assert spec.expanded_channels % k == 0
        got = np.asarray(jax.jit(split_apply, static_argnums=2)(weights, x, k))
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5, err_msg=f"k={k}")


def test_peak_temp_bytes_drop_with_k():
    config = MobileNetV2Config(width=1.0)
    weights = split_block(_block(config, 2))  # 56x56 block: 24 -> 144 -> 24 at 224 px
    x = jax.ShapeDtypeStruct((1, 28, 28, 24), jnp.float32)
    peak = {k: compiled_temp_bytes(lambda w, x, k=k: split_apply(w, x, k), weights, x)
            for k in (1, 2, 4, 8)}
    expanded_bytes = 28 * 28 * 144 * 4
    assert peak[1] >= expanded_bytes  # the whole expanded tensor is live at k = 1
    assert peak[1] > peak[2] > peak[4] > peak[8]
    assert peak[8] < 0.3 * peak[1]


def test_bad_k_and_expansion_shortcut():
    config = MobileNetV2Config(width=0.35, residual="expansion")
    block = _block(config, 3, expansion_shortcut=True)
    with pytest.raises(ValueError, match="expansion shortcut"):
        split_block(block)
    weights = split_block(_block(config, 1))
    x = jnp.zeros((1, 8, 8, config.blocks()[1].in_channels))
    with pytest.raises(ValueError, match="does not divide"):
        split_apply(weights, x, 5)
