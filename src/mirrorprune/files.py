"""Atomic file writes: readers, and runs killed mid-write, see the old file or the new one, never
half of one (write to NAME.tmp beside it, then rename over it)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, default=str))


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


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda p: torch.save(obj, p))


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> None:
    """Save a matplotlib figure (format from the final suffix)."""
    atomic_write(path, lambda p: fig.savefig(p, dpi=dpi, format=Path(path).suffix[1:]))
