"""Import a torchvision ``mobilenet_v2`` state dict into our MobileNetV2.

torchvision's MobileNetV2 is the paper's network with symmetric padding (``kernel // 2`` on both
sides) and BatchNorm epsilon 1e-5 (PyTorch's default); our model with ``padding="symmetric"`` and
``bn_epsilon=1e-5`` computes the same function in eval mode (dropout inactive) and returns the same
logits. Its module names (``torchvision.models.mobilenetv2``)::

    features.0                  stem: Conv2dNormActivation -> .0 conv (O, I, 3, 3), .1 BatchNorm
    features.1.conv             the t = 1 block: .0 depthwise Conv2dNormActivation (.0 conv
                                (C, 1, 3, 3), .1 BN), .1 projection conv (O, C, 1, 1), .2 BN
    features.2 .. 17 .conv      .0 expansion Conv2dNormActivation (.0 conv (E, I, 1, 1), .1 BN),
                                .1 depthwise Conv2dNormActivation, .2 projection conv, .3 BN
    features.18                 last 1x1 Conv2dNormActivation (.0 conv, .1 BN)
    classifier.1                Linear (classes, 1280) + bias (classifier.0 is the dropout)

with BatchNorm tensors ``weight``, ``bias``, ``running_mean``, ``running_var`` (and the unused
counter ``num_batches_tracked``). Conv kernels OIHW become our HWIO (depthwise ``(C, 1, 3, 3)``
becomes ``(3, 3, 1, C)``, the same transposition), the Linear ``(out, in)`` weight our Dense
``(in, out)`` kernel. Torch is needed only to read a ``.pt``/``.pth`` file; a dict of arrays
(NumPy or torch tensors) or a ``.safetensors`` file needs none::

    model = load_torchvision_state_dict(torchvision.models.mobilenet_v2(weights=...).state_dict())
    model = load_torchvision_state_dict("mobilenet_v2.pth")      # width/classes from the shapes
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from manifold_lab.models.config import MobileNetV2Config, require_geometry
from manifold_lab.models.mobilenet_v2 import MobileNetV2

#: Width multipliers tried when no config is given (any width whose shapes fit is the same network).
TORCHVISION_WIDTHS: tuple[float, ...] = (0.25, 0.35, 0.5, 0.75, 1.0, 1.3, 1.4, 1.5, 2.0)

#: torchvision's BatchNorm tensor names -> ours (``nnx.BatchNorm`` attributes).
BN_NAMES: tuple[tuple[str, str], ...] = (
    ("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var"))

#: BatchNorm buffers torchvision saves that our model has no use for.
IGNORED_SUFFIX = ".num_batches_tracked"


@dataclasses.dataclass(frozen=True)
class TorchUnit:
    """One torchvision module with tensors: its name, kind (``conv``, ``bn`` or ``linear``), the
    path of our module that holds the matching variables, and torchvision's weight shape."""

    prefix: str
    kind: str
    path: tuple[str | int, ...]
    shape: tuple[int, ...]


def _conv_bn(prefix: str, path: tuple[str | int, ...], shape: tuple[int, ...]) -> list[TorchUnit]:
    """A Conv2dNormActivation: ``<prefix>.0`` conv, ``<prefix>.1`` BatchNorm."""
    return [TorchUnit(f"{prefix}.0", "conv", path, shape), TorchUnit(f"{prefix}.1", "bn", path, shape[:1])]


def torchvision_units(config: MobileNetV2Config) -> list[TorchUnit]:
    """Every torchvision module with tensors for ``config``, in ``state_dict`` order."""
    units = _conv_bn("features.0", ("stem",), (config.stem_out, config.in_channels, 3, 3))
    for spec in config.blocks():
        base, path, k = f"features.{spec.index + 1}.conv", ("blocks", spec.index), 0
        if spec.has_expansion:
            units += _conv_bn(f"{base}.0", (*path, "expansion"),
                              (spec.expanded_channels, spec.in_channels, 1, 1))
            k = 1
        units += _conv_bn(f"{base}.{k}", (*path, "depthwise"), (spec.expanded_channels, 1, 3, 3))
        units += [TorchUnit(f"{base}.{k + 1}", "conv", (*path, "projection"),
                            (spec.out_channels, spec.expanded_channels, 1, 1)),
                  TorchUnit(f"{base}.{k + 2}", "bn", (*path, "projection"), (spec.out_channels,))]
    head = f"features.{len(config.blocks()) + 1}"
    units += _conv_bn(head, ("head",), (config.head_channels, config.blocks()[-1].out_channels, 1, 1))
    units.append(TorchUnit("classifier.1", "linear", ("classifier",),
                           (config.num_classes, config.head_channels)))
    return units


def _oihw_to_hwio(array: np.ndarray) -> np.ndarray:
    return np.transpose(array, (2, 3, 1, 0))


def _variables(model: MobileNetV2, unit: TorchUnit
               ) -> Iterator[tuple[str, nnx.Variable, Callable[[np.ndarray], np.ndarray]]]:
    """(torchvision tensor name, our variable, torchvision -> our layout) of one unit."""
    module: Any = model
    for part in unit.path:
        module = module[part] if isinstance(part, int) else getattr(module, part)
    if unit.kind == "conv":
        yield f"{unit.prefix}.weight", module.kernel, _oihw_to_hwio
    elif unit.kind == "bn":
        for theirs, ours in BN_NAMES:
            yield f"{unit.prefix}.{theirs}", getattr(module.bn, ours), np.asarray
    else:
        yield f"{unit.prefix}.weight", module.dense.kernel, np.transpose
        yield f"{unit.prefix}.bias", module.dense.bias, np.asarray


def check_torchvision_geometry(config: MobileNetV2Config) -> None:
    """Raise ``ValueError`` unless ``config`` computes what torchvision's MobileNetV2 computes."""
    require_geometry(config, {"padding": "symmetric", "bn_epsilon": 1e-5, "layout": "imagenet",
                "residual": "bottleneck", "bottleneck_activation": "linear"}, "torchvision")


def _fits(arrays: Mapping[str, np.ndarray], config: MobileNetV2Config) -> bool:
    """Whether every conv/linear weight of ``config`` is in ``arrays`` with torchvision's shape."""
    return all(f"{u.prefix}.weight" in arrays and arrays[f"{u.prefix}.weight"].shape == u.shape
               for u in torchvision_units(config) if u.kind != "bn")


def infer_torchvision_config(arrays: Mapping[str, np.ndarray]) -> MobileNetV2Config:
    """The torchvision-geometry config whose shapes match the state dict: classes and input
    channels from the classifier and stem weights, width from :data:`TORCHVISION_WIDTHS`."""
    for key in ("classifier.1.weight", "features.0.0.weight"):
        if key not in arrays:
            raise ValueError(f"not a torchvision mobilenet_v2 state dict: no {key!r}")
    base = MobileNetV2Config(padding="symmetric", bn_epsilon=1e-5,
                             num_classes=arrays["classifier.1.weight"].shape[0],
                             in_channels=arrays["features.0.0.weight"].shape[1])
    for width in TORCHVISION_WIDTHS:
        config = dataclasses.replace(base, width=width)
        if _fits(arrays, config):
            return config
    raise ValueError(f"no width in {TORCHVISION_WIDTHS} matches the state dict's shapes: pass a config")


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def read_state_dict(source: Mapping[str, Any] | str | Path) -> dict[str, np.ndarray]:
    """Name -> NumPy array of a state dict given as a mapping (NumPy arrays or torch tensors),
    a module (its ``state_dict()``), a ``.safetensors`` file or a file ``torch.save`` wrote."""
    if hasattr(source, "state_dict"):
        source = source.state_dict()
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file
            return load_file(str(path))
        try:
            import torch
        except ImportError as exc:
            raise ImportError(f"{path}: reading a torch file needs torch (the 'bench' extra)") from exc
        source = torch.load(path, map_location="cpu", weights_only=True)
    return {key: _to_numpy(value) for key, value in source.items()}


def load_torchvision_state_dict(state_dict_or_path: Mapping[str, Any] | str | Path,
                                config: MobileNetV2Config | None = None) -> MobileNetV2:
    """Our MobileNetV2 carrying the weights and BatchNorm statistics of a torchvision
    ``mobilenet_v2`` state dict (see :func:`read_state_dict` for the accepted sources).

    ``config`` defaults to :func:`infer_torchvision_config`; it must have torchvision's geometry
    (:func:`check_torchvision_geometry`). Every variable is taken from the state dict and every
    tensor of it is used exactly once (``num_batches_tracked`` is ignored), else ``ValueError``."""
    arrays = read_state_dict(state_dict_or_path)
    config = infer_torchvision_config(arrays) if config is None else config
    check_torchvision_geometry(config)
    model = nnx.eval_shape(lambda: MobileNetV2(config, rngs=nnx.Rngs(0)))
    used: set[str] = set()
    for unit in torchvision_units(config):
        for key, var, convert in _variables(model, unit):
            if key not in arrays:
                raise ValueError(f"{key} is missing from the state dict")
            target = var.get_value()  # a ShapeDtypeStruct until set
            array = convert(arrays[key])
            if array.shape != target.shape:
                raise ValueError(f"{key}: {arrays[key].shape} does not fit the config "
                                 f"(wrong width or classes?)")
            var.set_value(jnp.asarray(array, dtype=target.dtype))
            used.add(key)
    unused = sorted(k for k in arrays if k not in used and not k.endswith(IGNORED_SUFFIX))
    if unused:
        raise ValueError(f"{len(unused)} tensors of the state dict have no place in the model: {unused[:5]}")
    if any(not isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(nnx.state(model))):
        raise RuntimeError("some model variables have no torchvision counterpart")
    return model
