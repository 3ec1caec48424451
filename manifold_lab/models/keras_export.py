"""Export our MobileNetV2 as a Keras 3 ``.weights.h5`` file for ``keras.applications.MobileNetV2``.

The file has the layout Keras 3's ``save_weights`` writes (and
:func:`~manifold_lab.models.keras_import.load_keras_weights` reads): each weighted layer's arrays
under ``layers/<class name in snake case>[_<k>]/vars/<i>``, numbered per class in the order of
``model.layers``, with the layer's name as the group's ``name`` attribute. The layer names, the
numbering and the order of each layer's arrays come from :mod:`manifold_lab.models.keras_import`
(one name mapping for both directions). Layers without weights (padding, ReLU, add, pooling) get no
group: Keras loads a missing group as an empty one. Written with h5py only (no Keras needed)::

    export_keras_weights(model, "mnv2.weights.h5")
    keras_model = keras.applications.MobileNetV2(weights=None, alpha=model.config.width,
                                                 input_shape=(224, 224, 3),
                                                 classes=model.config.num_classes,
                                                 classifier_activation=None)
    keras_model.load_weights("mnv2.weights.h5")   # the logits of model(x, train=False)

Only networks Keras' MobileNetV2 computes can be exported (TF 'SAME' padding, BatchNorm epsilon
1e-3, the paper's layout, shortcuts and linear bottleneck: ``check_keras_geometry``, and widths
whose channel counts Keras rounds as we do); anything else is a ``ValueError``.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from manifold_lab.models.config import MobileNetV2Config, make_divisible
from manifold_lab.models.keras_import import check_keras_geometry, keras3_paths, keras_layers, keras_targets
from manifold_lab.models.mobilenet_v2 import MobileNetV2


def check_keras_widths(config: MobileNetV2Config) -> None:
    """Raise ``ValueError`` unless Keras builds our channel counts at ``config.width``.

    Keras rounds a block's output channels as ``make_divisible(int(c * alpha), 8)`` (truncating
    first), we as ``make_divisible(c * alpha, 8)``; the two agree for Keras' own alphas and most
    others, and where they differ the file would not fit Keras' model."""
    ours = [make_divisible(stage.channels * config.width, config.divisor) for stage in config.stages]
    keras = [make_divisible(int(stage.channels * config.width), config.divisor) for stage in config.stages]
    if ours != keras:
        raise ValueError(f"width {config.width}: Keras' MobileNetV2 rounds the stage widths to "
                         f"{keras}, this model has {ours}")


def keras_arrays(model: MobileNetV2) -> dict[str, list[np.ndarray]]:
    """Keras layer name -> the float32 arrays Keras stores for it, in Keras' order and layouts
    (depthwise kernels ``(3, 3, C, 1)``; ours are ``(3, 3, 1, C)``)."""
    if not isinstance(model, MobileNetV2):
        raise ValueError(f"only MobileNetV2 has a Keras counterpart, not {type(model).__name__}")
    check_keras_geometry(model.config)
    check_keras_widths(model.config)
    arrays = {}
    for name, variables, depthwise in keras_targets(model):
        values = [np.asarray(var.get_value(), dtype=np.float32) for var in variables]
        if depthwise:
            values = [np.ascontiguousarray(np.transpose(v, (0, 1, 3, 2))) for v in values]
        arrays[name] = values
    return arrays


def export_keras_weights(model: MobileNetV2, path: str | Path) -> Path:
    """Write ``model``'s parameters and BatchNorm statistics as a Keras 3 ``.weights.h5`` file that
    ``keras.applications.MobileNetV2(weights=None, alpha=width, classes=num_classes, ...)`` loads
    with ``load_weights``; returns the path. The name must end in ``.weights.h5`` (Keras picks its
    reader by the suffix); a network Keras cannot express is a ``ValueError`` (module doc)."""
    path = Path(path)
    if not path.name.endswith(".weights.h5"):
        raise ValueError(f"{path}: Keras reads this layout only from a file named *.weights.h5")
    arrays = keras_arrays(model)
    config = model.config
    with h5py.File(path, "w") as f:
        f.create_group("vars").attrs["name"] = f"mobilenetv2_{config.width:0.2f}"
        for name, group_path in keras3_paths(keras_layers(config)).items():
            group = f.create_group(group_path).create_group("vars")
            group.attrs["name"] = name
            for i, array in enumerate(arrays[name]):
                group[str(i)] = array
    return path
