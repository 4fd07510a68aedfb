"""glibc's allocator against large tensors on CPU.

By default glibc serves every allocation above a (dynamic) threshold with its own mmap and
gives freed memory back to the system, so a training step or inference call that allocates
activations of a few MB each page-faults them in again every time: the kernel's time then
shows as 35-55% system CPU in `vmstat` during CPU training here, and one ResNet-20 bf16 step
(batch 128, 1 thread) takes 1.25x as long as with the thresholds raised (issue 16). Raising
the mmap and trim thresholds keeps those blocks in the heap for reuse. The mirrorprune
command and its worker processes do it at start; `MIRRORPRUNE_MALLOC=default` leaves glibc
as it is. A library call never changes it on its own: call `keep_large_blocks()` in your
program if you want the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit systems
TRIM_THRESHOLD = 512 * 1024 * 1024


def keep_large_blocks() -> bool:
    """Raise glibc's mmap threshold (32 MiB) and trim threshold (512 MiB) for this process;
    True if done (False off glibc, or with MIRRORPRUNE_MALLOC=default)."""
    if os.environ.get("MIRRORPRUNE_MALLOC") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
