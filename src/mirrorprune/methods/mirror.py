"""Methods that train x = m ⊙ w: PILoT, spred (β = 0, constant weight decay) and L1 on m."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .. import schedules as S
from ..errors import UsageError
from ..pilot import PILoT
from ..prune import pruned_mass
from .base import HParams, Method, hparam


class Pilot(Method):
    """PILoT: α_t(‖m‖² + ‖w‖²) on x = m ⊙ w with m0² − w0² = beta.

    schedule (k counted in epochs): "geometric" α·p^epoch with p = decay_to^(1/epochs) unless p is
    given (paper: p = 0.95), "constant", "harmonic", "quadratic", "half" (constant for the first
    half of training, then off), or "target": `schedules.TargetController` started at α and aimed
    at `target` sparsity (its delta, acc_tol and mass_tol are hyperparameters here too). m and w
    get no ordinary weight decay.
    """

    name = "pilot"
    uses_mw = True

    @dataclasses.dataclass(frozen=True)
    class Config(HParams):
        alpha: float = hparam(1e-3, "α per step in the first epoch (target: the starting α)",
                              low=0)
        schedule: str = hparam("geometric", "how α changes from epoch to epoch",
                               choices=("geometric", "constant", "harmonic", "quadratic", "half",
                                        "target"))
        p: float | None = hparam(None, "geometric: α·p^epoch (None: decay_to^(1/epochs))",
                                 low=0, high=1, low_open=True, high_open=True)
        decay_to: float = hparam(0.01, "geometric with p None: α of the last epoch / α", low=0,
                                 high=1, low_open=True, high_open=True)
        beta: float = hparam(1.0, "m0² − w0² at initialization (0: spred's)", low=0)
        target: float | None = hparam(None, "target: the sparsity the controller aims at", low=0,
                                      high=1, low_open=True, high_open=True)
        delta: float = hparam(1.5, "target: factor by which α rises or falls per epoch", low=1,
                              low_open=True)
        acc_tol: float = hparam(0.01, "target: training-accuracy drop that holds α", low=0)
        mass_tol: float = hparam(0.4, "target: stop raising α once pruning to the target "
                                 "would remove this fraction of ‖x‖₁", low=0, high=1,
                                 low_open=True)

        def check(self) -> None:
            if self.schedule == "target" and self.target is None:
                raise UsageError("pilot.schedule=target needs pilot.target (a sparsity in "
                                 "(0, 1), e.g. 0.9)")

    def make_schedule(self) -> S.Schedule:
        a, kind = self.hp["alpha"], self.hp["schedule"]
        if kind == "target":
            return S.TargetController(a, self.hp["target"], self.epochs, delta=self.hp["delta"],
                                      acc_tol=self.hp["acc_tol"], mass_tol=self.hp["mass_tol"])
        if kind == "geometric":
            p = self.hp["p"] or self.hp["decay_to"] ** (1 / max(1, self.epochs))
            per_epoch = S.Geometric(a, p)
        elif kind == "half":
            per_epoch = S.OffAfter(S.Constant(a), max(1, self.epochs // 2))
        else:
            per_epoch = {"constant": S.Constant, "harmonic": S.Harmonic,
                         "quadratic": S.Quadratic}[kind](a)
        return S.Every(per_epoch, self.steps_per_epoch)

    def attach(self, model, steps_per_epoch, epochs):
        super().attach(model, steps_per_epoch, epochs)
        self.pilot = PILoT(model, self.make_schedule(), beta=self.hp["beta"],
                           include=self.include, exclude=self.exclude)

    def param_groups(self, weight_decay):
        return self.pilot.param_groups(weight_decay)

    def check_lr(self, lr):
        alpha = self.hp.get("alpha", 0.0)  # l1_m trains m ⊙ w without α
        if 2 * alpha * lr >= 1:
            raise UsageError(f"{self.name}.alpha {alpha:g} is too large for the learning rate "
                             f"{lr:g}: each step would multiply m and w by 1 − 2·alpha·lr = "
                             f"{1 - 2 * alpha * lr:g} <= 0; PILoT's alpha is typically "
                             "1e-5..1e-2 per step")

    def before_step(self, lr):
        self.pilot.step(lr=lr)

    def masked_tensors(self):
        # a pruned weight is the saddle m = w = 0: gradient and decay vanish there
        return {mw.name: [mw.m, mw.w] for mw in self.pilot.weights}

    def end_epoch(self, epoch, row):
        super().end_epoch(epoch, row)
        sched = self.pilot.schedule
        if isinstance(sched, S.TargetController):
            sched.observe(epoch, row["train_acc"], pruned_mass(self.weights(), sched.target))

    def weights(self):
        return {mw.name: mw.x() for mw in self.pilot.weights}

    def stats(self):
        st = self.pilot.stats()
        return {**super().stats(), **{k: st[k] for k in ("alpha", "A", "c_measured")}}

    def export(self):
        return self.pilot.finalize(0.0)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pilot": self.pilot.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.pilot.load_state_dict(state["pilot"])


class Spred(Pilot):
    """spred (Ziyin & Wang 2023): m ⊙ w from β = 0 (m0 = sqrt|x0|, w0 = sign(x0) sqrt|x0|) with a
    constant weight decay alpha on m and w — at the optimum an L1 penalty 2α‖x‖₁."""

    name = "spred"

    @dataclasses.dataclass(frozen=True)
    class Config(HParams):
        alpha: float = hparam(1e-4, "constant weight decay α on m and w, per step", low=0)

    def make_schedule(self):
        return S.Constant(self.hp["alpha"])

    def attach(self, model, steps_per_epoch, epochs):
        Method.attach(self, model, steps_per_epoch, epochs)
        self.pilot = PILoT(model, self.make_schedule(), beta=0.0, include=self.include,
                           exclude=self.exclude)


class L1OnM(Pilot):
    """x = m ⊙ w (β = 1) with an L1 penalty λ‖m‖₁ and ordinary weight decay on every parameter."""

    name = "l1_m"

    @dataclasses.dataclass(frozen=True)
    class Config(HParams):
        lam: float = hparam(1e-4, "λ of the penalty λ‖m‖₁", low=0)
        beta: float = hparam(1.0, "m0² − w0² at initialization", low=0)

    def make_schedule(self):
        return S.Constant(0.0)

    def param_groups(self, weight_decay):
        return [{"params": list(self.model.parameters()), "weight_decay": weight_decay}]

    def penalty(self) -> torch.Tensor:
        return self.hp["lam"] * sum(mw.m.abs().sum() for mw in self.pilot.weights)

    def before_step(self, lr):
        pass

    def stats(self):
        return Method.stats(self)
