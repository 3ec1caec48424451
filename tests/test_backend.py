"""The kernel backend: one rule resolves ``depthwise_impl``; capturing intermediates runs the same
arithmetic as the plain forward pass (logits and running averages bit for bit, every backend
that runs here); the one activation table agrees with its functions; the backend is static
(no state, checkpoint paths unchanged); and the analytic cost model imports without JAX."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from manifold_lab import native
from manifold_lab.models import KernelBackend, backend_for, build_model, model_config
from manifold_lab.models.activations import ACTIVATIONS
from manifold_lab.models.config import BottleneckStage

#: every backend that can run here (the native one where its libraries build)
BACKENDS = ("xla", "shift") + (("native",) if native.available() else ())
#: a t = 1 block (the stem folds into its depthwise), stride-1 blocks with shortcuts of every
#: placement, and stride-2 blocks (the expansion folds into the depthwise)
STAGES = (BottleneckStage(1, 16, 1, 1), BottleneckStage(6, 24, 2, 2), BottleneckStage(6, 32, 2, 2))
SMALL = dict(width=0.35, layout="small", num_classes=10, in_channels=3, stages=STAGES, last_channels=64)


# ---------------------------------------------------------------- resolving depthwise_impl


def test_backend_for_resolves_each_choice_once():
    assert backend_for("auto", "gpu") == KernelBackend("xla")
    assert backend_for("auto", "cpu").kind == ("native" if native.available() else "shift")
    for kind in ("xla", "shift"):
        assert backend_for(kind, "cpu") == backend_for(kind, "tpu") == KernelBackend(kind)
    with pytest.raises(ValueError, match="CPU backend only"):
        backend_for("native", "gpu")
    with pytest.raises(ValueError, match="depthwise_impl must be"):
        backend_for("grouped")
    with pytest.raises(ValueError, match="backend kind"):
        KernelBackend("auto")


def test_native_for_needs_the_native_kind_and_float32():
    x = jnp.zeros((1, 2, 2, 3))
    assert not KernelBackend("xla").native_for(x) and not KernelBackend("shift").native_for(x)
    assert KernelBackend("native").native_for(x)
    assert not KernelBackend("native").native_for(x.astype(jnp.bfloat16))


def test_activation_table_is_the_clamp_of_its_bounds():
    x = jnp.linspace(-10.0, 10.0, 81)
    for act in ACTIVATIONS.values():
        np.testing.assert_array_equal(np.asarray(act.fn(x)), np.asarray(jnp.clip(x, act.lo, act.hi)), act.name)
        grad = jax.vmap(jax.grad(act.fn))(x)
        inside = np.ones(x.shape, bool) if act.gradient_interval is None else (x > act.lo) & (x < act.hi)
        np.testing.assert_array_equal(np.asarray(grad), inside.astype(np.float32), act.name)


def test_backend_is_static_and_checkpoint_paths_unchanged():
    """The backend is part of the graph definition, not of the state: the state holds exactly the
    layers' parameters and BatchNorm statistics, under the same names whatever the backend."""
    paths = {}
    for impl in ("xla", "auto"):
        cfg = model_config("mobilenet_v2", **SMALL, depthwise_impl=impl)
        model = nnx.eval_shape(lambda cfg=cfg: build_model(cfg, rngs=nnx.Rngs(0)))
        paths[impl] = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(model))]
        assert model.backend == backend_for(impl)
    assert paths["xla"] == paths["auto"]
    names = {p.replace(".value", "") for p in paths["xla"]}
    bn = ("bias", "mean", "scale", "var")
    expected = {f"['{layer}']['bn']['{v}']" for layer in ("stem", "head") for v in bn}
    expected |= {f"['{layer}']['kernel']" for layer in ("stem", "head")}
    expected |= {"['classifier']['dense']['kernel']", "['classifier']['dense']['bias']"}
    for spec in model_config("mobilenet_v2", **SMALL).blocks():
        layers = ("expansion", "depthwise", "projection") if spec.has_expansion else ("depthwise", "projection")
        for layer in layers:
            prefix = f"['blocks'][{spec.index}]['{layer}']"
            expected |= {f"{prefix}['kernel']", *(f"{prefix}['bn']['{v}']" for v in bn)}
    assert names == expected


# ---------------------------------------------------------------- capture runs the same arithmetic


def _forward(graphdef, state, images, train: bool, capture: bool):
    model = nnx.merge(graphdef, state, copy=True)
    out = model(images, train=train, dropout_key=jax.random.key(3), capture=capture)
    logits = out[0] if capture else out
    return logits, nnx.state(model, nnx.BatchStat)


@pytest.mark.parametrize("residual", ["bottleneck", "expansion", "none"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_capture_runs_the_plain_forward(impl, residual):
    """``capture=True`` returns the logits of the plain forward pass bit for bit, in inference and
    in training (where the running averages also move identically), for every backend; the
    recorded tensors the native backend folds away are there too. (Fused blocks, which capture
    does not use, are compared in tests/test_fused_block.py.)"""
    cfg = model_config("mobilenet_v2", **SMALL, residual=residual, depthwise_impl=impl, block_impl="plain")
    model = build_model(cfg, rngs=nnx.Rngs(0))
    images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1.0, maxval=1.0)
    model(images, train=True, dropout_key=jax.random.key(2))  # non-trivial running statistics
    graphdef, state = nnx.split(model)
    run = jax.jit(_forward, static_argnums=(0, 3, 4))
    for train in (False, True):
        plain_logits, plain_stats = run(graphdef, state, images, train, False)
        captured_logits, captured_stats = run(graphdef, state, images, train, True)
        assert float(jnp.max(jnp.abs(plain_logits))) > 1e-3
        np.testing.assert_array_equal(np.asarray(captured_logits), np.asarray(plain_logits), f"train={train}")
        for a, b in zip(jax.tree.leaves(captured_stats), jax.tree.leaves(plain_stats)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, acts = nnx.merge(graphdef, state, copy=True)(images, capture=True)
    assert all(v is not None and v.shape[0] == 2 for v in acts.values())
    assert np.array_equal(np.asarray(acts["stem"]), np.asarray(acts["block00/expansion"]))


@pytest.mark.skipif("native" not in BACKENDS, reason="native kernels unavailable")
@pytest.mark.parametrize("train", [False, True])
def test_folded_intermediates_are_recorded_as_the_kernel_reads_them(train):
    """Where the native backend folds the stem's and the expansions' BatchNorm + ReLU6 into the
    depthwise kernels, the recorded tensors equal those of the unfolded ``shift`` network (same
    weights) up to float32 rounding, and stay within ReLU6's range."""
    images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1.0, maxval=1.0)
    acts = {}
    for impl in ("native", "shift"):
        model = build_model(model_config("mobilenet_v2", **SMALL, depthwise_impl=impl), rngs=nnx.Rngs(0))
        model(images, train=True, dropout_key=jax.random.key(2))
        acts[impl] = model(images, train=train, dropout_key=jax.random.key(3), capture=True)[1]
    for name in ("stem", "block00/expansion", "block01/expansion", "block03/expansion"):
        got, want = np.asarray(acts["native"][name]), np.asarray(acts["shift"][name])
        assert got.min() >= 0.0 and got.max() <= 6.0 and want.max() > 0.5, name
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=name)


# ---------------------------------------------------------------- the cost model needs no JAX


@pytest.mark.parametrize("module", ["manifold_lab.costs", "manifold_lab.costs.analytic", "manifold_lab.models.config"])
def test_imports_without_jax(module):
    """``sys.modules['jax'] = None`` makes every ``import jax`` fail: the module must not need it."""
    script = f"import sys; sys.modules['jax'] = None; import {module}"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_costs_count_without_jax():
    script = ("import sys; sys.modules['jax'] = None\n"
              "from manifold_lab.costs.analytic import model_costs\n"
              "from manifold_lab.models.config import MobileNetV2Config\n"
              "print(model_costs(MobileNetV2Config(), 224).madds, 'jax' in sys.modules and sys.modules['jax'])")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["300774272", "None"]
