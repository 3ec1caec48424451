"""The paper's ablations: studies and presets (:mod:`ablations.studies`), the sweep runner
(:mod:`ablations.run`), the measuring step, statistics, figures and the report.

```python
from ablations import run_sweep, load_preset_file
result = run_sweep("fig6a", "quick", "results", overrides={"steps": 100, "seeds": 2}, workers=2)
```
The names are imported on first use, so that ``import ablations`` stays light.
"""

from __future__ import annotations

from manifold_lab.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "run_sweep": "ablations.run",
    "SweepResult": "ablations.run",
    "Preset": "ablations.studies",
    "PRESETS": "ablations.studies",
    "STUDIES": "ablations.studies",
    "get_preset": "ablations.studies",
    "apply_overrides": "ablations.studies",
    "load_preset_file": "ablations.studies",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
