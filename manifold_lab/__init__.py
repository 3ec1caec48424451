"""manifold-lab: the MobileNetV2 paper's manifold/ReLU experiments and ablations in JAX / Flax NNX.

The entry points, imported on first use (``import manifold_lab`` does not import JAX)::

    import manifold_lab as ml
    cfg = ml.TrainConfig(dataset="digits", width=0.35, steps=200)
    summary = ml.train.train(cfg, "runs/digits")          # the engine: manifold_lab.train
    result = ml.evaluate("runs/digits", eval_bn="running")  # {"test_accuracy": ..., ...}
    probs = ml.predict("runs/digits", ["a.png", "b.png"])  # [2, num_classes]
    model = ml.restore_model("runs/digits")                # nnx.Module, ready for model(x, train=False)
    model = ml.build_model(ml.model_config("mobilenet_v2", width=0.5, num_classes=10), rngs=nnx.Rngs(0))

``ml.evaluate`` and ``ml.predict`` are the modules :mod:`manifold_lab.evaluate` and
:mod:`manifold_lab.predict`, each callable as its function of the same name. The command line is
``manifold-lab`` (:mod:`manifold_lab.command`).
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any

try:
    __version__ = metadata.version("manifold-lab")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

#: Names imported on first access: ``name -> (module, attribute)``; attribute None: the module.
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "train": ("manifold_lab.train", None),
    "evaluate": ("manifold_lab.evaluate", None),
    "predict": ("manifold_lab.predict", None),
    "models": ("manifold_lab.models", None),
    "data": ("manifold_lab.data", None),
    "TrainConfig": ("manifold_lab.train.config", "TrainConfig"),
    "train_seeds": ("manifold_lab.train.multiseed", "train_seeds"),
    "restore_model": ("manifold_lab.train.run_dir", "restore_model"),
    "load_run": ("manifold_lab.train.run_dir", "load_run"),
    "build_model": ("manifold_lab.models.factory", "build_model"),
    "model_config": ("manifold_lab.models.factory", "model_config"),
    "load_dataset": ("manifold_lab.data.registry", "load_dataset"),
    "load_predictor": ("manifold_lab.predict", "load_predictor"),
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    imported = importlib.import_module(module)
    return imported if attribute is None else getattr(imported, attribute)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
