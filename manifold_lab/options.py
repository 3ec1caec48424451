"""Configuration fields that describe themselves: the single source of a default, its help text,
its choices and its command-line flag.

A config dataclass declares each field with :func:`option`; :func:`check_fields` validates the
choices, and :func:`add_arguments` turns the fields into argparse options (grouped, with the
default shown once, from the field). Pure Python: cost models and report rendering import it without
JAX.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, flag: str | None = None,
           group: str = "model", kind: Callable[[str], Any] | None = None, metavar: str | None = None,
           default_text: str | None = None) -> Any:
    """A dataclass field with its command-line description.

    ``flag``: the option (default ``--`` + the field name with dashes); ``group``: the help section;
    ``kind``: the argparse type (default: from the default's type); ``default_text``: how the help
    states the default when it is not a plain value (e.g. ``None`` meaning "by dataset")."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "flag": flag, "group": group, "kind": kind,
        "metavar": metavar, "default_text": default_text})


def check_fields(instance: Any, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` for a field whose value is not among its declared choices (``None`` is
    accepted where it is the field's default)."""
    for field in dataclasses.fields(instance):
        choices = field.metadata.get("choices")
        value = getattr(instance, field.name)
        if choices is None or (value is None and field.default is None):
            continue
        if value not in choices:
            raise error(f"{field.name} must be one of {', '.join(choices)}; got {value!r}")


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
