"""Command-line checks shared by the ablation commands (run, measure, figures): presets by name and
results folders, each failing with a one-line :class:`UsageError` (exit code 2)."""

from __future__ import annotations

import os
from pathlib import Path

from manifold_lab.cli import UsageError
from ablations.plan import preset_dir
from ablations.studies import PRESETS, Preset, get_preset


def resolve_preset(name: str) -> Preset:
    """The preset ``name``, or :class:`UsageError` listing the valid ones."""
    try:
        return get_preset(name)
    except KeyError:
        raise UsageError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None


def check_readable_dir(path: Path, what: str) -> None:
    """An existing ``path`` must be a listable directory (else :class:`UsageError`)."""
    if path.exists() and (not path.is_dir() or not os.access(path, os.R_OK | os.X_OK)):
        raise UsageError(f"{what} {str(path)!r} is not a readable directory")


def pick_preset(results: Path, name: str | None) -> Preset:
    """``--preset``, or the only preset with a folder under ``results``."""
    if name is not None:
        return resolve_preset(name)
    found = sorted(p.name for p in results.iterdir() if p.is_dir() and p.name in PRESETS)
    if len(found) == 1:
        return resolve_preset(found[0])
    if not found:
        raise UsageError(f"no preset results under {str(results)!r}; run python -m ablations.run first "
                         f"or pass --preset")
    raise UsageError(f"results for several presets under {str(results)!r} ({', '.join(found)}); pass --preset")


def open_results(results: Path, preset_name: str | None) -> tuple[Preset, Path]:
    """The preset and its folder ``RESULTS/<preset>`` of an existing, readable results folder."""
    if not results.exists():
        raise UsageError(f"results folder {str(results)!r} does not exist; run python -m ablations.run first")
    check_readable_dir(results, "results folder")
    preset = pick_preset(results, preset_name)
    root = preset_dir(results, preset)
    check_readable_dir(root, "results folder")
    return preset, root
