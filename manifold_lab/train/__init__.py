"""The training engine: the paper's recipe in Optax, a jitted functional step, Orbax checkpoints
with exact resume, data parallelism over devices and vmapped multi-seed training.

```python
from manifold_lab.train import TrainConfig, train, train_seeds, load_run, is_complete, restore_model
summary = train(TrainConfig(width=0.35, steps=200), "runs/fmnist")
```
Command line: ``python -m manifold_lab.train --help``.
"""

from manifold_lab.train.config import TrainConfig
from manifold_lab.train.loop import EXIT_DIVERGED, TrainingDiverged, train
from manifold_lab.train.multiseed import train_seeds
from manifold_lab.train.records import is_complete, load_run
from manifold_lab.train.runs import restore_model

__all__ = ["EXIT_DIVERGED", "TrainConfig", "TrainingDiverged", "is_complete", "load_run", "restore_model",
           "train", "train_seeds"]
