"""From studies and a preset to the list of runs: resolved configs, stable ids, dedup, shards, status.

A run's id is ``{slug}-{hash}-s{seed}``: ``slug`` is a readable summary (width, bottleneck activation,
residual), ``hash`` the first 10 hex digits of the SHA-256 of the resolved TrainConfig without its
seed (and without ``data_dir``, which names a machine's folder, not an experiment). Runs of one
configuration that differ only by seed share the prefix ``{slug}-{hash}`` (their *group*), so they sort
together and can be trained as one multi-seed program. Identical configurations requested by
several studies map to one run.

Layout: ``RESULTS/<preset>/<run id>/`` is a trainer's run directory
(:mod:`manifold_lab.train.run_dir`), whose status (done, missing, partial, corrupt) is checked
against the run's expected config; a corrupt one is moved aside and re-run from scratch, never
used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from manifold_lab.cli import UsageError
from manifold_lab.train.config import LOCATION_FIELDS, SEED_COUNT, TrainConfig, identity_fields
from manifold_lab.train.lock import locked_by
from manifold_lab.train.run_dir import CORRUPT, DONE, LOCK_FILE, MISSING, PARTIAL, RunDir
from ablations.studies import STUDIES, Preset, Study, Variant, study_names

#: TrainConfig fields that say where things are, not what is trained: never listed as a run's overrides
#: (the trainer's :data:`~manifold_lab.train.config.LOCATION_FIELDS`).
NON_SEMANTIC_FIELDS: frozenset[str] = frozenset(LOCATION_FIELDS)

_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: its id, seed, the explicit config fields and the (study, variant) pairs using it."""

    run_id: str
    group_id: str
    seed: int
    spec: Mapping[str, Any]
    members: tuple[tuple[str, str], ...]

    def train_config(self) -> Any:
        """The :class:`manifold_lab.train.TrainConfig` of this run."""
        return TrainConfig(**self.spec)

    def expected_config(self) -> dict[str, Any]:
        """The resolved config as JSON values (what ``config.json`` must hold)."""
        return resolved_config(self.spec)

    def overrides(self, preset: Preset) -> dict[str, Any]:
        """Fields that differ from the preset's shared ``train`` config, plus the seed."""
        diff = {k: v for k, v in self.spec.items()
                if k != "seed" and k not in NON_SEMANTIC_FIELDS and preset.train.get(k) != v}
        diff["seed"] = self.seed
        return diff

    def describe_members(self) -> str:
        return ",".join(f"{s}:{v}" for s, v in self.members)


def config_dict(config: Any) -> dict[str, Any]:
    """A TrainConfig (dataclass) as plain JSON values (tuples become lists, as in ``config.json``)."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
    return json.loads(json.dumps(raw, sort_keys=True))


def resolved_config(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The TrainConfig of ``spec`` with its defaults resolved (``TrainConfig.resolved``), as JSON
    values: exactly the fields the trainer writes to ``config.json``. Invalid fields raise
    :class:`UsageError`."""
    try:
        return config_dict(TrainConfig(**spec).resolved())
    except TypeError as exc:
        raise UsageError(f"bad training config: {exc}") from None


def _slug(config: Mapping[str, Any]) -> str:
    parts = [str(config.get("model", "model")).replace("mobilenet_", "")]
    if "width" in config:
        parts.append(f"w{float(config['width']):g}")
    for key in ("bottleneck_activation", "residual"):
        if key in config:
            parts.append(str(config[key]))
    return re.sub(r"[^A-Za-z0-9.]+", "_", "-".join(parts))


def group_id(config: Mapping[str, Any]) -> str:
    """Seed-independent id of a resolved config: ``{slug}-{sha256[:10]}``."""
    key = {k: v for k, v in identity_fields(config).items() if k != "seed"}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return f"{_slug(config)}-{digest}"


def study_seeds(study: Study, preset: Preset, seeds: int | None) -> tuple[int, ...]:
    """Seeds a study trains: ``seeds`` (the ``--seeds`` flag) or the preset's count; fig7 uses seed 0."""
    if study.seed_policy == "first":
        return (0,)
    default = preset.width_seeds if study.seed_policy == "width_seeds" else preset.seeds
    return tuple(range(seeds if seeds is not None else default))


def study_variants(study: Study, preset: Preset) -> tuple[Variant, ...]:
    """The study's variants at this preset (``preset.widths`` restricts the width study)."""
    if study.kind != "width" or preset.widths is None:
        return study.variants
    keep = {float(w) for w in preset.widths}
    return tuple(v for v in study.variants if float(v.overrides["width"]) in keep)


def variant_spec(study: Study, variant: Variant, preset: Preset, seed: int,
                 data_dir: str | None = None) -> dict[str, Any]:
    """Explicit TrainConfig fields: preset, then study, then variant overrides, then the seed."""
    spec = {**preset.train, **study.overrides, **variant.overrides, "seed": seed}
    if data_dir is not None:
        spec["data_dir"] = str(data_dir)
    return spec


def build_plan(selector: str, preset: Preset, seeds: int | None = None,
               data_dir: str | None = None) -> list[Run]:
    """All runs of ``selector`` (a study name or ``all``), deduplicated by config, sorted by id.

    Raises :class:`UsageError` for an unknown study, a seed count outside
    :data:`~manifold_lab.train.config.SEED_COUNT` (before any run is listed) or a config the trainer
    rejects."""
    for name, count in (("--seeds", seeds), ("seeds", preset.seeds), ("width_seeds", preset.width_seeds)):
        problem = None if count is None else SEED_COUNT.problem(count)
        if problem is not None:
            raise UsageError(f"{name} {problem}")
    try:
        names = study_names(selector)
    except KeyError:
        raise UsageError(f"unknown study {selector!r}; choose from all, {', '.join(STUDIES)}") from None
    runs: dict[str, dict[str, Any]] = {}
    for name in names:
        study = STUDIES[name]
        for variant in study_variants(study, preset):
            for seed in study_seeds(study, preset, seeds):
                spec = variant_spec(study, variant, preset, seed, data_dir)
                try:
                    resolved = resolved_config(spec)
                except UsageError as exc:
                    raise UsageError(f"preset {preset.name}, {name}:{variant.name}: {exc}") from None
                gid = group_id(resolved)
                rid = f"{gid}-s{seed}"
                entry = runs.setdefault(rid, {"group_id": gid, "seed": seed, "spec": spec, "members": []})
                entry["members"].append((name, variant.name))
    return [Run(rid, e["group_id"], e["seed"], dict(e["spec"]), tuple(e["members"]))
            for rid, e in sorted(runs.items())]


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` (1 <= i <= N) -> ``(i, N)``; anything else raises :class:`UsageError`."""
    match = _SHARD_RE.match(text)
    if not match:
        raise UsageError(f"--shard must look like i/N (e.g. 1/4), got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise UsageError(f"--shard {text!r}: need 1 <= i <= N")
    return index, count


def shard(runs: Sequence[Run], index: int, count: int) -> list[Run]:
    """The ``index``-th (1-based) of ``count`` contiguous, near-equal slices of ``runs`` sorted by id.

    Every run lands in exactly one shard; contiguous slices keep a configuration's seeds together,
    so each shard can still train them as one multi-seed program."""
    ordered = sorted(runs, key=lambda r: r.run_id)
    n = len(ordered)
    return ordered[(index - 1) * n // count: index * n // count]


def preset_dir(results: str | Path, preset: Preset) -> Path:
    """Where a preset's run directories live: ``RESULTS/<preset>``."""
    return Path(results) / preset.name


def run_status(run_dir: Path, expected: Mapping[str, Any]) -> tuple[str, str]:
    """``(status, reason)`` of a run directory against its expected resolved config
    (:meth:`manifold_lab.train.run_dir.RunDir.status`; only the
    :func:`~manifold_lab.train.config.identity_fields` must agree)."""
    return RunDir(run_dir).status(identity_fields(expected))


def adopt_earlier_ids(root: Path, runs: Sequence[Run], log: Callable[[str], None]) -> list[str]:
    """Rename run directories saved under an earlier id of the same run to its current id.

    A run's id hashes its config's JSON, so renaming a config field changes every id. A missing run
    adopts a folder ``{slug}-<other hash>-s{seed}`` that is done or resumable with the expected
    config, read with the field renames of ``TrainConfig.from_dict``. Returns the adopted folder
    names."""
    adopted = []
    for run in runs:
        target = root / run.run_id
        if run_status(target, run.expected_config())[0] != MISSING:
            continue
        slug = run.group_id.rsplit("-", 1)[0]
        pattern = re.compile(re.escape(slug) + r"-[0-9a-f]{10}-s" + str(run.seed))
        for candidate in sorted(root.glob(f"{slug}-*-s{run.seed}")):
            if (candidate.name != run.run_id and pattern.fullmatch(candidate.name)
                    and run_status(candidate, run.expected_config())[0] in (DONE, PARTIAL)):
                if target.exists():  # MISSING: empty, or a lock file left behind
                    if locked_by(target) is not None:
                        break  # another process has just started this run
                    (target / LOCK_FILE).unlink(missing_ok=True)
                    target.rmdir()
                candidate.rename(target)
                log(f"{candidate.name}: the same run under an earlier id, renamed to {run.run_id}")
                adopted.append(candidate.name)
                break
    return adopted


def describe_summary(summary: object) -> str:
    """A finished run's ``summary.json`` in a few words."""
    if isinstance(summary, dict) and "final_test_accuracy" in summary:
        return f"test accuracy {100 * float(summary['final_test_accuracy']):.2f}%"
    return "finished"
