"""Reading and writing the project's files safely.

Writes are atomic: readers, and runs killed mid-write, see the old file or the new one, never
half of one (write to NAME.<pid>.tmp beside it, then rename over it; a failed write removes
it). The process id keeps two processes writing the same file (e.g. two runs building one data
cache) out of each other's temporary file.
Reads of torch files use `weights_only=True`: tensors and plain containers (dict, list, tuple,
str, int, float, bool, None) only, so a crafted file cannot run code."""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, default=str))


def write_results_json(path: str | os.PathLike, obj: dict) -> None:
    """write_json, except that a file which differs only in its "provenance" stays as it is:
    resuming a finished experiment keeps the record of the invocation that computed it (and
    committed results do not churn)."""
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        old = None
    new = json.loads(json.dumps(obj, default=str))
    if not (isinstance(old, dict) and {k: v for k, v in old.items() if k != "provenance"}
            == {k: v for k, v in new.items() if k != "provenance"}):
        write_json(path, obj)


def write_rows(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """A CSV with one column per key seen in `rows` (first-seen order)."""
    rows = list(rows)
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def write(p: Path) -> None:
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    atomic_write(path, write)


def _cell(text: str) -> Any:
    """A CSV cell as write_rows wrote it: '' is None, then int, float (repr round-trips
    exactly), or the string."""
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a CSV written by `write_rows`, with numbers parsed back exactly."""
    with open(path, newline="") as f:
        return [{k: _cell(v) for k, v in r.items()} for r in csv.DictReader(f)]


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda p: torch.save(obj, p))


def load_torch(path: str | os.PathLike, what: str, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`, with every failure turned into one sentence that
    names `what` the file should have been and what to do (never torch's advice to lift the
    weights-only restriction)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        asked = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if asked is None:  # not a torch file at all (random bytes, a plain pickle, ...)
            raise UsageError(f"{path} is not a readable {what} (not a torch file of tensors "
                             "and plain containers); move it away or replace it") from None
        raise UsageError(
            f"{path} is not a {what}: it asks to build {asked.group(1)}, a Python object "
            "mirrorprune never writes and refuses to load because such objects can run code; "
            "move the file away (and do not load it without the weights-only restriction)"
            ) from None
    except Exception as e:  # noqa: BLE001 - truncated, empty, random: all reported alike
        raise UsageError(f"{path} is not a readable {what} ({type(e).__name__}: empty, "
                         "truncated or another kind of file); move it away or replace it"
                         ) from None


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> None:
    """Save a matplotlib figure (format from the final suffix)."""
    atomic_write(path, lambda p: fig.savefig(p, dpi=dpi, format=Path(path).suffix[1:]))
