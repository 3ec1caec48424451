"""Read finished runs back: every completed seed of a variant, its learning curve and final accuracy.

Only runs whose directory is ``done`` (see :func:`ablations.plan.run_status`) are used; partial or
corrupt directories are counted and reported, never read. Seeds are discovered on disk (every
``{group}-s<seed>`` directory of the variant's configuration), so results trained with ``--seeds K``
are all used by the figures.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from ablations.plan import DONE, group_id, resolved_config, run_status, study_variants, variant_spec
from ablations.studies import Preset, Study, Variant


@dataclasses.dataclass(frozen=True)
class SeedRun:
    """One completed run: its seed, directory, resolved config, metrics lines and summary."""

    seed: int
    run_dir: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def final_accuracy(self) -> float:
        """Final test accuracy in percent."""
        return 100.0 * float(self.summary["final_test_accuracy"])

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, test accuracy in percent) at every evaluation."""
        evals = [(int(m["step"]), float(m["test_accuracy"])) for m in self.metrics if "test_accuracy" in m]
        steps = np.array([s for s, _ in evals], dtype=np.int64)
        return steps, 100.0 * np.array([a for _, a in evals], dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class VariantResults:
    """The completed seeds of one variant and the directories that were skipped (and why)."""

    study: str
    variant: Variant
    runs: tuple[SeedRun, ...]
    skipped: tuple[tuple[str, str, str], ...]  # (run id, status, reason)

    @property
    def accuracies(self) -> list[float]:
        return [r.final_accuracy for r in self.runs]

    def curves(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Steps evaluated by every seed and the [seeds, steps] accuracy matrix (None without runs)."""
        if not self.runs:
            return None
        per_seed = [r.curve() for r in self.runs]
        common = sorted(set.intersection(*(set(s.tolist()) for s, _ in per_seed)))
        if not common:
            return None
        matrix = np.stack([acc[np.searchsorted(steps, common)] for steps, acc in per_seed])
        return np.asarray(common, dtype=np.int64), matrix


def _seed_of(name: str, gid: str) -> int | None:
    match = re.fullmatch(re.escape(gid) + r"-s(\d+)", name)
    return int(match.group(1)) if match else None


def load_variant(root: Path, study: Study, variant: Variant, preset: Preset,
                 data_dir: str | None = None) -> VariantResults:
    """Every completed seed of ``variant`` under ``root`` (``RESULTS/<preset>``)."""
    from manifold_lab.train import load_run

    base = resolved_config(variant_spec(study, variant, preset, 0, data_dir))
    gid = group_id(base)
    seeds = sorted(s for p in (root.iterdir() if root.is_dir() else ())
                   if p.is_dir() and (s := _seed_of(p.name, gid)) is not None)
    if study.seed_policy == "first":
        seeds = [s for s in seeds if s == 0]
    runs, skipped = [], []
    for seed in seeds:
        run_dir = root / f"{gid}-s{seed}"
        expected = {**base, "seed": seed}
        status, reason = run_status(run_dir, expected)
        if status != DONE:
            skipped.append((run_dir.name, status, reason))
            continue
        saved, metrics = load_run(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        config = {**expected, "data_dir": data_dir if data_dir is not None else saved.get("data_dir")}
        runs.append(SeedRun(seed, run_dir, config, list(metrics), summary))
    return VariantResults(study.name, variant, tuple(runs), tuple(skipped))


def load_study(root: Path, study: Study, preset: Preset, data_dir: str | None = None) -> list[VariantResults]:
    """:func:`load_variant` for every variant of ``study`` at ``preset``."""
    return [load_variant(root, study, v, preset, data_dir) for v in study_variants(study, preset)]
