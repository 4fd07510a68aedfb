"""Schedules of the PILoT strength α_k (SPEC §2.5).

A schedule is a callable `k -> α_k` with `state_dict()` / `load_state_dict()`. The step index k
counts from 0: k = 0 is the first `PILoT.step()`. Harmonic and quadratic therefore use k + 1, so the
first step gets α0 (the paper's α0/k with k counted from 1). By default k counts optimizer steps;
wrap a schedule in `Every(schedule, steps_per_epoch)` to count it in epochs.

Convergence of PILoT needs A_∞ = Σ η α_k < ∞ (the regularization is eventually turned off):
Quadratic and Geometric satisfy this on their own; Constant and Harmonic do not, so combine them
with `OffAfter` for training runs meant to converge.
"""

from __future__ import annotations

import math
from typing import Any


def check_alpha(value: float, what: str = "alpha") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0 (0 turns PILoT's regularization off), got {value}")
    return float(value)


def _check_step(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"step index k must be an int >= 0, got {k!r}")
    return k


class Schedule:
    """Base class: subclasses implement `alpha(k)`; their constructor arguments are their state."""

    def alpha(self, k: int) -> float:
        raise NotImplementedError

    def __call__(self, k: int) -> float:
        return self.alpha(_check_step(k))

    def config(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, **self.config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Stateless schedules only check that the checkpoint was made with the same schedule.
        if state != self.state_dict():
            raise ValueError(
                f"schedule state {state} does not match this schedule {self.state_dict()}; "
                "resume with the schedule the run was started with"
            )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """α_k = alpha."""

    def __init__(self, alpha: float):
        self.alpha0 = check_alpha(alpha)

    def alpha(self, k: int) -> float:
        return self.alpha0

    def config(self) -> dict[str, Any]:
        return {"alpha": self.alpha0}


class Harmonic(Schedule):
    """α_k = alpha0 / (k + 1)."""

    def __init__(self, alpha0: float):
        self.alpha0 = check_alpha(alpha0, "alpha0")

    def alpha(self, k: int) -> float:
        return self.alpha0 / (k + 1)

    def config(self) -> dict[str, Any]:
        return {"alpha0": self.alpha0}


class Quadratic(Schedule):
    """α_k = alpha0 / (k + 1)²."""

    def __init__(self, alpha0: float):
        self.alpha0 = check_alpha(alpha0, "alpha0")

    def alpha(self, k: int) -> float:
        return self.alpha0 / (k + 1) ** 2

    def config(self) -> dict[str, Any]:
        return {"alpha0": self.alpha0}


class Geometric(Schedule):
    """α_k = alpha0 · p^k, 0 < p < 1 (paper: p = 0.95, counted in epochs)."""

    def __init__(self, alpha0: float, p: float = 0.95):
        self.alpha0 = check_alpha(alpha0, "alpha0")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
            raise ValueError(f"p must be in (0, 1) (paper: 0.95), got {p!r}")
        self.p = float(p)

    def alpha(self, k: int) -> float:
        return self.alpha0 * self.p**k

    def config(self) -> dict[str, Any]:
        return {"alpha0": self.alpha0, "p": self.p}


def _check_count(value: int, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


class OffAfter(Schedule):
    """`schedule` for k < step, then 0: turns any schedule off after `step` steps."""

    def __init__(self, schedule: Schedule, step: int):
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a mirrorprune Schedule, got {schedule!r}")
        self.inner = schedule
        self.step = _check_count(step, "step", 0)

    def alpha(self, k: int) -> float:
        return self.inner(k) if k < self.step else 0.0

    def config(self) -> dict[str, Any]:
        return {"schedule": self.inner.state_dict(), "step": self.step}


class Every(Schedule):
    """Advances `schedule` once every `n` steps: α_k = schedule(k // n).

    With n = steps per epoch, k counts epochs (as in the paper's geometric schedule).
    """

    def __init__(self, schedule: Schedule, n: int):
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a mirrorprune Schedule, got {schedule!r}")
        self.inner = schedule
        self.n = _check_count(n, "n", 1)

    def alpha(self, k: int) -> float:
        return self.inner(k // self.n)

    def config(self) -> dict[str, Any]:
        return {"schedule": self.inner.state_dict(), "n": self.n}


def as_schedule(schedule: Schedule | float | int) -> Schedule:
    """A Schedule from a Schedule or a number (a constant α)."""
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, (int, float)) and not isinstance(schedule, bool):
        return Constant(schedule)
    raise ValueError(
        "schedule must be a mirrorprune.schedules.Schedule (e.g. Geometric(alpha0=1e-3, p=0.95)) "
        f"or a number for a constant alpha, got {schedule!r}"
    )
