"""Parameter counts of the instantiated Flax model, built abstractly (shapes only, no memory).

Flax and the model code are imported when a count is asked for, so that importing
:mod:`manifold_lab.costs` (the analytic cost model) does not import JAX.
"""

from __future__ import annotations

from manifold_lab.models.config import MobileNetV1Config, MobileNetV2Config


def abstract_param_count(config: MobileNetV2Config | MobileNetV1Config) -> dict[str, int]:
    """``count_params`` of the model built from ``config`` under ``nnx.eval_shape``."""
    from flax import nnx

    from manifold_lab.models.factory import build_model, count_params

    model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    return count_params(model)
