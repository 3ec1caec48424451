"""The native kernels (C++ through XLA's FFI). Depthwise: equal to XLA's grouped convolution on the
shapes that reach each of its code paths, under vmap and jit, deterministic, replaced by the shift
form where it cannot be built, and equal to the layers it fuses, in inference and in training.
BatchNorm's training reductions: equal to the pure-JAX ones, forward and backward. The stem's
convolution and its weight gradient: equal to the im2col matmul."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from manifold_lab import native
from manifold_lab.models import (backend_for, build_model, depthwise_conv, model_config, output_size, pad_amounts,
                                 resolve_impl)
from manifold_lab.models.activations import activation
from manifold_lab.models.batchnorm import _bn_act_train
from manifold_lab.models.convolution import im2col_conv
from manifold_lab.native.ops import bn_act_depthwise_train, fused_inference_depthwise, native_conv


def value_and_grads(impl: str, x, kernel, cot, stride: int, padding: str):
    @jax.jit
    def run(x, kernel, cot):
        y, vjp = jax.vjp(lambda x, k: depthwise_conv(x, k, stride=stride, padding=padding, impl=impl),
                         x, kernel)
        return (y, *vjp(cot))
    return run(x, kernel, cot)


def draw(size: tuple[int, int], channels: int, stride: int, padding: str, batch: int = 2, seed: int = 0):
    kx, kk, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (batch, *size, channels))
    kernel = jax.random.normal(kk, (3, 3, 1, channels))
    out = tuple(output_size(n, 3, stride, padding) for n in size)
    return x, kernel, jax.random.normal(kg, (batch, *out, channels))


# channel counts reach the 32-channel blocks, one 16-channel block and the scalar tail; sizes reach
# the 4-pixel interior path (16 wide), rows shorter than a pixel block (3) and odd sizes
@pytest.mark.parametrize("size, channels, stride, padding", [
    ((16, 16), 48, 1, "same"), ((16, 16), 48, 2, "same"), ((15, 17), 37, 2, "same"),
    ((15, 17), 37, 1, "symmetric"), ((16, 12), 21, 2, "symmetric"), ((3, 3), 5, 1, "same"),
    ((3, 5), 70, 2, "same"), ((1, 1), 16, 1, "same"),
])
def test_native_equals_xla(size, channels, stride, padding):
    x, kernel, cot = draw(size, channels, stride, padding)
    got = value_and_grads("native", x, kernel, cot, stride, padding)
    want = value_and_grads("xla", x, kernel, cot, stride, padding)
    assert got[0].shape == want[0].shape and got[2].shape == kernel.shape
    for g, w in zip(got, want):
        assert float(jnp.max(jnp.abs(w))) > 0.1
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=1e-5)


def test_native_is_deterministic():
    """The tap gradient sums fixed row chunks in a fixed order, whatever the threads do."""
    x, kernel, cot = draw((32, 32), 64, 1, "same", batch=4, seed=3)
    first = value_and_grads("native", x, kernel, cot, 1, "same")
    for _ in range(3):
        again = value_and_grads("native", x, kernel, cot, 1, "same")
        for a, b in zip(first, again):
            assert bool(jnp.all(a == b))


def test_native_under_vmap():
    """vmap over a leading axis of both the input and the kernel (multi-seed training) equals
    the kernel run once per element."""
    xs, kernels, cots = zip(*(draw((9, 9), 20, 2, "same", seed=s) for s in range(3)))
    x, kernel, cot = jnp.stack(xs), jnp.stack(kernels), jnp.stack(cots)

    def one(x, kernel, cot):
        y, vjp = jax.vjp(lambda x, k: depthwise_conv(x, k, stride=2, impl="native"), x, kernel)
        return (y, *vjp(cot))

    mapped = jax.jit(jax.vmap(one))(x, kernel, cot)
    for i in range(3):
        single = jax.jit(one)(x[i], kernel[i], cot[i])
        for m, s in zip(mapped, single):
            np.testing.assert_allclose(np.asarray(m[i]), np.asarray(s), atol=1e-6, rtol=1e-6)


def test_native_takes_float32_only():
    """bfloat16 activations go through the shift form (same result as xla in bfloat16 rounding)."""
    x, kernel, cot = draw((8, 8), 16, 1, "same")
    x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    y = jax.jit(lambda x, k: depthwise_conv(x, k, impl="native"))(x, kernel)
    ref = jax.jit(lambda x, k: depthwise_conv(x, k, impl="xla"))(x, kernel)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), atol=0.1, rtol=0.05)


def test_no_compiler_falls_back_to_shift(monkeypatch):
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_reasons", {})
    monkeypatch.setattr(native, "compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert resolve_impl("auto") == "shift"
    with pytest.raises(ValueError, match="unavailable: no C\\+\\+ compiler"):
        resolve_impl("native")


def test_fresh_cache_builds_and_switch_turns_off(tmp_path):
    """A new cache folder gets the library built into it; MANIFOLD_LAB_NATIVE=0 keeps the shift form."""
    script = ("from manifold_lab.models import resolve_impl; import manifold_lab.native as n; "
              "print(resolve_impl('auto'), n.reason('depthwise'))")
    env = {**os.environ, native.ENV_CACHE: str(tmp_path), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["native", "None"]
    built = list(tmp_path.glob("depthwise-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob(".*.tmp"))
    env[native.ENV_SWITCH] = "0"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "shift" and "MANIFOLD_LAB_NATIVE=0" in out.stdout


def random_batch_norm(channels: int, seed: int) -> nnx.BatchNorm:
    """A BatchNorm with non-trivial parameters and running statistics."""
    bn = nnx.BatchNorm(channels, rngs=nnx.Rngs(0))
    ks = jax.random.split(jax.random.key(seed), 4)
    bn.scale[...] = 1.0 + 0.5 * jax.random.normal(ks[0], (channels,))
    bn.bias[...] = jax.random.normal(ks[1], (channels,))
    bn.mean[...] = jax.random.normal(ks[2], (channels,))
    bn.var[...] = jax.random.uniform(ks[3], (channels,), minval=0.2, maxval=2.0)
    return bn


@pytest.mark.parametrize("size, channels, stride, padding, in_act, out_act", [
    ((16, 16), 48, 1, "same", "relu6", "relu6"), ((15, 17), 37, 2, "same", "relu6", "relu6"),
    ((9, 8), 21, 2, "symmetric", "relu", "linear"), ((3, 3), 5, 1, "same", None, "relu6"),
    ((16, 16), 32, 2, "same", None, "relu"),
])
def test_fused_inference_equals_composition(size, channels, stride, padding, in_act, out_act):
    """Inference with BatchNorm (running statistics) and activations folded into the kernel equals
    the layers one after another, padding included (zeros after the input activation)."""
    x, kernel, _ = draw(size, channels, stride, padding, seed=7)
    x = 3.0 * x  # reach both ReLU6 bounds
    in_bn, out_bn = random_batch_norm(channels, 1), random_batch_norm(channels, 2)
    inner = x if in_act is None else activation(in_act)(in_bn(x, use_running_average=True))
    want = activation(out_act)(out_bn(depthwise_conv(inner, kernel, stride=stride, padding=padding, impl="xla"),
                                      use_running_average=True))
    got = fused_inference_depthwise(x, kernel, stride=stride, padding=padding, out_bn=out_bn, out_act=out_act,
                                    in_bn=None if in_act is None else in_bn, in_act=in_act or "linear")
    assert float(jnp.max(jnp.abs(want))) > 1.0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("residual", ["bottleneck", "expansion", "none"])
def test_model_inference_native_equals_shift(residual):
    """Whole-network inference through the fused kernels (expansion BatchNorm + ReLU6 folded into
    the depthwise call where nothing else reads the expanded tensor) equals the shift form."""
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    logits = {}
    for impl in ("native", "shift"):
        cfg = model_config("mobilenet_v2", width=0.35, layout="small", num_classes=10, in_channels=3,
                           depthwise_impl=impl, residual=residual)
        model = build_model(cfg, rngs=nnx.Rngs(0))
        model(x, train=True, dropout_key=jax.random.key(2))  # non-trivial running statistics
        logits[impl] = jax.jit(lambda x, m=model: m(x, train=False))(x)
        _, captured = model(x, train=False, capture=True)  # every intermediate, folded ones computed aside
        assert all(value is not None for value in captured.values())
    assert float(jnp.max(jnp.abs(logits["shift"]))) > 0.01
    np.testing.assert_allclose(np.asarray(logits["native"]), np.asarray(logits["shift"]), atol=1e-5, rtol=1e-4)


def test_mobilenet_v1_inference_native_equals_shift():
    """MobileNetV1's depthwise layers take the fused kernel for their own BatchNorm and ReLU6."""
    x = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
    logits = {}
    for impl in ("native", "shift"):
        cfg = model_config("mobilenet_v1", width=0.25, num_classes=10, in_channels=3, depthwise_impl=impl)
        model = build_model(cfg, rngs=nnx.Rngs(0))
        model(x, train=True, dropout_key=jax.random.key(2))
        logits[impl] = jax.jit(lambda x, m=model: m(x, train=False))(x)
    scale = float(jnp.max(jnp.abs(logits["shift"])))  # small: the classifier starts at std 0.01
    assert scale > 1e-4
    np.testing.assert_allclose(np.asarray(logits["native"]), np.asarray(logits["shift"]), atol=3e-3 * scale,
                               rtol=1e-4)


@pytest.mark.parametrize("shape, act", [
    ((4, 9, 9, 37), "relu6"), ((2, 8, 8, 96), "relu"), ((3, 5), "linear"), ((2, 3, 3, 1280), "relu6"),
])
def test_native_batch_norm_equals_jax(shape, act):
    """Training BatchNorm + activation with the native channel reductions: the same output, batch
    statistics and gradients as the pure-JAX reductions, bit-identical on a second run."""
    assert backend_for("native").native_for(jnp.zeros(shape))
    kx, ks, kb, kg = jax.random.split(jax.random.key(5), 4)
    x = 2.0 * jax.random.normal(kx, shape) + 0.5  # a non-zero mean; ReLU6 reaches both bounds
    scale, bias = 1.0 + jax.random.normal(ks, shape[-1:]), jax.random.normal(kb, shape[-1:])
    cot = (jax.random.normal(kg, shape), jnp.zeros(shape[-1]), jnp.zeros(shape[-1]))

    def run(x, scale, bias, use_native):
        out, vjp = jax.vjp(lambda x, s, b: _bn_act_train(x, s, b, 1e-3, act, use_native), x, scale, bias)
        return out, vjp(cot)

    run = jax.jit(run, static_argnums=3)
    got, want = run(x, scale, bias, True), run(x, scale, bias, False)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert float(jnp.max(jnp.abs(w))) > 0.1
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=3e-5, rtol=1e-4)
    for g, again in zip(jax.tree.leaves(got), jax.tree.leaves(run(x, scale, bias, True))):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(again))


@pytest.mark.parametrize("size, channels, stride, padding, act", [
    ((16, 16), 48, 1, "same", "relu6"), ((15, 17), 37, 2, "same", "relu6"),
    ((9, 8), 21, 2, "symmetric", "relu"), ((3, 3), 5, 1, "same", "linear"), ((12, 12), 32, 1, "symmetric", "relu6"),
])
def test_fused_training_equals_composition(size, channels, stride, padding, act):
    """Training with the previous BatchNorm (batch statistics) and activation folded into the
    depthwise kernels: the same output, statistics and gradients (input, taps, scale, bias) as
    BatchNorm, activation and XLA's depthwise convolution one after another."""
    assert resolve_impl("native") == "native"  # built and registered
    x, kernel, cot = draw(size, channels, stride, padding, batch=3, seed=9)
    x = 3.0 * x + 1.0
    ks, kb = jax.random.split(jax.random.key(10))
    scale, bias = 1.0 + 0.5 * jax.random.normal(ks, (channels,)), jax.random.normal(kb, (channels,))
    pads = tuple(pad_amounts(n, 3, stride, padding) for n in size)
    zeros = jnp.zeros(channels)

    def fused(x, k, s, b):
        return bn_act_depthwise_train(x, k[:, :, 0, :], s, b, 1e-3, act, stride, pads)

    def composed(x, k, s, b):
        y, mean, var = _bn_act_train(x, s, b, 1e-3, act, False)
        return depthwise_conv(y, k, stride=stride, padding=padding, impl="xla"), mean, var

    results = []
    for f in (fused, composed):
        out, vjp = jax.jit(lambda *a, f=f: jax.vjp(f, *a))(x, kernel, scale, bias)
        results.append((out, vjp((cot, zeros, zeros))))
    for g, w in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        assert g.shape == w.shape and float(jnp.max(jnp.abs(w))) > 0.05
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("residual", ["bottleneck", "expansion", "none"])
def test_model_training_native_equals_shift(residual):
    """A training step of the whole network through the fused kernels (stem and expansion
    BatchNorm + ReLU6 inside the depthwise calls, native reductions) against the shift form: the
    same loss and running statistics, and gradients that agree leaf by leaf (cosine > 0.999; the
    small network at batch 8 is ill-conditioned enough that float32 rounding alone moves some
    BatchNorm-bias gradients by a few per cent)."""
    x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    labels = jnp.arange(8) % 10
    results = {}
    for impl in ("native", "shift"):
        cfg = model_config("mobilenet_v2", width=0.35, layout="small", num_classes=10, in_channels=3,
                           depthwise_impl=impl, residual=residual)
        graphdef, params, rest = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)

        def loss(params):
            model = nnx.merge(graphdef, params, rest, copy=True)
            logits = model(x, train=True, dropout_key=jax.random.key(2))
            value = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels])
            return value, nnx.state(model, nnx.BatchStat)

        results[impl] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    (loss_n, stats_n), grads_n = results["native"]
    (loss_s, stats_s), grads_s = results["shift"]
    np.testing.assert_allclose(float(loss_n), float(loss_s), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(stats_n), jax.tree.leaves(stats_s)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
    largest = max(float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads_s))
    for a, b in zip(jax.tree.leaves(grads_n), jax.tree.leaves(grads_s)):
        norm = float(jnp.linalg.norm(b))
        if norm > 1e-3 * largest:
            assert float(jnp.vdot(a.ravel(), b.ravel())) / (float(jnp.linalg.norm(a)) * norm) > 0.999


# the stem's geometry; odd sizes and symmetric padding (edge columns), output channels with a
# 16-channel block and a scalar tail, fewer input channels, stride 1
@pytest.mark.parametrize("size, c_in, c_out, stride, padding", [
    ((32, 32), 3, 32, 2, "same"), ((17, 15), 3, 37, 2, "symmetric"), ((9, 9), 2, 16, 1, "same"),
    ((8, 8), 3, 8, 2, "same"), ((5, 3), 3, 48, 1, "symmetric"),
])
def test_native_conv_equals_im2col(size, c_in, c_out, stride, padding):
    """The native small-input-channel convolution: the same output and gradients (the kernel's by
    the native weight-gradient kernel: its register path for 3 input channels, its general path
    for 2, both with edge columns and a channel tail) as the im2col matmul."""
    kx, kk, kg = jax.random.split(jax.random.key(11), 3)
    x = jax.random.normal(kx, (2, *size, c_in))
    kernel = jax.random.normal(kk, (3, 3, c_in, c_out))
    assert backend_for("native").native_for(x)
    pads = tuple(pad_amounts(n, 3, stride, padding) for n in size)
    out_size = tuple(output_size(n, 3, stride, padding) for n in size)
    cot = jax.random.normal(kg, (2, *out_size, c_out))
    results = []
    for conv in (native_conv, im2col_conv):
        y, vjp = jax.jit(lambda x, k, conv=conv: jax.vjp(lambda x, k: conv(x, k, stride, pads), x, k))(x, kernel)
        results.append((y, *vjp(cot)))
    assert results[0][0].shape == (2, *out_size, c_out)
    for got, want in zip(results[0], results[1]):
        assert float(jnp.max(jnp.abs(want))) > 0.1
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=3e-5, rtol=1e-5)
