"""Configuration fields that describe themselves: the single source of a default, its help text,
its choices and its command-line flag.

A config dataclass declares each field with :func:`option`; :func:`check_fields` validates the
choices and the bounds of numbers (:class:`~manifold_lab.cli.Bounds`), and :func:`add_arguments`
turns the fields into argparse options (grouped, with the default shown once, from the field; a
bounded number is checked by its flag too, before any work). Pure Python: cost models and report rendering import it without
JAX.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from manifold_lab.cli import Bounds


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, flag: str | None = None,
           group: str = "model", kind: Callable[[str], Any] | None = None, metavar: str | None = None,
           default_text: str | None = None, bounds: Bounds | None = None) -> Any:
    """A dataclass field with its command-line description.

    ``flag``: the option (default ``--`` + the field name with dashes); ``group``: the help section;
    ``kind``: the argparse type (default: the ``bounds``, else from the default's type);
    ``default_text``: how the help states the default when it is not a plain value (e.g. ``None``
    meaning "by dataset"); ``bounds``: the interval a numeric value must lie in."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "flag": flag, "group": group, "kind": kind or bounds,
        "metavar": metavar, "default_text": default_text, "bounds": bounds})


def check_fields(instance: Any, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` for a field whose value is not among its declared choices or outside its
    declared bounds (``None`` is accepted where it is the field's default)."""
    for field in dataclasses.fields(instance):
        choices, bounds = field.metadata.get("choices"), field.metadata.get("bounds")
        value = getattr(instance, field.name)
        if value is None and field.default is None:
            continue
        if choices is not None and value not in choices:
            raise error(f"{field.name} must be one of {', '.join(choices)}; got {value!r}")
        problem = None if bounds is None else bounds.problem(value)
        if problem is not None:
            raise error(f"{field.name} {problem}")


def field_bounds(cls: type, name: str) -> Bounds:
    """The bounds declared on field ``name`` of the dataclass ``cls`` (for another command's flag
    of the same quantity)."""
    return cls.__dataclass_fields__[name].metadata["bounds"]


def flag_of(field: dataclasses.Field) -> str:
    """The command-line flag of a field."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def help_text(field: dataclasses.Field) -> str:
    """The field's help with its default, stated once, from the field."""
    text = field.metadata["help"]
    default = field.metadata.get("default_text")
    if default is None:
        default = "on" if field.default is True else field.default
    return f"{text} (default: {default})"


def add_arguments(groups: dict[str, Any], fields: Iterable[dataclasses.Field], *,
                  dest: Callable[[dataclasses.Field], str] = lambda f: f.name,
                  number: Callable[[str], Any] = float, integer: Callable[[str], Any] = int) -> dict[str, Any]:
    """Add one option per field to the argparse group named by its metadata; returns the actions by
    field name. A boolean field that defaults to True becomes ``--no-<name>`` (``store_false``)."""
    actions = {}
    for field in fields:
        if "help" not in field.metadata:
            continue
        group = groups[field.metadata["group"]]
        kwargs: dict[str, Any] = {"dest": dest(field), "help": help_text(field)}
        if field.metadata.get("metavar"):
            kwargs["metavar"] = field.metadata["metavar"]
        if isinstance(field.default, bool):
            kwargs["action"] = "store_false" if field.default else "store_true"
            kwargs["help"] = field.metadata["help"]
        elif field.metadata.get("choices"):
            kwargs["choices"] = field.metadata["choices"]
        else:
            kwargs["type"] = field.metadata.get("kind") or (integer if isinstance(field.default, int)
                                                           else number)
        actions[field.name] = group.add_argument(flag_of(field), **kwargs)
    return actions


def argument_groups(parser: argparse.ArgumentParser, titles: dict[str, str]) -> dict[str, Any]:
    """One argparse argument group per ``name: title``."""
    return {name: parser.add_argument_group(title) for name, title in titles.items()}
