"""Schedules of the PILoT strength (SPEC §2.5, §2.5b).

Two kinds:

- **Strength schedules** (`Strength`, and `TargetController`) set the integrated strength
  A = ∫ α directly, as a function of flow-time progress τ ∈ [0, 1] (τ_k = Σ_{j<k} η_j over
  Σ_{j<H} η_j for a horizon of H steps). PILoT applies each step's ΔA_k as a decoupled
  multiplicative decay (m, w) ← e^{−2ΔA_k}·(m, w), outside gradient and momentum, so the
  realized A is exactly the requested one, whatever the learning rate, its schedule, the
  momentum, the batch size or the number of steps: c_∞ = β/2·e^{−4A}. This is the default.
- **α schedules** (`Constant`, `Harmonic`, `Quadratic`, `Geometric`, `OffAfter`, `Every`): the
  paper's per-step α_k, added to the gradients as 2α_k·(m, w) (coupled: momentum amplifies it,
  by about 1/(1 − μ)). Kept for fidelity to the paper.

An α schedule is a callable `k -> α_k` with `state_dict()` / `load_state_dict()`. The step index
k counts from 0: k = 0 is the first `PILoT.step()`. Harmonic and quadratic therefore use k + 1,
so the first step gets α0 (the paper's α0/k with k counted from 1). By default k counts optimizer
steps; wrap a schedule in `Every(schedule, steps_per_epoch)` to count it in epochs. Convergence
needs A_∞ < ∞ (the regularization is eventually turned off): Quadratic and Geometric satisfy
this on their own; Constant and Harmonic do not, so combine them with `OffAfter`.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import warnings
from collections.abc import Callable
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
    """Base class: subclasses implement `alpha(k)`; their constructor arguments are their state.
    `decoupled` schedules (strength schedules) give ΔA_k by `delta(k)` instead."""

    decoupled = False

    @property
    def ready(self) -> bool:
        """Whether `alpha(k)` can be computed yet (a strength schedule needs its horizon)."""
        return True

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


#: The default strength of `Strength` (and of `--hp pilot.strength`), A = √2 with the cosine
#: shape: the best mean validation accuracy at 90/95/98% sparsity over MNIST / LeNet-300-100 and
#: digits / LeNet-300-100 on a √2-spaced grid of A for each shape (benchmarks/strength_transfer.py,
#: benchmarks/results/strength_transfer/).
DEFAULT_STRENGTH = 2**0.5
DEFAULT_SHAPE = "cosine"
SHAPES = ("geometric", "linear", "cosine")
IN_REACH = ("lower", "hold")  # TargetController: what the rate does once the target is in reach
# TargetController's defaults, chosen on a validation split (benchmarks/calibrate_targets.py)
TARGET_DELTA, TARGET_MASS_TOL, TARGET_IN_REACH = 1.25, 0.25, "hold"

LR = float | Callable[[int], float] | Any  # a number, k -> η_k, or a torch LR scheduler


def lr_profile(lr: LR | None, horizon: int) -> list[float]:
    """η_0, ..., η_{horizon−1}: from None or a number (constant), a callable k -> η_k, or a torch
    LR scheduler, whose profile is read from a copy (the scheduler passed is left as it is: pass
    it before training starts)."""
    if lr is None or isinstance(lr, numbers.Real):
        return [1.0 if lr is None else float(lr)] * horizon
    if hasattr(lr, "get_last_lr") and hasattr(lr, "optimizer"):
        opt = lr.optimizer
        # copy the scheduler and its optimizer's groups, not the parameters or their state
        memo = {id(p): p for g in opt.param_groups for p in g["params"]}
        memo[id(opt.state)] = {}
        sched = copy.deepcopy(lr, memo)
        out = []
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended
            warnings.simplefilter("ignore")
            for _ in range(horizon):
                out.append(float(sched.get_last_lr()[0]))
                try:
                    sched.step()
                except ValueError:  # e.g. OneCycleLR past its total_steps: hold the last lr
                    out += [out[-1]] * (horizon - len(out))
                    break
        return out
    if callable(lr):
        return [float(lr(k)) for k in range(horizon)]
    raise UsageError("lr must be a number, a callable k -> η_k or a torch LR scheduler, got "
                     f"{lr!r}")


class _StrengthSchedule(Schedule):
    """A set as a function of flow-time progress τ (needs the horizon and the lr profile;
    `bind` fills them in when PILoT is attached to an optimizer)."""

    decoupled = True

    def __init__(self, horizon: int | None, lr: LR | None):
        self.horizon = None if horizon is None else _check_count(horizon, "horizon", 1)
        self.lr = lr
        self._cum: list[float] | None = None  # Σ_{j<k} η_j, k = 0..horizon

    def bind(self, horizon: int | None = None, lr: LR | None = None) -> None:
        """Fill in the horizon and the lr profile where they were not given."""
        if self.horizon is None and horizon is not None:
            self.horizon = _check_count(horizon, "horizon", 1)
        if self.lr is None and lr is not None:
            self.lr, self._cum = lr, None

    @property
    def ready(self) -> bool:
        return self.horizon is not None

    def _profile(self) -> list[float]:
        if self._cum is None:
            if self.horizon is None:
                raise UsageError(
                    f"{type(self).__name__} needs its horizon, the number of optimizer steps "
                    "of the run: Strength(total, horizon=epochs * steps_per_epoch, lr=...), or "
                    "pilot.attach(optimizer, horizon=...)")
            etas = lr_profile(self.lr, self.horizon)
            if any(not math.isfinite(e) or e < 0 for e in etas) or sum(etas) <= 0:
                raise UsageError("the learning-rate profile must be finite, >= 0 and not all 0")
            self._cum = [0.0]
            for e in etas:
                self._cum.append(self._cum[-1] + e)
        return self._cum

    def tau(self, k: int) -> float:
        """Flow-time progress before step k: τ_k in [0, 1]."""
        cum = self._profile()
        return cum[min(k, len(cum) - 1)] / cum[-1]

    def eta(self, k: int) -> float:
        cum = self._profile()
        return cum[k + 1] - cum[k] if k + 1 < len(cum) else 0.0

    def delta(self, k: int) -> float:
        """ΔA_k, the strength applied by step k."""
        raise NotImplementedError

    def alpha(self, k: int) -> float:
        """The per-step α a coupled decay would need for the same ΔA_k: ΔA_k / η_k."""
        eta = self.eta(k)
        return self.delta(k) / eta if eta > 0 else 0.0


class Strength(_StrengthSchedule):
    """The integrated strength A rises from 0 to `total` along `shape` as a function of
    flow-time progress τ, reaching it at τ = `end` (then α is off: A_∞ = total):

    - "cosine" (default): α follows a half cosine from its largest value to 0 at `end`;
    - "geometric": α decays geometrically in τ, to `ratio` of its first value at `end`;
    - "linear": α constant in τ until `end` (the most forgiving of too large an A).

    horizon: optimizer steps of the run. lr: its learning-rate profile (a number, a callable
    k -> η_k, or a torch LR scheduler, read from a copy); None is a constant learning rate. The
    profile only spreads A over the steps (ΔA_k ∝ η_k under a constant α): A reaches `total`
    at the horizon whatever it is.
    """

    def __init__(self, total: float = DEFAULT_STRENGTH, horizon: int | None = None,
                 shape: str = DEFAULT_SHAPE, lr: LR | None = None, end: float = 1.0,
                 ratio: float = 0.01):
        super().__init__(horizon, lr)
        self.total = check_number(total, "total (the strength A)", low=0)
        if shape not in SHAPES:
            raise UsageError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
        self.shape = shape
        self.end = check_number(end, "end (flow-time fraction)", low=0, high=1, low_open=True)
        self.ratio = check_number(ratio, "ratio", low=0, high=1, low_open=True, high_open=True)

    def A_at(self, tau: float) -> float:
        """The strength reached at flow-time progress τ."""
        u = min(max(tau, 0.0) / self.end, 1.0)
        if self.shape == "linear":
            a = u
        elif self.shape == "cosine":  # α ∝ (1 + cos πu)/2
            a = u + math.sin(math.pi * u) / math.pi
        else:  # α ∝ ratio^u
            a = (1 - self.ratio ** u) / (1 - self.ratio)
        return self.total * a

    def delta(self, k: int) -> float:
        if k >= self._profile_len():
            return 0.0
        # A_at is monotone: clip rounding (a sine's last bits) so no step ever grows m, w
        return max(0.0, self.A_at(self.tau(k + 1)) - self.A_at(self.tau(k)))

    def _profile_len(self) -> int:
        return len(self._profile()) - 1

    def config(self) -> dict[str, Any]:
        return {"total": self.total, "horizon": self.horizon, "shape": self.shape,
                "end": self.end, "ratio": self.ratio}


class TargetController(_StrengthSchedule):
    """The strength driven towards a target sparsity (SPEC §2.5; our reading of the ICLR
    paper's Algorithm 1, whose comparison signs are not all recoverable), in terms of A: A grows
    at `rate` per unit of flow time (a rate held over the whole run would realize A = rate),
    applied like `Strength`'s, and the rate is updated once per epoch by `observe` from the
    training accuracy and `mass_at_target`, the fraction of ‖x‖₁ that pruning to the target
    would remove now:

    - target in reach (mass_at_target ≤ `mass_tol`): with `in_reach="lower"` (the paper's
      rule) rate ← rate / delta, so the strength is turned off geometrically, which still adds
      delta / (delta − 1) epochs' worth of the last rate to A; with `in_reach="hold"` the
      strength stops at once (A held where it reached the target) and resumes at the same rate
      if the model leaves reach in the first half;
    - second half of training (epoch ≥ epochs / 2), target not in reach: rate ← rate / delta;
    - otherwise rate ← rate · delta while the training accuracy stays within `acc_tol` of its
      best so far, and the rate is held when it does not.

    Holding rather than lowering the rate on an accuracy dip (the paper lowers it) keeps the
    target in control. The rate stays in [0, rate_max].
    """

    def __init__(self, rate_init: float, target_sparsity: float, epochs: int,
                 delta: float = TARGET_DELTA, acc_tol: float = 0.01,
                 mass_tol: float = TARGET_MASS_TOL,
                 rate_max: float = 50.0, horizon: int | None = None, lr: LR | None = None,
                 in_reach: str = TARGET_IN_REACH):
        super().__init__(horizon, lr)
        if in_reach not in IN_REACH:
            raise UsageError(f"in_reach must be one of {', '.join(IN_REACH)}, got {in_reach!r}")
        self.in_reach = in_reach
        self.rate_init = check_number(rate_init, "rate_init", low=0)
        self.target = check_number(target_sparsity, "target_sparsity", low=0, high=1,
                                   low_open=True, high_open=True)
        self.epochs = _check_count(epochs, "epochs", 1)
        self.delta_factor = check_number(delta, "delta", low=1, low_open=True)
        self.acc_tol = check_number(acc_tol, "acc_tol", low=0)
        self.mass_tol = check_number(mass_tol, "mass_tol", low=0, high=1)
        self.rate_max = check_number(rate_max, "rate_max", low=0)
        self.current, self.best_acc, self.seen, self.held = self.rate_init, -1.0, 0, False
        self.history: list[dict[str, float]] = []

    @property
    def rate(self) -> float:
        """The rate of A per unit of flow time now (0 while A is held at the target)."""
        return 0.0 if self.held else self.current

    def delta(self, k: int) -> float:
        return self.rate * (self.tau(k + 1) - self.tau(k))

    def observe(self, epoch: int, train_acc: float, mass_at_target: float) -> float:
        """Update the rate after `epoch` (0-based) from its training accuracy and the fraction
        of ‖x‖₁ that pruning to the target would remove; returns the new rate."""
        self.best_acc = max(self.best_acc, train_acc)
        holds = train_acc >= self.best_acc - self.acc_tol
        in_reach = mass_at_target <= self.mass_tol
        was_held, self.held = self.held, in_reach and self.in_reach == "hold"
        if not self.held:
            if in_reach or epoch + 1 >= self.epochs / 2:
                self.current /= self.delta_factor
            elif holds and not was_held:  # (leaving reach: resume at the held rate first)
                self.current = min(self.rate_max, self.current * self.delta_factor)
        self.seen = epoch + 1
        self.history.append({"epoch": epoch + 1, "train_acc": train_acc,
                             "mass_at_target": mass_at_target, "rate": self.rate})
        return self.rate

    def config(self) -> dict[str, Any]:
        return {"rate_init": self.rate_init, "target_sparsity": self.target,
                "epochs": self.epochs, "delta": self.delta_factor, "acc_tol": self.acc_tol,
                "mass_tol": self.mass_tol, "rate_max": self.rate_max, "horizon": self.horizon,
                "in_reach": self.in_reach}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "current": self.current, "best_acc": self.best_acc,
                "seen": self.seen, "history": list(self.history), "held": self.held}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = super().state_dict()
        if {k: state.get(k) for k in mine} != mine:
            raise UsageError(f"controller state {state} does not match this controller {mine}")
        self.current, self.best_acc = state["current"], state["best_acc"]
        self.seen, self.history = state["seen"], list(state["history"])
        self.held = state.get("held", False)  # (absent from states saved before "hold")


# ------------------------------------------------------------------ schedules by name
#
# Each entry builds the schedule of one training run from its value (the total A of `strength`,
# the starting rate of `target`, α for the α schedules), the number of epochs and the options it
# uses (horizon and lr for the strength schedules); the α schedules count k in epochs (the
# paper's), and `from_name` turns them into per-step schedules.


def _strength(total: float, epochs: int, horizon: int | None = None, lr: LR | None = None,
              shape: str = DEFAULT_SHAPE) -> Schedule:
    return Strength(total, horizon=horizon, shape=shape, lr=lr)


def _target(rate: float, epochs: int, target: float | None = None,
            delta: float = TARGET_DELTA, acc_tol: float = 0.01,
            mass_tol: float = TARGET_MASS_TOL, horizon: int | None = None,
            lr: LR | None = None, in_reach: str = TARGET_IN_REACH) -> Schedule:
    if target is None:
        raise UsageError("the target schedule needs a target sparsity (e.g. target=0.9)")
    return TargetController(rate, target, epochs, delta=delta, acc_tol=acc_tol,
                            mass_tol=mass_tol, horizon=horizon, lr=lr, in_reach=in_reach)


def _geometric(alpha: float, epochs: int, p: float | None = None, decay_to: float = 0.01
               ) -> Schedule:
    return Geometric(alpha, p or decay_to ** (1 / max(1, epochs)))


def _half(alpha: float, epochs: int) -> Schedule:
    return OffAfter(Constant(alpha), max(1, epochs // 2))


#: name -> (builder(value, epochs, **options), whether k counts epochs)
SCHEDULES: dict[str, tuple[Any, bool]] = {
    "strength": (_strength, False),
    "target": (_target, False),
    "geometric": (_geometric, True),
    "constant": (lambda alpha, epochs: Constant(alpha), True),
    "harmonic": (lambda alpha, epochs: Harmonic(alpha), True),
    "quadratic": (lambda alpha, epochs: Quadratic(alpha), True),
    "half": (_half, True),
}


def from_name(name: str, value: float, epochs: int, steps_per_epoch: int, **options: Any
              ) -> Schedule:
    """The per-step schedule `name` (see SCHEDULES) for a run of `epochs` epochs of
    `steps_per_epoch` steps: `value` is the total A (strength), the starting rate of A per unit
    of flow time (target) or α (the α schedules). `options` may hold more than the schedule
    uses (lr, shape, p, decay_to, target, delta, acc_tol, mass_tol, in_reach): each takes what
    it needs; the horizon is epochs × steps_per_epoch."""
    if name not in SCHEDULES:
        raise UsageError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    build, per_epoch = SCHEDULES[name]
    options = {"horizon": epochs * steps_per_epoch, **options}
    wanted = inspect.signature(build).parameters
    schedule = build(value, epochs, **{k: v for k, v in options.items() if k in wanted})
    return Every(schedule, steps_per_epoch) if per_epoch else schedule
