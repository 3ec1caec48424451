"""The ``expansion_preact`` and ``inner`` shortcut placements: where their shortcuts go, costs equal to
``bottleneck``'s, the forward pass against a hand-written reference in ``jnp``/``lax`` (every
placement, every depthwise form, with and without capture), the shortcuts' identity paths, and
gradients equal across the depthwise forms; and the ``residual_readings`` study, outside ``all``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ablations.plan import build_plan
from ablations.studies import ALL_STUDIES, STUDIES, get_preset, study_names
from manifold_lab import native
from manifold_lab.costs import abstract_param_count, model_costs
from manifold_lab.models import build_model, model_config
from manifold_lab.models.config import RESIDUAL_PLACEMENTS, BottleneckStage
from manifold_lab.train import TrainConfig

NEW = ("expansion_preact", "inner")
#: every depthwise form that can run here (the native one where its library builds)
FORMS = ("xla", "shift") + (("native",) if native.load("depthwise") is not None else ())
#: a t = 1 block, stride-1 blocks (shortcuts of every placement) and stride-2 blocks (none, and the
#: native form's fused expansion), at width 0.35 and 32 px
STAGES = (BottleneckStage(1, 16, 1, 1), BottleneckStage(6, 24, 2, 2), BottleneckStage(6, 32, 3, 2),
          BottleneckStage(6, 64, 1, 2))
SMALL = dict(width=0.35, layout="small", num_classes=10, in_channels=3, stages=STAGES, last_channels=64)


def small_config(residual: str, impl: str = "xla"):
    return model_config("mobilenet_v2", **SMALL, residual=residual, depthwise_impl=impl)


def abstract(cfg) -> nnx.Module:
    return nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def state():
    """Weights shared by every placement, with BatchNorm scales, offsets and running statistics
    drawn at random (so that no BatchNorm is near the identity and the ReLU6s clip)."""
    model = build_model(small_config("bottleneck"), rngs=nnx.Rngs(0))
    keys = iter(jax.random.split(jax.random.key(2), 1000))
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.BatchNorm):
            shape = module.scale.shape
            module.scale[...] = jax.random.uniform(next(keys), shape, minval=0.5, maxval=1.5)
            module.bias[...] = jax.random.normal(next(keys), shape)
            module.mean[...] = 0.3 * jax.random.normal(next(keys), shape)
            module.var[...] = jax.random.uniform(next(keys), shape, minval=0.5, maxval=2.0)
    return nnx.state(model)


def with_state(cfg, state) -> nnx.Module:
    model = abstract(cfg)
    nnx.update(model, state)
    return model


# ---------------------------------------------------------------- reference forward (eval mode)


def _bn(bn: nnx.BatchNorm, v):
    return (v - bn.mean[...]) / jnp.sqrt(bn.var[...] + bn.epsilon) * bn.scale[...] + bn.bias[...]


def _conv(v, kernel, stride: int, groups: int = 1):
    return jax.lax.conv_general_dilated(v, kernel, (stride, stride), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def reference_forward(model, cfg, x) -> dict:
    """Eval-mode logits and intermediates of ``cfg``'s network, written out from the module
    docstring's equations (``same`` padding, BatchNorm under its running statistics)."""
    relu6 = jax.nn.relu6
    out = {}
    h = relu6(_bn(model.stem.bn, _conv(x, model.stem.kernel[...], cfg.stem_stride)))
    expansion_pairs, inner = set(cfg.expansion_shortcuts()), set(cfg.inner_shortcuts())
    stream = None
    for spec, block in zip(cfg.blocks(), model.blocks):
        name, i = f"block{spec.index:02d}", spec.index
        if spec.has_expansion:
            z = _bn(block.expansion.bn, h @ block.expansion.kernel[...][0, 0])
            if cfg.residual == "expansion_preact":
                z = z + stream if i in expansion_pairs else z
                e, stream = relu6(z), z
                out[f"{name}/preactivation"] = z
            else:
                e = relu6(z)
                e = e + stream if cfg.residual == "expansion" and i in expansion_pairs else e
                stream = e
        else:
            e = stream = h
        d = relu6(_bn(block.depthwise.bn, _conv(e, block.depthwise.kernel[...], spec.stride, e.shape[-1])))
        if cfg.residual == "inner" and i in inner:
            d = d + e
        p = _bn(block.projection.bn, d @ block.projection.kernel[...][0, 0])
        if cfg.residual == "bottleneck" and spec.bottleneck_shortcut:
            p = p + h
        out.update({f"{name}/expansion": e, f"{name}/depthwise": d, f"{name}/projection": p})
        h = p
    pooled = jnp.mean(relu6(_bn(model.head.bn, h @ model.head.kernel[...][0, 0])), axis=(1, 2))
    out["logits"] = model.classifier.dense(pooled)
    return out


def assert_close(actual, expected, what: str) -> None:
    expected = np.asarray(expected)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-4, atol=1e-4 * scale, err_msg=what)


@pytest.fixture(scope="module")
def references(state, images) -> dict:
    out = {}
    for residual in RESIDUAL_PLACEMENTS:
        cfg = small_config(residual)
        out[residual] = reference_forward(with_state(cfg, state), cfg, images)
    return out


# ---------------------------------------------------------------- layout, choices, costs


def test_placements_are_choices():
    assert {"bottleneck", "expansion", "none", *NEW} == set(RESIDUAL_PLACEMENTS)
    for residual in NEW:
        assert TrainConfig(residual=residual).residual == residual
    with pytest.raises(ValueError, match="residual"):
        model_config("mobilenet_v2", residual="preact")


def test_shortcut_layout_at_224():
    """Where each placement's shortcuts are, and where the native form may fuse the expansion."""
    cfg = model_config("mobilenet_v2")
    assert cfg.inner_shortcuts() == (2, 4, 5, 7, 8, 9, 10, 11, 12, 14, 15, 16)
    preact = list(abstract(model_config("mobilenet_v2", residual="expansion_preact")).blocks)
    assert tuple(b.index for b in preact if b.expansion_shortcut) == cfg.expansion_shortcuts()
    assert all(b.preactivation_stream and b.keep_expanded and not b.bottleneck_shortcut for b in preact)
    inner = list(abstract(model_config("mobilenet_v2", residual="inner")).blocks)
    assert tuple(b.index for b in inner if b.inner_shortcut) == cfg.inner_shortcuts()
    # only the blocks with an inner shortcut keep e_i: the stride-2 ones still fuse their expansion
    assert all(b.keep_expanded == b.inner_shortcut for b in inner)
    assert not any(b.bottleneck_shortcut or b.expansion_shortcut for b in inner)


@pytest.mark.parametrize("residual", NEW)
def test_costs_equal_bottleneck(residual):
    base = model_config("mobilenet_v2", width=0.5)
    other = model_config("mobilenet_v2", width=0.5, residual=residual)
    assert abstract_param_count(other) == abstract_param_count(base)
    costs = model_costs(other, 160)
    assert costs.as_dict() == model_costs(base, 160).as_dict()
    assert abstract_param_count(other) == {"params": costs.params, "bn_statistics": costs.bn_statistics}


# ---------------------------------------------------------------- forward pass


@pytest.mark.parametrize("residual", RESIDUAL_PLACEMENTS)
def test_forward_matches_reference(residual, state, images, references):
    """Plain and captured logits, and every captured intermediate, equal the reference; the
    placements give different networks."""
    reference = references[residual]
    model = with_state(small_config(residual), state)
    logits, acts = model(images, capture=True)
    assert logits.shape == (2, 10)
    assert_close(model(images), reference["logits"], "plain logits")
    for name, value in reference.items():
        assert acts[name].shape == value.shape, name
        assert_close(acts[name], value, name)
    has_preactivation = [name for name in acts if name.endswith("/preactivation")]
    assert len(has_preactivation) == (6 if residual == "expansion_preact" else 0)
    for other in RESIDUAL_PLACEMENTS:
        if other != residual:
            assert np.abs(references[other]["logits"] - reference["logits"]).max() > 1e-3, other


@pytest.mark.parametrize("residual", NEW)
@pytest.mark.parametrize("impl", [f for f in FORMS if f != "xla"])
def test_depthwise_forms_match_reference(residual, impl, state, images, references):
    """``shift`` and ``native`` (fused where no shortcut reads e_i), jitted, with and without capture."""
    graphdef, params = nnx.split(with_state(small_config(residual, impl), state))
    plain = jax.jit(lambda s, x: nnx.merge(graphdef, s, copy=True)(x))(params, images)
    logits, acts = jax.jit(lambda s, x: nnx.merge(graphdef, s, copy=True)(x, capture=True))(params, images)
    assert_close(plain, references[residual]["logits"], "plain logits")
    assert_close(logits, plain, "captured logits")
    for name, value in references[residual].items():
        assert_close(acts[name], value, name)


def zero_output(bn: nnx.BatchNorm) -> None:
    """Scale and offset 0: the BatchNorm outputs 0, and so does the ReLU6 after it."""
    bn.scale[...] = jnp.zeros_like(bn.scale[...])
    bn.bias[...] = jnp.zeros_like(bn.bias[...])


def test_shortcuts_carry_the_identity(state, images):
    """With a branch's last BatchNorm zeroed the branch outputs 0 and only the shortcut remains:
    ``inner`` then passes e_i to the projection unchanged, and ``expansion_preact`` passes
    z_{i-1} on as z_i (so e_i = e_{i-1} too)."""
    cfg = small_config("inner")
    model = with_state(cfg, state)
    for i in cfg.inner_shortcuts():
        zero_output(model.blocks[i].depthwise.bn)
    acts = model(images, capture=True)[1]
    for i in cfg.inner_shortcuts():
        np.testing.assert_array_equal(acts[f"block{i:02d}/depthwise"], acts[f"block{i:02d}/expansion"])

    cfg = small_config("expansion_preact")
    model = with_state(cfg, state)
    j = cfg.expansion_shortcuts()[0]
    zero_output(model.blocks[j].expansion.bn)
    acts = model(images, capture=True)[1]
    for kind in ("preactivation", "expansion"):
        np.testing.assert_array_equal(acts[f"block{j:02d}/{kind}"], acts[f"block{j - 1:02d}/{kind}"])
    # where the stream goes negative or above 6, the carried sum is not e_{i-1}: ReLU6 did not clip it
    z = np.asarray(acts[f"block{j:02d}/preactivation"])
    assert z.min() < 0 or z.max() > 6


# ---------------------------------------------------------------- gradients (train mode)


def train_gradients(model, images):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest):
        logits = nnx.merge(graphdef, params, rest, copy=True)(images, train=True, dropout_key=jax.random.key(0))
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([1, 7])).mean()

    value, grads = jax.jit(jax.value_and_grad(loss))(params, rest)
    return float(value), grads


@pytest.mark.parametrize("residual", NEW)
def test_gradients_equal_across_depthwise_forms(residual, state, images):
    results = {impl: train_gradients(with_state(small_config(residual, impl), state), images) for impl in FORMS}
    value, grads = results["xla"]
    leaves = jax.tree.leaves(grads)
    assert np.isfinite(value)
    assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0 for g in leaves)
    for impl in FORMS[1:]:
        other, other_grads = results[impl]
        np.testing.assert_allclose(other, value, rtol=1e-5, err_msg=impl)
        for g, h in zip(leaves, jax.tree.leaves(other_grads)):
            scale = max(1e-3, float(jnp.abs(g).max()))
            np.testing.assert_allclose(np.asarray(h), np.asarray(g), rtol=1e-3, atol=1e-3 * scale, err_msg=impl)


# ---------------------------------------------------------------- the study


def test_residual_readings_study_runs_by_name_only():
    study = STUDIES["residual_readings"]
    assert study_names("all") == ALL_STUDIES == ("fig6a", "fig6b", "fig5", "fig7")
    assert study_names("residual_readings") == ("residual_readings",)
    assert study.kind == "curves" and study.baseline == "bottleneck"
    assert {"bottleneck", "expansion", *NEW} <= {v.name for v in study.variants}
    assert "no claim" in study.claim
    preset = get_preset("quick")
    runs = build_plan("residual_readings", preset)
    assert sorted(r.spec["residual"] for r in runs) == sorted(v.name for v in study.variants)
    assert all(r.spec["bottleneck_activation"] == "linear" for r in runs)
    assert not any(s == "residual_readings" for r in build_plan("all", preset) for s, _ in r.members)
    # the shared configurations are the same runs as fig6b's (same ids)
    fig6b = {r.run_id for r in build_plan("fig6b", preset)}
    assert fig6b <= {r.run_id for r in runs}
