"""Parameter counts of the instantiated Flax model, built abstractly (shapes only, no memory)."""

from __future__ import annotations

from flax import nnx

from manifold_lab.models import MobileNetV1Config, MobileNetV2Config, build_model, count_params


def abstract_param_count(config: MobileNetV2Config | MobileNetV1Config) -> dict[str, int]:
    """``count_params`` of the model built from ``config`` under ``nnx.eval_shape``."""
    model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    return count_params(model)
