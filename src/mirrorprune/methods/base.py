"""The one small interface every method implements, and dense training (x = x) as its base."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from ..prune import pruned_mass
from ..reparam import Selector, select_modules


class Method:
    """Dense training (x = x) with ordinary weight decay; pruned by global magnitude afterwards.

    The training loop calls, in order: `attach(model, steps_per_epoch, epochs)` once, then per
    epoch `start_epoch(epoch)`, per step `loss + penalty()`, `backward()`, `before_step(lr)`,
    `optimizer.step()`, `after_step()`, and after evaluation `end_epoch(epoch, row)`.
    `export()` returns a plain copy of the model after the method's own finalization (a hard
    mask, a collapsed m ⊙ w, ...), ready for exact magnitude pruning of the same weights.
    """

    name = "dense"
    uses_mw = False  # trains a product m ⊙ w (the paper gives those a doubled learning rate)
    defaults: dict[str, Any] = {}

    def __init__(self, include: Selector = None, exclude: Selector = (), **hparams: Any):
        unknown = set(hparams) - set(self.defaults)
        if unknown:
            valid = ", ".join(f"{k} (default {v!r})" for k, v in self.defaults.items()) or "none"
            raise ValueError(f"unknown hyperparameter(s) {sorted(unknown)} for method "
                             f"{self.name!r}; valid: {valid}")
        self.hp = {**self.defaults, **hparams}
        self.include, self.exclude = include, exclude
        self.model: nn.Module | None = None
        self.step_count = 0
        # For iterative pruning: fixed keep-masks by weight name (re-applied after every step),
        # a state_dict loaded right after attach, and an epoch whose weights are kept (rewind).
        self.masks: dict[str, torch.Tensor] | None = None
        self.initial_state: dict[str, torch.Tensor] | None = None
        self.snapshot_epoch: int | None = None
        self.snapshot: dict[str, torch.Tensor] | None = None

    # ---------------------------------------------------------------- training hooks

    def attach(self, model: nn.Module, steps_per_epoch: int, epochs: int) -> None:
        self.model, self.steps_per_epoch, self.epochs = model, steps_per_epoch, epochs
        self.modules = select_modules(model, self.include, self.exclude)

    def setup(self) -> None:
        """Called by the training loop after `attach` and before the optimizer is built."""
        if self.initial_state is not None:
            self.model.load_state_dict(self.initial_state)
        self.apply_masks()

    def masked_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The trainable tensors behind each prunable weight, which a mask zeroes."""
        return {f"{n}.weight" if n else "weight": [mod.weight] for n, mod in self.modules}

    @torch.no_grad()
    def apply_masks(self) -> None:
        if self.masks is None:
            return
        for name, tensors in self.masked_tensors().items():
            for t in tensors:
                t.mul_(self.masks[name])

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": list(self.model.parameters()), "weight_decay": weight_decay}]

    def penalty(self) -> torch.Tensor | None:
        return None

    def start_epoch(self, epoch: int) -> None:
        pass

    def before_step(self, lr: float) -> None:
        pass

    def end_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        """After evaluation, with the epoch's log row (train_acc, test_acc, ...)."""
        if self.snapshot_epoch is not None and epoch + 1 == self.snapshot_epoch:
            self.snapshot = copy.deepcopy(self.model.state_dict())

    def after_step(self) -> None:
        self.step_count += 1
        self.apply_masks()

    # ---------------------------------------------------------------- results

    def weights(self) -> dict[str, torch.Tensor]:
        """The effective prunable weights (detached), tied ones once."""
        out, seen = {}, set()
        for n, mod in self.modules:
            w = mod.weight
            key = id(mod._parameters.get("weight", mod))
            if key not in seen:
                seen.add(key)
                out[f"{n}.weight" if n else "weight"] = w.detach()
        return out

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """‖x‖₁, the fraction of exact zeros, and for pruning to 90/95/99%: the magnitude
        threshold (q90, ...) and the fraction of ‖x‖₁ that pruning removes (mass90, ...). Small
        values mean the model is already nearly that sparse."""
        weights = self.weights()
        flat = torch.cat([w.flatten().abs().float() for w in weights.values()])
        out = {"l1": float(flat.sum()), "zeros": float((flat == 0).float().mean())}
        srt = flat.sort().values
        for q in (90, 95, 99):
            out[f"q{q}"] = float(srt[max(1, min(len(srt), math.ceil(q / 100 * len(srt)))) - 1])
            out[f"mass{q}"] = pruned_mass(weights, q / 100)
        return out

    def export(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "snapshot": self.snapshot}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count, self.snapshot = state["step_count"], state.get("snapshot")


class L1(Method):
    """Dense with an explicit L1 penalty λ‖x‖₁ on the prunable weights (SPEC §3)."""

    name = "l1"
    defaults = {"lam": 1e-4}

    def penalty(self) -> torch.Tensor:
        return self.hp["lam"] * sum(mod.weight.abs().sum() for _, mod in self.modules)
