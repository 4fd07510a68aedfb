"""Sparsification methods behind one interface (`Method`), all trained by `mirrorprune.train`."""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from ..reparam import Selector
from .base import L1, Method
from .gmp import GMP
from .mirror import L1OnM, Pilot, Spred
from .param import STR, ContinuousSparsification, Powerprop

METHODS: dict[str, type[Method]] = {m.name: m for m in (
    Method, L1, L1OnM, Spred, Pilot, ContinuousSparsification, Powerprop, STR, GMP)}


def create_method(name: str, include: Selector = None, exclude: Selector = (),
                  **hparams: Any) -> Method:
    """A method by name (see METHODS) with its hyperparameters."""
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name](include=include, exclude=exclude, **hparams)


__all__ = ["METHODS", "GMP", "L1", "STR", "ContinuousSparsification", "L1OnM", "Method", "Pilot",
           "Powerprop", "Spred", "create_method"]
