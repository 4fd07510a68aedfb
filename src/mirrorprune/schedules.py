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

import inspect
import numbers
from typing import Any

from .errors import UsageError, check_number


def check_alpha(value: float, what: str = "alpha") -> float:
    """A finite α >= 0 (0 turns PILoT's regularization off) as a float, else a UsageError."""
    return check_number(value, what, low=0)


def _check_step(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise UsageError(f"step index k must be an int >= 0, got {k!r}")
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
            raise UsageError(
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


class _FromAlpha0(Schedule):
    """A schedule defined by alpha0 alone (its `alpha(k)` says how it decays)."""

    def __init__(self, alpha0: float):
        self.alpha0 = check_alpha(alpha0, "alpha0")

    def config(self) -> dict[str, Any]:
        return {"alpha0": self.alpha0}


class Harmonic(_FromAlpha0):
    """α_k = alpha0 / (k + 1)."""

    def alpha(self, k: int) -> float:
        return self.alpha0 / (k + 1)


class Quadratic(_FromAlpha0):
    """α_k = alpha0 / (k + 1)²."""

    def alpha(self, k: int) -> float:
        return self.alpha0 / (k + 1) ** 2


class Geometric(Schedule):
    """α_k = alpha0 · p^k, 0 < p < 1 (paper: p = 0.95, counted in epochs)."""

    def __init__(self, alpha0: float, p: float = 0.95):
        self.alpha0 = check_alpha(alpha0, "alpha0")
        self.p = check_number(p, "p (paper: 0.95)", low=0, high=1, low_open=True, high_open=True)

    def alpha(self, k: int) -> float:
        return self.alpha0 * self.p**k

    def config(self) -> dict[str, Any]:
        return {"alpha0": self.alpha0, "p": self.p}


def _check_count(value: int, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


def _check_schedule(schedule: Schedule) -> Schedule:
    if not isinstance(schedule, Schedule):
        raise UsageError(f"schedule must be a mirrorprune Schedule, got {schedule!r}")
    return schedule


class OffAfter(Schedule):
    """`schedule` for k < step, then 0: turns any schedule off after `step` steps."""

    def __init__(self, schedule: Schedule, step: int):
        self.inner = _check_schedule(schedule)
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
        self.inner = _check_schedule(schedule)
        self.n = _check_count(n, "n", 1)

    def alpha(self, k: int) -> float:
        return self.inner(k // self.n)

    def config(self) -> dict[str, Any]:
        return {"schedule": self.inner.state_dict(), "n": self.n}


def as_schedule(schedule: Schedule | float | int) -> Schedule:
    """A Schedule from a Schedule or a number (a constant α)."""
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, numbers.Real) and not isinstance(schedule, bool):
        return Constant(schedule)
    raise UsageError(
        "schedule must be a mirrorprune.schedules.Schedule (e.g. Geometric(alpha0=1e-3, p=0.95)) "
        f"or a number for a constant alpha, got {schedule!r}"
    )


class TargetController(Schedule):
    """α driven towards a target sparsity (SPEC §2.5; our reading of the ICLR paper's Algorithm 1,
    whose comparison signs are not all recoverable), updated once per epoch by `observe` from the
    training accuracy and `mass_at_target`, the fraction of ‖x‖₁ that pruning to the target would
    remove now:

    - target in reach (mass_at_target ≤ `mass_tol`), or second half of training
      (epoch ≥ epochs / 2): α ← α / delta, so α is turned off geometrically (A_∞ < ∞);
    - otherwise α ← α · delta while the training accuracy stays within `acc_tol` of its best so
      far, and α is held when it does not.

    Sparsification lags α by epochs, so the rise must stop well before the model is sparse:
    mass_tol = 0.4 stops it once pruning to the target would remove 40% of ‖x‖₁, and the decay
    that follows brings that to a few percent. Holding rather than lowering α on an accuracy dip
    (the paper lowers it) keeps the target in control: with a lowering rule the accuracy guard
    ended the rise first and every target got the same run. The defaults (delta 1.5, acc_tol
    0.01, mass_tol 0.4) were chosen on a validation split (benchmarks/calibrate_targets.py,
    benchmarks/results/calibrate_targets/pilot.csv). α stays in [0, alpha_max]; `alpha(k)`
    returns the current α for every step k of the epoch.
    """

    def __init__(self, alpha_init: float, target_sparsity: float, epochs: int,
                 delta: float = 1.5, acc_tol: float = 0.01, mass_tol: float = 0.4,
                 alpha_max: float = 0.1):
        self.alpha_init = check_alpha(alpha_init, "alpha_init")
        if not 0 < target_sparsity < 1:
            raise UsageError(f"target_sparsity must be in (0, 1), got {target_sparsity!r}")
        if not delta > 1:
            raise UsageError(f"delta must be > 1, got {delta!r}")
        self.target, self.epochs = float(target_sparsity), _check_count(epochs, "epochs", 1)
        self.delta, self.acc_tol, self.mass_tol = float(delta), float(acc_tol), float(mass_tol)
        self.alpha_max = check_alpha(alpha_max, "alpha_max")
        self.current, self.best_acc, self.seen = self.alpha_init, -1.0, 0
        self.history: list[dict[str, float]] = []

    def alpha(self, k: int) -> float:
        return self.current

    def observe(self, epoch: int, train_acc: float, mass_at_target: float) -> float:
        """Update α after `epoch` (0-based) from its training accuracy and the fraction of ‖x‖₁
        that pruning to the target would remove; returns the new α."""
        self.best_acc = max(self.best_acc, train_acc)
        holds = train_acc >= self.best_acc - self.acc_tol
        if mass_at_target <= self.mass_tol or epoch + 1 >= self.epochs / 2:
            self.current /= self.delta
        elif holds:
            self.current = min(self.alpha_max, self.current * self.delta)
        self.seen = epoch + 1
        self.history.append({"epoch": epoch + 1, "train_acc": train_acc,
                             "mass_at_target": mass_at_target, "alpha": self.current})
        return self.current

    def config(self) -> dict[str, Any]:
        return {"alpha_init": self.alpha_init, "target_sparsity": self.target,
                "epochs": self.epochs, "delta": self.delta, "acc_tol": self.acc_tol,
                "mass_tol": self.mass_tol, "alpha_max": self.alpha_max}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "current": self.current, "best_acc": self.best_acc,
                "seen": self.seen, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = super().state_dict()
        if {k: state.get(k) for k in mine} != mine:
            raise UsageError(f"controller state {state} does not match this controller {mine}")
        self.current, self.best_acc = state["current"], state["best_acc"]
        self.seen, self.history = state["seen"], list(state["history"])


# ------------------------------------------------------------------ schedules by name
#
# Each entry builds the schedule of one training run from α, the number of epochs and the
# options it uses; k counts epochs for all but the target controller (which the training loop
# updates once per epoch). `from_name` turns it into a per-step schedule.


def _geometric(alpha: float, epochs: int, p: float | None = None, decay_to: float = 0.01
               ) -> Schedule:
    return Geometric(alpha, p or decay_to ** (1 / max(1, epochs)))


def _half(alpha: float, epochs: int) -> Schedule:
    return OffAfter(Constant(alpha), max(1, epochs // 2))


def _target(alpha: float, epochs: int, target: float | None = None, delta: float = 1.5,
            acc_tol: float = 0.01, mass_tol: float = 0.4) -> Schedule:
    if target is None:
        raise UsageError("the target schedule needs a target sparsity (e.g. target=0.9)")
    return TargetController(alpha, target, epochs, delta=delta, acc_tol=acc_tol,
                            mass_tol=mass_tol)


#: name -> (builder(alpha, epochs, **options), whether k counts epochs)
SCHEDULES: dict[str, tuple[Any, bool]] = {
    "geometric": (_geometric, True),
    "constant": (lambda alpha, epochs: Constant(alpha), True),
    "harmonic": (lambda alpha, epochs: Harmonic(alpha), True),
    "quadratic": (lambda alpha, epochs: Quadratic(alpha), True),
    "half": (_half, True),
    "target": (_target, False),
}


def from_name(name: str, alpha: float, epochs: int, steps_per_epoch: int, **options: Any
              ) -> Schedule:
    """The per-step schedule `name` (see SCHEDULES) for a run of `epochs` epochs of
    `steps_per_epoch` steps, starting from `alpha`. `options` may hold more than the schedule
    uses (p, decay_to, target, delta, acc_tol, mass_tol): each takes what it needs."""
    if name not in SCHEDULES:
        raise UsageError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    build, per_epoch = SCHEDULES[name]
    wanted = inspect.signature(build).parameters
    schedule = build(alpha, epochs, **{k: v for k, v in options.items() if k in wanted})
    return Every(schedule, steps_per_epoch) if per_epoch else schedule
