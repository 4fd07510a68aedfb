"""What every experiment does before it trains: check everything it was asked for without
loading data or writing a file (so a mistake costs nothing and overwrites nothing), and merge
its results with those of earlier invocations in the same output folder."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..data import SHAPES, locate
from ..errors import UsageError
from ..files import read_rows
from ..methods import METHODS, Method, create_method
from ..models import create_model
from ..reparam import select_modules


def check_out(out: Path) -> None:
    """UsageError unless `out` is, or can be created as, a folder we can write to (checked by
    creating and removing an unnamed file in the nearest existing folder: nothing is left)."""
    p = out
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise UsageError(f"--out {out} cannot be created: {p} is a file, not a folder; choose "
                         "another output folder")
    try:
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise UsageError(f"--out {out} cannot be written ({p}: {e.strerror or e}); choose a "
                         "folder you can write to") from None


def check_options(methods: tuple[str, ...], hparams: dict[str, dict[str, Any]], seeds: int,
                  epochs: int | None) -> None:
    """The options every training experiment shares: known methods named once, hyperparameters
    only for those, at least one seed and epoch."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UsageError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    dup = sorted({m for m in methods if methods.count(m) > 1})
    if dup:
        raise UsageError(f"--methods names {', '.join(dup)} more than once; give each method "
                         "once (use --seeds for repeated runs)")
    bad_hp = [m for m in hparams if m not in methods]
    if bad_hp:
        raise UsageError(f"hyperparameters given for method(s) {bad_hp} that are not run")
    if seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {seeds}")
    if epochs is not None and epochs < 1:
        raise UsageError(f"--epochs must be >= 1 (or left out for the preset's), got {epochs}")


def check_methods(methods: dict[str, Method], dataset: str, model: str, lr: float,
                  lr_scale_mw: float, data_dir: str | None) -> None:
    """Every method's selection (include/exclude) on the model, and its hyperparameters against
    the largest learning rate it will get; the dataset's files are located, not read."""
    locate(dataset, data_dir)  # raises DataNotFoundError, saying where it looked
    for method in methods.values():
        select_modules(create_model(model, 10, SHAPES[dataset]), method.include,
                       method.exclude)
        method.check_lr(lr * (lr_scale_mw if method.uses_mw else 1.0))


def make_methods(names: Iterable[str], hparams: dict[str, dict[str, Any]],
                 exclude: tuple[str, ...] = ()) -> dict[str, Method]:
    """Each named method with its hyperparameters (checked now: UsageError)."""
    return {m: create_method(m, exclude=exclude, **hparams.get(m, {})) for m in names}


def previous_config(out: Path, results: str, shared: dict[str, Any], what: str
                    ) -> dict[str, Any] | None:
    """The config.json of an earlier invocation into `out` (None if there was none), with
    "methods": {name: {"seeds", "hparams", ...}}. Its shared settings (under `what`) must equal
    `shared`: results of other settings are never mixed into one table (UsageError listing the
    differences)."""
    path = out / "config.json"
    if not path.exists():
        if (out / results).exists():
            raise UsageError(f"{out / results} exists without its config.json, so it cannot be "
                             "extended safely; use another output folder")
        return None
    try:
        prev = json.loads(path.read_text())
        saved = prev[what]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{path} is unreadable; use another output folder") from None
    now = json.loads(json.dumps(shared, default=str))
    diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if diff:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise UsageError(f"{out} holds results made with other settings ({shown}); add methods "
                         "with the same settings, or use another output folder")
    if "methods" not in prev:  # written by release 0.1.0: one invocation's methods
        prev["methods"] = {m: {"seeds": saved.get("seeds"),
                               "hparams": saved.get("hparams", {}).get(m, {}),
                               **({"sparsities": saved["sparsities"]}
                                  if "sparsities" in saved else {})}
                           for m in saved.get("methods", ())}
    return prev


def merge_rows(out: Path, results: str, rows: list[dict], key: str, rerun: Iterable[str]
               ) -> list[dict]:
    """The rows of an earlier invocation's `results` CSV whose `key` is not among `rerun`,
    followed by `rows`: re-running some methods replaces their rows and keeps the others'."""
    path = out / results
    rerun = set(rerun)
    old = read_rows(path) if path.exists() else []
    return [r for r in old if r.get(key) not in rerun] + rows


def ordered(rows: list[dict], key: str) -> tuple[str, ...]:
    """The values of `key` in order of first appearance."""
    return tuple(dict.fromkeys(r[key] for r in rows))
