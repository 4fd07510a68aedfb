"""Typed, validated, printable options (as torchao's configs): a dataclass whose fields are
declared with `option(default, help, ...)`. The same declaration

- checks values given in code or on the command line (`parse`: unknown names list the valid
  ones; a bad value names the expected type and range),
- describes itself (`describe`: "alpha (float >= 0, default 0.001): what it does"),
- and generates command-line options (`add_arguments` / `from_args`), so defaults and help are
  written once.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import numbers
import typing
from typing import Any

from .errors import UsageError, check_number


def option(default: Any, help: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False,
           choices: tuple[str, ...] | None = None, cli: bool = True,
           required: bool = False, repeat: bool = False) -> Any:
    """A dataclass field: its default, one line of help, the allowed values and, for the
    command line, whether it is an option at all (`cli`), `required`, or given once per value
    (`repeat`, e.g. --exclude a --exclude b; otherwise tuples are comma-separated)."""
    md = {"help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
          "choices": choices, "cli": cli, "required": required, "repeat": repeat}
    if getattr(default, "__hash__", None) is None:  # mutable: a fresh copy per instance
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=md)
    return dataclasses.field(default=default, metadata=md)


def _kind(cls: type, f: dataclasses.Field) -> tuple[Any, bool]:
    """(the field's type without None, whether None is allowed)."""
    hint = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def _range(md: dict) -> str:
    lo, hi = md.get("low"), md.get("high")
    if lo is not None and hi is not None:
        return (f" in {'(' if md['low_open'] else '['}{lo:g}, "
                f"{hi:g}{')' if md['high_open'] else ']'}")
    if lo is not None:
        return f" {'>' if md['low_open'] else '>='} {lo:g}"
    if hi is not None:
        return f" {'<' if md['high_open'] else '<='} {hi:g}"
    return ""


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def with_defaults(recorded: dict[str, Any], cls: type) -> dict[str, Any]:
    """A configuration as recorded in JSON, with each field of the dataclass `cls` that it
    lacks at its default (as JSON): a setting added after the record was written, at its
    default, changes nothing."""
    out = dict(recorded)
    for f in dataclasses.fields(cls):
        if f.name not in out and (f.default is not dataclasses.MISSING
                                  or f.default_factory is not dataclasses.MISSING):
            out[f.name] = json.loads(json.dumps(default_of(f), default=str))
    return out


def kind_text(cls: type, f: dataclasses.Field) -> str:
    """The field's type and allowed values, e.g. 'float >= 0' or 'geometric | constant'."""
    kind, optional = _kind(cls, f)
    md = f.metadata
    what = " | ".join(md["choices"]) if md.get("choices") else (
        getattr(kind, "__name__", str(kind)) + _range(md))
    return what + (" or None" if optional else "")


def describe(cls: type, f: dataclasses.Field) -> str:
    """'alpha (float >= 0, default 0.001): what it does' for one field."""
    return f"{f.name} ({kind_text(cls, f)}, default {default_of(f)!r}): {f.metadata.get('help')}"


def check_value(cls: type, f: dataclasses.Field, value: Any, what: str) -> Any:
    """`value` checked against the field's type and range, converted (int -> float, numpy
    scalars -> Python numbers); UsageError naming `what`, the type and the range otherwise."""
    kind, optional = _kind(cls, f)
    md = f.metadata
    if value is None and optional:
        return None
    if kind is float:
        return check_number(value, what, md.get("low"), md.get("high"), md.get("low_open", False),
                            md.get("high_open", False))
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise UsageError(f"{what} must be an integer{_range(md)}, got {value!r}")
        return int(check_number(value, what, md.get("low"), md.get("high")))
    if kind is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{what} must be True or False, got {value!r}")
        return value
    if kind is str:
        choices = md.get("choices")
        if not isinstance(value, str) or (choices and value not in choices):
            raise UsageError(f"{what} must be one of {', '.join(choices or ('a string',))}, "
                             f"got {value!r}")
        return value
    return value  # containers: checked by the owner's check()


def parse(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """An instance of the dataclass `cls` from `values` (unset fields keep their defaults),
    every value checked; then `cls.check()` if it has one. Names in messages are
    `prefix.name` (e.g. pilot.alpha)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        valid = "; ".join(describe(cls, f) for f in fields.values()) or "none"
        raise UsageError(f"unknown hyperparameter(s) {unknown} for method {prefix!r}; "
                         f"valid: {valid}")
    out = cls(**{k: check_value(cls, fields[k], v, f"{prefix}.{k}") for k, v in values.items()})
    if hasattr(out, "check"):
        out.check()
    return out


# ------------------------------------------------------------------------ the command line


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One command-line option per field of `cls` whose metadata says cli=True, with its
    default, help and choices from the declaration."""
    for f in dataclasses.fields(cls):
        md = f.metadata
        if not md.get("cli", False):
            continue
        kind, optional = _kind(cls, f)
        default = default_of(f)
        text = md["help"].replace("%", "%%")  # argparse formats help with %
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else repr(default)
        kw: dict[str, Any] = {"help": f"{text} (default {shown})"}
        if md.get("required"):
            kw = {"help": text, "required": True}
        elif kind is bool:
            kw["action"] = "store_true"
        elif typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            if md.get("repeat"):
                kw.update(action="append", type=item, metavar=f.name.upper())
            else:
                kw.update(type=str, metavar=",".join([f.name.upper()] * 2) + ",...")
        else:
            kw["type"] = kind
            if md.get("choices"):
                kw["choices"] = md["choices"]
        parser.add_argument(_flag(f.name), dest=f.name, **kw)


def from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """The dataclass `cls` from parsed command-line options (added by `add_arguments`): options
    left out keep the field defaults; comma-separated tuples are split and converted."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", False):
            continue
        v = getattr(args, f.name, None)
        kind, _ = _kind(cls, f)
        if v is None or (kind is bool and v is False):
            continue
        if typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            parts = v if isinstance(v, list) else [p for p in v.split(",") if p.strip()]
            try:
                v = tuple(item(p) for p in parts)
            except ValueError:
                raise UsageError(f"{_flag(f.name)} expects comma-separated "
                                 f"{'numbers like 0.8,0.9' if item is float else 'integers'}, "
                                 f"got {v!r}") from None
        values[f.name] = v
    return cls(**values, **extra)
