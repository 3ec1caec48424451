"""The training engine: the paper's recipe in Optax, a jitted functional step, Orbax checkpoints
with exact resume, data parallelism over devices and vmapped multi-seed training.

```python
from manifold_lab.train import TrainConfig, train, train_seeds, load_run, is_complete, restore_model
summary = train(TrainConfig(width=0.35, steps=200), "runs/fmnist")
```
Command line: ``python -m manifold_lab.train --help``. The names are imported on first use, so that
reading finished runs (:mod:`manifold_lab.train.run_dir`) does not import JAX.
"""

from __future__ import annotations

from manifold_lab.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "EXIT_DIVERGED": "manifold_lab.train.loop",
    "TrainingDiverged": "manifold_lab.train.loop",
    "train": "manifold_lab.train.loop",
    "train_seeds": "manifold_lab.train.multiseed",
    "TrainConfig": "manifold_lab.train.config",
    "RunDir": "manifold_lab.train.run_dir",
    "is_complete": "manifold_lab.train.run_dir",
    "load_run": "manifold_lab.train.run_dir",
    "restore_model": "manifold_lab.train.run_dir",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
