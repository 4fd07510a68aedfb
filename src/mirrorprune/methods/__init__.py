"""Sparsification methods behind one interface (`Method`), all trained by `mirrorprune.train`.

Importing this package registers every method (`METHODS`, in this order: dense, l1, l1_m, spred,
pilot, cs, powerprop, str, gmp); `create_method(name, **hparams)` builds one."""

from __future__ import annotations

from .base import L1, METHODS, Method, create_method, methods_table, register_method
from .mirror import (REFERENCE_EPOCH_LR, DecayedMirror, L1OnM, MirrorMethod, PilotAdamW,
                     PilotMethod, PilotOptimizer, Spred)
from .param import STR, ContinuousSparsification, Powerprop
from .gmp import GMP

__all__ = ["METHODS", "REFERENCE_EPOCH_LR", "GMP", "L1", "STR", "ContinuousSparsification",
           "DecayedMirror", "L1OnM", "Method", "MirrorMethod", "PilotAdamW", "PilotMethod",
           "PilotOptimizer", "Powerprop",
           "Spred", "create_method", "methods_table", "register_method"]
