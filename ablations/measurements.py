"""The measurement files: what :mod:`ablations.measure` computes and :mod:`ablations.figures` reads.

Everything the report states that needs JAX (the spiral experiment, Fig. 7's positive-channel
statistics, latency, the cost model's numbers) is measured once and written next to the runs, so
that rendering only reads files and gives the same bytes on any machine:

``RESULTS/<preset>/measurements/<name>.json``, one JSON object per measurement::

    {
      "format": 1,
      "name": "fig7",                      # the file's stem
      "what": "Fig. 7: positive channels ...",
      "preset": "smoke",
      "status": "measured",                # or "unavailable" (then "reason" says why)
      "inputs": {...},                     # what it was computed from (see below)
      "provenance": {"command": ..., "measured_at": "2025-01-01T00:00:00+00:00", "seconds": 12.3,
                     "host": {...}, "device": {...}, "versions": {...}, "git_commit": ...},
      "data": {...}                        # the numbers (layout per measurement, in ablations.measure)
    }

Names: ``spiral`` (Fig. 1 / Theorem 1), ``tables`` (Tables 2 and 3 from the cost model), one per
study whose kind needs a network measured (:data:`MEASURED_KINDS`): ``fig5`` (costs and latency per
width), ``fig7`` (positive-channel statistics), and ``appendix_a`` (the per-layer invertibility
audit of every paired seed of ``fig6a``, :data:`APPENDIX_A`). ``inputs`` holds the preset's sizes
and, for the studies, the id and config digest of each run used: the renderer recomputes them from the results
folder and treats a measurement whose inputs differ as out of date (it says so, with the command
that refreshes it), so a re-trained or newly finished run is never reported with old numbers.

This module does not import JAX.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from manifold_lab.atomic import atomic_write_json
from manifold_lab.cli import UsageError
from ablations.results import SeedRun, VariantResults
from ablations.studies import STUDIES, Preset, Study

FORMAT = 1
MEASUREMENTS_DIR = "measurements"
SPIRAL, TABLES = "spiral", "tables"
#: The Appendix A audit of trained networks, and the study whose paired runs it audits.
APPENDIX_A, APPENDIX_A_STUDY = "appendix_a", "fig6a"
MEASURED, UNAVAILABLE = "measured", "unavailable"
#: Study kinds whose figure needs a network measured (the file is named after the study).
MEASURED_KINDS: tuple[str, ...] = ("width", "activations")
#: Seed of the spiral experiment (fixed: the report's numbers must not depend on the machine's luck).
SPIRAL_SEED = 0
#: Resolution and width of the cost model's Tables 2 and 3 (the paper's).
TABLES_RESOLUTION, TABLES_WIDTH = 224, 1.0


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One measurement file's content (see the module docstring)."""

    name: str
    what: str
    preset: str
    status: str
    inputs: Mapping[str, Any]
    provenance: Mapping[str, Any]
    data: Mapping[str, Any]
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        """The file's JSON object."""
        out = {"format": FORMAT, "name": self.name, "what": self.what, "preset": self.preset,
               "status": self.status, "inputs": self.inputs, "provenance": self.provenance, "data": self.data}
        if self.reason:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_json(cls, raw: Any, path: Path) -> Measurement:
        """Parse a file's object; :class:`UsageError` (one line, naming ``path``) when malformed."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise UsageError(f"corrupt measurement {path}: not a format-{FORMAT} measurement object")
        try:
            m = cls(str(raw["name"]), str(raw["what"]), str(raw["preset"]), str(raw["status"]),
                    dict(raw["inputs"]), dict(raw["provenance"]), dict(raw["data"]), str(raw.get("reason", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"corrupt measurement {path}: {exc.__class__.__name__}: {exc}") from None
        if m.status not in (MEASURED, UNAVAILABLE):
            raise UsageError(f"corrupt measurement {path}: unknown status {m.status!r}")
        return m

    def cite(self) -> str:
        """Where and when it was measured, in a few words, for the report (the Measurements
        section of the report lists the rest of the provenance)."""
        host = self.provenance.get("host", {})
        return (f"measured by `ablations.measure` on {device_label(self)} ({hardware(self)}) of host "
                f"`{host.get('name', '?')}` at {self.provenance.get('measured_at', '?')}")


def hardware(measurement: Measurement) -> str:
    """The processor a measurement ran on: the CPU model for the CPU backend, else the devices' kinds."""
    device = measurement.provenance.get("device", {})
    if device.get("backend") == "cpu":
        return str(measurement.provenance.get("host", {}).get("cpu", "unknown CPU"))
    kinds = sorted({d.split(" ", 1)[1] if " " in d else d for d in device.get("devices", [])})
    return ", ".join(kinds) or "unknown device"


def device_label(measurement: Measurement) -> str:
    """The backend a measurement ran on, as the report names it (``CPU``, ``GPU``, ``TPU``)."""
    return str(measurement.provenance.get("device", {}).get("backend", "unknown device")).upper()


def measurement_names() -> list[str]:
    """Every measurement, in the order they are made: the spiral, the cost-model tables, the
    studies whose kind needs a network measured, then the Appendix A audit (the longest)."""
    return [SPIRAL, TABLES, *(s.name for s in STUDIES.values() if s.kind in MEASURED_KINDS), APPENDIX_A]


def measurements_dir(root: Path) -> Path:
    """``RESULTS/<preset>/measurements`` for the preset folder ``root``."""
    return root / MEASUREMENTS_DIR


def measurement_path(root: Path, name: str) -> Path:
    """The file of measurement ``name`` under the preset folder ``root``."""
    return measurements_dir(root) / f"{name}.json"


def measure_command(preset: Preset, only: str | None = None) -> str:
    """The command that (re)measures ``only`` (or everything) for ``preset``."""
    return (f"python -m ablations.measure --preset {preset.name} --results RESULTS"
            + (f" --only {only}" if only else ""))


def write_measurement(root: Path, measurement: Measurement) -> Path:
    """Write ``measurement`` atomically; returns its path."""
    path = measurement_path(root, measurement.name)
    atomic_write_json(path, jsonable(measurement.to_json()))
    return path


def read_measurement(root: Path, name: str) -> Measurement | None:
    """The measurement ``name`` of the preset folder ``root``; None when there is none."""
    path = measurement_path(root, name)
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"corrupt measurement {path}: {exc}") from None
    return Measurement.from_json(raw, path)


def array_from_json(data: Mapping[str, Any]) -> Any:
    """An array written as ``{"dtype": ..., "values": ...}`` (its exact values and dtype)."""
    return np.asarray(data["values"], dtype=np.dtype(str(data["dtype"])))


def jsonable(value: Any) -> Any:
    """``value`` with NumPy scalars and arrays, tuples and mappings turned into JSON values."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # NumPy arrays and scalars
        return jsonable(value.tolist())
    return value


# ----------------------------------------------------------------------------------- inputs


def run_input(run: SeedRun) -> dict[str, Any]:
    """A run as a measurement input: its id, config digest and number of steps."""
    return {"run": run.run_dir.name, "config_sha256": run.summary.get("config_sha256"),
            "steps": run.summary.get("steps")}


def spiral_inputs(preset: Preset) -> dict[str, Any]:
    """The spiral experiment's inputs: the preset's size and the fixed seed."""
    return {"points": preset.spiral_points, "trials": preset.spiral_trials, "seed": SPIRAL_SEED}


def tables_inputs() -> dict[str, Any]:
    """The cost-model tables' inputs: the paper's resolution and width."""
    return {"resolution": TABLES_RESOLUTION, "width": TABLES_WIDTH}


def study_inputs(study: Study, preset: Preset, results: Sequence[VariantResults]) -> dict[str, Any] | None:
    """The inputs of a study's measurement: the first seed of each variant with runs, and the
    preset's sizes; None when no variant has a completed run (nothing to measure)."""
    runs = {vr.variant.name: run_input(vr.runs[0]) for vr in results if vr.runs}
    if not runs:
        return None
    if study.kind == "activations":
        return {"runs": runs, "images": preset.fig7_images}
    return {"runs": runs, "latency_repeats": preset.latency_repeats}


def appendix_a_seeds(results: Sequence[VariantResults]) -> dict[int, dict[str, SeedRun]]:
    """``{seed: {variant: run}}`` of the seeds at which every variant of the audited study has a
    completed run (the pairs: runs of one seed share initial weights and data order)."""
    by_variant = {vr.variant.name: {r.seed: r for r in vr.runs} for vr in results}
    seeds = sorted(set.intersection(*(set(runs) for runs in by_variant.values()))) if by_variant else []
    return {seed: {name: runs[seed] for name, runs in by_variant.items()} for seed in seeds}


def appendix_a_inputs(preset: Preset, results: Sequence[VariantResults]) -> dict[str, Any] | None:
    """The Appendix A audit's inputs: every paired run of :data:`APPENDIX_A_STUDY` (by seed and
    variant) and the preset's sizes; None without a seed at which every variant completed."""
    paired = appendix_a_seeds(results)
    if not paired:
        return None
    return {"study": APPENDIX_A_STUDY, "runs": {str(seed): {v: run_input(r) for v, r in runs.items()}
                                                for seed, runs in paired.items()},
            "images": preset.fig7_images, "train_images": preset.audit_train_images,
            "max_decoder_features": preset.audit_decoder_features}


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(jsonable(value), sort_keys=True))


def current(root: Path, name: str, preset: Preset, inputs: Mapping[str, Any]) -> tuple[Measurement | None, str]:
    """The measurement ``name`` if it was made from exactly ``inputs`` and holds numbers;
    otherwise ``(None, why)``: not measured, out of date (with the command that refreshes it),
    or unavailable (its recorded reason)."""
    command = measure_command(preset, name)
    measurement = read_measurement(root, name)
    if measurement is None:
        return None, f"not measured yet: run `{command}`"
    if _normal(measurement.inputs) != _normal(inputs):
        return None, (f"the measurement in {MEASUREMENTS_DIR}/{name}.json was made from other runs or "
                      f"sizes than the results folder now holds; refresh it with `{command}`")
    if measurement.status != MEASURED:
        return None, measurement.reason or "not measurable"
    return measurement, ""
