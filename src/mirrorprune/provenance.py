"""What produced a results file: package, git commit, torch, Python, command line, time."""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


def git_commit() -> str | None:
    """The commit of the source checkout, '+dirty' if the package source or pyproject.toml has
    uncommitted changes (result files do not count), or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ":/src", ":/pyproject.toml"],
                               cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def cpu_features() -> str:
    """The CPU's vector level as torch sees it and its bf16 units (Linux flags): what bf16
    autocast's speed depends on — 2.4x fp32's on one host, no faster on one without AMX
    (benchmarks/results/train_speed*)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    units = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return (f"{torch.backends.cpu.get_cpu_capability()}, bf16 units: "
            f"{', '.join(units) if units else 'none found'}")


def provenance() -> dict:
    from . import __version__

    return {
        "mirrorprune": __version__,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(["mirrorprune", *sys.argv[1:]]) if sys.argv else None,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
