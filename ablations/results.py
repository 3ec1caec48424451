"""Read finished runs back: every completed seed of a variant, its learning curve and final accuracy.

Only runs whose directory is ``done`` (see :func:`ablations.plan.run_status`) are used; partial or
corrupt directories are counted and reported, never read. Seeds are discovered on disk (every
``{group}-s<seed>`` directory of the variant's configuration), so results trained with ``--seeds K``
are all used by the figures.

BatchNorm evaluation protocols. A summary records the final test accuracy of its primary protocol
(``final_test_accuracy``, protocol named by ``eval_bn``: ``running`` averages or ``precise``
statistics recomputed after training) and, when measured, each protocol's own
``final_test_accuracy_<protocol>``; evaluation lines of ``metrics.jsonl`` likewise carry
``test_accuracy`` and ``test_accuracy_<protocol>``. Summaries written before these keys existed
give the primary accuracy only (protocol ``None``).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from manifold_lab.train.run_dir import RunDir
from ablations.plan import DONE, group_id, resolved_config, run_status, study_variants, variant_spec
from ablations.studies import Preset, Study, Variant

#: BatchNorm evaluation protocols a summary may report: ``precise`` (statistics recomputed over
#: training batches after training) and ``running`` (the running averages kept during training).
PROTOCOLS: tuple[str, ...] = ("precise", "running")


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
        """Final test accuracy in percent (primary BatchNorm protocol)."""
        return 100.0 * float(self.summary["final_test_accuracy"])

    @property
    def eval_bn(self) -> str | None:
        """Name of the primary BatchNorm evaluation protocol (``None`` in older summaries)."""
        value = self.summary.get("eval_bn")
        return None if value is None else str(value)

    def final_accuracy_for(self, protocol: str | None) -> float | None:
        """Final test accuracy in percent under BatchNorm ``protocol`` (``None``: the primary one);
        ``None`` when the run did not measure that protocol."""
        if protocol is None:
            return self.final_accuracy
        value = self.summary.get(f"final_test_accuracy_{protocol}")
        if value is None and protocol == self.eval_bn:
            value = self.summary.get("final_test_accuracy")
        return None if value is None else 100.0 * float(value)

    def curve(self, protocol: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(steps, test accuracy in percent) at every evaluation under ``protocol`` (``None``: the
        primary one); evaluations that did not measure the protocol are left out."""
        keys = ["test_accuracy"] if protocol is None else [f"test_accuracy_{protocol}"]
        if protocol is not None and protocol == self.eval_bn:
            keys.append("test_accuracy")
        evals = [(int(m["step"]), float(v)) for m in self.metrics
                 if (v := next((m[k] for k in keys if m.get(k) is not None), None)) is not None]
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
        """Final accuracies (percent, primary protocol) in seed order."""
        return [r.final_accuracy for r in self.runs]

    def accuracies_by_seed(self, protocol: str | None = None) -> dict[int, float]:
        """``{seed: final accuracy in percent}`` under ``protocol`` for the seeds that measured it."""
        return {r.seed: acc for r in self.runs if (acc := r.final_accuracy_for(protocol)) is not None}

    def accuracies_for(self, protocol: str | None = None) -> list[float]:
        """Final accuracies (percent) under ``protocol`` in seed order, seeds without it left out."""
        return list(self.accuracies_by_seed(protocol).values())

    def curves(self, protocol: str | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """Steps evaluated by every seed and the [seeds, steps] accuracy matrix under ``protocol``
        (``None``: the primary one; None without runs)."""
        if not self.runs:
            return None
        per_seed = [r.curve(protocol) for r in self.runs]
        common = sorted(set.intersection(*(set(s.tolist()) for s, _ in per_seed)))
        if not common:
            return None
        matrix = np.stack([acc[np.searchsorted(steps, common)] for steps, acc in per_seed])
        return np.asarray(common, dtype=np.int64), matrix


def paired_accuracies(a: VariantResults, b: VariantResults,
                      protocol: str | None = None) -> tuple[list[float], list[float]]:
    """Seed-aligned final accuracies (percent) of ``a`` and ``b`` under ``protocol``: two lists over
    the seeds both measured, in seed order. Runs of two variants at one seed share their initial
    parameters and data order, so these are the pairs of a paired comparison."""
    acc_a, acc_b = a.accuracies_by_seed(protocol), b.accuracies_by_seed(protocol)
    seeds = sorted(set(acc_a) & set(acc_b))
    return [acc_a[s] for s in seeds], [acc_b[s] for s in seeds]


def protocols(results: Sequence[VariantResults]) -> list[str | None]:
    """BatchNorm protocols to report for ``results``, the primary first.

    ``[None]`` (primary accuracy, protocol unnamed) when no run names its protocol; otherwise every
    protocol of :data:`PROTOCOLS` some run measured, the most common ``eval_bn`` first."""
    runs = [r for vr in results for r in vr.runs]
    measured = [p for p in PROTOCOLS if any(r.final_accuracy_for(p) is not None for r in runs)]
    if not measured:
        return [None]
    primaries = Counter(r.eval_bn for r in runs if r.eval_bn in measured)
    primary = primaries.most_common(1)[0][0] if primaries else measured[0]
    return [primary, *(p for p in measured if p != primary)]


def _seed_of(name: str, gid: str) -> int | None:
    match = re.fullmatch(re.escape(gid) + r"-s(\d+)", name)
    return int(match.group(1)) if match else None


def load_variant(root: Path, study: Study, variant: Variant, preset: Preset,
                 data_dir: str | None = None) -> VariantResults:
    """Every completed seed of ``variant`` under ``root`` (``RESULTS/<preset>``)."""
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
        run = RunDir(run_dir)
        saved, metrics = run.load()
        summary = run.summary()
        config = {**expected, "data_dir": data_dir if data_dir is not None else saved.get("data_dir")}
        runs.append(SeedRun(seed, run_dir, config, list(metrics), summary))
    return VariantResults(study.name, variant, tuple(runs), tuple(skipped))


def load_study(root: Path, study: Study, preset: Preset, data_dir: str | None = None) -> list[VariantResults]:
    """:func:`load_variant` for every variant of ``study`` at ``preset``."""
    return [load_variant(root, study, v, preset, data_dir) for v in study_variants(study, preset)]
