"""Save and load our networks as safetensors files: every variable of the model's ``nnx.state``
(parameters and BatchNorm statistics) under its nested state name joined by dots
(``stem.kernel``, ``blocks.3.depthwise.bn.mean``, ``classifier.dense.bias``, ...).

safetensors is a plain, framework-neutral format (a JSON header, then raw little-endian buffers)
that any framework reads without running code from the file, unlike a pickle. The model's config
goes into the header's metadata as JSON, so that :func:`load_safetensors` can rebuild the network
without being told it; a config given explicitly must fit the file's shapes. Arrays are stored
with their dtypes, so a round trip is exact. Needs the ``safetensors`` package (the ``weights``
extra)::

    save_safetensors(model, "mnv2.safetensors")
    model = load_safetensors("mnv2.safetensors")               # config from the metadata
    model = load_safetensors("mnv2.safetensors", model.config)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from manifold_lab.models.config import BottleneckStage, SeparableLayer
from manifold_lab.models.factory import MODELS, ModelConfig, build_model

#: Metadata keys of the header: the model name (a key of ``MODELS``) and its config fields.
MODEL_KEY = "manifold_lab.model"
CONFIG_KEY = "manifold_lab.config"


def _safetensors() -> Any:
    """The ``safetensors`` package (an optional dependency), with its NumPy helpers loaded."""
    try:
        import safetensors
        import safetensors.numpy
    except ImportError as exc:
        raise ImportError("safetensors files need the 'safetensors' package "
                          "(pip install 'manifold-lab[weights]')") from exc
    return safetensors


def _named_variables(state: nnx.State) -> dict[str, nnx.Variable]:
    """Dotted state name (``blocks.3.depthwise.kernel``) -> variable, in the state's order."""
    return {".".join(str(part) for part in path): var for path, var in nnx.to_flat_state(state)}


def state_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    """Dotted state name -> NumPy copy of every variable of ``model`` (parameters and statistics)."""
    return {name: np.ascontiguousarray(np.asarray(var.get_value()))
            for name, var in _named_variables(nnx.state(model)).items()}


def config_metadata(config: ModelConfig) -> dict[str, str]:
    """The header metadata that records ``config`` (model name and JSON of its fields)."""
    name = next(key for key, cls in MODELS.items() if type(config) is cls)
    return {MODEL_KEY: name, CONFIG_KEY: json.dumps(dataclasses.asdict(config), sort_keys=True)}


def config_from_metadata(metadata: dict[str, str] | None) -> ModelConfig:
    """The config :func:`config_metadata` recorded; ``ValueError`` if the header has none."""
    if not metadata or MODEL_KEY not in metadata or CONFIG_KEY not in metadata:
        raise ValueError("the file records no manifold_lab config: pass config explicitly")
    cls = MODELS[metadata[MODEL_KEY]]
    fields = json.loads(metadata[CONFIG_KEY])
    # the architecture tables are tuples of dataclasses, which JSON writes as dicts
    if "stages" in fields:
        fields["stages"] = tuple(BottleneckStage(**row) for row in fields["stages"])
    if "layers" in fields:
        fields["layers"] = tuple(SeparableLayer(**row) for row in fields["layers"])
    return cls(**fields)


def save_safetensors(model: nnx.Module, path: str | Path) -> Path:
    """Write every variable of ``model`` (a network of :func:`build_model`, with a ``config``) to
    a safetensors file under its dotted state name, the config in the metadata; returns the path."""
    path = Path(path)
    _safetensors().numpy.save_file(state_arrays(model), str(path), metadata=config_metadata(model.config))
    return path


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str] | None]:
    with _safetensors().safe_open(str(path), framework="numpy") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


def load_safetensors(path: str | Path, config: ModelConfig | None = None) -> nnx.Module:
    """The network of ``config`` (default: the one recorded in the file) carrying the file's
    variables. Every variable must be in the file with its shape and dtype and every tensor of the
    file must be a variable, else ``ValueError``. The model is built abstractly (no initialisation)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    tensors, metadata = _read(path)
    config = config_from_metadata(metadata) if config is None else config
    model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    variables = _named_variables(state)
    expected = {name: var.get_value() for name, var in variables.items()}
    missing, unused = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unused:
        raise ValueError(f"{path} does not fit the config: missing {missing[:5]} "
                         f"({len(missing)}), not in the model {unused[:5]} ({len(unused)})")
    for key, target in expected.items():
        array = tensors[key]
        if array.shape != target.shape or array.dtype != target.dtype:
            raise ValueError(f"{key}: {array.dtype}{list(array.shape)} in the file, "
                             f"{target.dtype}{list(target.shape)} in the model")
    for name, var in variables.items():
        var.set_value(jnp.asarray(tensors[name]))
    nnx.update(model, state)
    if any(not isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(nnx.state(model))):
        raise RuntimeError("some model variables were not set from the file")
    return model
