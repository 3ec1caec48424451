"""Analytic costs of MobileNetV2 / MobileNetV1 and the paper's cost tables.

``python -m manifold_lab.costs`` prints them; the figures code calls the functions directly::

    model_costs(config, resolution) -> ModelCosts   # per-layer rows and totals
    slim_table()                    -> list[dict]   # authors' checkpoint table, measured vs published
    memory_table()                  -> dict         # Table 3 for V1 and V2
    table2_rows(config, resolution) -> list[dict]   # Table 2 decoded from a config
    abstract_param_count(config)    -> dict         # counted on the Flax model, no memory used
"""

from manifold_lab.costs.analytic import LayerCost, ModelCosts, model_costs
from manifold_lab.costs.model_count import abstract_param_count
from manifold_lab.costs.tables import memory_table, slim_table, table2_rows

__all__ = [
    "LayerCost",
    "ModelCosts",
    "abstract_param_count",
    "memory_table",
    "model_costs",
    "slim_table",
    "table2_rows",
]
