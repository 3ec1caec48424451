"""Keras MobileNetV2 weights imported into our model give Keras' logits (eval mode)."""

from __future__ import annotations

import os
import zipfile

import jax
import numpy as np
import pytest
from flax import nnx

from manifold_lab.models import MobileNetV2Config
from manifold_lab.models.keras_import import infer_config, load_keras_weights

os.environ.setdefault("KERAS_BACKEND", "jax")
keras = pytest.importorskip("keras")

# Keras' own saving code trips NumPy 2's copy-keyword deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

#: (width, input size): 72 px makes the later stride-2 inputs odd (9 and 5 px), where Keras'
#: explicit padding is (1, 1) rather than (0, 1).
CASES = [(1.0, 72), (0.35, 96)]
NUM_CLASSES = 10


def _randomise(model, rng: np.random.Generator) -> None:
    """Random BatchNorm scale, offset and moving statistics, so eval-mode BN is not the identity."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n),
                               rng.normal(0, 0.2, n), rng.uniform(0.5, 1.5, n)])
        elif isinstance(layer, keras.layers.Dense):
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape)])


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"width{c[0]}-{c[1]}px")
def keras_case(request, tmp_path_factory):
    """A random Keras model saved in the three layouts, and its logits on a random batch."""
    width, size = request.param
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=width, weights=None,
                                           classes=NUM_CLASSES, classifier_activation=None)
    _randomise(model, np.random.default_rng(1))
    x = np.random.default_rng(2).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    logits = np.asarray(model.predict(x, verbose=0))
    out = tmp_path_factory.mktemp(f"keras{width}")
    paths = {"keras": out / "m.keras", "weights_h5": out / "m.weights.h5", "legacy_h5": out / "m.h5"}
    model.save(paths["keras"])
    model.save_weights(paths["weights_h5"])
    model.save(paths["legacy_h5"])
    return width, x, logits, paths


def test_logits_match_keras(keras_case):
    width, x, expected, paths = keras_case
    config = MobileNetV2Config(width=width, num_classes=NUM_CLASSES)
    models = {name: load_keras_weights(path, config) for name, path in paths.items()}
    states = [jax.tree.leaves(nnx.state(m)) for m in models.values()]
    for other in states[1:]:  # the three layouts carry identical arrays
        assert all(np.array_equal(a, b) for a, b in zip(states[0], other, strict=True))
    assert np.std(expected) > 0.05  # a non-degenerate check
    graphdef, state = nnx.split(models["keras"])
    ours = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False))(state, x))
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def test_infer_config_and_mismatches(keras_case):
    width, _, _, paths = keras_case
    for path in paths.values():
        config = infer_config(path)
        assert (config.width, config.num_classes, config.in_channels) == (width, NUM_CLASSES, 3)
    wrong_width = 0.5 if width != 0.5 else 1.0
    with pytest.raises(ValueError, match="does not fit"):
        load_keras_weights(paths["keras"], MobileNetV2Config(width=wrong_width, num_classes=NUM_CLASSES))
    with pytest.raises(ValueError, match="padding"):
        load_keras_weights(paths["keras"], MobileNetV2Config(width=width, num_classes=NUM_CLASSES,
                                                             padding="symmetric"))


def test_not_a_keras_file(tmp_path):
    bogus = tmp_path / "x.keras"
    with zipfile.ZipFile(bogus, "w") as archive:
        archive.writestr("config.json", "{}")
    with pytest.raises(ValueError, match="model.weights.h5"):
        load_keras_weights(bogus, MobileNetV2Config())
    with pytest.raises(FileNotFoundError):
        load_keras_weights(tmp_path / "missing.h5", MobileNetV2Config())
