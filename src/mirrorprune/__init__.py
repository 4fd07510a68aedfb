"""mirrorprune: PILoT implicit sparsification (Jacobs & Burkholz, ICLR 2025) for PyTorch."""

from . import optim, schedules, theory
from .fast import export_dense_fast
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
from .sparse import SparseLinear, export_sparse, load_sparse, save_sparse

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TYPES",
    "PILoT",
    "SparseLinear",
    "SparsityReport",
    "export_dense_fast",
    "export_sparse",
    "finalize",
    "is_wrapped",
    "load_sparse",
    "magnitude_masks",
    "mirror_init",
    "optim",
    "prune",
    "save_sparse",
    "schedules",
    "sparsity_report",
    "theory",
]
