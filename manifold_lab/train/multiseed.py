"""Multi-seed training: k seeds of one configuration in one compiled program.

Parameters, optimiser state, BatchNorm statistics, the data order and the augmentation/dropout
randomness all carry a leading seed axis and the step is ``jax.vmap``-ed over it, while the dataset
on the device is shared. Small models leave a device underused, so k seeds in one program run
faster than k runs one after another. Each seed writes its own run directory, with the same files
and the same numbers (to float tolerance) as :func:`~manifold_lab.train.train` with that seed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from manifold_lab.train.config import TrainConfig
from manifold_lab.train.checkpoint import DEFAULT_KEEP
from manifold_lab.train.loop import RunOptions, parse_init_from, run_engine


def train_seeds(cfg: TrainConfig, seeds: Sequence[int], run_dirs: Sequence[str | os.PathLike[str]],
                resume: bool = False, *, stop_at_step: int | None = None, verbose: bool = True,
                keep: int = DEFAULT_KEEP, init_from: str | os.PathLike[str] | None = None,
                tensorboard: bool = False) -> list[dict[str, Any]] | None:
    """Train ``cfg`` once per seed (``cfg.seed`` is ignored) in one vmapped program; returns one
    summary per seed, in order (None when stopped early by ``stop_at_step``). ``resume`` continues
    from the newest step checkpointed in every directory. A non-finite loss in any seed stops all
    of them (:class:`~manifold_lab.train.TrainingDiverged` names the seeds). ``keep``, ``init_from``
    (every seed starts from those weights) and ``tensorboard``: as for :func:`~manifold_lab.train.train`."""
    options = RunOptions(keep, None if init_from is None else parse_init_from(init_from), tensorboard)
    return run_engine(cfg, list(seeds), list(run_dirs), resume=resume, batched=True,
                      stop_at_step=stop_at_step, verbose=verbose, options=options)
