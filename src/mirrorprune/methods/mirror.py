"""Methods that train x = m ⊙ w, as siblings over one base that holds the reparametrization:

- `MirrorMethod`: x = m ⊙ w from m0² − w0² = β (masks act on m and w; export collapses x);
- `L1OnM`: + an L1 penalty λ‖m‖₁, ordinary weight decay on every parameter;
- `DecayedMirror`: + a weight decay α_k(‖m‖² + ‖w‖²) on m and w instead of the ordinary one,
  applied by `mirrorprune.PILoT.step`:
  - `PilotMethod`: PILoT, α_k from a named schedule that is turned off in time, β = 1;
  - `Spred`: a constant α from spred's initialization β = 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .. import optim
from .. import schedules as S
from ..errors import UsageError
from ..pilot import PILoT
from ..prune import pruned_mass
from .base import Method, hparam, register_method

# The budget the aim values below were chosen on (50k MNIST images, batch 128: 391 steps of lr
# 0.1 per epoch). α is a per-step rate, so on another budget the α values are scaled by
# REFERENCE_EPOCH_LR / (its steps per epoch × lr), to add the same A = Σ ηα per epoch.
REFERENCE_EPOCH_LR = 391 * 0.1


class MirrorMethod(Method):
    """x = m ⊙ w on the selected weights (a `mirrorprune.PILoT` holds the reparametrization and
    the schedule of α_k, `schedule()`), initialized with m0² − w0² = `beta()`."""

    uses_mw = True

    def beta(self) -> float:
        return self.hp["beta"]

    def schedule(self) -> S.Schedule:
        return S.Constant(0.0)

    def attach(self, model, steps_per_epoch, epochs, lr=None):
        super().attach(model, steps_per_epoch, epochs, lr)
        self.pilot = PILoT(model, self.schedule(), beta=self.beta(), include=self.include,
                           exclude=self.exclude)

    def masked_tensors(self):
        # a pruned weight is the saddle m = w = 0: gradient and decay vanish there
        return {mw.name: [mw.m, mw.w] for mw in self.pilot.weights}

    def weights(self):
        return {mw.name: mw.x() for mw in self.pilot.weights}

    def export(self):
        return self.pilot.finalize(0.0)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pilot": self.pilot.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.pilot.load_state_dict(state["pilot"])


@register_method("l1_m")
class L1OnM(MirrorMethod):
    """x = m ⊙ w (β = 1) with an L1 penalty λ‖m‖₁ and ordinary weight decay on every parameter."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        lam: float = hparam(1e-4, "λ of the penalty λ‖m‖₁", low=0)
        beta: float = hparam(1.0, "m0² − w0² at initialization", low=0)

    def penalty(self) -> torch.Tensor:
        return self.hp["lam"] * sum(mw.m.abs().sum() for mw in self.pilot.weights)


class DecayedMirror(MirrorMethod):
    """x = m ⊙ w with the weight decay α_k(‖m‖² + ‖w‖²) on m and w (and none of the ordinary
    one), added to their gradients before every optimizer step."""

    def param_groups(self, weight_decay):
        return self.pilot.param_groups(weight_decay)

    def coupled(self) -> bool:
        """Whether α is added to the gradients (an α schedule) rather than applied as a
        decoupled decay of a strength schedule (which no learning rate can make too large)."""
        return True

    def check_lr(self, lr):
        alpha = self.hp["alpha"]
        if self.coupled() and 2 * alpha * lr >= 1:
            raise UsageError(f"{self.name}.alpha {alpha:g} is too large for the learning rate "
                             f"{lr:g}: each step would multiply m and w by 1 − 2·alpha·lr = "
                             f"{1 - 2 * alpha * lr:g} <= 0; PILoT's alpha is typically "
                             "1e-5..1e-2 per step")

    def before_step(self, lr):
        self.pilot.step(lr=lr)

    def stats(self):
        st = self.pilot.stats()
        return {**super().stats(), **{k: st[k] for k in ("alpha", "A", "c_measured")}}


@register_method("spred")
class Spred(DecayedMirror):
    """spred (Ziyin & Wang 2023): m ⊙ w from β = 0 (m0 = sqrt|x0|, w0 = sign(x0) sqrt|x0|) with a
    constant weight decay alpha on m and w — at the optimum an L1 penalty 2α‖x‖₁.

    No knob aims it at a sparsity: its sparsity follows α. `aim` uses the α of the grid point
    that was best at the nearest target on a validation split (the last 10k MNIST training
    images, LeNet-300-100, `cpu` budget; benchmarks/calibrate_targets.py)."""

    AIM_ALPHA = {0.8: 3e-4, 0.9: 3e-4, 0.95: 3e-4, 0.98: 5e-4}

    @dataclasses.dataclass(frozen=True)
    class Config:
        alpha: float = hparam(1e-4, "constant weight decay α on m and w, per step", low=0)

    def beta(self) -> float:
        return 0.0

    def schedule(self):
        return S.Constant(self.hp["alpha"])

    @classmethod
    def aim(cls, target, epoch_lr):
        nearest = min(cls.AIM_ALPHA, key=lambda s: abs(s - target))
        return {"alpha": cls.AIM_ALPHA[nearest] * REFERENCE_EPOCH_LR / epoch_lr}


@register_method("pilot")
class PilotMethod(DecayedMirror):
    """PILoT: a time-dependent decay α_t(‖m‖² + ‖w‖²) on x = m ⊙ w with m0² − w0² = beta.

    schedule (`mirrorprune.schedules.from_name`): "strength" (default), the integrated strength
    A rising to `strength` along `shape` in flow time, applied as a decoupled decay, so the
    realized A is `strength` on any budget; "target", `schedules.TargetController` aimed at
    `target` sparsity, from a rate of `strength` per unit of flow time (its delta, acc_tol and
    mass_tol are hyperparameters here too); or the paper's α schedules, coupled, k in epochs:
    "geometric" α·p^epoch with p = decay_to^(1/epochs) unless p is given (paper: p = 0.95),
    "constant", "harmonic", "quadratic", "half" (constant for the first half, then off).
    m and w get no ordinary weight decay.
    """

    # `aim`: the target controller's starting rate; the controller's delta and mass_tol were
    # chosen on a validation split (benchmarks/calibrate_targets.py)
    AIM_RATE = 1.0

    @dataclasses.dataclass(frozen=True)
    class Config:
        strength: float = hparam(S.DEFAULT_STRENGTH, "strength: the total A reached (c∞ = "
                                 "β/2·e^(−4A)); target: the starting rate of A per unit of "
                                 "flow time", low=0)
        schedule: str = hparam("strength", "how the strength is spread over training",
                               choices=tuple(S.SCHEDULES))
        shape: str = hparam(S.DEFAULT_SHAPE, "strength: how A rises in flow time",
                            choices=S.SHAPES)
        alpha: float = hparam(1e-3, "α schedules: α per step in the first epoch", low=0)
        p: float | None = hparam(None, "geometric: α·p^epoch (None: decay_to^(1/epochs))",
                                 low=0, high=1, low_open=True, high_open=True)
        decay_to: float = hparam(0.01, "geometric with p None: α of the last epoch / α", low=0,
                                 high=1, low_open=True, high_open=True)
        beta: float = hparam(1.0, "m0² − w0² at initialization (0: spred's)", low=0)
        target: float | None = hparam(None, "target: the sparsity the controller aims at", low=0,
                                      high=1, low_open=True, high_open=True)
        delta: float = hparam(S.TARGET_DELTA, "target: factor by which the rate rises or "
                              "falls per epoch", low=1, low_open=True)
        acc_tol: float = hparam(0.01, "target: training-accuracy drop that holds the rate",
                                low=0)
        mass_tol: float = hparam(S.TARGET_MASS_TOL, "target: stop raising the rate once "
                                 "pruning to the target would remove this fraction of ‖x‖₁",
                                 low=0, high=1, low_open=True)
        in_reach: str = hparam(S.TARGET_IN_REACH, "target: once in reach, hold A where it is "
                               "or lower the rate by delta each epoch (the paper's)",
                               choices=S.IN_REACH)

        def check(self) -> None:
            if self.schedule == "target" and self.target is None:
                raise UsageError("pilot.schedule=target needs pilot.target (a sparsity in "
                                 "(0, 1), e.g. 0.9)")
            defaults = type(self)()
            if self.schedule in ("strength", "target"):
                moved = [k for k in ("alpha", "p", "decay_to")
                         if getattr(self, k) != getattr(defaults, k)]
                if moved:
                    raise UsageError(
                        f"pilot.{moved[0]} applies to the α schedules (pilot.schedule="
                        f"geometric, constant, ...); with schedule={self.schedule} set "
                        "pilot.strength instead")

    def coupled(self) -> bool:
        return self.hp["schedule"] not in ("strength", "target")

    def schedule(self) -> S.Schedule:
        hp = self.hp
        value = hp["alpha"] if self.coupled() else hp["strength"]
        return S.from_name(hp["schedule"], value, self.epochs, self.steps_per_epoch,
                           lr=self.lr_at, shape=hp["shape"], p=hp["p"],
                           decay_to=hp["decay_to"], target=hp["target"], delta=hp["delta"],
                           acc_tol=hp["acc_tol"], mass_tol=hp["mass_tol"],
                           in_reach=hp["in_reach"])

    @classmethod
    def aim(cls, target, epoch_lr):
        return {"schedule": "target", "target": target, "strength": cls.AIM_RATE}

    @classmethod
    def inert(cls, hp):
        alpha, target = {"alpha", "p", "decay_to"}, {"target", "delta", "acc_tol", "mass_tol",
                                                     "in_reach"}
        schedule = hp.get("schedule", "strength")
        if schedule == "strength":
            return alpha | target
        return alpha | {"shape"} if schedule == "target" else target | {"strength", "shape"}

    def end_epoch(self, epoch, row):
        sched = self.pilot.schedule
        if isinstance(sched, S.TargetController):
            # logged, so that how the controller steered can be read from log.jsonl alone
            row["mass_at_target"] = pruned_mass(self.weights(), sched.target)
            row["rate"] = sched.observe(epoch, row["train_acc"], row["mass_at_target"])


@register_method("pilot_opt")
class PilotOptimizer(Method):
    """PILoT as an optimizer (`mirrorprune.optim.PILoTSGD`): the same mirror flow taken on x
    directly, no reparametrization and no memory beyond SGD's; SGD's momentum acts in the dual
    space (on z = arcsinh(x/c)) here, on (m, w) in `pilot`. Trained with the m ⊙ w methods'
    learning rate (the flow's step on x is the same)."""

    uses_mw = True

    @dataclasses.dataclass(frozen=True)
    class Config:
        strength: float = hparam(S.DEFAULT_STRENGTH, "the total A reached (c∞ = β/2·e^(−4A))",
                                 low=0)
        shape: str = hparam(S.DEFAULT_SHAPE, "how A rises in flow time", choices=S.SHAPES)
        beta: float = hparam(1.0, "m0² − w0² of the flow (c0 = β/2)", low=0, low_open=True)

    def param_groups(self, weight_decay):
        return optim.param_groups(self.model, self.include, self.exclude, weight_decay)

    def make_optimizer(self, groups, lr, momentum):
        strength = S.Strength(self.hp["strength"], horizon=self.steps_per_epoch * self.epochs,
                              shape=self.hp["shape"], lr=self.lr_at)
        self.optimizer = self._optimizer(groups, lr, momentum, strength)
        return self.optimizer

    def _optimizer(self, groups, lr, momentum, strength) -> optim.PILoTSGD | optim.PILoTAdamW:
        return optim.PILoTSGD(groups, lr=lr, momentum=momentum, beta=self.hp["beta"],
                              strength=strength)

    def stats(self):
        st = self.optimizer.stats()
        return {**super().stats(), "A": st["A"], "log_c": st["log_c"]}


@register_method("pilot_adamw")
class PilotAdamW(PilotOptimizer):
    """Experimental: PILoT as an optimizer with AdamW's normalized direction in the dual space
    (`mirrorprune.optim.PILoTAdamW`), at `lr_factor` times the training loop's learning rate."""

    @dataclasses.dataclass(frozen=True)
    class Config(PilotOptimizer.Config):
        lr_factor: float = hparam(0.1, "AdamW's learning rate as a fraction of the training "
                                  "loop's (SGD's) one", low=0, low_open=True)

    @property
    def lr_factor(self) -> float:
        return self.hp["lr_factor"]

    def _optimizer(self, groups, lr, momentum, strength):
        return optim.PILoTAdamW(groups, lr=lr, betas=(momentum, 0.999), beta=self.hp["beta"],
                                strength=strength)
