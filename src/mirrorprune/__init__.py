"""mirrorprune: PILoT implicit sparsification (Jacobs & Burkholz, ICLR 2025) for PyTorch."""

from . import schedules, theory
from .pilot import PILoT
from .prune import (
    SparsityReport,
    finalize,
    is_wrapped,
    magnitude_masks,
    prune,
    sparsity_report,
)
from .reparam import DEFAULT_TYPES, mirror_init

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TYPES",
    "PILoT",
    "SparsityReport",
    "finalize",
    "is_wrapped",
    "magnitude_masks",
    "mirror_init",
    "prune",
    "schedules",
    "sparsity_report",
    "theory",
]
