"""From studies and a preset to the list of runs: resolved configs, stable ids, dedup, shards, status.

A run's id is ``{slug}-{hash}-s{seed}``: ``slug`` is a readable summary (width, bottleneck activation,
residual), ``hash`` the first 10 hex digits of the SHA-256 of the resolved TrainConfig without its
seed (and without ``data_dir``, which names a machine's folder, not an experiment). Runs of one
configuration that differ only by seed share the prefix ``{slug}-{hash}`` (their *group*), so they sort
together and can be trained as one multi-seed program. Identical configurations requested by
several studies map to one run.

Layout: ``RESULTS/<preset>/<run id>/`` holds the trainer's ``config.json``, ``metrics.jsonl``,
``checkpoints/`` and ``summary.json``. A run directory is

- ``done``: ``is_complete``, its config equal to the expected one, metrics readable with a test
  accuracy;
- ``missing``: absent (or empty);
- ``partial``: expected config, no summary yet, a checkpoint folder: resumable;
- ``corrupt``: anything else (config mismatch, unreadable files, inconsistent summary), which is
  moved aside and re-run from scratch, never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from manifold_lab.cli import UsageError
from ablations.studies import STUDIES, Preset, Study, Variant, study_names

DONE, MISSING, PARTIAL, CORRUPT = "done", "missing", "partial", "corrupt"

#: TrainConfig fields that say where things are, not what is trained: excluded from ids and checks.
NON_SEMANTIC_FIELDS: frozenset[str] = frozenset({"data_dir"})

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
        from manifold_lab.train import TrainConfig
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
    from manifold_lab.train import TrainConfig
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
    key = {k: v for k, v in config.items() if k != "seed" and k not in NON_SEMANTIC_FIELDS}
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

    Raises :class:`UsageError` for an unknown study or a config the trainer rejects."""
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


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def saved_train_config(raw: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """The TrainConfig part of a run's ``config.json`` (nested under ``"config"``/``"train"`` or flat)."""
    for key in ("train_config", "config", "train"):
        inner = raw.get(key)
        if isinstance(inner, Mapping) and any(f in inner for f in fields):
            return dict(inner)
    return dict(raw)


def config_mismatch(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Field names whose saved value differs from the expected one (missing counts as different)."""
    return sorted(k for k, v in expected.items()
                  if k not in NON_SEMANTIC_FIELDS and (k not in saved or saved[k] != v))


def run_status(run_dir: Path, expected: Mapping[str, Any]) -> tuple[str, str]:
    """``(status, reason)`` of a run directory against its expected resolved config."""
    from manifold_lab.train import is_complete, load_run

    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return MISSING, "no run directory"
    if not run_dir.is_dir():
        return CORRUPT, "not a directory"
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        return CORRUPT, "no config.json"
    try:
        saved = saved_train_config(_read_json(config_path), expected)
    except (OSError, ValueError) as exc:
        return CORRUPT, f"unreadable config.json ({exc.__class__.__name__})"
    if not isinstance(saved, dict):
        return CORRUPT, "config.json is not an object"
    diff = config_mismatch(saved, expected)
    if diff:
        return CORRUPT, "config mismatch: " + ", ".join(diff)
    if not (run_dir / "summary.json").exists():
        if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
            return PARTIAL, "no summary.json; checkpoint present"
        return CORRUPT, "no summary.json and no checkpoint"
    try:
        complete = is_complete(run_dir)
    except Exception as exc:  # a corrupt file must never crash the sweep: it is re-run
        return CORRUPT, f"is_complete failed ({exc.__class__.__name__})"
    if not complete:
        return CORRUPT, "summary.json invalid or inconsistent with config.json"
    try:
        _, metrics = load_run(run_dir)
    except Exception as exc:
        return CORRUPT, f"unreadable metrics ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if not any("test_accuracy" in m for m in metrics):
        return CORRUPT, "metrics.jsonl has no evaluation"
    return DONE, "complete"


def describe_summary(summary: object) -> str:
    """A finished run's ``summary.json`` in a few words."""
    if isinstance(summary, dict) and "final_test_accuracy" in summary:
        return f"test accuracy {100 * float(summary['final_test_accuracy']):.2f}%"
    return "finished"
