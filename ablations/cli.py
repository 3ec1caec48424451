"""Command-line plumbing shared by the ablation commands (sweep, measure, figures): the preset
options (``--preset``, ``--preset-file``, ``--set``), presets by name, user files and overrides, and
results folders, each failing with a one-line :class:`UsageError` (exit code 2)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from manifold_lab.cli import UsageError
from ablations.plan import preset_dir
from ablations.studies import PRESETS, Preset, apply_overrides, get_preset, load_preset_file, parse_value


def resolve_preset(name: str) -> Preset:
    """The preset ``name``, or :class:`UsageError` listing the valid ones."""
    try:
        return get_preset(name)
    except KeyError:
        raise UsageError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None


def override_arg(text: str) -> tuple[str, Any]:
    """argparse type of ``--set``: ``KEY=VALUE``, the value parsed as JSON, else kept as text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), parse_value(value)


def add_preset_arguments(parser: argparse.ArgumentParser, default: str | None) -> None:
    """The ``preset`` group: ``--preset``, ``--preset-file`` and ``--set``, the same in every
    command that reads a sweep (``default``: the preset name when none is given; None means "the
    only one present in the results folder")."""
    group = parser.add_argument_group("preset")
    default_text = "the only one present in --results" if default is None else default
    group.add_argument("--preset", default=default,
                       help=f"one of {', '.join(PRESETS)} (default: {default_text})")
    group.add_argument("--preset-file", default=None, metavar="FILE",
                       help="a user preset instead of --preset: a .py file defining PRESET, get_preset() "
                            "or one function returning an ablations.studies.Preset (or a .json preset)")
    group.add_argument("--set", dest="overrides", type=override_arg, action="append", default=[],
                       metavar="KEY=VALUE",
                       help="override a preset field (seeds=3, widths=[0.35,1.0]) or a training field of "
                            "its runs (epochs=3, lr=0.05); repeatable; values are JSON, else text; give "
                            "the sweep's --set to measure and figures too, so they find its runs")


def sweep_preset(preset: str | Preset, overrides: Mapping[str, Any] | Sequence[str] | None = None,
                 preset_file: str | os.PathLike[str] | None = None) -> Preset:
    """The preset of a sweep: ``preset_file`` if given (:func:`ablations.studies.load_preset_file`),
    else ``preset`` (a name or a :class:`Preset`), with ``overrides`` applied
    (:func:`ablations.studies.apply_overrides`; a mapping, or ``KEY=VALUE`` strings as ``--set``)."""
    base = load_preset_file(preset_file) if preset_file is not None else (
        preset if isinstance(preset, Preset) else resolve_preset(preset))
    if not overrides:
        return base
    if not isinstance(overrides, Mapping):
        pairs = []
        for text in overrides:
            try:
                pairs.append(override_arg(text))
            except argparse.ArgumentTypeError as exc:
                raise UsageError(f"--set: {exc}") from None
        overrides = dict(pairs)
    return apply_overrides(base, overrides)


def preset_from_args(args: argparse.Namespace, results: Path | None = None) -> Preset:
    """The preset that :func:`add_preset_arguments`' options name; with no ``--preset`` (and no
    ``--preset-file``), the only preset with a folder under ``results``."""
    if args.preset_file is None and args.preset is None:
        if results is None:
            raise UsageError("no preset given: pass --preset or --preset-file")
        return sweep_preset(pick_preset(results, None), dict(args.overrides))
    return sweep_preset(args.preset, dict(args.overrides), args.preset_file)


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
        raise UsageError(f"no preset results under {str(results)!r}; run the sweep first "
                         f"(manifold-lab sweep) or pass --preset")
    raise UsageError(f"results for several presets under {str(results)!r} ({', '.join(found)}); pass --preset")


def check_results(results: Path) -> None:
    """``results`` must be an existing, readable folder."""
    if not results.exists():
        raise UsageError(f"results folder {str(results)!r} does not exist; run the sweep first "
                         f"(manifold-lab sweep)")
    check_readable_dir(results, "results folder")


def open_results(results: Path, preset: str | Preset | None) -> tuple[Preset, Path]:
    """The preset (given, by name, or the only one present) and its folder ``RESULTS/<preset>`` of
    an existing, readable results folder."""
    check_results(results)
    chosen = preset if isinstance(preset, Preset) else pick_preset(results, preset)
    root = preset_dir(results, chosen)
    check_readable_dir(root, "results folder")
    return chosen, root
