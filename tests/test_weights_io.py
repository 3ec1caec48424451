"""Weights in and out of our networks: Keras ``.weights.h5`` export, safetensors files, and
torchvision ``mobilenet_v2`` state dicts (checked against a NumPy forward pass with torchvision's
semantics, and against torchvision itself where torch is installed)."""

from __future__ import annotations

import dataclasses
import math
import os

import h5py
import jax
import numpy as np
import pytest
from flax import nnx

from manifold_lab.models import MobileNetV1Config, MobileNetV2, MobileNetV2Config, build_model
from manifold_lab.models.keras_export import export_keras_weights
from manifold_lab.models.keras_import import load_keras_weights
from manifold_lab.models.torch_import import load_torchvision_state_dict

os.environ.setdefault("KERAS_BACKEND", "jax")

NUM_CLASSES = 10
TORCH_CONFIG = MobileNetV2Config(width=0.35, num_classes=NUM_CLASSES, padding="symmetric", bn_epsilon=1e-5)


def _randomised(config, seed: int = 0) -> nnx.Module:
    """A network of ``config`` with random BatchNorm scales, offsets and statistics (so that
    eval-mode BatchNorm is not the identity) and a random classifier bias."""
    model = build_model(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 1)
    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        if path[-2:] in {("bn", "scale"), ("bn", "var")}:
            var.set_value(jax.numpy.asarray(rng.uniform(0.5, 1.5, value.shape), value.dtype))
        elif path[-2:] in {("bn", "bias"), ("bn", "mean"), ("dense", "bias")}:
            var.set_value(jax.numpy.asarray(rng.normal(0.0, 0.2, value.shape), value.dtype))
    nnx.update(model, state)
    return model


def _leaves(model: nnx.Module) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model))]


def _logits(model: nnx.Module, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(x, train=False))


# ---------------------------------------------------------------------------------------- Keras


def test_keras_export_round_trip(tmp_path):
    model = _randomised(MobileNetV2Config(width=0.35, num_classes=NUM_CLASSES))
    path = export_keras_weights(model, tmp_path / "m.weights.h5")
    with h5py.File(path) as f:  # Keras 3's layout, layer names as attributes
        assert f["layers/depthwise_conv2d_1/vars"].attrs["name"] == "block_1_depthwise"
        assert f["layers/depthwise_conv2d_1/vars/0"].shape == (3, 3, 48, 1)
        assert f["layers/dense/vars/0"].shape == (1280, NUM_CLASSES)
    back = load_keras_weights(path)  # config inferred from the file
    assert back.config == model.config
    for a, b in zip(_leaves(model), _leaves(back), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config, match", [
    (MobileNetV2Config(padding="symmetric"), "padding"),
    (MobileNetV2Config(bn_epsilon=1e-5), "bn_epsilon"),
    (MobileNetV2Config(layout="small"), "layout"),
    (MobileNetV2Config(residual="expansion"), "residual"),
    (MobileNetV2Config(width=0.14), "rounds the stage widths"),
    (MobileNetV1Config(), "only MobileNetV2"),
])
def test_keras_export_refuses_what_keras_cannot_express(tmp_path, config, match):
    model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=match):
        export_keras_weights(model, tmp_path / "m.weights.h5")


def test_keras_export_needs_the_keras_suffix(tmp_path):
    model = nnx.eval_shape(lambda: MobileNetV2(MobileNetV2Config(), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"\.weights\.h5"):
        export_keras_weights(model, tmp_path / "m.h5")


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_keras_loads_the_export(tmp_path):
    keras = pytest.importorskip("keras")
    width, size = 0.35, 72  # 72 px: odd inputs (9 and 5 px) to the later stride-2 layers
    model = _randomised(MobileNetV2Config(width=width, num_classes=NUM_CLASSES))
    path = export_keras_weights(model, tmp_path / "m.weights.h5")
    theirs = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=width, weights=None,
                                            classes=NUM_CLASSES, classifier_activation=None)
    theirs.load_weights(path)
    x = np.random.default_rng(2).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    expected = _logits(model, x)
    assert np.std(expected) > 0.05
    np.testing.assert_allclose(np.asarray(theirs.predict(x, verbose=0)), expected, atol=1e-4, rtol=0)
    theirs.save_weights(tmp_path / "k.weights.h5")  # and back through Keras' own writer
    for a, b in zip(_leaves(model), _leaves(load_keras_weights(tmp_path / "k.weights.h5")), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------- safetensors


@pytest.mark.parametrize("config", [
    MobileNetV2Config(width=0.35, num_classes=NUM_CLASSES, residual="expansion_preact", layout="small"),
    MobileNetV1Config(width=0.25, num_classes=NUM_CLASSES, in_channels=1),
], ids=["mobilenet_v2", "mobilenet_v1"])
def test_safetensors_round_trip_is_exact(tmp_path, config):
    pytest.importorskip("safetensors")
    from safetensors.numpy import load_file

    from manifold_lab.models.safetensors_io import load_safetensors, save_safetensors

    model = _randomised(config)
    path = save_safetensors(model, tmp_path / "m.safetensors")
    names = set(load_file(str(path)))
    assert len(names) == len(_leaves(model))
    assert {"stem.kernel", "stem.bn.mean", "stem.bn.var", "classifier.dense.kernel"} <= names
    for back in (load_safetensors(path), load_safetensors(path, config)):
        assert back.config == config and type(back) is type(model)
        for a, b in zip(_leaves(model), _leaves(back), strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b)


def test_safetensors_refuses_a_wrong_config(tmp_path):
    pytest.importorskip("safetensors")
    from manifold_lab.models.safetensors_io import load_safetensors, save_safetensors

    config = MobileNetV2Config(width=0.35, num_classes=NUM_CLASSES)
    path = save_safetensors(MobileNetV2(config, rngs=nnx.Rngs(0)), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="classifier.dense"):
        load_safetensors(path, dataclasses.replace(config, num_classes=5))
    with pytest.raises(ValueError, match="missing"):
        load_safetensors(path, MobileNetV1Config(width=0.35, num_classes=NUM_CLASSES))
    with pytest.raises(FileNotFoundError):
        load_safetensors(tmp_path / "none.safetensors")


# ----------------------------------------------------------------------------------- torchvision

#: torchvision's ``inverted_residual_setting`` (t, c, n, s) and its width rounding, written out
#: independently of our config module.
TORCHVISION_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
                       [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


def _tv_make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class _TorchvisionDict:
    """A random state dict with torchvision ``mobilenet_v2``'s names and shapes (NumPy arrays), and
    the block table (index, stride, expands, shortcut) that a forward pass over it needs."""

    def __init__(self, width: float, classes: int, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.sd: dict[str, np.ndarray] = {}
        self.blocks: list[tuple[int, int, bool, bool]] = []
        channels = _tv_make_divisible(32 * width)
        self._conv_bn("features.0", (channels, 3, 3, 3))
        index = 1
        for t, c, n, s in TORCHVISION_SETTING:
            out = _tv_make_divisible(c * width)
            for i in range(n):
                hidden, stride, k = int(round(channels * t)), (s if i == 0 else 1), 0
                prefix = f"features.{index}.conv"
                if t != 1:
                    self._conv_bn(f"{prefix}.0", (hidden, channels, 1, 1))
                    k = 1
                self._conv_bn(f"{prefix}.{k}", (hidden, 1, 3, 3))
                self._conv(f"{prefix}.{k + 1}", (out, hidden, 1, 1))
                self._bn(f"{prefix}.{k + 2}", out)
                self.blocks.append((index, stride, t != 1, stride == 1 and channels == out))
                channels, index = out, index + 1
        last = _tv_make_divisible(1280 * max(1.0, width))
        self._conv_bn(f"features.{index}", (last, channels, 1, 1))
        self.head = index
        self.sd["classifier.1.weight"] = self.rng.normal(0, 0.01, (classes, last)).astype(np.float32)
        self.sd["classifier.1.bias"] = self.rng.normal(0, 0.1, classes).astype(np.float32)

    def _conv(self, name: str, shape: tuple[int, ...]) -> None:
        fan = shape[0] * shape[2] * shape[3] if shape[1] > 1 else 9
        self.sd[f"{name}.weight"] = self.rng.normal(0, math.sqrt(2 / fan), shape).astype(np.float32)

    def _bn(self, name: str, c: int) -> None:
        for key, draw in (("weight", lambda: self.rng.uniform(0.5, 1.5, c)),
                          ("bias", lambda: self.rng.normal(0, 0.2, c)),
                          ("running_mean", lambda: self.rng.normal(0, 0.2, c)),
                          ("running_var", lambda: self.rng.uniform(0.5, 1.5, c))):
            self.sd[f"{name}.{key}"] = draw().astype(np.float32)
        self.sd[f"{name}.num_batches_tracked"] = np.array(0, np.int64)

    def _conv_bn(self, name: str, shape: tuple[int, ...]) -> None:
        self._conv(f"{name}.0", shape)
        self._bn(f"{name}.1", shape[0])


def _np_conv(x: np.ndarray, w: np.ndarray, stride: int = 1) -> np.ndarray:
    """PyTorch's Conv2d (NCHW, OIHW, padding k // 2, no bias); depthwise when w is (C, 1, k, k)."""
    k = w.shape[-1]
    x = np.pad(x, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    ho, wo = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    depthwise = w.shape[1] == 1 and x.shape[1] > 1
    out = 0.0
    for i in range(k):
        for j in range(k):
            patch = x[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
            if depthwise:
                out = out + patch * w[:, 0, i, j][None, :, None, None]
            else:
                out = out + np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out


def _np_bn(x: np.ndarray, sd: dict[str, np.ndarray], name: str) -> np.ndarray:
    """PyTorch's eval-mode BatchNorm2d (epsilon 1e-5)."""
    c = lambda key: sd[f"{name}.{key}"].astype(np.float64)[None, :, None, None]  # noqa: E731
    return (x - c("running_mean")) / np.sqrt(c("running_var") + 1e-5) * c("weight") + c("bias")


def _np_torchvision_logits(tv: _TorchvisionDict, x_nhwc: np.ndarray) -> np.ndarray:
    """torchvision's MobileNetV2 forward pass (eval mode) in float64 NumPy, read off the state dict."""
    sd = {k: v.astype(np.float64) for k, v in tv.sd.items()}
    relu6 = lambda v: np.clip(v, 0.0, 6.0)  # noqa: E731
    x = np.transpose(x_nhwc, (0, 3, 1, 2)).astype(np.float64)
    h = relu6(_np_bn(_np_conv(x, sd["features.0.0.weight"], 2), sd, "features.0.1"))
    for index, stride, expands, shortcut in tv.blocks:
        p, y, k = f"features.{index}.conv", h, 0
        if expands:
            y = relu6(_np_bn(_np_conv(y, sd[f"{p}.0.0.weight"]), sd, f"{p}.0.1"))
            k = 1
        y = relu6(_np_bn(_np_conv(y, sd[f"{p}.{k}.0.weight"], stride), sd, f"{p}.{k}.1"))
        y = _np_bn(_np_conv(y, sd[f"{p}.{k + 1}.weight"]), sd, f"{p}.{k + 2}")
        h = h + y if shortcut else y
    h = relu6(_np_bn(_np_conv(h, sd[f"features.{tv.head}.0.weight"]), sd, f"features.{tv.head}.1"))
    return h.mean(axis=(2, 3)) @ sd["classifier.1.weight"].T + sd["classifier.1.bias"]


def test_torchvision_names_and_shapes_map_one_to_one():
    full = _TorchvisionDict(1.0, 1000)
    assert len(full.sd) == 314  # torchvision's mobilenet_v2().state_dict() has 314 entries
    model = load_torchvision_state_dict(full.sd)
    assert (model.config.width, model.config.num_classes) == (1.0, 1000)
    assert sum(a.size for a in _leaves(model)) == 3_504_872 + 2 * 17_056  # params + BN statistics
    # every tensor used exactly once: the random values of the dict are those of the model
    theirs = np.sort(np.concatenate([v.ravel() for k, v in full.sd.items() if "num_batches" not in k]))
    ours = np.sort(np.concatenate([a.ravel() for a in _leaves(model)]))
    np.testing.assert_array_equal(theirs, ours)


def test_torchvision_logits_match_a_numpy_reference():
    tv = _TorchvisionDict(0.35, NUM_CLASSES, seed=3)
    model = load_torchvision_state_dict(tv.sd)  # config inferred from the shapes
    assert model.config == TORCH_CONFIG
    x = np.random.default_rng(4).uniform(-1, 1, (2, 40, 40, 3)).astype(np.float32)
    ours = _logits(model, x)
    assert np.all(np.isfinite(ours)) and np.std(ours) > 0.05
    np.testing.assert_allclose(ours, _np_torchvision_logits(tv, x), atol=1e-4, rtol=0)


def test_torchvision_refusals():
    tv = _TorchvisionDict(0.35, NUM_CLASSES)
    with pytest.raises(ValueError, match="padding"):
        load_torchvision_state_dict(tv.sd, MobileNetV2Config(width=0.35, num_classes=NUM_CLASSES))
    with pytest.raises(ValueError, match="does not fit"):
        load_torchvision_state_dict(tv.sd, dataclasses.replace(TORCH_CONFIG, width=0.5))
    with pytest.raises(ValueError, match="no place"):
        load_torchvision_state_dict({**tv.sd, "features.19.0.weight": np.zeros(1)}, TORCH_CONFIG)
    incomplete = {k: v for k, v in tv.sd.items() if k != "features.5.conv.1.1.running_var"}
    with pytest.raises(ValueError, match="running_var is missing"):
        load_torchvision_state_dict(incomplete, TORCH_CONFIG)


def test_torchvision_itself(tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(weights=None, num_classes=NUM_CLASSES, width_mult=0.35).eval()
    with torch.no_grad():  # random BatchNorm statistics, so that eval-mode BN is not the identity
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 1.5)
        net.classifier[1].bias.normal_(0, 0.1)
    x = np.random.default_rng(5).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy())).numpy()
    torch.save(net.state_dict(), tmp_path / "mnv2.pth")
    for source in (net.state_dict(), net, tmp_path / "mnv2.pth"):
        ours = _logits(load_torchvision_state_dict(source), x)
        np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def test_torchvision_from_a_safetensors_file(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tv = _TorchvisionDict(0.35, NUM_CLASSES, seed=6)
    safetensors_numpy.save_file(tv.sd, str(tmp_path / "mnv2.safetensors"))
    from_file = load_torchvision_state_dict(tmp_path / "mnv2.safetensors", TORCH_CONFIG)
    for a, b in zip(_leaves(load_torchvision_state_dict(tv.sd)), _leaves(from_file), strict=True):
        assert np.array_equal(a, b)
