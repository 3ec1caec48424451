"""Import the weights of a Keras ``keras.applications.MobileNetV2`` file into our MobileNetV2.

Reads the file with h5py only (Keras is not needed at run time). Three layouts are understood:

- ``.keras`` (Keras 3): a zip archive holding ``model.weights.h5``;
- ``.weights.h5`` (Keras 3 ``save_weights``) -- both store each layer's variables under
  ``layers/<class name in snake case>[_<k>]/vars/<i>``, numbered per class in the order of
  ``model.layers`` (``conv2d``, ``conv2d_1``, ...; ``batch_normalization_<k>``; ...);
- legacy HDF5 ``.h5`` (``model.save("x.h5")``, and the Keras-Applications ImageNet files): one
  group per layer name (``Conv1``, ``bn_Conv1``, ``block_3_expand``, ...; the classifier is
  ``predictions``, ``Logits`` in older files) whose ``weight_names`` attribute lists its arrays,
  optionally under ``model_weights/``. ``include_top=False`` files have no classifier and are
  refused.

Keras' MobileNetV2 is the paper's network with TF 'SAME' geometry (its explicit (0, 1) zero padding
before stride-2 depthwise convolutions followed by a 'valid' convolution is 'SAME'), BatchNorm
epsilon 1e-3, no dropout, global average pool then a dense layer; ``classifier_activation=None``
gives logits. Our model with ``padding="same"`` and ``bn_epsilon=1e-3`` computes the same function
(in eval mode; our dropout is inactive there) and returns logits: apply a softmax to get what a
Keras model with its default ``classifier_activation="softmax"`` returns. Depthwise kernels are
stored ``(3, 3, C, 1)`` by Keras and ``(3, 3, 1, C)`` here. The layer names and their order
(:func:`keras_layers`, :func:`keras3_paths`, :func:`keras_targets`) are also what
:mod:`manifold_lab.models.keras_export` writes.

    model = load_keras_weights("mobilenet_v2_1.0_224.h5")            # width/classes from the file
    model = load_keras_weights(path, MobileNetV2Config(width=0.35, num_classes=10))
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from manifold_lab.models.config import MobileNetV2Config, require_geometry
from manifold_lab.models.mobilenet_v2 import MobileNetV2

#: Width multipliers keras.applications.MobileNetV2 accepts (tried when no config is given).
KERAS_ALPHAS: tuple[float, ...] = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)

_BN_KEYS = ("gamma", "beta", "moving_mean", "moving_variance")


@dataclasses.dataclass(frozen=True)
class KerasLayer:
    """One weighted layer of keras.applications.MobileNetV2 in ``model.layers`` order."""

    name: str  # the layer's name in the legacy .h5 layout
    kind: str  # "conv2d", "depthwise_conv2d", "batch_normalization" or "dense"


def keras_layers(config: MobileNetV2Config) -> list[KerasLayer]:
    """The weighted layers of Keras' MobileNetV2 for ``config``, in ``model.layers`` order."""
    layers = [KerasLayer("Conv1", "conv2d"), KerasLayer("bn_Conv1", "batch_normalization")]
    for spec in config.blocks():
        prefix = f"block_{spec.index}" if spec.index else "expanded_conv"
        if spec.has_expansion:
            layers += [KerasLayer(f"{prefix}_expand", "conv2d"),
                       KerasLayer(f"{prefix}_expand_BN", "batch_normalization")]
        layers += [KerasLayer(f"{prefix}_depthwise", "depthwise_conv2d"),
                   KerasLayer(f"{prefix}_depthwise_BN", "batch_normalization"),
                   KerasLayer(f"{prefix}_project", "conv2d"),
                   KerasLayer(f"{prefix}_project_BN", "batch_normalization")]
    layers += [KerasLayer("Conv_1", "conv2d"), KerasLayer("Conv_1_bn", "batch_normalization"),
               KerasLayer("predictions", "dense")]
    return layers


def keras3_paths(layers: list[KerasLayer]) -> dict[str, str]:
    """Layer name -> ``layers/<snake class>[_k]`` as Keras 3's saving code numbers them (shared
    with :mod:`manifold_lab.models.keras_export`, which writes what this module reads)."""
    seen: dict[str, int] = {}
    paths = {}
    for layer in layers:
        k = seen.get(layer.kind, -1) + 1
        seen[layer.kind] = k
        paths[layer.name] = f"layers/{layer.kind}" + (f"_{k}" if k else "")
    return paths


def _read_arrays(path: Path, config: MobileNetV2Config) -> dict[str, list[np.ndarray]]:
    """Layer name -> its arrays in Keras' order (kernel[, bias]; gamma, beta, mean, variance)."""
    layers = keras_layers(config)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if "model.weights.h5" not in archive.namelist():
                raise ValueError(f"{path}: a zip without model.weights.h5 is not a .keras file")
            data = archive.read("model.weights.h5")
        with h5py.File(io.BytesIO(data), "r") as f:
            return _read_keras3(f, layers)
    with h5py.File(path, "r") as f:
        if "layers" in f and "vars" in f:
            return _read_keras3(f, layers)
        return _read_legacy(f.get("model_weights", f), layers)


def _read_keras3(f: h5py.File, layers: list[KerasLayer]) -> dict[str, list[np.ndarray]]:
    out = {}
    for name, group_path in keras3_paths(layers).items():
        if group_path not in f:
            raise ValueError(f"no weights for {name} (expected {group_path}/vars)")
        group = f[group_path]["vars"]
        out[name] = [np.asarray(group[str(i)]) for i in range(len(group))]
    return out


def _read_legacy(root: h5py.Group, layers: list[KerasLayer]) -> dict[str, list[np.ndarray]]:
    out = {}
    for layer in layers:
        # Keras-Applications files before Keras 2.3 call the classifier "Logits".
        names = [layer.name] + (["Logits"] if layer.kind == "dense" else [])
        found = [name for name in names if name in root]
        if not found:
            raise ValueError(f"no weights for layer {layer.name!r} in the HDF5 file")
        group = root[found[0]]
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs["weight_names"]]
        arrays = {n.split("/")[-1].split(":")[0]: np.asarray(group[n]) for n in names}
        if layer.kind == "batch_normalization":
            out[layer.name] = [arrays[k] for k in _BN_KEYS]
        elif layer.kind == "dense":
            out[layer.name] = [arrays["kernel"], arrays["bias"]]
        else:  # Keras 2 calls a depthwise kernel "depthwise_kernel"
            out[layer.name] = [arrays.get("kernel", arrays.get("depthwise_kernel"))]
    return out


def _bn(unit) -> list[nnx.Variable]:
    return [unit.bn.scale, unit.bn.bias, unit.bn.mean, unit.bn.var]


def keras_targets(model: MobileNetV2) -> Iterator[tuple[str, list[nnx.Variable], bool]]:
    """(Keras layer name, our variables in Keras' order, is-depthwise) for every weighted layer:
    the one name mapping between Keras and our model, read by the importer and the exporter."""
    yield "Conv1", [model.stem.kernel], False
    yield "bn_Conv1", _bn(model.stem), False
    for block in model.blocks:
        prefix = f"block_{block.index}" if block.index else "expanded_conv"
        units = [("expand", block.expansion), ("depthwise", block.depthwise),
                 ("project", block.projection)]
        for suffix, unit in units:
            if unit is not None:
                yield f"{prefix}_{suffix}", [unit.kernel], suffix == "depthwise"
                yield f"{prefix}_{suffix}_BN", _bn(unit), False
    yield "Conv_1", [model.head.kernel], False
    yield "Conv_1_bn", _bn(model.head), False
    yield "predictions", [model.classifier.dense.kernel, model.classifier.dense.bias], False


def check_keras_geometry(config: MobileNetV2Config) -> None:
    """Raise ``ValueError`` unless ``config`` computes what Keras's MobileNetV2 computes."""
    require_geometry(config, {"padding": "same", "bn_epsilon": 1e-3, "layout": "imagenet",
                "residual": "bottleneck", "bottleneck_activation": "linear"}, "Keras")


def _kernel_shapes(config: MobileNetV2Config) -> dict[str, tuple[int, ...]]:
    """Keras' kernel shape of every convolution and of the classifier under ``config``."""
    shapes = {"Conv1": (3, 3, config.in_channels, config.stem_out)}
    for spec in config.blocks():
        prefix = f"block_{spec.index}" if spec.index else "expanded_conv"
        if spec.has_expansion:
            shapes[f"{prefix}_expand"] = (1, 1, spec.in_channels, spec.expanded_channels)
        shapes[f"{prefix}_depthwise"] = (3, 3, spec.expanded_channels, 1)
        shapes[f"{prefix}_project"] = (1, 1, spec.expanded_channels, spec.out_channels)
    last = config.blocks()[-1].out_channels
    shapes["Conv_1"] = (1, 1, last, config.head_channels)
    shapes["predictions"] = (config.head_channels, config.num_classes)
    return shapes


def infer_config(path: str | Path) -> MobileNetV2Config:
    """The Keras-geometry config whose shapes match the file: classes and input channels from the
    classifier and stem kernels, width from the Keras alphas whose kernel shapes all fit.
    (The layer list does not depend on the width, so the file is read once.)"""
    arrays = _read_arrays(Path(path), MobileNetV2Config())
    classes = arrays["predictions"][0].shape[1]
    channels = arrays["Conv1"][0].shape[2]
    for alpha in KERAS_ALPHAS:
        config = MobileNetV2Config(width=alpha, num_classes=classes, in_channels=channels)
        if all(arrays[name][0].shape == shape for name, shape in _kernel_shapes(config).items()):
            return config
    raise ValueError(f"{path}: no Keras MobileNetV2 width in {KERAS_ALPHAS} matches the file")


def load_keras_weights(path: str | Path, config: MobileNetV2Config | None = None) -> MobileNetV2:
    """Our MobileNetV2 carrying the weights (and BatchNorm statistics) of a Keras MobileNetV2 file.

    ``config`` defaults to :func:`infer_config`; it must have Keras' geometry
    (:func:`check_keras_geometry`) and shapes matching the file, else ``ValueError``.
    The model is built abstractly and every variable is taken from the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    config = infer_config(path) if config is None else config
    check_keras_geometry(config)
    arrays = _read_arrays(path, config)
    # Shapes only: every variable (kernels, BatchNorm scale/offset/statistics) is set below.
    model = nnx.eval_shape(lambda: MobileNetV2(config, rngs=nnx.Rngs(0)))
    for name, variables, depthwise in keras_targets(model):
        if len(arrays[name]) != len(variables):
            raise ValueError(f"{name}: {len(arrays[name])} arrays in the file, "
                             f"{len(variables)} expected")
        for var, array in zip(variables, arrays[name]):
            if depthwise:  # Keras (3, 3, C, 1) -> ours (3, 3, 1, C)
                array = np.transpose(array, (0, 1, 3, 2))
            target = var.get_value()  # a ShapeDtypeStruct until set
            if array.shape != target.shape:
                raise ValueError(f"{name}: array {array.shape} in the file does not fit "
                                 f"{target.shape} (wrong width or classes?)")
            var.set_value(jnp.asarray(array, dtype=target.dtype))
    missing = [leaf for leaf in jax.tree.leaves(nnx.state(model)) if not isinstance(leaf, jax.Array)]
    if missing:
        raise RuntimeError(f"{len(missing)} model variables have no Keras counterpart")
    return model
