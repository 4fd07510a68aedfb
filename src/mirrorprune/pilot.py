"""The PILoT object: wraps a model as m ⊙ w, applies α_t(‖m‖² + ‖w‖²) through the gradients,
reports diagnostics, and exports an exactly sparse plain model (SPEC §2)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from . import theory
from .errors import UsageError, check_number
from .prune import finalize as _finalize
from .reparam import MirrorWeight, Selector, check_beta, iter_mw_params, wrap
from .schedules import Schedule, Strength, as_schedule, check_alpha


class PILoT:
    """PILoT regularization on any PyTorch model.

    Wrapping reparametrizes the selected weights in place as x = m ⊙ w with m0 ⊙ w0 = x0 and
    m0² − w0² = beta (beta = 0 is spred's initialization). Then either attach it to your
    optimizer, which changes nothing else in your loop:

        pilot = mp.PILoT(model, mp.schedules.Strength(total=2.0, horizon=steps, lr=scheduler))
        optimizer = torch.optim.SGD(pilot.param_groups(weight_decay=1e-4), lr=0.1, momentum=0.9)
        pilot.attach(optimizer)   # acts right before every optimizer.step()

    or call `pilot.step()` yourself after `backward()` and before `optimizer.step()` (not both).

    With a strength schedule (`Strength`, the default, or `TargetController`) each step
    multiplies m and w by e^{−2ΔA_k} (a decoupled decay, outside gradients and momentum), so the
    realized A = Σ ΔA_k is the requested one. With an α schedule (the paper's) each step adds
    2α_k·m and 2α_k·w to m.grad and w.grad. Once per optimizer step: with gradient accumulation
    after the last micro-batch (attach does this by itself); with AMP's GradScaler, after
    `scaler.unscale_(optimizer)` — attached, it runs inside `scaler.step(optimizer)`, after the
    unscaling and only on the steps that are not skipped. Under DistributedDataParallel, wrap
    the model with PILoT first, then with DDP.

    Args:
        model: any nn.Module; modified in place.
        schedule: a `mirrorprune.schedules` schedule, a number for a constant α, or None for
            `Strength()` (its horizon then comes from `attach(optimizer, horizon=...)`).
        beta: m0² − w0² (> 0 for PILoT; paper: 1.0).
        include: None (`reparam.default_types()`: Linear, Conv*, MultiheadAttention's input
            projection, RNN/LSTM/GRU matrices, Hugging Face's Conv1D), module types / name
            globs, or a predicate fn(module, name).
        exclude: module types / name globs left dense (e.g. ("conv1", "fc")).
        track_mirror: accumulate L_t = Σ η ∇f(x) to report the mirror residual
            ‖∇R_{c_t}(x_t) + L_t‖ (SPEC §2.4); costs two extra copies of the weights and
            needs the step size (`step(lr=...)`, or attached).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule | float | None = None,
        beta: float = 1.0,
        include: Selector = None,
        exclude: Selector = (),
        track_mirror: bool = False,
    ):
        self.schedule = Strength() if schedule is None else as_schedule(schedule)
        self.beta = check_beta(beta)
        if track_mirror and self.beta == 0:
            raise UsageError("track_mirror needs beta > 0: with beta = 0 (spred) R is undefined")
        self.model = model
        self.weights: list[MirrorWeight] = wrap(model, self.beta, include, exclude)
        self._k = 0
        self._alpha_sum = 0.0
        # Σ ΔA_k applied (strength schedules) or Σ η_k α_k (α schedules; None once a step came
        # without lr): the A of the mirror-flow theory for plain gradient descent
        self._A: float | None = 0.0
        self._finalized = False
        self._hook: Any = None
        self.track_mirror = track_mirror
        if track_mirror:
            self._z0 = [theory.z0_from_x0(mw.x(), self.beta) for mw in self.weights]
            self._L = [torch.zeros_like(mw.m, memory_format=torch.contiguous_format)
                       for mw in self.weights]

    # ------------------------------------------------------------------ training

    @property
    def alpha(self) -> float:
        """α_k that the next `step()` applies (k = number of steps taken so far); for a strength
        schedule, the coupled α that would give the same ΔA_k (ΔA_k / η_k)."""
        return check_alpha(self.schedule(self._k), f"schedule({self._k})")

    @property
    def steps(self) -> int:
        return self._k

    def param_groups(self, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Parameter groups for any torch optimizer: m and w without ordinary weight decay
        (PILoT's replaces it), every other parameter with `weight_decay`."""
        check_alpha(weight_decay, "weight_decay")
        mw = list(iter_mw_params(self.weights))
        ids = {id(p) for p in mw}
        rest = [p for p in self.model.parameters() if id(p) not in ids]
        groups = [{"params": mw, "weight_decay": 0.0, "name": "pilot_mw"}]
        if rest:
            groups.append({"params": rest, "weight_decay": weight_decay, "name": "other"})
        return groups

    def attach(self, optimizer: torch.optim.Optimizer, horizon: int | None = None,
               lr: Any = None) -> PILoT:
        """Act before every `optimizer.step()` (a step pre-hook): no change to the training
        loop. `horizon` (optimizer steps of the run) and `lr` (a number, k -> η_k, or the LR
        scheduler you will step) complete a strength schedule that lacks them. The learning
        rate of each step is read from the optimizer group that holds m. Returns self."""
        if self._hook is not None:
            raise UsageError("this PILoT is attached already; call pilot.detach() first")
        ids = {id(p) for p in iter_mw_params(self.weights)}
        groups = [g for g in optimizer.param_groups if any(id(p) in ids for p in g["params"])]
        if not groups:
            raise UsageError("the optimizer does not train this PILoT's m and w; build it from "
                             "pilot.param_groups(...) (or model.parameters())")
        if self.schedule.decoupled:
            self.schedule.bind(horizon, lr)
        group = groups[0]

        def before_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._step(group["lr"])

        self._hook = optimizer.register_step_pre_hook(before_step)
        return self

    def detach(self) -> None:
        """Undo `attach`."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def step(self, lr: float | None = None) -> float:
        """Apply step k of the schedule and advance it; returns α_k (see `alpha`). Call it after
        `backward()` and before `optimizer.step()` — unless attached (then the optimizer does).

        lr: the learning rate of the coming optimizer step. Needed for α schedules' A_t =
        Σ η_k α_k (and the theory's c_t) and with track_mirror; not for strength schedules.
        """
        if self._hook is not None:
            raise UsageError("pilot.attach(optimizer) already applies PILoT at every optimizer "
                             "step; remove the pilot.step() call (or call pilot.detach())")
        return self._step(lr)

    @torch.no_grad()
    def _step(self, lr: float | None) -> float:
        self._check_open()
        alpha = self.alpha
        if lr is not None:
            lr = check_number(lr, "lr (the coming step's learning rate)", low=0)
        coupled = not self.schedule.decoupled
        if coupled and lr is not None and 2 * alpha * lr >= 1:
            # gradient descent on α(m² + w²) alone multiplies m and w by 1 − 2αη per step
            raise UsageError(f"alpha {alpha:g} is too large for lr {lr:g}: each step would "
                             f"multiply m and w by 1 − 2·alpha·lr = {1 - 2 * alpha * lr:g} <= 0 "
                             "(sign flips, divergence); PILoT's alpha is typically 1e-5..1e-2")
        if self.track_mirror:
            self._track(lr)
        params = [p for p in iter_mw_params(self.weights) if p.requires_grad]
        if not coupled:
            dA = self.schedule.delta(self._k)
            if dA > 0:
                torch._foreach_mul_(params, math.exp(-2 * dA))
            self._A = (self._A or 0.0) + dA
        elif alpha > 0:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            torch._foreach_add_([p.grad for p in params], params, alpha=2 * alpha)
        if coupled:
            self._A = None if lr is None or self._A is None else self._A + alpha * float(lr)
        self._alpha_sum += alpha
        self._k += 1
        return alpha

    def _track(self, lr: float | None) -> None:
        if lr is None:
            raise UsageError("track_mirror=True needs the step size: call pilot.step(lr=...)")
        for mw, L in zip(self.weights, self._L):
            if mw.m.grad is not None and mw.w.grad is not None:
                # m.grad = g ⊙ w and w.grad = g ⊙ m, so g = (m.grad w + w.grad m)/(m² + w²).
                g = (mw.m.grad * mw.w + mw.w.grad * mw.m) / (mw.m.square() + mw.w.square())
                L.add_(g, alpha=lr)

    # ------------------------------------------------------------------ diagnostics

    @torch.no_grad()
    def stats(self, zero_tol: float = 1e-3) -> dict[str, float | int | None]:
        """Diagnostics as a flat dict of numbers (JSON-ready).

        step, alpha (next α_k; None for a Strength before its horizon is known), alpha_sum
        (Σ α_k), A (the realized strength: Σ ΔA_k for a strength schedule; for an α schedule
        the measured A_measured, which includes momentum's amplification of a coupled decay),
        A_nominal (Σ ΔA_k, or Σ η_k α_k for an α schedule, None unless every step got lr: the
        A of the theory for plain gradient descent), c
        (theory: β/2·exp(−4·A_nominal)), c_measured (median of (m² − w²)/2, which the flow keeps
        equal to c_t whatever the loss), A_measured (−¼ log(2 c_measured / β)), l1 (‖x‖₁),
        l2sq_mw (‖m‖² + ‖w‖²), penalty (α·l2sq_mw), near_zero (fraction with |x| ≤ zero_tol),
        zeros, params, and with track_mirror mirror_residual (‖∇R_c(x) + L‖₂) and its max.
        """
        self._check_open()
        xs = [mw.x() for mw in self.weights]
        n = sum(x.numel() for x in xs)
        l2 = sum(float(mw.m.square().sum() + mw.w.square().sum()) for mw in self.weights)
        half_diff = torch.cat([((mw.m.square() - mw.w.square()) / 2).flatten().double()
                               for mw in self.weights])
        c_meas = float(half_diff.median())
        alpha = self.alpha if self.schedule.ready else None  # None: before attach
        a_meas = (-0.25 * math.log(2 * c_meas / self.beta) if self.beta > 0 and c_meas > 0
                  else None)
        out: dict[str, float | int | None] = {
            "step": self._k,
            "alpha": alpha,
            "alpha_sum": self._alpha_sum,
            "A": self._A if self.schedule.decoupled else a_meas,
            "A_nominal": self._A,
            "c": self.beta / 2 * math.exp(-4 * self._A) if self._A is not None else None,
            "c_measured": c_meas,
            "A_measured": a_meas,
            "l1": sum(float(x.abs().sum()) for x in xs),
            "l2sq_mw": l2,
            "penalty": alpha * l2 if alpha is not None else None,
            "near_zero": sum(int((x.abs() <= zero_tol).sum()) for x in xs) / n,
            "zeros": sum(int((x == 0).sum()) for x in xs),
            "params": n,
        }
        if self.track_mirror:
            out.update(self._mirror_residual())
        return out

    def _mirror_residual(self) -> dict[str, float | None]:
        if self._A is None:
            return {"mirror_residual": None, "mirror_residual_max": None}
        logc = theory.log_c(self.beta, self._A)
        r = torch.cat([theory.mirror_residual(mw.x().to(z.dtype), L, z, logc).flatten()
                       for mw, z, L in zip(self.weights, self._z0, self._L)])
        return {"mirror_residual": float(r.norm()), "mirror_residual_max": float(r.abs().max())}

    # ------------------------------------------------------------------ export

    def finalize(self, sparsity: float, scope: str = "global", inplace: bool = False) -> nn.Module:
        """A plain model with x = m ⊙ w collapsed and exactly round(sparsity·N) weights zeroed.

        scope="global" ranks all reparametrized weights together, "layer" each tensor alone.
        By default the wrapped model stays as it is (training may continue; call again for
        another sparsity) and a plain copy is returned. inplace=True unwraps the model itself
        and closes this PILoT object.
        """
        self._check_open()
        out = _finalize(self.model, sparsity, scope, inplace=inplace)
        if inplace:
            self._finalized = True
        return out

    def _check_open(self) -> None:
        if self._finalized:
            raise RuntimeError(
                "this PILoT was finalized in place: its model is plain now. Keep the returned "
                "model, or use finalize(..., inplace=False) to export while training goes on"
            )

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """Schedule position and integrals (the model's m, w live in model.state_dict())."""
        state: dict[str, Any] = {
            "step": self._k,
            "alpha_sum": self._alpha_sum,
            "A": self._A,
            "beta": self.beta,
            "names": [mw.name for mw in self.weights],
            "schedule": self.schedule.state_dict(),
        }
        if self.track_mirror:
            state["L"] = [L.clone() for L in self._L]
            state["z0"] = [z.clone() for z in self._z0]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [mw.name for mw in self.weights]
        if state.get("names") != names or state.get("beta") != self.beta:
            raise UsageError(
                "PILoT state was saved for another configuration (weights "
                f"{state.get('names')}, beta {state.get('beta')}; here {names}, beta {self.beta})"
            )
        if self.track_mirror != ("L" in state):
            raise UsageError("PILoT state and this PILoT disagree on track_mirror")
        self.schedule.load_state_dict(state["schedule"])
        self._k, self._alpha_sum, self._A = int(state["step"]), state["alpha_sum"], state["A"]
        if self.track_mirror:
            for dst, src in zip(self._L + self._z0, state["L"] + state["z0"]):
                dst.copy_(src)

    def __repr__(self) -> str:
        n = sum(mw.m.numel() for mw in self.weights)
        return (f"PILoT({len(self.weights)} tensors, {n:,} weights, beta={self.beta}, "
                f"schedule={self.schedule!r}, step={self._k})")
