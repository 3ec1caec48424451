"""MobileNetV2 / MobileNetV1: exact sizes of the paper's network (counted abstractly), the ablation
switches, train/eval BatchNorm behaviour, and the depthwise forms (the native kernel's own cases:
``test_native.py``)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from manifold_lab.costs.analytic import model_costs
from manifold_lab.models import (
    InvertedResidual,
    MobileNetV1,
    MobileNetV2,
    MobileNetV2Config,
    build_model,
    count_params,
    depthwise_conv,
    model_config,
    output_size,
    pad_amounts,
    resolve_impl,
    weight_decay_mask,
)
from manifold_lab.models.config import LAYOUTS, BottleneckStage
from manifold_lab.models.backend import backend_for
from manifold_lab.models.depthwise import DEPTHWISE_FORMS


def abstract(cfg) -> nnx.Module:
    return nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))


def abstract_acts(cfg, size: int, batch: int = 1) -> dict:
    """Shapes of every captured intermediate, in forward order, without computing anything.
    (JAX transformations return dicts with sorted keys, so the order is recorded while tracing.)"""
    x = jax.ShapeDtypeStruct((batch, size, size, cfg.in_channels), jnp.float32)
    order: list[str] = []

    def trace(x):
        acts = build_model(cfg, rngs=nnx.Rngs(0))(x, capture=True)[1]
        order.extend(acts)
        return acts

    shapes = jax.eval_shape(trace, x)
    return {name: shapes[name] for name in order}


def blocks_of(model: MobileNetV2) -> list[InvertedResidual]:
    return list(model.blocks)


# ---------------------------------------------------------------- sizes (abstract, width 1.0 / 224 px)

def test_paper_network_size():
    model = abstract(model_config("mobilenet_v2"))
    assert count_params(model) == {"params": 3_504_872, "bn_statistics": 34_112}
    blocks = blocks_of(model)
    assert len(blocks) == 17
    assert sum(b.bottleneck_shortcut for b in blocks) == 10
    assert sum(b.expansion_shortcut for b in blocks) == 0
    assert blocks[0].expansion is None and all(b.expansion is not None for b in blocks[1:])


@pytest.mark.parametrize("width, params, stem", [
    (0.35, 1_677_128, 16), (0.5, 1_968_680, 16), (0.75, 2_636_424, 24),
    (1.3, 5_386_792, 40), (1.4, 6_108_776, 48),
])
def test_width_multiplier_params(width, params, stem):
    model = abstract(model_config("mobilenet_v2", width=width))
    assert count_params(model)["params"] == params
    assert model.stem.kernel.shape == (3, 3, 3, stem)
    assert model.head.kernel.shape[-1] == (1280 if width <= 1 else int(1280 * width + 4) // 8 * 8)


def test_table2_shapes_at_224():
    acts = abstract_acts(model_config("mobilenet_v2"), 224)
    expected = {
        "stem": (112, 112, 32), "block00/projection": (112, 112, 16), "block02/projection": (56, 56, 24),
        "block05/projection": (28, 28, 32), "block09/projection": (14, 14, 64),
        "block12/projection": (14, 14, 96), "block15/projection": (7, 7, 160),
        "block16/projection": (7, 7, 320), "head": (7, 7, 1280),
    }
    for name, shape in expected.items():
        assert acts[name].shape == (1, *shape), name
    assert acts["block03/expansion"].shape == (1, 56, 56, 144)  # depthwise input before the stride
    assert acts["block03/depthwise"].shape == (1, 28, 28, 144)
    assert acts["logits"].shape == (1, 1000) and acts["logits"].dtype == jnp.float32
    names = list(acts)
    assert names[0] == "stem" and names[-1] == "logits"
    assert names[1:4] == ["block00/expansion", "block00/depthwise", "block00/projection"]
    assert len([n for n in names if n.startswith("block")]) == 3 * 17


@pytest.mark.parametrize("size, padding", [(32, "same"), (28, "same"), (32, "symmetric"), (28, "symmetric")])
def test_small_layout_ends_at_4x4(size, padding):
    cfg = model_config("mobilenet_v2", width=0.5, layout="small", num_classes=10, in_channels=1,
                       padding=padding)
    acts = abstract_acts(cfg, size, batch=3)
    assert acts["stem"].shape[1:3] == (size, size)
    assert acts["head"].shape == (3, 4, 4, 1280)
    assert acts["logits"].shape == (3, 10)


def test_stem1_layout_ends_at_2x2_at_28px():
    """Only the stem runs at stride 1: 28 -> 28 (stem) -> 14 -> 7 -> 4 -> 2; same parameters."""
    kw = dict(width=0.35, num_classes=10, in_channels=1)
    acts = abstract_acts(model_config("mobilenet_v2", layout="stem1", **kw), 28, batch=2)
    assert acts["stem"].shape[1:3] == (28, 28)
    assert acts["head"].shape == (2, 2, 2, 1280)
    counts = [count_params(abstract(model_config("mobilenet_v2", layout=p, **kw)))["params"] for p in LAYOUTS]
    assert counts == [counts[0]] * len(LAYOUTS) == [408_650] * len(LAYOUTS)


def test_bneck1_layout_keeps_14x14_through_the_first_stride2_stage_at_28px():
    """Stem at stride 2, the 24-channel stage at 1: 28 -> 14 (stem) -> 14 -> 7 -> 4 -> 2."""
    cfg = model_config("mobilenet_v2", layout="bneck1", width=0.35, num_classes=10, in_channels=1)
    acts = abstract_acts(cfg, 28, batch=2)
    assert acts["stem"].shape[1:3] == (14, 14)
    assert acts["block02/projection"].shape == (2, 14, 14, 8)
    assert acts["block03/depthwise"].shape == (2, 7, 7, 48)
    assert acts["head"].shape == (2, 2, 2, 1280)
    madds = {p: model_costs(model_config("mobilenet_v2", layout=p, width=0.35, num_classes=10,
                                         in_channels=1), 28).madds for p in LAYOUTS}
    assert madds["imagenet"] < madds["bneck1"] < madds["stem1"] < madds["small"]


def test_residual_switch_keeps_parameters_and_counts_shortcuts():
    counts = {}
    for residual in ("bottleneck", "expansion", "none"):
        cfg = model_config("mobilenet_v2", residual=residual)
        model = abstract(cfg)
        counts[residual] = count_params(model)
        blocks = blocks_of(model)
        assert sum(b.bottleneck_shortcut for b in blocks) == (10 if residual == "bottleneck" else 0)
        expected = cfg.expansion_shortcuts() if residual == "expansion" else ()
        assert tuple(b.index for b in blocks if b.expansion_shortcut) == expected
    assert counts["bottleneck"] == counts["expansion"] == counts["none"]
    assert model_config("mobilenet_v2").expansion_shortcuts() == (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)


def test_compute_dtype_keeps_params_float32():
    cfg = model_config("mobilenet_v2", width=0.35, layout="small", num_classes=10, compute_dtype="bfloat16")
    model = abstract(cfg)
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.float32)}
    acts = abstract_acts(cfg, 32)
    assert acts["block05/depthwise"].dtype == jnp.bfloat16
    assert acts["logits"].dtype == jnp.float32


def test_mobilenet_v1_size_and_capture():
    cfg = model_config("mobilenet_v1")
    model = abstract(cfg)
    assert isinstance(model, MobileNetV1)
    # Equal to keras.applications.MobileNet(alpha=1, classes=1000) trainable parameters.
    assert count_params(model) == {"params": 4_231_976, "bn_statistics": 21_888}
    acts = abstract_acts(cfg, 224)
    assert acts["layer00/pointwise"].shape == (1, 112, 112, 64)
    assert acts["layer12/pointwise"].shape == (1, 7, 7, 1024)
    assert acts["logits"].shape == (1, 1000)
    half = abstract(model_config("mobilenet_v1", width=0.5))
    assert half.layers[-1].pointwise.kernel.shape == (1, 1, 512, 512)
    small = abstract_acts(model_config("mobilenet_v1", layout="small", num_classes=10), 32)
    assert small["layer12/pointwise"].shape == (1, 4, 4, 1024)


def test_model_config_errors():
    assert isinstance(model_config("mobilenet_v2", width=0.5), MobileNetV2Config)
    with pytest.raises(ValueError, match="unknown model"):
        model_config("resnet")
    with pytest.raises(ValueError, match="residual"):
        model_config("mobilenet_v2", residual="dense")
    with pytest.raises(ValueError):
        model_config("mobilenet_v2", no_such_field=1)


# ---------------------------------------------------------------- weight decay mask

def test_weight_decay_mask():
    model = abstract(model_config("mobilenet_v2", width=0.35, num_classes=10))
    _, abstract_params, _ = nnx.split(model, nnx.Param, ...)
    mask = weight_decay_mask(abstract_params)
    assert jax.tree.structure(mask) == jax.tree.structure(abstract_params)
    flags = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = sorted(k for k, m in flags.items() if m)
    # stem, 16 expansions, 17 projections, head, classifier
    assert len(decayed) == 1 + 16 + 17 + 1 + 1
    assert all("kernel" in k and "depthwise" not in k for k in decayed)
    assert not any(m for k, m in flags.items() if "depthwise" in k or "bn" in k or "bias" in k)

    @jax.jit
    def decay_updates():  # usable as an optax mask: only decayed leaves change
        params = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), abstract_params)
        opt = optax.add_decayed_weights(1.0, mask=mask)
        return opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)[0]

    changed = {jax.tree_util.keystr(p) for p, u in jax.tree_util.tree_leaves_with_path(decay_updates())
               if bool(jnp.any(u != 0))}
    assert changed == set(decayed)


# ---------------------------------------------------------------- fused BatchNorm + activation

@pytest.mark.parametrize("act", ["linear", "relu6", "relu"])
def test_fused_batch_norm_gradient_equals_autodiff(act):
    """The hand-written VJP of training-mode BatchNorm + activation equals autodiff of the textbook
    composite (biased batch variance) for the input, scale and bias; the running averages move by
    (1 - decay) towards the batch statistics."""
    from manifold_lab.models.activations import activation
    from manifold_lab.models.batchnorm import batch_norm_act
    kx, ks, kb, kw = jax.random.split(jax.random.key(7), 4)
    x = 3.0 * jax.random.normal(kx, (4, 5, 5, 8)) + 1.0
    scale, bias = jax.random.normal(ks, (8,)) + 1.0, jax.random.normal(kb, (8,))
    weights = jax.random.normal(kw, (4, 5, 5, 8))

    def fused(x, scale, bias):
        bn = nnx.BatchNorm(8, momentum=0.9, epsilon=1e-3, rngs=nnx.Rngs(0))
        bn.scale[...], bn.bias[...] = scale, bias
        return jnp.sum(batch_norm_act(bn, x, True, act) * weights), (bn.mean[...], bn.var[...])

    def reference(x, scale, bias):
        mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
        return jnp.sum(activation(act)((x - mean) / jnp.sqrt(var + 1e-3) * scale + bias) * weights)

    (value, (run_mean, run_var)), grads = jax.value_and_grad(fused, (0, 1, 2), has_aux=True)(x, scale, bias)
    ref_value, ref_grads = jax.value_and_grad(reference, (0, 1, 2))(x, scale, bias)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert float(jnp.max(jnp.abs(r))) > 1.0  # a real signal, not zeros
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(run_mean, 0.1 * x.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run_var, 0.9 + 0.1 * x.var((0, 1, 2)), rtol=1e-4)


def test_pointwise_matmul_equals_convolution():
    """ConvBN computes 1x1 stride-1 convolutions as a [pixels, channels] matmul; its output and both
    gradients (input and kernel) equal XLA's convolution."""
    from manifold_lab.models.layers import ConvBN
    layer = ConvBN(6, 10, kernel_size=1, rngs=nnx.Rngs(3))
    kx, kg = jax.random.split(jax.random.key(11))
    x, cot = jax.random.normal(kx, (3, 5, 7, 6)), jax.random.normal(kg, (3, 5, 7, 10))

    def matmul(x, kernel):
        inner = ConvBN(6, 10, kernel_size=1, rngs=nnx.Rngs(0))  # made inside the trace: settable
        inner.kernel[...] = kernel
        return inner.conv(x)

    def convolution(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    kernel = layer.kernel[...]
    results = [jax.vjp(f, x, kernel) for f in (matmul, convolution)]
    (y, vjp), (y_ref, vjp_ref) = results
    assert y.shape == (3, 5, 7, 10)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-5, rtol=1e-5)
    for g, r in zip(vjp(cot), vjp_ref(cot)):
        assert float(jnp.max(jnp.abs(r))) > 0.1
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_channels, stride, padding", [(3, 2, "same"), (3, 2, "symmetric"), (1, 1, "same"),
                                                         (1, 2, "same")])
def test_im2col_convolution_equals_xla(in_channels, stride, padding):
    """ConvBN computes convolutions with few input channels (the stem) as one matmul over the
    stacked windows; its output and both gradients equal XLA's convolution."""
    from manifold_lab.models.convolution import IM2COL_MAX_DEPTH
    from manifold_lab.models.layers import ConvBN
    assert 3 * 3 * in_channels <= IM2COL_MAX_DEPTH  # the im2col path is the one under test
    kx, kg = jax.random.split(jax.random.key(in_channels * 10 + stride))
    x = jax.random.normal(kx, (2, 9, 8, in_channels))
    out_h, out_w = output_size(9, 3, stride, padding), output_size(8, 3, stride, padding)
    cot = jax.random.normal(kg, (2, out_h, out_w, 6))

    def im2col(x, kernel):
        inner = ConvBN(in_channels, 6, kernel_size=3, stride=stride, padding=padding, backend=backend_for("xla"),
                       rngs=nnx.Rngs(0))
        inner.kernel[...] = kernel
        return inner.conv(x)

    def convolution(x, kernel):
        pads = [pad_amounts(n, 3, stride, padding) for n in (9, 8)]
        return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pads,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    kernel = jax.random.normal(jax.random.key(5), (3, 3, in_channels, 6))
    (y, vjp), (y_ref, vjp_ref) = [jax.vjp(f, x, kernel) for f in (im2col, convolution)]
    assert y.shape == (2, out_h, out_w, 6)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-5, rtol=1e-5)
    for g, r in zip(vjp(cot), vjp_ref(cot)):
        assert float(jnp.max(jnp.abs(r))) > 0.1
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- depthwise forms

@pytest.mark.parametrize("size, stride, padding", list(itertools.product((7, 8), (1, 2), ("same", "symmetric"))))
def test_depthwise_forms_equal_xla(size, stride, padding):
    kx, kk, kg = jax.random.split(jax.random.key(size * 10 + stride), 3)
    x = jax.random.normal(kx, (2, size, size, 5))
    kernel = jax.random.normal(kk, (3, 3, 1, 5))
    out = output_size(size, 3, stride, padding)
    cot = jax.random.normal(kg, (2, out, out, 5))
    results = {}
    for impl in DEPTHWISE_FORMS:
        @jax.jit
        def value_and_vjp(x, k, cot):
            y, vjp = jax.vjp(lambda x, k: depthwise_conv(x, k, stride=stride, padding=padding, impl=impl), x, k)
            return (y, *vjp(cot))
        results[impl] = value_and_vjp(x, kernel, cot)
    for impl in ("shift", "native"):
        assert results[impl][0].shape == (2, out, out, 5)
        for a, b in zip(results["xla"], results[impl]):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)


def test_padding_geometry():
    assert pad_amounts(8, 3, 2, "same") == (0, 1)  # TF 'SAME' on even sizes
    assert pad_amounts(7, 3, 2, "same") == (1, 1)
    assert pad_amounts(8, 3, 1, "same") == (1, 1)
    assert pad_amounts(8, 3, 2, "symmetric") == (1, 1)
    assert pad_amounts(8, 5, 3, "same") == (1, 2)  # general formula: out 3, total (3-1)*3+5-8 = 3
    assert [output_size(n, 3, 2, "same") for n in (7, 8, 224)] == [4, 4, 112]
    assert resolve_impl("auto") == "native"  # the tests run on CPU, with a C++ compiler
    assert resolve_impl("xla") == "xla"


# ---------------------------------------------------------------- switches on real numbers (32 px, width 0.35)

#: A shortened stage table (same block code) keeps compilation fast for the switch grid: a t = 1
#: block, stride-1 and stride-2 stages, 4 bottleneck and 4 expansion shortcuts at width 0.35.
SHORT_STAGES = (BottleneckStage(1, 16, 1, 1), BottleneckStage(6, 24, 2, 2), BottleneckStage(6, 32, 3, 2),
                BottleneckStage(6, 64, 1, 2))
SMALL = dict(width=0.35, layout="small", num_classes=10, in_channels=3, stages=SHORT_STAGES)


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def reference_state():
    """Weights shared by every switch variant (they all have the same variables)."""
    return nnx.state(build_model(model_config("mobilenet_v2", **SMALL), rngs=nnx.Rngs(0)))


def with_state(cfg, state) -> nnx.Module:
    """The model of ``cfg`` carrying ``state`` (built abstractly: no initialisation work)."""
    model = abstract(cfg)
    nnx.update(model, state)
    return model


def eval_acts(reference_state, images, **switches) -> dict:
    graphdef, state = nnx.split(with_state(model_config("mobilenet_v2", **SMALL, **switches), reference_state))
    run = jax.jit(lambda s, x: nnx.merge(graphdef, s, copy=True)(x, train=False, capture=True)[1])
    return {k: np.asarray(v) for k, v in run(state, images).items()}


@pytest.fixture(scope="module")
def variants(reference_state, images):
    return {
        (act, res): eval_acts(reference_state, images, bottleneck_activation=act, residual=res)
        for act, res in [("linear", "bottleneck"), ("linear", "none"), ("linear", "expansion"),
                         ("relu6", "none"), ("relu6", "bottleneck")]
    }


def test_short_table_exercises_both_shortcuts():
    cfg = model_config("mobilenet_v2", **SMALL)
    assert [b.index for b in cfg.blocks() if b.bottleneck_shortcut] == [1, 2, 4, 5]
    assert cfg.expansion_shortcuts() == (2, 3, 5, 6)


def test_residual_definitions(variants):
    cfg = model_config("mobilenet_v2", **SMALL)
    plain, bottleneck, expansion = (variants[("linear", r)] for r in ("none", "bottleneck", "expansion"))
    first = next(b.index for b in cfg.blocks() if b.bottleneck_shortcut)
    # up to the first shortcut the three networks coincide, there x_{j+1} = p_j + x_j
    np.testing.assert_allclose(bottleneck[f"block{first:02d}/projection"],
                               plain[f"block{first:02d}/projection"] + plain[f"block{first - 1:02d}/projection"],
                               rtol=1e-5, atol=1e-5)
    j = cfg.expansion_shortcuts()[0]
    np.testing.assert_allclose(expansion[f"block{j:02d}/expansion"],
                               plain[f"block{j:02d}/expansion"] + plain[f"block{j - 1:02d}/expansion"],
                               rtol=1e-5, atol=1e-5)
    # under 'expansion', every joined tensor is its block's ReLU6 output plus the previous stream
    for i in cfg.expansion_shortcuts():
        delta = expansion[f"block{i:02d}/expansion"] - expansion[f"block{i - 1:02d}/expansion"]
        assert delta.min() >= -1e-5 and delta.max() <= 6 + 1e-5
    for a, b in itertools.combinations((plain, bottleneck, expansion), 2):
        assert np.abs(a["logits"] - b["logits"]).max() > 1e-4


def test_bottleneck_activation(variants):
    cfg = model_config("mobilenet_v2", **SMALL)
    linear, relu6 = variants[("linear", "none")], variants[("relu6", "none")]
    projections = [f"block{b.index:02d}/projection" for b in cfg.blocks()]
    # without shortcuts the projection output is the activation's output
    assert all(relu6[p].min() >= 0 and relu6[p].max() <= 6 for p in projections)
    assert all(linear[p].min() < 0 for p in projections)
    # with shortcuts ReLU6 applies before the add: output minus block input lies in [0, 6]
    res6 = variants[("relu6", "bottleneck")]
    for b in cfg.blocks():
        if b.bottleneck_shortcut:
            delta = res6[f"block{b.index:02d}/projection"] - res6[f"block{b.index - 1:02d}/projection"]
            assert delta.min() >= -1e-5 and delta.max() <= 6 + 1e-5
    assert np.abs(linear["logits"] - relu6["logits"]).max() > 1e-4
    assert np.abs(variants[("linear", "bottleneck")]["logits"] - res6["logits"]).max() > 1e-4


def train_loss_fn(graphdef, images, labels):
    """Cross-entropy of a train-mode forward; returns (loss, updated BatchNorm statistics)."""
    def loss(params, rest, key):
        model = nnx.merge(graphdef, params, rest, copy=True)
        logits = model(images, train=True, dropout_key=key)
        return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(),
                nnx.state(model, nnx.BatchStat))
    return loss


def assert_finite_gradient(model, images) -> None:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grad = jax.jit(jax.value_and_grad(train_loss_fn(graphdef, images, jnp.array([1, 7])), has_aux=True))
    (value, _), grads = grad(params, rest, jax.random.key(0))
    assert np.isfinite(float(value))
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert all(float(jnp.abs(g).sum()) > 0 for g in leaves)


# every (activation, residual) pair; the depthwise form and padding cycle through their 6 pairs
SWITCH_GRID = [
    (act, res, impl, pad)
    for (act, res), (impl, pad) in zip(
        itertools.product(("linear", "relu6", "relu"), ("bottleneck", "expansion", "none")),
        itertools.cycle(itertools.product(("native", "shift", "xla"), ("same", "symmetric"))))
]


@pytest.mark.parametrize("act, res, impl, pad", SWITCH_GRID)
def test_forward_and_gradient_finite(act, res, impl, pad, images, reference_state):
    cfg = model_config("mobilenet_v2", **SMALL, bottleneck_activation=act, residual=res,
                       depthwise_impl=impl, padding=pad)
    assert_finite_gradient(with_state(cfg, reference_state), images)


def test_train_and_eval_modes(images, reference_state):
    """BatchNorm statistics move in train mode only, by (1 - decay) towards the batch statistics;
    parameters do not; eval is deterministic; train mode needs a dropout key."""
    cfg = model_config("mobilenet_v2", **SMALL)
    model = with_state(cfg, reference_state)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = train_loss_fn(graphdef, images, jnp.array([1, 7]))
    (value, train_rest), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, rest, jax.random.key(0))
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))

    def changed(a, b):
        return [bool(jnp.any(x != y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]

    stats = nnx.state(model, nnx.BatchStat)
    assert len(jax.tree.leaves(stats)) == 2 * (2 + 3 * 7 - 1) and all(changed(stats, train_rest))
    batch_mean = np.asarray(model.stem.conv(images)).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(train_rest["stem"]["bn"]["mean"][...]),
                               (1 - cfg.bn_decay) * batch_mean, rtol=1e-4, atol=1e-7)

    @jax.jit
    def evaluate(params, rest):
        m = nnx.merge(graphdef, params, rest, copy=True)
        return m(images, train=False), nnx.state(m, nnx.BatchStat)

    logits, eval_stats = evaluate(params, rest)
    assert not any(changed(stats, eval_stats))
    np.testing.assert_array_equal(np.asarray(evaluate(params, rest)[0]), np.asarray(logits))
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    with pytest.raises(ValueError, match="dropout_key"):
        model(images, train=True)
